"""MNASNet-B1 (Tan et al. 2019) with depth multipliers 0.5 / 0.75 / 1.0 / 1.3, in torchvision's layout
(``torchvision.models.mnasnet``, version 2: the stem scales with ``alpha`` too).

Flax module paths are torchvision's module paths: the ``layers`` Sequential's entries are ``layers.0`` ...
``layers.15`` (convs and BatchNorms; ReLUs have no module here), its stacks of inverted residuals
``layers.8.0`` ... ``layers.13.0`` with children ``layers.0`` / ``.1`` / ``.3`` / ``.4`` / ``.6`` / ``.7``,
and the head ``classifier.1``, so torchvision state dicts port 1:1 (:mod:`cnnjax.port`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax

from cnnjax.errors import UsageError
from cnnjax.layers import BatchNorm, Conv, Dense, Dropout, global_avg_pool, kaiming_normal_fan_out

Array = jax.Array

# torchvision's BatchNorm momentum 1 - 0.9997 (the paper's TensorFlow 0.9997), in Flax's convention.
BN_MOMENTUM = 0.9997
# Stacks after the stem: (kernel, first stride, expansion, repeats); outputs are depths[2:] of `depths`.
STACKS = ((3, 2, 3, 3), (5, 2, 3, 3), (5, 2, 6, 3), (3, 1, 6, 2), (5, 2, 6, 4), (3, 1, 6, 1))
_BASE_DEPTHS = (32, 16, 24, 40, 80, 96, 192, 320)


def round_to_multiple_of(value: float, divisor: int, round_up_bias: float = 0.9) -> int:
    """torchvision's ``_round_to_multiple_of``: nearest multiple of ``divisor`` (at least ``divisor``), one
    ``divisor`` more when that is below ``round_up_bias * value`` (``(83, 8) -> 80``, ``(84, 8) -> 88``)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded if rounded >= round_up_bias * value else rounded + divisor


def depths(alpha: float) -> list[int]:
    """Channel widths of MNASNet ``alpha``: stem conv, stem projection, then the six stacks."""
    return [round_to_multiple_of(d * alpha, 8) for d in _BASE_DEPTHS]


class MNASNetBlock(nn.Module):
    """torchvision ``mnasnet._InvertedResidual``: ``[N, H, W, C] -> [N, H / stride, W / stride, features]``.

    1x1 conv to ``C * expansion`` (``layers.0``) + BN (``layers.1``) + ReLU, depthwise ``kernel_size`` conv
    (padding ``k // 2``, ``layers.3``) + BN (``layers.4``) + ReLU, linear 1x1 conv (``layers.6``) + BN
    (``layers.7``); input added when ``stride == 1`` and ``C == features``. ``bn_momentum`` is Flax's convention.
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    expansion: int = 6
    bn_momentum: float = BN_MOMENTUM
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        channels = x.shape[-1]
        mid = channels * self.expansion

        def bn(name: str):
            return BatchNorm(momentum=self.bn_momentum, axis_name=self.axis_name, name=name)

        y = Conv(mid, 1, use_bias=False, kernel_init=kaiming_normal_fan_out, name="layers.0")(x)
        y = nn.relu(bn("layers.1")(y, train))
        y = Conv(mid, self.kernel_size, self.stride, self.kernel_size // 2, groups=mid, use_bias=False,
                 kernel_init=kaiming_normal_fan_out, name="layers.3")(y)
        y = nn.relu(bn("layers.4")(y, train))
        y = Conv(self.features, 1, use_bias=False, kernel_init=kaiming_normal_fan_out, name="layers.6")(y)
        y = bn("layers.7")(y, train)
        if self.stride == 1 and channels == self.features:
            return x + y
        return y


class MNASNet(nn.Module):
    """``[N, H, W, 3] -> [N, num_classes]``: torchvision ``MNASNet(alpha)`` (B1, version 2).

    Stem: 3x3 stride-2 conv ``layers.0`` + BN ``layers.1`` + ReLU, depthwise 3x3 ``layers.3`` + BN ``layers.4``
    + ReLU, 1x1 ``layers.6`` + BN ``layers.7`` (widths ``depths(alpha)[:2]``); six stacks ``layers.8..13`` of
    :class:`MNASNetBlock` per :data:`STACKS`; 1x1 conv to 1280 ``layers.14`` + BN ``layers.15`` + ReLU; global
    average pool; ``classifier.0`` Dropout(``dropout_rate``), ``classifier.1`` Linear. BatchNorm torch momentum
    0.0003 (Flax 0.9997), eps 1e-5. Any input of at least 1x1 works; 224x224 for ImageNet.
    """

    alpha: float = 1.0
    num_classes: int = 1000
    dropout_rate: float = 0.2
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if self.alpha <= 0.0:
            raise UsageError(f"MNASNet alpha must be > 0, got {self.alpha}")
        widths = depths(self.alpha)

        def conv(features: int, kernel: int, stride: int, groups: int, name: str):
            return Conv(features, kernel, stride, kernel // 2, groups=groups, use_bias=False,
                        kernel_init=kaiming_normal_fan_out, name=name)

        def bn(name: str):
            return BatchNorm(momentum=BN_MOMENTUM, axis_name=self.axis_name, name=name)

        x = nn.relu(bn("layers.1")(conv(widths[0], 3, 2, 1, "layers.0")(x), train))
        x = nn.relu(bn("layers.4")(conv(widths[0], 3, 1, widths[0], "layers.3")(x), train))
        x = bn("layers.7")(conv(widths[1], 1, 1, 1, "layers.6")(x), train)
        for stack, ((kernel, stride, expansion, repeats), features) in enumerate(zip(STACKS, widths[2:],
                                                                                      strict=True)):
            for i in range(repeats):
                x = MNASNetBlock(features, kernel, stride if i == 0 else 1, expansion, axis_name=self.axis_name,
                                 name=f"layers.{8 + stack}.{i}")(x, train)
        x = nn.relu(bn("layers.15")(conv(1280, 1, 1, 1, "layers.14")(x), train))
        x = global_avg_pool(x)
        x = Dropout(self.dropout_rate, name="classifier.0")(x, train)
        # torchvision: kaiming_uniform(mode='fan_out', nonlinearity='sigmoid') weights, zero bias.
        return Dense(self.num_classes, kernel_init=nn.initializers.variance_scaling(1.0, "fan_out", "uniform"),
                     bias_init=nn.initializers.zeros, name="classifier.1")(x)


_ALPHAS = {"mnasnet0_5": 0.5, "mnasnet0_75": 0.75, "mnasnet1_0": 1.0, "mnasnet1_3": 1.3}
MODELS = {name: (functools.partial(MNASNet, alpha), 1000, (224, 224, 3)) for name, alpha in _ALPHAS.items()}
# torchvision IMAGENET1K_V1 weight files (torchvision/models/mnasnet.py).
WEIGHTS = {
    "mnasnet0_5": "mnasnet0.5_top1_67.823-3ffadce67e.pth",
    "mnasnet0_75": "mnasnet0_75-7090bc5f.pth",
    "mnasnet1_0": "mnasnet1.0_top1_73.512-f206786ef8.pth",
    "mnasnet1_3": "mnasnet1_3-a4c69d6f.pth",
}
