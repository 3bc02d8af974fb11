"""ConvNeXt-Tiny/Small/Base/Large (Liu et al. 2022, "A ConvNet for the 2020s") in torchvision's layout.

NHWC throughout, so torchvision's ``Permute`` modules vanish: the block's ``nn.LayerNorm`` and its two
``nn.Linear`` act on the channel axis directly, and ``LayerNorm2d`` is the same :class:`ChannelLayerNorm`.
Flax module paths are torchvision's module paths (``/`` for ``.``), so a state dict maps 1:1:

* stem ``features.0`` = ``features.0.0`` Conv 4x4 stride 4 (bias) + ``features.0.1`` LayerNorm2d;
* stages ``features.{1,3,5,7}.{j}`` = :class:`CNBlock` (``block.0`` depthwise 7x7 conv, ``block.2`` LayerNorm,
  ``block.3`` / ``block.5`` Linear ``C -> 4C -> C`` with exact GELU between, raw parameter ``layer_scale``
  of torch's shape ``[C, 1, 1]``, row-mode stochastic depth);
* downsampling ``features.{2,4,6}`` = ``.0`` LayerNorm2d + ``.1`` Conv 2x2 stride 2 (bias);
* head: global average pool, ``classifier.0`` LayerNorm2d, ``classifier.2`` Linear.

All LayerNorms use ``eps=1e-6``. Init as torchvision: conv / linear weights ``trunc_normal(std=0.02)`` (torch's
absolute bounds ``[-2, 2]``), zero biases, LayerNorm ``(1, 0)``, ``layer_scale = 1e-6``. Block ``k`` of ``K``
(counted over all stages) drops its residual branch with probability ``stochastic_depth_prob * k / (K - 1)``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.errors import UsageError
from cnnjax.layers import ChannelLayerNorm, Conv, Dense, StochasticDepth, global_avg_pool

Array = jax.Array

_STD = 0.02
# torch's trunc_normal_(std=0.02) truncates at the absolute bounds [-2, 2], i.e. +-100 standard deviations.
trunc_normal_init = nn.initializers.truncated_normal(stddev=_STD, lower=-2.0 / _STD, upper=2.0 / _STD)
_zeros = nn.initializers.zeros
_EPS = 1e-6


class CNBlock(nn.Module):
    """torchvision ``CNBlock``: ``x + StochasticDepth(layer_scale * block(x))``, ``[N, H, W, C] -> [N, H, W, C]``.

    ``block`` = depthwise 7x7 conv (pad 3, bias) ``block.0``, LayerNorm ``block.2``, Linear ``C -> 4C``
    ``block.3``, exact GELU, Linear ``4C -> C`` ``block.5``. ``layer_scale`` is a parameter of shape
    ``[C, 1, 1]`` (torch's), initialised to ``layer_scale_init``.
    """

    dim: int
    layer_scale_init: float = 1e-6
    stochastic_depth_prob: float = 0.0

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        dim = self.dim
        y = Conv(dim, 7, 1, 3, groups=dim, kernel_init=trunc_normal_init, bias_init=_zeros, name="block.0")(x)
        y = ChannelLayerNorm(_EPS, name="block.2")(y)
        y = Dense(4 * dim, kernel_init=trunc_normal_init, bias_init=_zeros, name="block.3")(y)
        y = nn.gelu(y, approximate=False)
        y = Dense(dim, kernel_init=trunc_normal_init, bias_init=_zeros, name="block.5")(y)
        gamma = self.param("layer_scale", nn.initializers.constant(self.layer_scale_init), (dim, 1, 1), jnp.float32)
        y = y * gamma.reshape(dim).astype(y.dtype)
        y = StochasticDepth(self.stochastic_depth_prob, name="stochastic_depth")(y, train)
        return x + y


class ConvNeXt(nn.Module):
    """``[N, H, W, 3] -> [N, num_classes]`` (any H, W >= 32; total stride 32, every downsampling floors).

    ``channels[s]`` / ``depths[s]``: width and number of blocks of stage ``s`` (torchvision's ``CNBlockConfig``
    list; each stage but the last is followed by a downsampling to ``channels[s + 1]``).
    ``stochastic_depth_prob``: the last block's drop probability (linear from 0 over all blocks), torchvision's
    default per model. ``layer_scale``: initial value of every block's ``layer_scale``.
    Train mode needs ``rngs={'dropout': key}`` when ``stochastic_depth_prob > 0``.
    """

    channels: Sequence[int]
    depths: Sequence[int]
    stochastic_depth_prob: float = 0.0
    layer_scale: float = 1e-6
    num_classes: int = 1000

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if x.ndim != 4:
            raise UsageError(f"ConvNeXt expects an [N, H, W, C] array, got shape {tuple(x.shape)}")
        if min(x.shape[1:3]) < 32:
            raise UsageError(f"ConvNeXt needs inputs of at least 32x32 (total stride 32), got {tuple(x.shape[1:3])}")
        if len(self.channels) != len(self.depths) or not self.depths:
            raise UsageError(f"ConvNeXt needs one width per stage, got channels {self.channels}, depths {self.depths}")
        conv = functools.partial(Conv, kernel_init=trunc_normal_init, bias_init=_zeros)
        x = conv(self.channels[0], 4, 4, 0, name="features.0.0")(x)
        x = ChannelLayerNorm(_EPS, name="features.0.1")(x)
        total = sum(self.depths)
        block_id = 0
        for stage, (dim, depth) in enumerate(zip(self.channels, self.depths, strict=True)):
            index = 2 * stage + 1
            for j in range(depth):
                rate = self.stochastic_depth_prob * block_id / (total - 1.0) if total > 1 else 0.0
                x = CNBlock(dim, self.layer_scale, rate, name=f"features.{index}.{j}")(x, train)
                block_id += 1
            if stage + 1 < len(self.channels):
                x = ChannelLayerNorm(_EPS, name=f"features.{index + 1}.0")(x)
                x = conv(self.channels[stage + 1], 2, 2, 0, name=f"features.{index + 1}.1")(x)
        x = global_avg_pool(x)
        x = ChannelLayerNorm(_EPS, name="classifier.0")(x)
        return Dense(self.num_classes, kernel_init=trunc_normal_init, bias_init=_zeros, name="classifier.2")(x)


# name -> (stage widths, stage depths, torchvision's default stochastic_depth_prob).
CONFIGS: dict[str, tuple[tuple[int, ...], tuple[int, ...], float]] = {
    "convnext_tiny": ((96, 192, 384, 768), (3, 3, 9, 3), 0.1),
    "convnext_small": ((96, 192, 384, 768), (3, 3, 27, 3), 0.4),
    "convnext_base": ((128, 256, 512, 1024), (3, 3, 27, 3), 0.5),
    "convnext_large": ((192, 384, 768, 1536), (3, 3, 27, 3), 0.5),
}
MODELS = {
    name: (functools.partial(ConvNeXt, channels, depths, stochastic_depth_prob=prob), 1000, (224, 224, 3))
    for name, (channels, depths, prob) in CONFIGS.items()
}
WEIGHTS = {
    "convnext_tiny": "convnext_tiny-983f1562.pth",
    "convnext_small": "convnext_small-0c510722.pth",
    "convnext_base": "convnext_base-6075fbad.pth",
    "convnext_large": "convnext_large-ea097f82.pth",
}
