"""CIFAR ResNets (He et al. 2015, Sec. 4.2): depth 6n+2, widths 16/32/64, option-A shortcuts."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.errors import UsageError
from cnnjax.layers import BatchNorm, Conv, Dense, global_avg_pool, kaiming_normal_fan_out

Array = jax.Array


def option_a_shortcut(x: Array, features: int, stride: int) -> Array:
    """Parameter-free shortcut: subsample by ``stride`` and zero-pad channels evenly to ``features``."""
    if stride == 1 and x.shape[-1] == features:
        return x
    x = x[:, ::stride, ::stride, :]
    extra = features - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


class CifarBasicBlock(nn.Module):
    """Two 3x3 conv-BN with an option-A shortcut: ``[N, H, W, C] -> [N, H/s, W/s, features]``."""

    features: int
    stride: int = 1
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        y = Conv(self.features, 3, self.stride, 1, use_bias=False, kernel_init=kaiming_normal_fan_out,
                 name="conv1")(x)
        y = nn.relu(BatchNorm(axis_name=self.axis_name, name="bn1")(y, train))
        y = Conv(self.features, 3, 1, 1, use_bias=False, kernel_init=kaiming_normal_fan_out, name="conv2")(y)
        y = BatchNorm(axis_name=self.axis_name, name="bn2")(y, train)
        return nn.relu(y + option_a_shortcut(x, self.features, self.stride))


class CifarResNet(nn.Module):
    """``[N, H, W, 3] -> [N, num_classes]`` with ``depth = 6 n + 2`` (20, 32, 44, 56, 110)."""

    depth: int = 20
    num_classes: int = 10
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if (self.depth - 2) % 6:
            raise UsageError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {self.depth}")
        n = (self.depth - 2) // 6
        x = Conv(16, 3, 1, 1, use_bias=False, kernel_init=kaiming_normal_fan_out, name="conv1")(x)
        x = nn.relu(BatchNorm(axis_name=self.axis_name, name="bn1")(x, train))
        for stage, width in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                x = CifarBasicBlock(width, stride, self.axis_name, name=f"layer{stage + 1}_{i}")(x, train)
        return Dense(self.num_classes, name="fc")(global_avg_pool(x))
