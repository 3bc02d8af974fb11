"""RegNetX / RegNetY (Radosavovic et al. 2020, "Designing Network Design Spaces") in torchvision's layout.

The per-stage settings come from the four RegNet parameters (``depth``, ``w_0``, ``w_a``, ``w_m``) plus the group
width and the SE ratio, by torchvision's ``BlockParams.from_init_params``: block widths ``w_0 + w_a * j``
quantised in log space to powers of ``w_m`` (then to multiples of 8), consecutive equal widths forming a stage
(every stage strided by 2), and each stage's width adjusted so its bottleneck width is a multiple of its group
width (torchvision's ``_adjust_widths_groups_compatibilty``). The arithmetic is float32, as torch's.

Names are torch's module paths: ``stem`` (3x3 stride-2 ``Conv2dNormActivation`` to ``stem_width``),
``trunk_output.block{i}`` (torchvision's ``AnyStage``) with blocks ``block{i}-{j}`` (a hyphen), each a
``ResBottleneckBlock``: ``proj`` (1x1 conv + BN, no activation) when the width or stride changes, ``f`` with
``a`` (1x1), ``b`` (3x3 grouped, strided), ``se`` (RegNetY only: squeeze to ``round(se_ratio * block input
width)``, ReLU, sigmoid) and ``c`` (1x1, no activation); ``relu(shortcut + f(x))``. Then global average pool and
``fc``. BatchNorm eps 1e-5, torch momentum 0.1. Init as torchvision: conv ``N(0, 2 / (k * k * out))``, BN (1, 0),
``fc`` ``N(0, 0.01)`` with zero bias; no zero-init of the last BN. One difference: the SE block's ``fc1`` / ``fc2``
kernels keep :class:`cnnjax.layers.SqueezeExcitation`'s torch-default uniform init, where torchvision re-draws them
from ``N(0, 2 / out)`` (their biases are torch-default on both sides).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import numpy as np

from cnnjax.errors import UsageError
from cnnjax.layers import (
    ConvNormAct,
    Dense,
    SqueezeExcitation,
    global_avg_pool,
    make_divisible,
)

Array = jax.Array


class StageParams(NamedTuple):
    """One stage (torchvision ``AnyStage``): ``depth`` blocks of output width ``width``, the first one strided
    by ``stride``; grouped 3x3 convs of ``group_width`` channels per group."""

    width: int
    stride: int
    depth: int
    group_width: int
    bottleneck_multiplier: float


def block_params(depth: int, w_0: int, w_a: float, w_m: float, group_width: int,
                 bottleneck_multiplier: float = 1.0) -> tuple[StageParams, ...]:
    """torchvision ``BlockParams.from_init_params``: the stages of a RegNet from its parameters (float32
    arithmetic as torch's). Raises :class:`UsageError` on the settings torchvision rejects."""
    if w_a < 0 or w_0 <= 0 or w_m <= 1 or w_0 % 8 != 0:
        raise UsageError(f"invalid RegNet settings: need w_a >= 0, w_0 > 0 and a multiple of 8, w_m > 1; "
                         f"got w_0={w_0}, w_a={w_a}, w_m={w_m}")
    quant = 8
    f32 = np.float32
    widths_cont = np.arange(depth, dtype=f32) * f32(w_a) + f32(w_0)
    capacity = np.round(np.log(widths_cont / f32(w_0)) / f32(np.log(w_m)))
    block_widths = (np.round(f32(w_0) * np.power(f32(w_m), capacity) / f32(quant)) * quant).astype(np.int64).tolist()

    stage_widths: list[int] = []
    stage_depths: list[int] = []
    for width in block_widths:
        if stage_widths and stage_widths[-1] == width:
            stage_depths[-1] += 1
        else:
            stage_widths.append(width)
            stage_depths.append(1)

    stages = []
    for width, num_blocks in zip(stage_widths, stage_depths, strict=True):
        bottleneck = int(width * bottleneck_multiplier)
        groups_width = min(group_width, bottleneck)
        adjusted = int(make_divisible(bottleneck, groups_width) / bottleneck_multiplier)
        stages.append(StageParams(adjusted, 2, num_blocks, groups_width, bottleneck_multiplier))
    return tuple(stages)


class BottleneckTransform(nn.Module):
    """torchvision ``BottleneckTransform`` (``f``): ``a`` 1x1, ``b`` 3x3 grouped (``stride``), ``se`` when
    ``se_ratio``, ``c`` 1x1 linear. ``[N, H, W, C_in] -> [N, H', W', width_out]``."""

    width_out: int
    stride: int
    group_width: int
    bottleneck_multiplier: float = 1.0
    se_ratio: float | None = None
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        width_in = x.shape[-1]
        w_b = int(round(self.width_out * self.bottleneck_multiplier))
        conv = functools.partial(ConvNormAct, axis_name=self.axis_name)
        x = conv(w_b, 1, name="a")(x, train)
        x = conv(w_b, 3, self.stride, groups=w_b // self.group_width, name="b")(x, train)
        if self.se_ratio:
            x = SqueezeExcitation(int(round(self.se_ratio * width_in)), name="se")(x)
        return conv(self.width_out, 1, activation=None, name="c")(x, train)


class ResBottleneckBlock(nn.Module):
    """torchvision ``ResBottleneckBlock``: ``relu(shortcut + f(x))``, the shortcut a 1x1 strided conv + BN
    (``proj``) when the width or the stride changes, else the identity."""

    width_out: int
    stride: int
    group_width: int
    bottleneck_multiplier: float = 1.0
    se_ratio: float | None = None
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        shortcut = x
        if x.shape[-1] != self.width_out or self.stride != 1:
            shortcut = ConvNormAct(self.width_out, 1, self.stride, activation=None, axis_name=self.axis_name,
                                   name="proj")(x, train)
        y = BottleneckTransform(self.width_out, self.stride, self.group_width, self.bottleneck_multiplier,
                                self.se_ratio, self.axis_name, name="f")(x, train)
        return nn.relu(shortcut + y)


class AnyStage(nn.Module):
    """torchvision ``AnyStage``: ``stage.depth`` blocks named ``block{index}-{j}``, the first strided."""

    stage: StageParams
    index: int
    se_ratio: float | None = None
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        for j in range(self.stage.depth):
            x = ResBottleneckBlock(self.stage.width, self.stage.stride if j == 0 else 1, self.stage.group_width,
                                   self.stage.bottleneck_multiplier, self.se_ratio, self.axis_name,
                                   name=f"block{self.index}-{j}")(x, train)
        return x


class RegNet(nn.Module):
    """``[N, H, W, 3] -> [N, num_classes]`` (any H, W >= 1 as torchvision; 224 for ImageNet).

    ``depth``, ``w_0``, ``w_a``, ``w_m``, ``group_width`` define the stages (:func:`block_params`);
    ``se_ratio`` (RegNetY: 0.25) adds squeeze-and-excitation to every block; torchvision's
    ``bottleneck_multiplier`` and ``stem_width`` knobs are fields too.
    """

    depth: int
    w_0: int
    w_a: float
    w_m: float
    group_width: int
    se_ratio: float | None = None
    bottleneck_multiplier: float = 1.0
    stem_width: int = 32
    num_classes: int = 1000
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        stages = block_params(self.depth, self.w_0, self.w_a, self.w_m, self.group_width,
                              self.bottleneck_multiplier)
        x = ConvNormAct(self.stem_width, 3, 2, axis_name=self.axis_name, name="stem")(x, train)
        for i, stage in enumerate(stages, start=1):
            x = AnyStage(stage, i, self.se_ratio, self.axis_name, name=f"trunk_output.block{i}")(x, train)
        x = global_avg_pool(x)
        return Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01), bias_init=nn.initializers.zeros,
                     name="fc")(x)


