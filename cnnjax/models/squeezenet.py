"""SqueezeNet 1.0 / 1.1 (Iandola et al. 2016) in torchvision's layout.

Flax module names are torchvision's module paths (``features.0``, ``features.3/squeeze``,
``features.3/expand1x1``, ``classifier.1``), so a torchvision state dict maps 1:1.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.errors import UsageError
from cnnjax.layers import Conv, Dropout, global_avg_pool, max_pool

Array = jax.Array

# torch's nn.init.kaiming_uniform_ with its defaults: U(-sqrt(6 / fan_in), sqrt(6 / fan_in)).
kaiming_uniform_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "uniform")
_zeros = nn.initializers.zeros


class Fire(nn.Module):
    """torchvision ``Fire``: ``[N, H, W, C] -> [N, H, W, expand1x1 + expand3x3]``.

    ``squeeze`` (1x1 conv to ``squeeze_planes``) -> ReLU, then ``expand1x1`` (1x1) and ``expand3x3`` (3x3,
    padding 1), each with ReLU, concatenated along channels (1x1 first). Convs have biases; init kaiming-uniform
    (fan-in) weights and zero biases, as torchvision's SqueezeNet.
    """

    squeeze_planes: int
    expand1x1_planes: int
    expand3x3_planes: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = functools.partial(Conv, kernel_init=kaiming_uniform_fan_in, bias_init=_zeros)
        x = nn.relu(conv(self.squeeze_planes, 1, name="squeeze")(x))
        return jnp.concatenate([nn.relu(conv(self.expand1x1_planes, 1, name="expand1x1")(x)),
                                nn.relu(conv(self.expand3x3_planes, 3, padding=1, name="expand3x3")(x))], axis=-1)


# version -> (stem conv (features, kernel), the rest of `features` from index 3: "M" a ceil-mode 3x3 / 2 max-pool,
# a triple a Fire module's (squeeze, expand1x1, expand3x3)), as torchvision.
CONFIGS: dict[str, tuple[tuple[int, int], tuple]] = {
    "1_0": ((96, 7), ((16, 64, 64), (16, 64, 64), (32, 128, 128), "M", (32, 128, 128), (48, 192, 192),
                      (48, 192, 192), (64, 256, 256), "M", (64, 256, 256))),
    "1_1": ((64, 3), ((16, 64, 64), (16, 64, 64), "M", (32, 128, 128), (32, 128, 128), "M", (48, 192, 192),
                      (48, 192, 192), (64, 256, 256), (64, 256, 256))),
}
# torchvision's min_size for each version: the smallest side every pool still gives an output for.
MIN_SIZES = {"1_0": 21, "1_1": 17}


class SqueezeNet(nn.Module):
    """``[N, H, W, 3] -> [N, num_classes]``; H, W >= 21 (1.0) / 17 (1.1), torchvision's ``min_size``; 224 for
    ImageNet.

    ``features``: ``features.0`` stem conv (stride 2, no padding; 1.0: 7x7 / 96, 1.1: 3x3 / 64), ReLU, then 3x3
    stride-2 max-pools with ``ceil_mode=True`` and :class:`Fire` modules at torchvision's indices. ``classifier``:
    dropout ``classifier.0`` (``dropout_rate``, torch default 0.5), ``classifier.1`` 1x1 conv to ``num_classes``
    (init ``N(0, 0.01)``, zero bias), ReLU, global average pool. Every other conv: kaiming-uniform, zero bias.
    """

    version: str = "1_0"
    num_classes: int = 1000
    dropout_rate: float = 0.5

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if self.version not in CONFIGS:
            raise UsageError(f"unknown SqueezeNet version {self.version!r}; choose one of: {', '.join(CONFIGS)}")
        min_size = MIN_SIZES[self.version]
        if x.ndim != 4 or min(x.shape[1:3]) < min_size:
            raise UsageError(f"SqueezeNet {self.version.replace('_', '.')} needs [N, H, W, C] inputs of at least "
                             f"{min_size}x{min_size}, got shape {tuple(x.shape)}")
        (stem_features, stem_kernel), layers = CONFIGS[self.version]
        x = nn.relu(Conv(stem_features, stem_kernel, 2, kernel_init=kaiming_uniform_fan_in, bias_init=_zeros,
                         name="features.0")(x))
        x = max_pool(x, 3, 2, ceil_mode=True)  # features.2
        for index, item in enumerate(layers, start=3):
            if item == "M":
                x = max_pool(x, 3, 2, ceil_mode=True)
            else:
                x = Fire(*item, name=f"features.{index}")(x)
        x = Dropout(self.dropout_rate, name="classifier.0")(x, train)
        x = nn.relu(Conv(self.num_classes, 1, kernel_init=nn.initializers.normal(0.01), bias_init=_zeros,
                         name="classifier.1")(x))
        return global_avg_pool(x)


MODELS = {f"squeezenet{version}": (functools.partial(SqueezeNet, version), 1000, (224, 224, 3))
          for version in CONFIGS}
WEIGHTS = {
    "squeezenet1_0": "squeezenet1_0-b66bff10.pth",
    "squeezenet1_1": "squeezenet1_1-b8a52dc0.pth",
}
