"""torch twins of torchvision's ConvNeXt-Tiny/Small/Base/Large, in its exact module layout and init.

``features.0`` stem (``.0`` Conv 4x4/4, ``.1`` LayerNorm2d), ``features.{1,3,5,7}.{j}`` CNBlocks (``block.0``
depthwise 7x7, ``block.1`` / ``block.6`` Permute, ``block.2`` LayerNorm, ``block.3`` Linear, ``block.4`` GELU,
``block.5`` Linear; ``layer_scale [C, 1, 1]``; ``stochastic_depth`` row mode), ``features.{2,4,6}``
downsampling (``.0`` LayerNorm2d, ``.1`` Conv 2x2/2), ``avgpool``, ``classifier`` (``.0`` LayerNorm2d,
``.1`` Flatten, ``.2`` Linear). Builders take torchvision's ``num_classes`` and ``stochastic_depth_prob``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_EPS = 1e-6


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of NCHW (torchvision's ``LayerNorm2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    def __init__(self, dims: list[int]):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.permute(x, self.dims)


class StochasticDepth(nn.Module):
    """``torchvision.ops.StochasticDepth(p, 'row')``: one Bernoulli(1 - p) per sample, survivors / (1 - p)."""

    def __init__(self, p: float, mode: str = "row"):
        super().__init__()
        if mode != "row":
            raise ValueError("only row mode is used by ConvNeXt")
        self.p, self.mode = p, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        survival = 1.0 - self.p
        noise = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
        noise = noise.bernoulli_(survival)
        if survival > 0.0:
            noise.div_(survival)
        return x * noise


class CNBlock(nn.Module):
    def __init__(self, dim: int, layer_scale: float, stochastic_depth_prob: float):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=_EPS),
            nn.Linear(dim, 4 * dim, bias=True),
            nn.GELU(),
            nn.Linear(4 * dim, dim, bias=True),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.stochastic_depth(self.layer_scale * self.block(x))
        return result + x


class Conv2dNormActivation(nn.Sequential):
    """The stem: conv (``.0``, with bias) + LayerNorm2d (``.1``), no activation, as torchvision builds it."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size, stride, 0, bias=True),
                         LayerNorm2d(out_channels, eps=_EPS))


class ConvNeXt(nn.Module):
    def __init__(self, channels: tuple[int, ...], depths: tuple[int, ...], stochastic_depth_prob: float = 0.0,
                 layer_scale: float = 1e-6, num_classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = [Conv2dNormActivation(3, channels[0], 4, 4)]
        total, block_id = sum(depths), 0
        for stage, (dim, depth) in enumerate(zip(channels, depths, strict=True)):
            blocks = []
            for _ in range(depth):
                blocks.append(CNBlock(dim, layer_scale, stochastic_depth_prob * block_id / (total - 1.0)))
                block_id += 1
            layers.append(nn.Sequential(*blocks))
            if stage + 1 < len(channels):
                layers.append(nn.Sequential(LayerNorm2d(dim, eps=_EPS),
                                            nn.Conv2d(dim, channels[stage + 1], kernel_size=2, stride=2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(channels[-1], eps=_EPS), nn.Flatten(1),
                                        nn.Linear(channels[-1], num_classes))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


_CONFIGS = {
    "convnext_tiny": ((96, 192, 384, 768), (3, 3, 9, 3), 0.1),
    "convnext_small": ((96, 192, 384, 768), (3, 3, 27, 3), 0.4),
    "convnext_base": ((128, 256, 512, 1024), (3, 3, 27, 3), 0.5),
    "convnext_large": ((192, 384, 768, 1536), (3, 3, 27, 3), 0.5),
}


def _builder(name: str):
    channels, depths, default_prob = _CONFIGS[name]

    def build(num_classes: int = 1000, stochastic_depth_prob: float = default_prob) -> ConvNeXt:
        return ConvNeXt(channels, depths, stochastic_depth_prob, num_classes=num_classes)

    build.__name__ = name
    return build


BUILDERS = {name: _builder(name) for name in _CONFIGS}
