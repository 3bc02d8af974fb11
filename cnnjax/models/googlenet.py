"""GoogLeNet (Inception v1, Szegedy et al. 2014) in torchvision's layout (``torchvision.models.googlenet``).

``[N, H, W, 3] -> [N, num_classes]``; H, W >= 15 as torchvision (from 15 to 30 a ceil-mode max-pool's window is
wider than its input and gives one output), 224 for ImageNet. Flax module paths are torch's with '/' for '.':
``conv1`` .. ``conv3`` (:class:`BasicConv2d`:
``conv`` + ``bn``), ceil-mode max-pools, ``inception3a`` .. ``inception5b`` (:class:`Inception`: ``branch1``,
``branch2.0/1``, ``branch3.0/1``, ``branch4.1``), optional auxiliary heads ``aux1`` / ``aux2``
(:class:`InceptionAux`: ``conv``, ``fc1``, ``fc2``), global average pool, dropout, ``fc``. As torchvision,
``branch3`` is a 3x3 conv (the paper has 5x5; the pretrained weights are for 3x3).

``transform_input=True`` maps ImageNet-normalised inputs to the [-1, 1] scaling the ported TensorFlow weights
were trained on (torchvision sets it for ``IMAGENET1K_V1``; it is False when built without weights).

Auxiliary heads (``aux_logits=True``, torchvision's default is True, here False): their parameters always exist;
in train mode the model returns :class:`GoogLeNetOutputs` ``(logits, aux_logits2, aux_logits1)`` (torchvision's
namedtuple and order), in eval mode the logits alone. torchvision's ``IMAGENET1K_V1`` file has no trained aux heads.

Init as torchvision: conv / linear weights N(0, 0.01^2) (torchvision's ``trunc_normal_(std=0.01, a=-2, b=2)``
truncates at 200 standard deviations: a plain normal), linear biases torch's default, BatchNorm 1 / 0.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.errors import UsageError
from cnnjax.layers import (
    BatchNorm,
    Conv,
    Dense,
    Dropout,
    IntPair,
    Padding,
    adaptive_avg_pool,
    flatten_nchw,
    max_pool,
)

Array = jax.Array

# torchvision's ``_transform_input``: channel c becomes x * _SCALE[c] + _SHIFT[c].
_SCALE = (0.229 / 0.5, 0.224 / 0.5, 0.225 / 0.5)
_SHIFT = ((0.485 - 0.5) / 0.5, (0.456 - 0.5) / 0.5, (0.406 - 0.5) / 0.5)

# Smallest input side (torchvision's): below it a ceil-mode max-pool would see an empty map.
MIN_SIZE = 15


class GoogLeNetOutputs(NamedTuple):
    """Train-mode output with auxiliary heads, as torchvision's ``GoogLeNetOutputs`` (same fields, same order)."""

    logits: Array
    aux_logits2: Array
    aux_logits1: Array


def transform_input(x: Array) -> Array:
    """torchvision's ``transform_input`` of GoogLeNet / Inception v3 on ``[N, H, W, 3]``: undo ImageNet's
    mean / std normalisation and rescale to [-1, 1] (``x * std / 0.5 + (mean - 0.5) / 0.5`` per channel)."""
    if x.shape[-1] != 3:
        raise UsageError(f"transform_input needs 3 input channels, got {x.shape[-1]}")
    return x * jnp.asarray(_SCALE, x.dtype) + jnp.asarray(_SHIFT, x.dtype)


def normal_init(stddev: float):
    """N(0, stddev^2): torchvision's ``trunc_normal_(std=stddev, a=-2, b=2)`` for stddev <= 0.1 (the bounds lie
    at >= 20 standard deviations)."""
    return nn.initializers.normal(stddev)


class BasicConv2d(nn.Module):
    """torchvision's ``BasicConv2d`` of GoogLeNet / Inception v3: conv (no bias) ``conv``, BatchNorm ``bn``
    (eps 0.001, torch momentum 0.1), ReLU. ``stddev`` is the conv weights' init scale."""

    features: int
    kernel_size: IntPair = 1
    stride: IntPair = 1
    padding: Padding = 0
    stddev: float = 0.01
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        x = Conv(self.features, self.kernel_size, self.stride, self.padding, use_bias=False,
                 kernel_init=normal_init(self.stddev), name="conv")(x)
        return nn.relu(BatchNorm(epsilon=1e-3, axis_name=self.axis_name, name="bn")(x, train))


