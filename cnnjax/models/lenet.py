"""LeNet-5 (LeCun et al. 1998) as in seed 003: tanh activations, average-pool subsampling."""

from __future__ import annotations

import flax.linen as nn
import jax

from cnnjax.layers import AvgPool, Conv, Dense, check_head_input, flatten_nchw

Array = jax.Array

# XLA:CPU vectorises loops over 8-wide channel dims but not over LeNet's 6: conv1 -> tanh -> pool then
# runs several times slower. Computed as 8 channels (2 exactly zero), LeNet-5's train step at batch 128
# ran 1.21x and 1.31x faster in two paired runs (experiments.bench_ab; experiments/PERFORMANCE.md, "8-channel
# LeNet").
CPU_CHANNEL_PAD = 2


class LeNet5(nn.Module):
    """``[N, 32, 32, 1] -> [N, num_classes]``: conv5x5x6 -> pool -> conv5x5x16 -> pool -> 120 -> 84.

    ``conv1_padding=2`` takes 28x28 MNIST images to the same 28x28x6 first feature map.
    ``pad_channels`` (default: on the CPU only) carries the 6-channel maps as 8 channels, the extra two
    exactly zero (:class:`cnnjax.layers.Conv`'s ``pad_features`` / ``in_features``): the same parameters
    and outputs, a faster step on the CPU. Introspection switches it off
    (:func:`cnnjax.layers.without_channel_padding`).
    """

    num_classes: int = 10
    conv1_padding: int = 0
    pad_channels: bool | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        pad = self.pad_channels if self.pad_channels is not None else jax.default_backend() == "cpu"
        extra = CPU_CHANNEL_PAD if pad else 0
        conv1 = Conv(6, 5, padding=self.conv1_padding, pad_features=extra, name="conv1")
        x = AvgPool(2, name="pool1")(nn.tanh(conv1(x)))
        x = AvgPool(2, name="pool2")(nn.tanh(Conv(16, 5, in_features=6 if pad else None, name="conv2")(x)))
        check_head_input(
            "lenet5", x, (5, 5, 16),
            "feed 32x32 images, or 28x28 images with conv1_padding=2 (e.g. create('lenet5', conv1_padding=2))",
        )
        x = nn.tanh(Dense(120, name="fc1")(flatten_nchw(x)))
        x = nn.tanh(Dense(84, name="fc2")(x))
        return Dense(self.num_classes, name="fc3")(x)
