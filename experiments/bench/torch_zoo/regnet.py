"""torch twins of torchvision's RegNetX / RegNetY (``torchvision.models.regnet``), same module layout and init.

``BUILDERS[name](num_classes=1000)``; state-dict keys as torchvision's: ``stem.{0,1}``,
``trunk_output.block{i}.block{i}-{j}.{proj,f.a,f.b,f.se,f.c}...``, ``fc``. The stage settings are computed here
with torch ops as torchvision's ``BlockParams.from_init_params`` does (the Flax model computes them separately,
see :func:`cnnjax.models.regnet.block_params`).
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict

import torch
from torch import nn

from cnnjax.models.regnet import CONFIGS


def _make_divisible(value: float, divisor: int) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def stage_params(depth: int, w_0: int, w_a: float, w_m: float, group_width: int,
                 bottleneck_multiplier: float = 1.0) -> list[tuple[int, int, int, int, float]]:
    """(width, stride, depth, group width, bottleneck multiplier) per stage, with torch's float32 ops."""
    if w_a < 0 or w_0 <= 0 or w_m <= 1 or w_0 % 8 != 0:
        raise ValueError("Invalid RegNet settings")
    widths_cont = torch.arange(depth, device="cpu") * w_a + w_0  # on the CPU under a meta device too
    capacity = torch.round(torch.log(widths_cont / w_0) / math.log(w_m))
    block_widths = (torch.round(torch.divide(w_0 * torch.pow(w_m, capacity), 8)) * 8).int().tolist()
    boundaries = [j for j in range(len(block_widths) + 1)
                  if j == 0 or j == len(block_widths) or block_widths[j] != block_widths[j - 1]]
    widths = [block_widths[j] for j in boundaries[:-1]]
    depths = [b - a for a, b in zip(boundaries[:-1], boundaries[1:], strict=True)]
    out = []
    for width, num_blocks in zip(widths, depths, strict=True):
        bottleneck = int(width * bottleneck_multiplier)
        groups_width = min(group_width, bottleneck)
        width = int(_make_divisible(bottleneck, groups_width) / bottleneck_multiplier)
        out.append((width, 2, num_blocks, groups_width, bottleneck_multiplier))
    return out


class Conv2dNormActivation(nn.Sequential):
    """torchvision ``Conv2dNormActivation``: conv (no bias) ``0``, BatchNorm ``1``, ReLU ``2`` when ``relu``."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 relu: bool = True) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(c_in, c_out, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out, eps=1e-5, momentum=0.1),
        ]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """``torchvision.ops.SqueezeExcitation`` with ReLU / sigmoid: ``fc1``, ``fc2`` 1x1 convs with bias."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class BottleneckTransform(nn.Sequential):
    def __init__(self, width_in: int, width_out: int, stride: int, group_width: int, bottleneck_multiplier: float,
                 se_ratio: float | None) -> None:
        w_b = int(round(width_out * bottleneck_multiplier))
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["a"] = Conv2dNormActivation(width_in, w_b, 1)
        layers["b"] = Conv2dNormActivation(w_b, w_b, 3, stride, groups=w_b // group_width)
        if se_ratio:
            layers["se"] = SqueezeExcitation(w_b, int(round(se_ratio * width_in)))
        layers["c"] = Conv2dNormActivation(w_b, width_out, 1, relu=False)
        super().__init__(layers)


class ResBottleneckBlock(nn.Module):
    def __init__(self, width_in: int, width_out: int, stride: int, group_width: int, bottleneck_multiplier: float,
                 se_ratio: float | None) -> None:
        super().__init__()
        self.proj = None
        if width_in != width_out or stride != 1:
            self.proj = Conv2dNormActivation(width_in, width_out, 1, stride, relu=False)
        self.f = BottleneckTransform(width_in, width_out, stride, group_width, bottleneck_multiplier, se_ratio)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.proj is None else self.proj(x)
        return self.activation(shortcut + self.f(x))


class AnyStage(nn.Sequential):
    def __init__(self, width_in: int, width_out: int, stride: int, depth: int, group_width: int,
                 bottleneck_multiplier: float, se_ratio: float | None, index: int) -> None:
        super().__init__()
        for j in range(depth):
            self.add_module(f"block{index}-{j}", ResBottleneckBlock(
                width_in if j == 0 else width_out, width_out, stride if j == 0 else 1, group_width,
                bottleneck_multiplier, se_ratio))


class RegNet(nn.Module):
    def __init__(self, depth: int, w_0: int, w_a: float, w_m: float, group_width: int,
                 se_ratio: float | None = None, num_classes: int = 1000, stem_width: int = 32,
                 bottleneck_multiplier: float = 1.0) -> None:
        super().__init__()
        self.stem = Conv2dNormActivation(3, stem_width, 3, 2)
        width = stem_width
        stages = OrderedDict()
        for i, (width_out, stride, num_blocks, gw, bm) in enumerate(
                stage_params(depth, w_0, w_a, w_m, group_width, bottleneck_multiplier), start=1):
            stages[f"block{i}"] = AnyStage(width, width_out, stride, num_blocks, gw, bm, se_ratio, i)
            width = width_out
        self.trunk_output = nn.Sequential(stages)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trunk_output(self.stem(x))
        return self.fc(self.avgpool(x).flatten(1))


BUILDERS = {name: functools.partial(RegNet, depth, w_0, w_a, w_m, group_width, se_ratio)
            for name, (depth, w_0, w_a, w_m, group_width, se_ratio) in CONFIGS.items()}
