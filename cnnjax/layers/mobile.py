"""Blocks of the post-2015 torchvision families, NHWC with PyTorch semantics.

Activations (``hardswish``, ``hardsigmoid``, ``silu``), torchvision's ``_make_divisible`` channel rounding,
squeeze-and-excitation, stochastic depth, LayerNorm over channels, channel shuffle and
``Conv2dNormActivation``. Child module names follow torchvision, so a state dict maps 1:1 (see
:mod:`cnnjax.port`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.errors import UsageError
from cnnjax.layers.core import (
    BatchNorm,
    Conv,
    IntPair,
    Padding,
    check_nhwc,
    kaiming_normal_fan_out,
)

Array = jax.Array
Activation = Callable[[Array], Array]


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision's ``_make_divisible``: ``value`` rounded to the nearest multiple of ``divisor`` (at least
    ``min_value``, default ``divisor``), raised by one ``divisor`` when rounding down lost more than 10%."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def hardsigmoid(x: Array) -> Array:
    """torch ``Hardsigmoid``: ``relu6(x + 3) / 6``."""
    return jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


def hardswish(x: Array) -> Array:
    """torch ``Hardswish``: ``x * relu6(x + 3) / 6``."""
    return x * hardsigmoid(x)


def silu(x: Array) -> Array:
    """torch ``SiLU``: ``x * sigmoid(x)``."""
    return x * jax.nn.sigmoid(x)


def relu6(x: Array) -> Array:
    """torch ``ReLU6``: ``min(max(x, 0), 6)``."""
    return jnp.clip(x, 0.0, 6.0)


class SqueezeExcitation(nn.Module):
    """``torchvision.ops.SqueezeExcitation``: ``x * scale_activation(fc2(activation(fc1(mean_hw(x)))))``.

    ``[N, H, W, C] -> [N, H, W, C]``; ``fc1`` / ``fc2`` are 1x1 convolutions with bias (``C -> squeeze_channels
    -> C``), initialised kaiming-normal (fan-out) with zero bias. MobileNetV3 uses
    ``scale_activation=hardsigmoid``; EfficientNet ``activation=silu``; RegNet the defaults (ReLU, sigmoid).
    """

    squeeze_channels: int
    activation: Activation = nn.relu
    scale_activation: Activation = jax.nn.sigmoid
    # torchvision's MobileNetV3, EfficientNet and RegNet all re-initialise these convs so.
    kernel_init: Any = kaiming_normal_fan_out
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Array) -> Array:
        check_nhwc(x, "SqueezeExcitation")
        conv = functools.partial(Conv, kernel_size=1, kernel_init=self.kernel_init, bias_init=self.bias_init)
        scale = jnp.mean(x, axis=(1, 2), keepdims=True)
        scale = self.activation(conv(self.squeeze_channels, name="fc1")(scale))
        scale = self.scale_activation(conv(x.shape[-1], name="fc2")(scale))
        return x * scale


class StochasticDepth(nn.Module):
    """``torchvision.ops.StochasticDepth(p, mode='row')``: in training, each sample's input is zeroed with
    probability ``rate`` and the survivors scaled by ``1 / (1 - rate)``; identity in eval mode or at
    ``rate == 0``. Draws one Bernoulli per sample from the ``'dropout'`` rng stream."""

    rate: float

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if not 0.0 <= self.rate <= 1.0:
            raise UsageError(f"stochastic depth rate must be in [0, 1], got {self.rate}")
        if not train or self.rate == 0.0:
            return x
        survival = 1.0 - self.rate
        keep = jax.random.bernoulli(self.make_rng("dropout"), survival, (x.shape[0],) + (1,) * (x.ndim - 1))
        if survival > 0.0:
            return jnp.where(keep, x / survival, jnp.zeros_like(x))
        return jnp.zeros_like(x)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel (last) axis of ``[..., C]``: torch ``nn.LayerNorm(C)`` on channels-last data,
    and ConvNeXt's ``LayerNorm2d`` (which permutes NCHW to NHWC). Biased variance, ``epsilon`` inside the root;
    statistics in at least float32. Params ``scale [C]`` (torch ``weight``) and ``bias [C]``."""

    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        centred = xf - mean
        var = jnp.mean(centred * centred, axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(var + self.epsilon) * scale.astype(xf.dtype) + bias.astype(xf.dtype)
        return y.astype(x.dtype)


def channel_shuffle(x: Array, groups: int) -> Array:
    """ShuffleNet's channel shuffle on ``[N, H, W, C]``: channel ``g * (C / groups) + i`` moves to
    ``i * groups + g``, as torch's ``view(N, groups, C / groups, H, W).transpose(1, 2)`` on NCHW."""
    check_nhwc(x, "channel_shuffle")
    n, h, w, c = x.shape
    if c % groups:
        raise UsageError(f"channel_shuffle: {c} channels do not split into {groups} groups")
    return x.reshape(n, h, w, groups, c // groups).swapaxes(3, 4).reshape(n, h, w, c)


class ConvNormAct(nn.Module):
    """torchvision ``Conv2dNormActivation``: conv (no bias) ``"0"``, BatchNorm ``"1"``, then ``activation``.

    ``[N, H, W, C] -> [N, H', W', features]``; ``padding`` defaults to ``(k - 1) // 2 * dilation`` as torchvision.
    ``bn_momentum`` is Flax's convention (0.9 is torch's 0.1). ``activation=None`` leaves the output linear.
    """

    features: int
    kernel_size: int = 3
    stride: IntPair = 1
    groups: int = 1
    padding: Padding | None = None
    dilation: int = 1
    activation: Activation | None = nn.relu
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    axis_name: str | None = None
    kernel_init: Any = kaiming_normal_fan_out

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        padding = (self.kernel_size - 1) // 2 * self.dilation if self.padding is None else self.padding
        x = Conv(self.features, self.kernel_size, self.stride, padding, self.dilation, self.groups, use_bias=False,
                 kernel_init=self.kernel_init, name="0")(x)
        x = BatchNorm(momentum=self.bn_momentum, epsilon=self.bn_epsilon, axis_name=self.axis_name, name="1")(x, train)
        return x if self.activation is None else self.activation(x)
