"""PyTorch twins of torchvision's EfficientNet B0-B7 and EfficientNetV2 S/M/L, in torchvision's module layout
(``features.{s}.{j}.block.{k}``, ``classifier.1``) and init, for :mod:`cnnjax.models.efficientnet`.

``BUILDERS[name](num_classes=1000, dropout=<variant's>, stochastic_depth_prob=0.2)``, as torchvision's
``efficientnet_*`` constructors. The stage tables here are written out independently of the Flax model's.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cnnjax.layers import make_divisible


@dataclass
class Config:
    """torchvision's ``MBConvConfig`` (``fused=False``) / ``FusedMBConvConfig``, channels and depth scaled."""

    fused: bool
    expand_ratio: float
    kernel: int
    stride: int
    input_channels: int
    out_channels: int
    num_layers: int


def _mb(expand: float, kernel: int, stride: int, cin: int, cout: int, layers: int, width: float = 1.0,
        depth: float = 1.0) -> Config:
    return Config(False, expand, kernel, stride, make_divisible(cin * width, 8), make_divisible(cout * width, 8),
                  int(math.ceil(layers * depth)))


def _fused(expand: float, kernel: int, stride: int, cin: int, cout: int, layers: int) -> Config:
    return Config(True, expand, kernel, stride, cin, cout, layers)


def _v1_conf(width: float, depth: float) -> list[Config]:
    mb = functools.partial(_mb, width=width, depth=depth)
    return [mb(1, 3, 1, 32, 16, 1), mb(6, 3, 2, 16, 24, 2), mb(6, 5, 2, 24, 40, 2), mb(6, 3, 2, 40, 80, 3),
            mb(6, 5, 1, 80, 112, 3), mb(6, 5, 2, 112, 192, 4), mb(6, 3, 1, 192, 320, 1)]


_V2_CONF = {
    "efficientnet_v2_s": lambda: [
        _fused(1, 3, 1, 24, 24, 2), _fused(4, 3, 2, 24, 48, 4), _fused(4, 3, 2, 48, 64, 4),
        _mb(4, 3, 2, 64, 128, 6), _mb(6, 3, 1, 128, 160, 9), _mb(6, 3, 2, 160, 256, 15)],
    "efficientnet_v2_m": lambda: [
        _fused(1, 3, 1, 24, 24, 3), _fused(4, 3, 2, 24, 48, 5), _fused(4, 3, 2, 48, 80, 5),
        _mb(4, 3, 2, 80, 160, 7), _mb(6, 3, 1, 160, 176, 14), _mb(6, 3, 2, 176, 304, 18),
        _mb(6, 3, 1, 304, 512, 5)],
    "efficientnet_v2_l": lambda: [
        _fused(1, 3, 1, 32, 32, 4), _fused(4, 3, 2, 32, 64, 7), _fused(4, 3, 2, 64, 96, 7),
        _mb(4, 3, 2, 96, 192, 10), _mb(6, 3, 1, 192, 224, 19), _mb(6, 3, 2, 224, 384, 25),
        _mb(6, 3, 1, 384, 640, 7)],
}
# name -> (width multiplier, depth multiplier, dropout) of torchvision's efficientnet_b0..b7.
_V1 = {"efficientnet_b0": (1.0, 1.0, 0.2), "efficientnet_b1": (1.0, 1.1, 0.2), "efficientnet_b2": (1.1, 1.2, 0.3),
       "efficientnet_b3": (1.2, 1.4, 0.3), "efficientnet_b4": (1.4, 1.8, 0.4), "efficientnet_b5": (1.6, 2.2, 0.4),
       "efficientnet_b6": (1.8, 2.6, 0.5), "efficientnet_b7": (2.0, 3.1, 0.5)}
_V2_DROPOUT = {"efficientnet_v2_s": 0.2, "efficientnet_v2_m": 0.3, "efficientnet_v2_l": 0.4}


