"""ShuffleNet V2 (Ma et al. 2018) x0.5 / x1.0 / x1.5 / x2.0 in torchvision's layout (``torchvision.models.
shufflenetv2``).

``[N, H, W, 3] -> [N, num_classes]``; any H, W >= 1 (torchvision's minimum), 224 for ImageNet. Flax module paths
are torch's module paths with '/' for '.': ``conv1.0`` (3x3 s2 conv) / ``conv1.1`` (BN), max-pool 3 s2 p1,
``stage2`` .. ``stage4`` of :class:`InvertedResidual` (``stage2.0/branch2.3`` is torch's ``stage2.0.branch2.3``),
``conv5.0`` / ``conv5.1`` (1x1 conv + BN), mean over H, W, ``fc``. Weights use torch's default initialisers, as
torchvision (which has no custom init for this family). No dropout.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.errors import UsageError
from cnnjax.layers import BatchNorm, Conv, Dense, MaxPool, channel_shuffle

Array = jax.Array


class InvertedResidual(nn.Module):
    """torchvision's ShuffleNet V2 unit: ``[N, H, W, C_in] -> [N, H / stride, W / stride, features]``.

    ``stride == 1`` (needs ``C_in == features``): the channels split in two halves, the second goes through
    ``branch2`` (1x1 conv-BN-ReLU, 3x3 depthwise conv-BN, 1x1 conv-BN-ReLU), the first passes unchanged.
    ``stride > 1``: ``branch1`` (3x3 depthwise s2 conv-BN, 1x1 conv-BN-ReLU) and ``branch2`` both see the whole
    input. The two halves are concatenated (``branch1`` / identity first) and channel-shuffled with 2 groups.
    Children: ``branch1.{0,1,2,3}``, ``branch2.{0,1,3,4,5,6}`` (torch's Sequential indices; ReLUs have none).
    """

    features: int
    stride: int
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if not 1 <= self.stride <= 3:
            raise UsageError(f"InvertedResidual: stride must be 1, 2 or 3, got {self.stride}")
        branch = self.features // 2
        if self.stride == 1 and x.shape[-1] != 2 * branch:
            raise UsageError(f"InvertedResidual: stride 1 needs {2 * branch} input channels, got {x.shape[-1]}")

        def bn(name: str) -> BatchNorm:
            return BatchNorm(axis_name=self.axis_name, name=name)

        if self.stride == 1:
            left, right = jnp.split(x, 2, axis=-1)
        else:
            channels = x.shape[-1]
            left = Conv(channels, 3, self.stride, 1, groups=channels, use_bias=False, name="branch1.0")(x)
            left = bn("branch1.1")(left, train)
            left = Conv(branch, 1, use_bias=False, name="branch1.2")(left)
            left = nn.relu(bn("branch1.3")(left, train))
            right = x
        right = Conv(branch, 1, use_bias=False, name="branch2.0")(right)
        right = nn.relu(bn("branch2.1")(right, train))
        right = Conv(branch, 3, self.stride, 1, groups=branch, use_bias=False, name="branch2.3")(right)
        right = bn("branch2.4")(right, train)
        right = Conv(branch, 1, use_bias=False, name="branch2.5")(right)
        right = nn.relu(bn("branch2.6")(right, train))
        return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleNetV2(nn.Module):
    """``[N, H, W, 3] -> [N, num_classes]``: torchvision ``ShuffleNetV2(stages_repeats, stages_out_channels)``.

    ``stages_repeats``: units in stage2..4 (the first of each has stride 2); ``stages_out_channels``: the widths
    of conv1, stage2..4 and conv5.
    """

    stages_repeats: Sequence[int]
    stages_out_channels: Sequence[int]
    num_classes: int = 1000
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if len(self.stages_repeats) != 3 or len(self.stages_out_channels) != 5:
            raise UsageError("ShuffleNetV2 needs 3 stage repeats and 5 stage widths, got "
                             f"{list(self.stages_repeats)} and {list(self.stages_out_channels)}")
        if x.ndim != 4:
            raise UsageError(f"ShuffleNetV2 expects an [N, H, W, C] array, got shape {tuple(x.shape)}")
        widths = self.stages_out_channels
        x = Conv(widths[0], 3, 2, 1, use_bias=False, name="conv1.0")(x)
        x = nn.relu(BatchNorm(axis_name=self.axis_name, name="conv1.1")(x, train))
        x = MaxPool(3, 2, 1, name="maxpool")(x)
        for stage, (repeats, width) in enumerate(zip(self.stages_repeats, widths[1:4], strict=True), start=2):
            for i in range(repeats):
                x = InvertedResidual(width, 2 if i == 0 else 1, self.axis_name, name=f"stage{stage}.{i}")(x, train)
        x = Conv(widths[4], 1, use_bias=False, name="conv5.0")(x)
        x = nn.relu(BatchNorm(axis_name=self.axis_name, name="conv5.1")(x, train))
        x = jnp.mean(x, axis=(1, 2))
        return Dense(self.num_classes, name="fc")(x)


_CONFIGS = {
    "shufflenet_v2_x0_5": ((4, 8, 4), (24, 48, 96, 192, 1024)),
    "shufflenet_v2_x1_0": ((4, 8, 4), (24, 116, 232, 464, 1024)),
    "shufflenet_v2_x1_5": ((4, 8, 4), (24, 176, 352, 704, 1024)),
    "shufflenet_v2_x2_0": ((4, 8, 4), (24, 244, 488, 976, 2048)),
}
MODELS = {name: (functools.partial(ShuffleNetV2, repeats, widths), 1000, (224, 224, 3))
          for name, (repeats, widths) in _CONFIGS.items()}
WEIGHTS = {
    "shufflenet_v2_x0_5": "shufflenetv2_x0.5-f707e7126e.pth",
    "shufflenet_v2_x1_0": "shufflenetv2_x1-5666bf0f80.pth",
    "shufflenet_v2_x1_5": "shufflenetv2_x1_5-3c479a10.pth",
    "shufflenet_v2_x2_0": "shufflenetv2_x2_0-8be3c8ee.pth",
}
