"""VGG (Simonyan & Zisserman 2014) in torchvision's layout: ``features``, 7x7 adaptive pool, classifier."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax

from cnnjax.errors import UsageError
from cnnjax.layers import (
    BatchNorm,
    Conv,
    Dense,
    Dropout,
    MaxPool,
    adaptive_avg_pool,
    flatten_nchw,
    kaiming_normal_fan_out,
)

Array = jax.Array

CONFIGS: dict[str, Sequence[int | str]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """``[N, H, W, 3] -> [N, num_classes]``; H, W >= 32 (five 2x2 pools), 224 as in ImageNet.

    Submodules are named after torchvision's ``features.{i}`` / ``classifier.{i}`` indices
    (``features_0``, ``classifier_6``...) so state dicts map 1:1. Conv init: kaiming-normal
    fan-out; linear init ``N(0, 0.01)``, as torchvision.
    """

    config: Sequence[int | str]
    batch_norm: bool = False
    num_classes: int = 1000
    dropout_rate: float = 0.5
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if min(x.shape[1:3]) < 32:
            raise UsageError(f"VGG needs inputs of at least 32x32 (five 2x2 max-pools), got {x.shape[1:3]}")
        idx = 0  # torchvision's index into nn.Sequential `features`
        for item in self.config:
            if item == "M":
                x = MaxPool(2, name=f"features_{idx}")(x)
                idx += 1
                continue
            x = Conv(int(item), 3, padding=1, kernel_init=kaiming_normal_fan_out,
                     bias_init=nn.initializers.zeros, name=f"features_{idx}")(x)
            idx += 1
            if self.batch_norm:
                x = BatchNorm(axis_name=self.axis_name, name=f"features_{idx}")(x, train)
                idx += 1
            x = nn.relu(x)
            idx += 1
        x = flatten_nchw(adaptive_avg_pool(x, 7))
        dense_init = nn.initializers.normal(0.01)
        zeros = nn.initializers.zeros
        x = nn.relu(Dense(4096, kernel_init=dense_init, bias_init=zeros, name="classifier_0")(x))
        x = Dropout(self.dropout_rate, name="classifier_2")(x, train)
        x = nn.relu(Dense(4096, kernel_init=dense_init, bias_init=zeros, name="classifier_3")(x))
        x = Dropout(self.dropout_rate, name="classifier_5")(x, train)
        return Dense(self.num_classes, kernel_init=dense_init, bias_init=zeros, name="classifier_6")(x)


MODELS = {f"{name}{suffix}": (functools.partial(VGG, CONFIGS[name], bn), 1000, (224, 224, 3))
          for name in CONFIGS for suffix, bn in (("", False), ("_bn", True))}
WEIGHTS = {
    "vgg11": "vgg11-8a719046.pth", "vgg11_bn": "vgg11_bn-6002323d.pth",
    "vgg13": "vgg13-19584684.pth", "vgg13_bn": "vgg13_bn-abd245e5.pth",
    "vgg16": "vgg16-397923af.pth", "vgg16_bn": "vgg16_bn-6c64b313.pth",
    "vgg19": "vgg19-dcbb9e9d.pth", "vgg19_bn": "vgg19_bn-c79401a0.pth",
}