class Inception(nn.Module):
    """GoogLeNet's Inception module: ``[N, H, W, C] -> [N, H, W, ch1x1 + ch3x3 + ch5x5 + pool_proj]``.

    Branches (concatenated in this order): 1x1; 1x1 -> 3x3; 1x1 -> 3x3 (torchvision's "5x5"); 3x3 s1 max-pool ->
    1x1.
    """

    ch1x1: int
    ch3x3red: int
    ch3x3: int
    ch5x5red: int
    ch5x5: int
    pool_proj: int
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        def conv(features: int, kernel: int, name: str) -> BasicConv2d:
            return BasicConv2d(features, kernel, 1, kernel // 2, axis_name=self.axis_name, name=name)

        b1 = conv(self.ch1x1, 1, "branch1")(x, train)
        b2 = conv(self.ch3x3, 3, "branch2.1")(conv(self.ch3x3red, 1, "branch2.0")(x, train), train)
        b3 = conv(self.ch5x5, 3, "branch3.1")(conv(self.ch5x5red, 1, "branch3.0")(x, train), train)
        b4 = conv(self.pool_proj, 1, "branch4.1")(max_pool(x, 3, 1, 1, ceil_mode=True), train)
        return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class InceptionAux(nn.Module):
    """GoogLeNet's auxiliary classifier: adaptive average pool to 4x4, 1x1 BasicConv2d to 128 (``conv``), flatten
    (torch's order), ``fc1`` (2048 -> 1024) + ReLU, dropout ``dropout_rate``, ``fc2``."""

    num_classes: int
    dropout_rate: float = 0.7
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        x = BasicConv2d(128, 1, axis_name=self.axis_name, name="conv")(adaptive_avg_pool(x, 4), train)
        x = nn.relu(Dense(1024, kernel_init=normal_init(0.01), name="fc1")(flatten_nchw(x)))
        x = Dropout(self.dropout_rate, name="dropout")(x, train)
        return Dense(self.num_classes, kernel_init=normal_init(0.01), name="fc2")(x)


# name -> (ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj), in forward order; None marks a max-pool.
_BLOCKS = (
    ("inception3a", (64, 96, 128, 16, 32, 32)),
    ("inception3b", (128, 128, 192, 32, 96, 64)),
    ("maxpool3", None),
    ("inception4a", (192, 96, 208, 16, 48, 64)),
    ("inception4b", (160, 112, 224, 24, 64, 64)),
    ("inception4c", (128, 128, 256, 24, 64, 64)),
    ("inception4d", (112, 144, 288, 32, 64, 64)),
    ("inception4e", (256, 160, 320, 32, 128, 128)),
    ("maxpool4", None),
    ("inception5a", (256, 160, 320, 32, 128, 128)),
    ("inception5b", (384, 192, 384, 48, 128, 128)),
)


class GoogLeNet(nn.Module):
    """``[N, H, W, 3] -> [N, num_classes]`` logits, or :class:`GoogLeNetOutputs` in train mode with
    ``aux_logits``. ``dropout_rate`` before ``fc`` (torchvision's ``dropout``), ``dropout_aux_rate`` in the
    auxiliary heads (``dropout_aux``)."""

    num_classes: int = 1000
    aux_logits: bool = False
    transform_input: bool = False
    dropout_rate: float = 0.2
    dropout_aux_rate: float = 0.7
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array | GoogLeNetOutputs:
        if x.ndim != 4:
            raise UsageError(f"GoogLeNet expects an [N, H, W, C] array, got shape {tuple(x.shape)}")
        if min(x.shape[1:3]) < MIN_SIZE:
            raise UsageError(f"GoogLeNet needs inputs of at least {MIN_SIZE}x{MIN_SIZE}, got {tuple(x.shape[1:3])}")
        if self.transform_input:
            x = transform_input(x)

        def conv(features: int, kernel: int, stride: int, name: str) -> BasicConv2d:
            return BasicConv2d(features, kernel, stride, kernel // 2, axis_name=self.axis_name, name=name)

        def aux(name: str) -> InceptionAux:
            return InceptionAux(self.num_classes, self.dropout_aux_rate, self.axis_name, name=name)

        # The aux heads run in train mode, and at init so that their parameters exist in either mode.
        run_aux = self.aux_logits and (train or self.is_initializing())
        x = conv(64, 7, 2, "conv1")(x, train)
        x = max_pool(x, 3, 2, ceil_mode=True)
        x = conv(64, 1, 1, "conv2")(x, train)
        x = conv(192, 3, 1, "conv3")(x, train)
        x = max_pool(x, 3, 2, ceil_mode=True)
        aux1 = aux2 = None
        for name, widths in _BLOCKS:
            if widths is None:
                x = max_pool(x, 3 if name == "maxpool3" else 2, 2, ceil_mode=True)
                continue
            if name == "inception4b" and run_aux:
                aux1 = aux("aux1")(x, train)
            if name == "inception4e" and run_aux:
                aux2 = aux("aux2")(x, train)
            x = Inception(*widths, axis_name=self.axis_name, name=name)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        x = Dropout(self.dropout_rate, name="dropout")(x, train)
        logits = Dense(self.num_classes, kernel_init=normal_init(0.01), name="fc")(x)
        if self.aux_logits and train:
            return GoogLeNetOutputs(logits, aux2, aux1)
        return logits


MODELS = {"googlenet": (GoogLeNet, 1000, (224, 224, 3))}
WEIGHTS = {"googlenet": "googlenet-1378be20.pth"}
