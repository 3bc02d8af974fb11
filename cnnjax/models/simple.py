"""Small CNNs from the tutorials: TinyCNN, SimpleCNN, ImprovedCNN and the GAP "modern CNN".

All take ``[N, H, W, C]`` input and return ``[N, num_classes]`` logits. Models with a Dense head
flatten in torch's NCHW order so torch weights port 1:1.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from cnnjax.layers import BatchNorm, Conv, Dense, Dropout, MaxPool, check_head_input, flatten_nchw, global_avg_pool

Array = jax.Array


class TinyCNN(nn.Module):
    """Seed 004 stripes net, 8x8x1 input: Conv(1->4, 3x3, pad 1) -> ReLU -> MaxPool 2 -> FC(64->2)."""

    num_classes: int = 2

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = MaxPool(2, name="pool")(nn.relu(Conv(4, 3, padding=1, name="conv1")(x)))
        check_head_input("tiny_cnn", x, (4, 4, 4), "feed 8x8x1 images")
        return Dense(self.num_classes, name="fc1")(flatten_nchw(x))


class SimpleCNN(nn.Module):
    """Seed 004 SimpleCNN for 32x32x3: conv 3->16, pool, conv 16->32, pool, FC 2048->128->classes.

    ``image_size``: input height = width (28 for unpadded MNIST-style images: FC 1568->128).
    """

    num_classes: int = 10
    image_size: int = 32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = MaxPool(2, name="pool1")(nn.relu(Conv(16, 3, padding=1, name="conv1")(x)))
        x = MaxPool(2, name="pool2")(nn.relu(Conv(32, 3, padding=1, name="conv2")(x)))
        side = self.image_size // 4
        check_head_input("simple_cnn", x, (side, side, 32),
                         f"feed {self.image_size}x{self.image_size} images (or set model.kwargs.image_size)")
        x = nn.relu(Dense(128, name="fc1")(flatten_nchw(x)))
        return Dense(self.num_classes, name="fc2")(x)


class ImprovedCNN(nn.Module):
    """Seed 004 ImprovedCNN for 32x32: two [conv-BN-ReLU x2, pool, dropout] stages, FC-BN-ReLU head."""

    num_classes: int = 10
    dropout_rate: float = 0.25
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        def conv_bn(x: Array, features: int, idx: int) -> Array:
            x = Conv(features, 3, padding=1, name=f"conv{idx}")(x)
            return nn.relu(BatchNorm(axis_name=self.axis_name, name=f"bn{idx}")(x, train))

        x = conv_bn(conv_bn(x, 32, 1), 32, 2)
        x = Dropout(self.dropout_rate, name="drop1")(MaxPool(2, name="pool1")(x), train)
        x = conv_bn(conv_bn(x, 64, 3), 64, 4)
        x = Dropout(self.dropout_rate, name="drop2")(MaxPool(2, name="pool2")(x), train)
        check_head_input("improved_cnn", x, (8, 8, 64), "feed 32x32 images")
        x = Dense(256, name="fc1")(flatten_nchw(x))
        x = nn.relu(BatchNorm(axis_name=self.axis_name, name="bn5")(x, train))
        x = Dropout(self.dropout_rate, name="drop3")(x, train)
        return Dense(self.num_classes, name="fc2")(x)


class GapCNN(nn.Module):
    """Seed 003 "modern CNN": convs 3->32->64->128 (pools after the first two), GAP, linear head.

    Any input size of at least 4x4 works: global average pooling removes the spatial size.
    """

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = MaxPool(2, name="pool1")(nn.relu(Conv(32, 3, padding=1, name="conv1")(x)))
        x = MaxPool(2, name="pool2")(nn.relu(Conv(64, 3, padding=1, name="conv2")(x)))
        x = nn.relu(Conv(128, 3, padding=1, name="conv3")(x))
        return Dense(self.num_classes, name="fc")(global_avg_pool(x))
