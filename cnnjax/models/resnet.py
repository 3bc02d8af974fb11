"""ResNet-18/34/50/101/152 (He et al. 2015), ResNeXt (Xie et al. 2017) and Wide ResNet (Zagoruyko & Komodakis
2016) in torchvision's layout (v1.5 bottlenecks; ResNeXt groups and Wide ResNet widths in the 3x3 conv).

Names mirror torchvision's state dict: ``conv1, bn1, layer{1-4}_{i}/{conv1,bn1,...,downsample_conv,
downsample_bn}, fc`` (torch ``layer1.0.conv1.weight`` <-> ``params/layer1_0/conv1/kernel``).
Explicit symmetric pads (stem 3, 3x3 convs 1, max-pool 1), unlike 'SAME', so torch weights load.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax

from cnnjax.errors import UsageError
from cnnjax.layers import (
    BasicBlock,
    BatchNorm,
    Bottleneck,
    Conv,
    Dense,
    MaxPool,
    global_avg_pool,
    kaiming_normal_fan_out,
)

Array = jax.Array
Block = type[BasicBlock | Bottleneck]

STAGES: dict[str, tuple[Block, Sequence[int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}


class ResNet(nn.Module):
    """``[N, H, W, 3] -> [N, num_classes]`` (any H, W >= 32; 224 for ImageNet).

    ``groups`` / ``width_per_group`` set the bottlenecks' 3x3 conv (ResNeXt 32x4d: 32 / 4; Wide ResNet: 1 / 128).
    ``zero_init_residual`` zeroes the last BN scale of every block (torchvision's option).
    ``features_only=True`` returns the pooled ``[N, 512 * expansion]`` features instead of logits.
    """

    block: Block
    stage_sizes: Sequence[int]
    num_classes: int = 1000
    zero_init_residual: bool = False
    axis_name: str | None = None
    groups: int = 1
    width_per_group: int = 64

    @nn.compact
    def __call__(self, x: Array, train: bool = False, features_only: bool = False) -> Array:
        if min(x.shape[1:3]) < 32:
            raise UsageError(f"ResNet needs inputs of at least 32x32 (total stride 32), got {x.shape[1:3]}")
        x = Conv(64, 7, 2, 3, use_bias=False, kernel_init=kaiming_normal_fan_out, name="conv1")(x)
        x = nn.relu(BatchNorm(axis_name=self.axis_name, name="bn1")(x, train))
        x = MaxPool(3, 2, 1, name="maxpool")(x)
        for stage, num_blocks in enumerate(self.stage_sizes):
            for i in range(num_blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                grouping = {"groups": self.groups, "base_width": self.width_per_group} \
                    if self.block is Bottleneck else {}
                x = self.block(64 * 2**stage, stride, self.zero_init_residual, self.axis_name, **grouping,
                               name=f"layer{stage + 1}_{i}")(x, train)
        x = global_avg_pool(x)
        if features_only:
            return x
        return Dense(self.num_classes, name="fc")(x)


# name -> (stage sizes, groups, width per group) of the bottleneck variants.
_GROUPED = {
    "resnext50_32x4d": ((3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": ((3, 4, 23, 3), 32, 8),
    "resnext101_64x4d": ((3, 4, 23, 3), 64, 4),
    "wide_resnet50_2": ((3, 4, 6, 3), 1, 128),
    "wide_resnet101_2": ((3, 4, 23, 3), 1, 128),
}
MODELS = {
    **{name: (functools.partial(ResNet, block, sizes), 1000, (224, 224, 3)) for name, (block, sizes) in STAGES.items()},
    **{name: (functools.partial(ResNet, Bottleneck, sizes, groups=groups, width_per_group=width), 1000, (224, 224, 3))
       for name, (sizes, groups, width) in _GROUPED.items()},
}
WEIGHTS = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-0676ba61.pth",
    "resnet101": "resnet101-63fe2227.pth",
    "resnet152": "resnet152-394f9c45.pth",
    "resnext50_32x4d": "resnext50_32x4d-7cdf4587.pth",
    "resnext101_32x8d": "resnext101_32x8d-8ba56ff5.pth",
    "resnext101_64x4d": "resnext101_64x4d-173b62eb.pth",
    "wide_resnet50_2": "wide_resnet50_2-95faca4d.pth",
    "wide_resnet101_2": "wide_resnet101_2-32ee1156.pth",
}