class Conv2dNormActivation(nn.Sequential):
    """torchvision ``Conv2dNormActivation``: ``0`` conv (no bias, padding ``(k - 1) // 2``), ``1`` norm,
    ``2`` activation (absent when None)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
                 activation_layer: Callable[[], nn.Module] | None = nn.SiLU) -> None:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups,
                                             bias=False), norm_layer(cout)]
        if activation_layer is not None:
            layers.append(activation_layer())
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """``torchvision.ops.SqueezeExcitation`` with SiLU: ``x * sigmoid(fc2(silu(fc1(avgpool(x)))))``."""

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = nn.SiLU()
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class StochasticDepth(nn.Module):
    """``torchvision.ops.StochasticDepth(p, 'row')``: in training, zero each sample with probability ``p`` and
    scale the survivors by ``1 / (1 - p)``."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        survival = 1.0 - self.p
        noise = x.new_empty([x.shape[0]] + [1] * (x.ndim - 1)).bernoulli_(survival)
        if survival > 0.0:
            noise.div_(survival)
        return x * noise


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, expand_ratio: float, kernel: int, stride: int, sd_prob: float,
                 norm_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        expanded = make_divisible(cin * expand_ratio)
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(Conv2dNormActivation(cin, expanded, 1, norm_layer=norm_layer))
        layers.append(Conv2dNormActivation(expanded, expanded, kernel, stride, groups=expanded, norm_layer=norm_layer))
        layers.append(SqueezeExcitation(expanded, max(1, cin // 4)))
        layers.append(Conv2dNormActivation(expanded, cout, 1, norm_layer=norm_layer, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(sd_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return self.stochastic_depth(y) + x if self.use_res_connect else y


class FusedMBConv(nn.Module):
    def __init__(self, cin: int, cout: int, expand_ratio: float, kernel: int, stride: int, sd_prob: float,
                 norm_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        expanded = make_divisible(cin * expand_ratio)
        if expanded != cin:
            layers = [Conv2dNormActivation(cin, expanded, kernel, stride, norm_layer=norm_layer),
                      Conv2dNormActivation(expanded, cout, 1, norm_layer=norm_layer, activation_layer=None)]
        else:
            layers = [Conv2dNormActivation(cin, cout, kernel, stride, norm_layer=norm_layer)]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(sd_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return self.stochastic_depth(y) + x if self.use_res_connect else y


class EfficientNet(nn.Module):
    def __init__(self, stages: list[Config], dropout: float, stochastic_depth_prob: float = 0.2,
                 num_classes: int = 1000, norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
                 last_channel: int | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = [Conv2dNormActivation(3, stages[0].input_channels, 3, 2, norm_layer=norm_layer)]
        total, block_id = sum(stage.num_layers for stage in stages), 0
        for stage in stages:
            block = FusedMBConv if stage.fused else MBConv
            blocks = []
            for j in range(stage.num_layers):
                sd_prob = stochastic_depth_prob * float(block_id) / total
                blocks.append(block(stage.input_channels if j == 0 else stage.out_channels, stage.out_channels,
                                    stage.expand_ratio, stage.kernel, stage.stride if j == 0 else 1, sd_prob,
                                    norm_layer))
                block_id += 1
            layers.append(nn.Sequential(*blocks))
        last = last_channel if last_channel is not None else 4 * stages[-1].out_channels
        layers.append(Conv2dNormActivation(stages[-1].out_channels, last, 1, norm_layer=norm_layer))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=True), nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


_LATE_V1 = ("efficientnet_b5", "efficientnet_b6", "efficientnet_b7")


def _v1(name: str, num_classes: int = 1000, dropout: float | None = None,
        stochastic_depth_prob: float = 0.2) -> EfficientNet:
    width, depth, default_dropout = _V1[name]
    norm = functools.partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01) if name in _LATE_V1 else nn.BatchNorm2d
    return EfficientNet(_v1_conf(width, depth), default_dropout if dropout is None else dropout,
                        stochastic_depth_prob, num_classes, norm)


def _v2(name: str, num_classes: int = 1000, dropout: float | None = None,
        stochastic_depth_prob: float = 0.2) -> EfficientNet:
    default_dropout = _V2_DROPOUT[name]
    return EfficientNet(_V2_CONF[name](), default_dropout if dropout is None else dropout, stochastic_depth_prob,
                        num_classes, functools.partial(nn.BatchNorm2d, eps=1e-3), last_channel=1280)


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    **{name: functools.partial(_v1, name) for name in _V1},
    **{name: functools.partial(_v2, name) for name in _V2_DROPOUT},
}
