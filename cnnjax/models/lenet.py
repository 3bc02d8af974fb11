"""LeNet-5 (LeCun et al. 1998) as in seed 003: tanh activations, average-pool subsampling."""

from __future__ import annotations

import flax.linen as nn
import jax

from cnnjax.layers import AvgPool, Conv, Dense, check_head_input, flatten_nchw

Array = jax.Array

class LeNet5(nn.Module):
    """``[N, 32, 32, 1] -> [N, num_classes]``: conv5x5x6 -> pool -> conv5x5x16 -> pool -> 120 -> 84.

    ``conv1_padding=2`` takes 28x28 MNIST images to the same 28x28x6 first feature map.
    """

    num_classes: int = 10
    conv1_padding: int = 0

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = AvgPool(2, name="pool1")(nn.tanh(Conv(6, 5, padding=self.conv1_padding, name="conv1")(x)))
        x = AvgPool(2, name="pool2")(nn.tanh(Conv(16, 5, name="conv2")(x)))
        check_head_input(
            "lenet5", x, (5, 5, 16),
            "feed 32x32 images, or 28x28 images with conv1_padding=2 (e.g. create('lenet5', conv1_padding=2))",
        )
        x = nn.tanh(Dense(120, name="fc1")(flatten_nchw(x)))
        x = nn.tanh(Dense(84, name="fc2")(x))
        return Dense(self.num_classes, name="fc3")(x)
