"""AlexNet in torchvision's layout (the "one weird trick" variant, Krizhevsky 2014).

Flax module names are torchvision's module paths (``features.0``, ``features.3``, ..., ``classifier.1``,
``classifier.4``, ``classifier.6``), so a torchvision state dict maps 1:1.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from cnnjax.errors import UsageError
from cnnjax.layers import Conv, Dense, Dropout, adaptive_avg_pool, flatten_nchw, max_pool

Array = jax.Array

# Smallest input side (torchvision's min_size): 63 -> 15 (conv) -> 7 -> 3 -> 1 (three 3x3 / 2 max-pools).
MIN_SIZE = 63

# `features` convs: (torchvision index, channels, kernel, stride, padding, followed by a 3x3 / 2 max-pool).
_FEATURES = ((0, 64, 11, 4, 2, True), (3, 192, 5, 1, 2, True), (6, 384, 3, 1, 1, False),
             (8, 256, 3, 1, 1, False), (10, 256, 3, 1, 1, True))


class AlexNet(nn.Module):
    """``[N, H, W, 3] -> [N, num_classes]``; H, W >= 63 (torchvision's ``min_size``), 224 for ImageNet.

    ``features``: five convs with ReLU (11x11 / 4 pad 2 -> 64, 5x5 pad 2 -> 192, 3x3 pad 1 -> 384, 256, 256), a 3x3
    stride-2 max-pool (floor mode) after the 1st, 2nd and 5th; adaptive average pool to 6x6 (the identity at 224),
    flattened in torch's NCHW order; ``classifier``: dropout ``.0``, Linear 9216 -> 4096 ``.1``, ReLU, dropout
    ``.3``, Linear 4096 -> 4096 ``.4``, ReLU, Linear ``.6``. ``dropout_rate`` is torch's ``dropout`` (0.5).
    Init: torch's defaults (torchvision sets none).
    """

    num_classes: int = 1000
    dropout_rate: float = 0.5

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if x.ndim != 4 or min(x.shape[1:3]) < MIN_SIZE:
            raise UsageError(f"AlexNet needs [N, H, W, C] inputs of at least {MIN_SIZE}x{MIN_SIZE} (a stride-4 conv "
                             f"and three 3x3 / 2 max-pools), got shape {tuple(x.shape)}")
        for index, features, kernel, stride, padding, pool in _FEATURES:
            x = nn.relu(Conv(features, kernel, stride, padding, name=f"features.{index}")(x))
            if pool:
                x = max_pool(x, 3, 2)
        x = flatten_nchw(adaptive_avg_pool(x, 6))
        x = Dropout(self.dropout_rate, name="classifier.0")(x, train)
        x = nn.relu(Dense(4096, name="classifier.1")(x))
        x = Dropout(self.dropout_rate, name="classifier.3")(x, train)
        x = nn.relu(Dense(4096, name="classifier.4")(x))
        return Dense(self.num_classes, name="classifier.6")(x)


MODELS = {"alexnet": (AlexNet, 1000, (224, 224, 3))}
WEIGHTS = {"alexnet": "alexnet-owt-7be5be79.pth"}
