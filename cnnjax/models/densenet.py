"""DenseNet-BC (Huang et al. 2017) in torchvision's layout: DenseNet-121 / 161 / 169 / 201.

Flax module names are torchvision's module paths (``features.conv0``, ``features.denseblock1/denselayer1/norm1``,
``features.transition1/conv``, ``features.norm5``, ``classifier``), so a torchvision state dict maps 1:1. (The
official weight files store dense-layer keys in an older form, ``denselayer1.norm.1.weight``, which torchvision
renames to ``denselayer1.norm1.weight`` when it loads them.)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax

from cnnjax.errors import UsageError
from cnnjax.layers import BatchNorm, Conv, Dense, global_avg_pool, max_pool
from cnnjax.layers.dense_block import DenseBlock, Transition, kaiming_normal_fan_in

Array = jax.Array

# Smallest input side: the stem divides by 4 (rounding up), then three 2x2 average pools need 8 -> 4 -> 2 -> 1.
MIN_SIZE = 29


class DenseNet(nn.Module):
    """``[N, H, W, 3] -> [N, num_classes]``, H, W >= 29 (torchvision's ``min_size``); 224 for ImageNet.

    ``features``: ``conv0`` (7x7, stride 2, padding 3, ``num_init_features`` channels, no bias), ``norm0``, ReLU,
    3x3 max-pool (stride 2, padding 1), then ``denseblock{i}`` (:class:`~cnnjax.layers.dense_block.DenseBlock` of
    ``block_config[i - 1]`` layers) each followed, but the last, by ``transition{i}``
    (:class:`~cnnjax.layers.dense_block.Transition` halving the channels, floor), and ``norm5``; then ReLU, global
    average pool and the ``classifier`` Linear. ``dropout_rate`` (torchvision's ``drop_rate``, default 0) is the
    dropout after each dense layer. Init as torchvision: convs kaiming-normal (fan-in), BatchNorm 1 / 0, Linear
    bias 0 (its weight torch's default).
    """

    growth_rate: int = 32
    block_config: Sequence[int] = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4
    dropout_rate: float = 0.0
    num_classes: int = 1000
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if x.ndim != 4 or min(x.shape[1:3]) < MIN_SIZE:
            raise UsageError(f"DenseNet needs [N, H, W, C] inputs of at least {MIN_SIZE}x{MIN_SIZE} (the stem and "
                             f"three 2x2 transition pools), got shape {tuple(x.shape)}")
        x = Conv(self.num_init_features, 7, 2, 3, use_bias=False, kernel_init=kaiming_normal_fan_in,
                 name="features.conv0")(x)
        x = nn.relu(BatchNorm(axis_name=self.axis_name, name="features.norm0")(x, train))
        x = max_pool(x, 3, 2, 1)
        features = self.num_init_features
        for i, num_layers in enumerate(self.block_config, start=1):
            x = DenseBlock(num_layers, self.growth_rate, self.bn_size, self.dropout_rate, self.axis_name,
                           name=f"features.denseblock{i}")(x, train)
            features += num_layers * self.growth_rate
            if i != len(self.block_config):
                features //= 2
                x = Transition(features, self.axis_name, name=f"features.transition{i}")(x, train)
        x = nn.relu(BatchNorm(axis_name=self.axis_name, name="features.norm5")(x, train))
        x = global_avg_pool(x)
        return Dense(self.num_classes, bias_init=nn.initializers.zeros, name="classifier")(x)


# name -> (growth_rate, block_config, num_init_features), as torchvision's builders.
CONFIGS: dict[str, tuple[int, tuple[int, ...], int]] = {
    "densenet121": (32, (6, 12, 24, 16), 64),
    "densenet161": (48, (6, 12, 36, 24), 96),
    "densenet169": (32, (6, 12, 32, 32), 64),
    "densenet201": (32, (6, 12, 48, 32), 64),
}

MODELS = {name: (functools.partial(DenseNet, growth, blocks, init), 1000, (224, 224, 3))
          for name, (growth, blocks, init) in CONFIGS.items()}
WEIGHTS = {
    "densenet121": "densenet121-a639ec97.pth",
    "densenet161": "densenet161-8d451a50.pth",
    "densenet169": "densenet169-b2777c0a.pth",
    "densenet201": "densenet201-c1103571.pth",
}
