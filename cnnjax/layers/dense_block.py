"""DenseNet-BC blocks (Huang et al. 2017), NHWC with torchvision's semantics and child names.

``DenseLayer`` is torchvision's ``_DenseLayer`` (BN-ReLU-1x1 conv-BN-ReLU-3x3 conv, returning only the new
``growth_rate`` channels), ``DenseBlock`` its ``_DenseBlock`` (each layer sees the concatenation, along
channels, of the block input and every earlier layer's output; the block returns all of them concatenated, in
that order) and ``Transition`` its ``_Transition`` (BN-ReLU-1x1 conv-2x2 average pool). Children are named
``norm1`` / ``conv1`` / ``norm2`` / ``conv2``, ``denselayer{k}`` (from 1) and ``norm`` / ``conv``, as torchvision's
modules, so a state dict maps 1:1 (see :mod:`cnnjax.port`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.errors import UsageError
from cnnjax.layers.core import BatchNorm, Conv, Dropout, avg_pool, check_nhwc

Array = jax.Array

# torchvision's DenseNet conv init: nn.init.kaiming_normal_ with its defaults (fan_in, gain sqrt(2), untruncated).
kaiming_normal_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class DenseLayer(nn.Module):
    """``[N, H, W, C] -> [N, H, W, growth_rate]``: the new features of one dense layer (not concatenated).

    ``norm1`` -> ReLU -> ``conv1`` (1x1, ``bn_size * growth_rate`` channels, no bias) -> ``norm2`` -> ReLU ->
    ``conv2`` (3x3, padding 1, ``growth_rate`` channels, no bias), then dropout with ``dropout_rate`` in training
    (``'dropout'`` rng; torchvision's ``F.dropout`` on the new features). BatchNorm momentum / epsilon are torch's
    defaults (0.1 / 1e-5; Flax momentum 0.9).
    """

    growth_rate: int
    bn_size: int = 4
    dropout_rate: float = 0.0
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        check_nhwc(x, "DenseLayer")
        y = nn.relu(BatchNorm(axis_name=self.axis_name, name="norm1")(x, train))
        y = Conv(self.bn_size * self.growth_rate, 1, use_bias=False, kernel_init=kaiming_normal_fan_in,
                 name="conv1")(y)
        y = nn.relu(BatchNorm(axis_name=self.axis_name, name="norm2")(y, train))
        y = Conv(self.growth_rate, 3, padding=1, use_bias=False, kernel_init=kaiming_normal_fan_in, name="conv2")(y)
        return Dropout(self.dropout_rate, name="dropout")(y, train)


class DenseBlock(nn.Module):
    """``[N, H, W, C] -> [N, H, W, C + num_layers * growth_rate]``: ``num_layers`` :class:`DenseLayer` children
    ``denselayer1..denselayer{num_layers}``; layer ``k`` takes ``C + (k - 1) * growth_rate`` channels (the input
    and every earlier layer's output, concatenated along channels in that order) and the block returns the input
    followed by all ``num_layers`` outputs."""

    num_layers: int
    growth_rate: int
    bn_size: int = 4
    dropout_rate: float = 0.0
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        check_nhwc(x, "DenseBlock")
        if self.num_layers < 1:
            raise UsageError(f"DenseBlock needs at least one layer, got num_layers={self.num_layers}")
        for k in range(1, self.num_layers + 1):
            new = DenseLayer(self.growth_rate, self.bn_size, self.dropout_rate, self.axis_name,
                             name=f"denselayer{k}")(x, train)
            x = jnp.concatenate([x, new], axis=-1)
        return x


class Transition(nn.Module):
    """``[N, H, W, C] -> [N, floor(H / 2), floor(W / 2), out_features]``: ``norm`` -> ReLU -> ``conv`` (1x1, no
    bias) -> 2x2 average pool with stride 2 (torchvision ``_Transition``; DenseNet halves the channels here)."""

    out_features: int
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        check_nhwc(x, "Transition")
        if min(x.shape[1:3]) < 2:
            raise UsageError(f"Transition needs a feature map of at least 2x2 (a 2x2 average pool), got "
                             f"{tuple(x.shape[1:3])}")
        x = nn.relu(BatchNorm(axis_name=self.axis_name, name="norm")(x, train))
        x = Conv(self.out_features, 1, use_bias=False, kernel_init=kaiming_normal_fan_in, name="conv")(x)
        return avg_pool(x, 2, 2)
