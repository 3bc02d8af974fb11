"""PyTorch twins of the cnnjax zoo (seed and torchvision layouts), for parity tests and benchmarks.

torchvision has no CPU wheel on these machines, so its ResNet / VGG structure is written out
here, module for module (same names, same forward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int = 2):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1 = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        return self.fc1(x.flatten(1))


class SimpleCNN(nn.Module):
    def __init__(self, num_classes: int = 10, c_in: int = 3, image_size: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * (image_size // 4) ** 2, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class ImprovedCNN(nn.Module):
    def __init__(self, num_classes: int = 10, dropout: float = 0.25):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv3, self.bn3 = nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.conv4, self.bn4 = nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.pool, self.dropout = nn.MaxPool2d(2, 2), nn.Dropout(dropout)
        self.fc1, self.bn5 = nn.Linear(64 * 8 * 8, 256), nn.BatchNorm1d(256)
        self.fc2 = nn.Linear(256, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.dropout(self.pool(F.relu(self.bn2(self.conv2(x)))))
        x = F.relu(self.bn3(self.conv3(x)))
        x = self.dropout(self.pool(F.relu(self.bn4(self.conv4(x)))))
        x = self.dropout(F.relu(self.bn5(self.fc1(x.flatten(1)))))
        return self.fc2(x)


class GapCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.adaptive_avg_pool2d(F.relu(self.conv3(x)), 1)
        return self.fc(x.flatten(1))


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10, conv1_padding: int = 0):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=conv1_padding)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, num_classes)

    def forward(self, x):
        x = F.avg_pool2d(torch.tanh(self.conv1(x)), 2)
        x = F.avg_pool2d(torch.tanh(self.conv2(x)), 2)
        x = torch.tanh(self.fc1(x.flatten(1)))
        return self.fc3(torch.tanh(self.fc2(x)))


# --- torchvision layouts -------------------------------------------------------------------

VGG_CFGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, cfg, batch_norm: bool, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        mods, c = [], 3
        for v in cfg:
            if v == "M":
                mods.append(nn.MaxPool2d(2, 2))
                continue
            mods.append(nn.Conv2d(c, v, 3, padding=1))
            if batch_norm:
                mods.append(nn.BatchNorm2d(v))
            mods.append(nn.ReLU(inplace=True))
            c = v
        self.features = nn.Sequential(*mods)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def make_block(block, inplanes, planes, stride, **grouping):
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
            nn.BatchNorm2d(planes * block.expansion),
        )
    return block(inplanes, planes, stride, downsample, **grouping)


RESNET_CFGS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
    "resnext50_32x4d": (Bottleneck, [3, 4, 6, 3], {"groups": 32, "base_width": 4}),
    "resnext101_32x8d": (Bottleneck, [3, 4, 23, 3], {"groups": 32, "base_width": 8}),
    "resnext101_64x4d": (Bottleneck, [3, 4, 23, 3], {"groups": 64, "base_width": 4}),
    "wide_resnet50_2": (Bottleneck, [3, 4, 6, 3], {"base_width": 128}),
    "wide_resnet101_2": (Bottleneck, [3, 4, 23, 3], {"base_width": 128}),
}


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes: int = 1000, grouping=None):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, n in enumerate(layers):
            planes = 64 * 2**i
            blocks = []
            for j in range(n):
                blocks.append(make_block(block, inplanes, planes, 2 if i > 0 and j == 0 else 1, **(grouping or {})))
                inplanes = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def stages(self, x):
        """Feature maps after the stem and each of layer1..4."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = [x]
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            outs.append(x)
        return outs

    def forward(self, x):
        x = self.stages(x)[-1]
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --- He et al. 2015 CIFAR ResNet, option A ------------------------------------------------------


class CifarBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = 0 if (stride == 1 and inplanes == planes) else planes // 4
        self.stride = stride

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.pad:
            shortcut = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        inplanes = 16
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(CifarBlock(inplanes, planes, 2 if i > 0 and j == 0 else 1))
                inplanes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


# --- airbench94-style fast net -------------------------------------------------------------------


class ScalelessBatchNorm(nn.Module):
    """BatchNorm2d without a scale parameter (bias only), eps 1e-12, torch momentum 0.4."""

    def __init__(self, c, momentum=0.4, eps=1e-12):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        # A fixed unit scale rather than none: torch's CUDA batch norm (channels-last) with weight=None and a bias
        # that needs a gradient fails its backward ("NativeBatchNormBackward0 returned an invalid gradient at
        # index 2"). Not saved: the state dict is unchanged.
        self.register_buffer("unit_scale", torch.ones(c), persistent=False)
        self.momentum, self.eps = momentum, eps

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.unit_scale, self.bias, self.training,
                            self.momentum, self.eps)


class FastGroup(nn.Module):
    def __init__(self, c_in, c_out, residual: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm1 = ScalelessBatchNorm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = ScalelessBatchNorm(c_out)
        self.residual = residual
        if residual:  # airbench96's group
            self.conv3 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
            self.norm3 = ScalelessBatchNorm(c_out)

    def forward(self, x):
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        y = F.gelu(self.norm2(self.conv2(x)))
        return F.gelu(self.norm3(self.conv3(y)) + x) if self.residual else y


class FastNet(nn.Module):
    def __init__(self, num_classes: int = 10, widths=(64, 256, 256), c_in: int = 3, residual: bool = False):
        super().__init__()
        self.whiten = nn.Conv2d(c_in, 8 * c_in, 2, padding=0, bias=True)
        self.block1 = FastGroup(8 * c_in, widths[0], residual)
        self.block2 = FastGroup(widths[0], widths[1], residual)
        self.block3 = FastGroup(widths[1], widths[2], residual)
        self.head = nn.Linear(widths[2], num_classes, bias=False)

    def forward(self, x):
        x = F.gelu(self.whiten(x))
        x = self.block3(self.block2(self.block1(x)))
        return self.head(F.max_pool2d(x, 3).flatten(1)) / 9.0


def build(name: str, num_classes: int | None = None, **kw) -> nn.Module:
    """torch twin of ``cnnjax.models.create(name, ...)``."""
    simple = {"tiny_cnn": TinyCNN, "simple_cnn": SimpleCNN, "improved_cnn": ImprovedCNN,
              "gap_cnn": GapCNN, "lenet5": LeNet5}
    extra = {} if num_classes is None else {"num_classes": num_classes}
    if name in simple:
        return simple[name](**extra, **kw)
    if name == "fast_cnn":
        return FastNet(**extra, **kw)
    if name.startswith("vgg"):
        return VGG(VGG_CFGS[name.removesuffix("_bn")], name.endswith("_bn"), **extra, **kw)
    if name in RESNET_CFGS:
        return ResNet(*RESNET_CFGS[name][:2], **extra, grouping=(RESNET_CFGS[name][2:] or [None])[0])
    if name.startswith("cifar_resnet"):
        return CifarResNet(int(name.removeprefix("cifar_resnet")), **extra)
    raise KeyError(name)


def randomize_bn_stats(module: nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(getattr(m, "running_mean", None), torch.Tensor):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) * 1.5 + 0.5)
                if isinstance(getattr(m, "weight", None), torch.Tensor):
                    m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)