# name -> (depth, w_0, w_a, w_m, group_width, se_ratio), torchvision's builders.
CONFIGS: dict[str, tuple[int, int, float, float, int, float | None]] = {
    "regnet_y_400mf": (16, 48, 27.89, 2.09, 8, 0.25),
    "regnet_y_800mf": (14, 56, 38.84, 2.4, 16, 0.25),
    "regnet_y_1_6gf": (27, 48, 20.71, 2.65, 24, 0.25),
    "regnet_y_3_2gf": (21, 80, 42.63, 2.66, 24, 0.25),
    "regnet_y_8gf": (17, 192, 76.82, 2.19, 56, 0.25),
    "regnet_y_16gf": (18, 200, 106.23, 2.48, 112, 0.25),
    "regnet_y_32gf": (20, 232, 115.89, 2.53, 232, 0.25),
    "regnet_y_128gf": (27, 456, 160.83, 2.52, 264, 0.25),
    "regnet_x_400mf": (22, 24, 24.48, 2.54, 16, None),
    "regnet_x_800mf": (16, 56, 35.73, 2.28, 16, None),
    "regnet_x_1_6gf": (18, 80, 34.01, 2.25, 24, None),
    "regnet_x_3_2gf": (25, 88, 26.31, 2.25, 48, None),
    "regnet_x_8gf": (23, 80, 49.56, 2.88, 120, None),
    "regnet_x_16gf": (22, 216, 55.59, 2.1, 128, None),
    "regnet_x_32gf": (23, 320, 69.86, 2.0, 168, None),
}

MODELS = {
    name: (functools.partial(RegNet, depth, w_0, w_a, w_m, group_width, se_ratio), 1000, (224, 224, 3))
    for name, (depth, w_0, w_a, w_m, group_width, se_ratio) in CONFIGS.items()
}
# torchvision's IMAGENET1K_V1 files; regnet_y_128gf has only SWAG weights (IMAGENET1K_SWAG_E2E_V1, 384 px).
WEIGHTS = {
    "regnet_y_400mf": "regnet_y_400mf-c65dace8.pth",
    "regnet_y_800mf": "regnet_y_800mf-1b27b58c.pth",
    "regnet_y_1_6gf": "regnet_y_1_6gf-b11a554e.pth",
    "regnet_y_3_2gf": "regnet_y_3_2gf-b5a9779c.pth",
    "regnet_y_8gf": "regnet_y_8gf-d0d0e4a8.pth",
    "regnet_y_16gf": "regnet_y_16gf-9e6ed7dd.pth",
    "regnet_y_32gf": "regnet_y_32gf-4dee3f7a.pth",
    "regnet_x_400mf": "regnet_x_400mf-adf1edd5.pth",
    "regnet_x_800mf": "regnet_x_800mf-ad17e45c.pth",
    "regnet_x_1_6gf": "regnet_x_1_6gf-e3633e7f.pth",
    "regnet_x_3_2gf": "regnet_x_3_2gf-f342aeae.pth",
    "regnet_x_8gf": "regnet_x_8gf-03ceed89.pth",
    "regnet_x_16gf": "regnet_x_16gf-2007eb11.pth",
    "regnet_x_32gf": "regnet_x_32gf-9d47f8d0.pth",
}
