"""EfficientNet B0-B7 (Tan & Le 2019) and EfficientNetV2 S/M/L (Tan & Le 2021) in torchvision's layout.

``[N, H, W, 3] -> [N, num_classes]``, any ``H, W >= 1`` (every conv is padded; total stride 32).
Flax module paths are torchvision's module paths (``/`` for ``.``):

* ``features.0``: stem ``Conv2dNormActivation`` (3x3 stride 2, SiLU), children ``0`` (conv) / ``1`` (BN);
* ``features.{s}.{j}``: block ``j`` of stage ``s`` (``s = 1..len(stages)``), an :class:`MBConv` or
  :class:`FusedMBConv` whose layers are ``block.0``, ``block.1``, ... exactly as torchvision's ``block``
  Sequential (``MBConv``: [expand 1x1 SiLU,] depthwise kxk SiLU, squeeze-excitation ``fc1`` / ``fc2``,
  project 1x1 linear; ``FusedMBConv``: expand kxk SiLU + project 1x1 linear, or one kxk SiLU conv at ratio 1);
* ``features.{len(stages) + 1}``: last 1x1 ``Conv2dNormActivation`` (SiLU) to ``4 x`` the last stage's
  channels (V1) or 1280 (V2);
* global average pool, ``classifier.0`` dropout, ``classifier.1`` linear.

A block adds its input back (after stochastic depth, row mode) iff stride 1 and input == output channels;
block ``b`` of ``B`` (counted over all stages from 0) drops with ``stochastic_depth_prob * b / B``.
BatchNorm: torch's defaults (eps 1e-5, momentum 0.1) for B0-B4; eps 1e-3 and momentum 0.01 for B5-B7
(their weights come from TensorFlow); eps 1e-3, momentum 0.1 for V2. Init as torchvision: convs
``kaiming_normal(fan_out)`` with zero bias (squeeze-excitation's too), linear ``U(-1/sqrt(out), 1/sqrt(out))``
with zero bias.
``WEIGHTS`` are torchvision's ``IMAGENET1K_V1`` files; note that V2-L's expect inputs normalised with
mean = std = 0.5 rather than ImageNet's statistics.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.errors import UsageError
from cnnjax.layers import (
    ConvNormAct,
    Dense,
    Dropout,
    Initializer,
    SqueezeExcitation,
    StochasticDepth,
    global_avg_pool,
    make_divisible,
    silu,
)

Array = jax.Array


@dataclass(frozen=True)
class Stage:
    """One row of the EfficientNet / V2 stage table (torchvision's ``MBConvConfig`` / ``FusedMBConvConfig``),
    channels and depth already scaled: ``num_layers`` blocks, the first with ``stride`` and ``input_channels``
    -> ``out_channels``, the rest stride 1 ``out_channels`` -> ``out_channels``."""

    fused: bool
    expand_ratio: float
    kernel: int
    stride: int
    input_channels: int
    out_channels: int
    num_layers: int


# (expand ratio, kernel, stride, input channels, output channels, layers) of EfficientNet-B0 (paper Table 1).
_V1_BASE = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
            (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))


def v1_stages(width_mult: float, depth_mult: float) -> tuple[Stage, ...]:
    """EfficientNet-B0's stages scaled as torchvision: channels ``make_divisible(c * width_mult, 8)``, layers
    ``ceil(n * depth_mult)``."""
    return tuple(Stage(False, e, k, s, make_divisible(cin * width_mult), make_divisible(cout * width_mult),
                       int(math.ceil(n * depth_mult)))
                 for e, k, s, cin, cout, n in _V1_BASE)


# (fused, expand ratio, kernel, stride, input channels, output channels, layers) (EfficientNetV2 paper Table 4).
V2_STAGES: dict[str, tuple[Stage, ...]] = {
    "efficientnet_v2_s": tuple(Stage(*row) for row in (
        (True, 1, 3, 1, 24, 24, 2), (True, 4, 3, 2, 24, 48, 4), (True, 4, 3, 2, 48, 64, 4),
        (False, 4, 3, 2, 64, 128, 6), (False, 6, 3, 1, 128, 160, 9), (False, 6, 3, 2, 160, 256, 15))),
    "efficientnet_v2_m": tuple(Stage(*row) for row in (
        (True, 1, 3, 1, 24, 24, 3), (True, 4, 3, 2, 24, 48, 5), (True, 4, 3, 2, 48, 80, 5),
        (False, 4, 3, 2, 80, 160, 7), (False, 6, 3, 1, 160, 176, 14), (False, 6, 3, 2, 176, 304, 18),
        (False, 6, 3, 1, 304, 512, 5))),
    "efficientnet_v2_l": tuple(Stage(*row) for row in (
        (True, 1, 3, 1, 32, 32, 4), (True, 4, 3, 2, 32, 64, 7), (True, 4, 3, 2, 64, 96, 7),
        (False, 4, 3, 2, 96, 192, 10), (False, 6, 3, 1, 192, 224, 19), (False, 6, 3, 2, 224, 384, 25),
        (False, 6, 3, 1, 384, 640, 7))),
}


def stochastic_depth_rates(stages: Sequence[Stage], prob: float) -> list[float]:
    """Per-block drop probability, in block order: ``prob * b / B`` for block ``b`` of ``B`` (torchvision)."""
    total = sum(stage.num_layers for stage in stages)
    return [prob * float(b) / total for b in range(total)]


class MBConv(nn.Module):
    """torchvision ``MBConv``: ``[N, H, W, C_in] -> [N, H / stride, W / stride, out_channels]``.

    Expansion to ``make_divisible(C_in * expand_ratio, 8)`` channels (1x1 conv, skipped when that equals
    ``C_in``), depthwise ``kernel`` x ``kernel`` conv with ``stride``, squeeze-excitation to
    ``max(1, C_in // 4)`` channels (SiLU, sigmoid gate), 1x1 linear projection; residual with stochastic depth
    ``stochastic_depth_rate`` iff ``stride == 1`` and ``C_in == out_channels``.
    """

    expand_ratio: float
    kernel: int
    stride: int
    out_channels: int
    stochastic_depth_rate: float = 0.0
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        cin = x.shape[-1]
        norm = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, axis_name=self.axis_name)
        expanded = make_divisible(cin * self.expand_ratio)
        y, i = x, 0
        if expanded != cin:
            y = ConvNormAct(expanded, 1, activation=silu, **norm, name=f"block.{i}")(y, train)
            i += 1
        y = ConvNormAct(expanded, self.kernel, self.stride, groups=expanded, activation=silu, **norm,
                        name=f"block.{i}")(y, train)
        y = SqueezeExcitation(max(1, cin // 4), activation=silu, name=f"block.{i + 1}")(y)
        y = ConvNormAct(self.out_channels, 1, activation=None, **norm, name=f"block.{i + 2}")(y, train)
        if self.stride == 1 and cin == self.out_channels:
            y = StochasticDepth(self.stochastic_depth_rate)(y, train) + x
        return y


class FusedMBConv(nn.Module):
    """torchvision ``FusedMBConv`` (EfficientNetV2): ``[N, H, W, C_in] -> [N, H / stride, W / stride,
    out_channels]``.

    Expansion to ``make_divisible(C_in * expand_ratio, 8)`` channels by one ``kernel`` x ``kernel`` conv with
    ``stride`` (SiLU), then a 1x1 linear projection; at ratio 1 a single ``kernel`` x ``kernel`` SiLU conv to
    ``out_channels``. Residual with stochastic depth iff ``stride == 1`` and ``C_in == out_channels``.
    """

    expand_ratio: float
    kernel: int
    stride: int
    out_channels: int
    stochastic_depth_rate: float = 0.0
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        cin = x.shape[-1]
        norm = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, axis_name=self.axis_name)
        expanded = make_divisible(cin * self.expand_ratio)
        if expanded != cin:
            y = ConvNormAct(expanded, self.kernel, self.stride, activation=silu, **norm, name="block.0")(x, train)
            y = ConvNormAct(self.out_channels, 1, activation=None, **norm, name="block.1")(y, train)
        else:
            y = ConvNormAct(self.out_channels, self.kernel, self.stride, activation=silu, **norm,
                            name="block.0")(x, train)
        if self.stride == 1 and cin == self.out_channels:
            y = StochasticDepth(self.stochastic_depth_rate)(y, train) + x
        return y


class EfficientNet(nn.Module):
    """torchvision ``EfficientNet`` (V1 and V2): ``[N, H, W, 3] -> [N, num_classes]``.

    ``stages``: the scaled stage table (:func:`v1_stages`, :data:`V2_STAGES`); ``last_channel``: width of the
    last 1x1 conv (None: 4x the last stage's output channels, as V1). ``dropout_rate`` before the classifier,
    ``stochastic_depth_prob`` the drop probability reached by the last block. ``bn_momentum`` is Flax's
    convention (0.9 == torch 0.1).
    """

    stages: Sequence[Stage]
    dropout_rate: float
    last_channel: int | None = None
    stochastic_depth_prob: float = 0.2
    num_classes: int = 1000
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if not self.stages:
            raise UsageError("EfficientNet needs at least one stage")
        if not 0.0 <= self.stochastic_depth_prob <= 1.0:
            raise UsageError(f"stochastic_depth_prob must be in [0, 1], got {self.stochastic_depth_prob}")
        norm = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, axis_name=self.axis_name)
        x = ConvNormAct(self.stages[0].input_channels, 3, 2, activation=silu, **norm, name="features.0")(x, train)
        rates = iter(stochastic_depth_rates(self.stages, self.stochastic_depth_prob))
        for s, stage in enumerate(self.stages, start=1):
            block = FusedMBConv if stage.fused else MBConv
            for j in range(stage.num_layers):
                x = block(stage.expand_ratio, stage.kernel, stage.stride if j == 0 else 1, stage.out_channels,
                          next(rates), **norm, name=f"features.{s}.{j}")(x, train)
        last = self.last_channel if self.last_channel is not None else 4 * self.stages[-1].out_channels
        x = ConvNormAct(last, 1, activation=silu, **norm, name=f"features.{len(self.stages) + 1}")(x, train)
        x = Dropout(self.dropout_rate)(global_avg_pool(x), train)
        init_range = 1.0 / math.sqrt(self.num_classes)
        return Dense(self.num_classes, kernel_init=_uniform(init_range), bias_init=nn.initializers.zeros,
                     name="classifier.1")(x)


def _uniform(bound: float) -> Initializer:
    """``U(-bound, bound)`` (torchvision's classifier init)."""

    def init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# name -> (width multiplier, depth multiplier, dropout, input size) of B0-B7 (torchvision's constructors and
# eval crop sizes).
_V1 = {
    "efficientnet_b0": (1.0, 1.0, 0.2, 224),
    "efficientnet_b1": (1.0, 1.1, 0.2, 240),
    "efficientnet_b2": (1.1, 1.2, 0.3, 288),
    "efficientnet_b3": (1.2, 1.4, 0.3, 300),
    "efficientnet_b4": (1.4, 1.8, 0.4, 380),
    "efficientnet_b5": (1.6, 2.2, 0.4, 456),
    "efficientnet_b6": (1.8, 2.6, 0.5, 528),
    "efficientnet_b7": (2.0, 3.1, 0.5, 600),
}
# B5-B7 use BatchNorm2d(eps=1e-3, momentum=0.01) (Flax momentum 0.99); B0-B4 torch's defaults.
_V1_BN = {name: (0.99, 1e-3) if name in ("efficientnet_b5", "efficientnet_b6", "efficientnet_b7") else (0.9, 1e-5)
          for name in _V1}
# name -> (dropout, input size) of V2; BatchNorm2d(eps=1e-3), momentum 0.1; last conv 1280 channels.
_V2 = {"efficientnet_v2_s": (0.2, 384), "efficientnet_v2_m": (0.3, 480), "efficientnet_v2_l": (0.4, 480)}

MODELS = {
    **{name: (functools.partial(EfficientNet, stages=v1_stages(width, depth), dropout_rate=dropout,
                                bn_momentum=_V1_BN[name][0], bn_epsilon=_V1_BN[name][1]), 1000, (size, size, 3))
       for name, (width, depth, dropout, size) in _V1.items()},
    **{name: (functools.partial(EfficientNet, stages=V2_STAGES[name], dropout_rate=dropout, last_channel=1280,
                                bn_epsilon=1e-3), 1000,
              (size, size, 3))
       for name, (dropout, size) in _V2.items()},
}
WEIGHTS = {
    "efficientnet_b0": "efficientnet_b0_rwightman-3dd342df.pth",
    "efficientnet_b1": "efficientnet_b1_rwightman-533bc792.pth",
    "efficientnet_b2": "efficientnet_b2_rwightman-bcdf34b7.pth",
    "efficientnet_b3": "efficientnet_b3_rwightman-cf984f9c.pth",
    "efficientnet_b4": "efficientnet_b4_rwightman-7eb33cd5.pth",
    "efficientnet_b5": "efficientnet_b5_lukemelas-b6417697.pth",
    "efficientnet_b6": "efficientnet_b6_lukemelas-c76e70fd.pth",
    "efficientnet_b7": "efficientnet_b7_lukemelas-dcc49843.pth",
    "efficientnet_v2_s": "efficientnet_v2_s-dd5fe13b.pth",
    "efficientnet_v2_m": "efficientnet_v2_m-dc08266a.pth",
    "efficientnet_v2_l": "efficientnet_v2_l-59c71312.pth",
}
