"""MobileNetV2 (Sandler et al. 2018) and MobileNetV3 small / large (Howard et al. 2019) in torchvision's layout.

Flax module paths are torchvision's module paths (``features.0/0`` is ``features.0.0``, ``features.1/conv.0.0``
is ``features.1.conv.0.0``, ``classifier.1`` the last Linear), so torchvision state dicts port 1:1
(:mod:`cnnjax.port`). Any input of at least 1x1 works (global average pool before the head); 224x224 for
ImageNet.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax

from cnnjax.errors import UsageError
from cnnjax.layers import ConvNormAct, Dense, Dropout, global_avg_pool, hardswish, make_divisible, relu6
from cnnjax.layers.inverted_residual import InvertedResidual, InvertedResidualV3

Array = jax.Array

# MobileNetV2 stages: (expand ratio t, output channels c, repeats n, first stride s).
V2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
              (6, 320, 1, 1))

# torchvision Linear init of both MobileNets: N(0, 0.01) weights, zero bias.
_linear_init = {"kernel_init": nn.initializers.normal(0.01), "bias_init": nn.initializers.zeros}


class MobileNetV2(nn.Module):
    """``[N, H, W, 3] -> [N, num_classes]``: torchvision ``MobileNetV2``.

    ``features.0`` 3x3 stride-2 ``ConvNormAct`` (ReLU6) with ``make_divisible(32 * width_mult, round_nearest)``
    channels, ``features.1..17`` :class:`~cnnjax.layers.inverted_residual.InvertedResidual` blocks per
    :data:`V2_SETTING` (channels ``make_divisible(c * width_mult, round_nearest)``), ``features.18`` 1x1
    ``ConvNormAct`` to ``make_divisible(1280 * max(1, width_mult), round_nearest)``, global average pool,
    ``classifier.0`` Dropout(``dropout_rate``), ``classifier.1`` Linear. BatchNorm: torch defaults.
    """

    width_mult: float = 1.0
    round_nearest: int = 8
    num_classes: int = 1000
    dropout_rate: float = 0.2
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        channels = make_divisible(32 * self.width_mult, self.round_nearest)
        last_channels = make_divisible(1280 * max(1.0, self.width_mult), self.round_nearest)
        x = ConvNormAct(channels, 3, 2, activation=relu6, axis_name=self.axis_name, name="features.0")(x, train)
        index = 1
        for t, c, n, s in V2_SETTING:
            features = make_divisible(c * self.width_mult, self.round_nearest)
            for i in range(n):
                x = InvertedResidual(features, s if i == 0 else 1, t, axis_name=self.axis_name,
                                     name=f"features.{index}")(x, train)
                index += 1
        x = ConvNormAct(last_channels, 1, activation=relu6, axis_name=self.axis_name,
                        name=f"features.{index}")(x, train)
        x = global_avg_pool(x)
        x = Dropout(self.dropout_rate, name="classifier.0")(x, train)
        return Dense(self.num_classes, **_linear_init, name="classifier.1")(x)


# MobileNetV3 blocks: (input channels, kernel, expanded channels, output channels, squeeze-excitation,
# hardswish (else ReLU), stride, in the dilatable tail (C4 on)). Channels before width_mult / reduced_tail.
V3_SETTINGS = {
    "large": (
        (16, 3, 16, 16, False, False, 1, False),
        (16, 3, 64, 24, False, False, 2, False),
        (24, 3, 72, 24, False, False, 1, False),
        (24, 5, 72, 40, True, False, 2, False),
        (40, 5, 120, 40, True, False, 1, False),
        (40, 5, 120, 40, True, False, 1, False),
        (40, 3, 240, 80, False, True, 2, False),
        (80, 3, 200, 80, False, True, 1, False),
        (80, 3, 184, 80, False, True, 1, False),
        (80, 3, 184, 80, False, True, 1, False),
        (80, 3, 480, 112, True, True, 1, False),
        (112, 3, 672, 112, True, True, 1, False),
        (112, 5, 672, 160, True, True, 2, True),
        (160, 5, 960, 160, True, True, 1, True),
        (160, 5, 960, 160, True, True, 1, True),
    ),
    "small": (
        (16, 3, 16, 16, True, False, 2, False),
        (16, 3, 72, 24, False, False, 2, False),
        (24, 3, 88, 24, False, False, 1, False),
        (24, 5, 96, 40, True, True, 2, False),
        (40, 5, 240, 40, True, True, 1, False),
        (40, 5, 240, 40, True, True, 1, False),
        (40, 5, 120, 48, True, True, 1, False),
        (48, 5, 144, 48, True, True, 1, False),
        (48, 5, 288, 96, True, True, 2, True),
        (96, 5, 576, 96, True, True, 1, True),
        (96, 5, 576, 96, True, True, 1, True),
    ),
}
V3_LAST_CHANNEL = {"large": 1280, "small": 1024}


class MobileNetV3(nn.Module):
    """``[N, H, W, 3] -> [N, num_classes]``: torchvision ``MobileNetV3`` (``arch`` ``'large'`` or ``'small'``).

    ``features.0`` 3x3 stride-2 ``ConvNormAct`` (hardswish), ``features.1..`` the
    :class:`~cnnjax.layers.inverted_residual.InvertedResidualV3` blocks of :data:`V3_SETTINGS`, then a 1x1
    ``ConvNormAct`` (hardswish) to 6x the last block's channels; global average pool; ``classifier.0`` Linear
    (to 1280 / 1024), hardswish, ``classifier.2`` Dropout(``dropout_rate``), ``classifier.3`` Linear.
    Channels are ``make_divisible(c * width_mult, 8)``; ``reduced_tail`` halves the channels from C4 on and
    ``dilated`` gives those blocks dilation 2 instead of the stride (torchvision's ``_reduced_tail`` /
    ``_dilated`` options for segmentation backbones). BatchNorm ``eps=1e-3``, torch momentum 0.01 (Flax 0.99).
    """

    arch: str = "large"
    width_mult: float = 1.0
    reduced_tail: bool = False
    dilated: bool = False
    num_classes: int = 1000
    dropout_rate: float = 0.2
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if self.arch not in V3_SETTINGS:
            raise UsageError(f"MobileNetV3 arch must be one of {sorted(V3_SETTINGS)}, got {self.arch!r}")

        def adjust(channels: int, tail: bool = False) -> int:
            return make_divisible((channels // 2 if tail and self.reduced_tail else channels) * self.width_mult, 8)

        norm = {"bn_momentum": 0.99, "bn_epsilon": 1e-3, "axis_name": self.axis_name}
        setting = V3_SETTINGS[self.arch]
        x = ConvNormAct(adjust(setting[0][0]), 3, 2, activation=hardswish, **norm, name="features.0")(x, train)
        for index, (_, kernel, expanded, out, use_se, use_hs, stride, tail) in enumerate(setting, start=1):
            x = InvertedResidualV3(adjust(expanded, tail), adjust(out, tail), kernel, stride, use_se, use_hs,
                                   2 if tail and self.dilated else 1, **norm, name=f"features.{index}")(x, train)
        x = ConvNormAct(6 * x.shape[-1], 1, activation=hardswish, **norm,
                        name=f"features.{len(setting) + 1}")(x, train)
        x = global_avg_pool(x)
        last_channel = adjust(V3_LAST_CHANNEL[self.arch], True)
        x = hardswish(Dense(last_channel, **_linear_init, name="classifier.0")(x))
        x = Dropout(self.dropout_rate, name="classifier.2")(x, train)
        return Dense(self.num_classes, **_linear_init, name="classifier.3")(x)


MODELS = {
    "mobilenet_v2": (functools.partial(MobileNetV2, width_mult=1.0), 1000, (224, 224, 3)),
    "mobilenet_v3_large": (functools.partial(MobileNetV3, "large"), 1000, (224, 224, 3)),
    "mobilenet_v3_small": (functools.partial(MobileNetV3, "small"), 1000, (224, 224, 3)),
}
# torchvision IMAGENET1K_V1 weight files (torchvision/models/mobilenetv2.py, mobilenetv3.py).
WEIGHTS = {
    "mobilenet_v2": "mobilenet_v2-b0353104.pth",
    "mobilenet_v3_large": "mobilenet_v3_large-8738ca79.pth",
    "mobilenet_v3_small": "mobilenet_v3_small-047dcff4.pth",
}
