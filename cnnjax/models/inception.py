"""Inception v3 (Szegedy et al. 2015) in torchvision's layout (``torchvision.models.inception_v3``).

``[N, H, W, 3] -> [N, num_classes]``; H, W >= 75 (torchvision's minimum), 299 for ImageNet. Flax module paths are
torch's with '/' for '.': the stem ``Conv2d_1a_3x3`` .. ``Conv2d_4a_3x3`` (:class:`BasicConv2d`: ``conv`` + ``bn``,
BN eps 0.001) with max-pools ``maxpool1`` / ``maxpool2`` (3 s2), ``Mixed_5b`` .. ``Mixed_5d`` (:class:`InceptionA`),
``Mixed_6a`` (:class:`InceptionB`), ``Mixed_6b`` .. ``Mixed_6e`` (:class:`InceptionC`), the optional auxiliary head
``AuxLogits`` (:class:`InceptionAux`), ``Mixed_7a`` (:class:`InceptionD`), ``Mixed_7b`` / ``Mixed_7c``
(:class:`InceptionE`), global average pool, dropout, ``fc``; e.g. torch ``Mixed_5b.branch1x1.conv.weight`` is
``params/Mixed_5b/branch1x1/conv/kernel``. The branches' 3x3 s1 p1 average pools count the padding (torch's
default ``count_include_pad=True``).

``transform_input=True`` maps ImageNet-normalised inputs to the [-1, 1] scaling of the ported TensorFlow weights
(torchvision sets it for ``IMAGENET1K_V1``; False when built without weights).

Auxiliary head (``aux_logits=True``; torchvision's default is True, here False): its parameters always exist; in
train mode the model returns :class:`InceptionOutputs` ``(logits, aux_logits)`` (torchvision's namedtuple), in
eval mode the logits alone. It needs a 17x17 ``Mixed_6e`` map, i.e. inputs of at least 299x299, in train mode.

Init as torchvision: conv / linear weights N(0, 0.1^2), the aux head's ``conv1`` N(0, 0.01^2) and ``fc``
N(0, 0.001^2) (torchvision's ``trunc_normal_(a=-2, b=2)`` bounds lie at >= 20 standard deviations: a plain
normal); linear biases torch's default; BatchNorm 1 / 0.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnnjax.errors import UsageError
from cnnjax.layers import Dense, Dropout, IntPair, Padding, avg_pool, max_pool
from cnnjax.models.googlenet import BasicConv2d, normal_init, transform_input

Array = jax.Array

MIN_SIZE = 75  # torchvision's minimum input side: Mixed_7a needs a 3x3 map
AUX_MIN_MAP = 17  # the aux head's 5x5 s3 average pool then 5x5 conv need a 17x17 Mixed_6e map (299x299 inputs)


class InceptionOutputs(NamedTuple):
    """Train-mode output with the auxiliary head, as torchvision's ``InceptionOutputs``."""

    logits: Array
    aux_logits: Array


def _conv(module: nn.Module, features: int, kernel: IntPair, name: str, stride: int = 1, padding: Padding = 0,
          stddev: float = 0.1) -> BasicConv2d:
    """A :class:`cnnjax.models.googlenet.BasicConv2d` (conv, BN eps 0.001, ReLU), weights N(0, stddev^2)."""
    return BasicConv2d(features, kernel, stride, padding, stddev, axis_name=module.axis_name, name=name)


def _pool_branch(x: Array) -> Array:
    return avg_pool(x, 3, 1, 1)  # F.avg_pool2d(x, 3, 1, 1): count_include_pad=True


class InceptionA(nn.Module):
    """``[N, H, W, C] -> [N, H, W, 224 + pool_features]``: 1x1 (64); 1x1 -> 5x5 (48, 64); 1x1 -> 3x3 -> 3x3
    (64, 96, 96); avg-pool -> 1x1 (``pool_features``)."""

    pool_features: int
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        b1 = _conv(self, 64, 1, "branch1x1")(x, train)
        b5 = _conv(self, 48, 1, "branch5x5_1")(x, train)
        b5 = _conv(self, 64, 5, "branch5x5_2", padding=2)(b5, train)
        b3 = _conv(self, 64, 1, "branch3x3dbl_1")(x, train)
        b3 = _conv(self, 96, 3, "branch3x3dbl_2", padding=1)(b3, train)
        b3 = _conv(self, 96, 3, "branch3x3dbl_3", padding=1)(b3, train)
        bp = _conv(self, self.pool_features, 1, "branch_pool")(_pool_branch(x), train)
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Grid reduction ``[N, H, W, C] -> [N, (H - 3) // 2 + 1, ., 480 + C]``: 3x3 s2 (384); 1x1 -> 3x3 -> 3x3 s2
    (64, 96, 96); 3x3 s2 max-pool."""

    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        b3 = _conv(self, 384, 3, "branch3x3", stride=2)(x, train)
        bd = _conv(self, 64, 1, "branch3x3dbl_1")(x, train)
        bd = _conv(self, 96, 3, "branch3x3dbl_2", padding=1)(bd, train)
        bd = _conv(self, 96, 3, "branch3x3dbl_3", stride=2)(bd, train)
        return jnp.concatenate([b3, bd, max_pool(x, 3, 2)], axis=-1)


class InceptionC(nn.Module):
    """``[N, H, W, C] -> [N, H, W, 768]`` with factorised 7x7 convs (1x7 / 7x1, ``channels_7x7`` wide): 1x1;
    1x1 -> 1x7 -> 7x1; 1x1 -> 7x1 -> 1x7 -> 7x1 -> 1x7; avg-pool -> 1x1 (192 each)."""

    channels_7x7: int
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        c7 = self.channels_7x7
        b1 = _conv(self, 192, 1, "branch1x1")(x, train)
        b7 = _conv(self, c7, 1, "branch7x7_1")(x, train)
        b7 = _conv(self, c7, (1, 7), "branch7x7_2", padding=(0, 3))(b7, train)
        b7 = _conv(self, 192, (7, 1), "branch7x7_3", padding=(3, 0))(b7, train)
        bd = _conv(self, c7, 1, "branch7x7dbl_1")(x, train)
        bd = _conv(self, c7, (7, 1), "branch7x7dbl_2", padding=(3, 0))(bd, train)
        bd = _conv(self, c7, (1, 7), "branch7x7dbl_3", padding=(0, 3))(bd, train)
        bd = _conv(self, c7, (7, 1), "branch7x7dbl_4", padding=(3, 0))(bd, train)
        bd = _conv(self, 192, (1, 7), "branch7x7dbl_5", padding=(0, 3))(bd, train)
        bp = _conv(self, 192, 1, "branch_pool")(_pool_branch(x), train)
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Grid reduction ``[N, H, W, C] -> [N, (H - 3) // 2 + 1, ., 512 + C]``: 1x1 -> 3x3 s2 (192, 320);
    1x1 -> 1x7 -> 7x1 -> 3x3 s2 (192 each); 3x3 s2 max-pool."""

    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        b3 = _conv(self, 192, 1, "branch3x3_1")(x, train)
        b3 = _conv(self, 320, 3, "branch3x3_2", stride=2)(b3, train)
        b7 = _conv(self, 192, 1, "branch7x7x3_1")(x, train)
        b7 = _conv(self, 192, (1, 7), "branch7x7x3_2", padding=(0, 3))(b7, train)
        b7 = _conv(self, 192, (7, 1), "branch7x7x3_3", padding=(3, 0))(b7, train)
        b7 = _conv(self, 192, 3, "branch7x7x3_4", stride=2)(b7, train)
        return jnp.concatenate([b3, b7, max_pool(x, 3, 2)], axis=-1)


class InceptionE(nn.Module):
    """``[N, H, W, C] -> [N, H, W, 2048]``: 1x1 (320); 1x1 -> (1x3 | 3x1) (384, 384 + 384); 1x1 -> 3x3 ->
    (1x3 | 3x1) (448, 384, 384 + 384); avg-pool -> 1x1 (192)."""

    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        b1 = _conv(self, 320, 1, "branch1x1")(x, train)
        b3 = _conv(self, 384, 1, "branch3x3_1")(x, train)
        b3 = jnp.concatenate([_conv(self, 384, (1, 3), "branch3x3_2a", padding=(0, 1))(b3, train),
                              _conv(self, 384, (3, 1), "branch3x3_2b", padding=(1, 0))(b3, train)], axis=-1)
        bd = _conv(self, 448, 1, "branch3x3dbl_1")(x, train)
        bd = _conv(self, 384, 3, "branch3x3dbl_2", padding=1)(bd, train)
        bd = jnp.concatenate([_conv(self, 384, (1, 3), "branch3x3dbl_3a", padding=(0, 1))(bd, train),
                              _conv(self, 384, (3, 1), "branch3x3dbl_3b", padding=(1, 0))(bd, train)], axis=-1)
        bp = _conv(self, 192, 1, "branch_pool")(_pool_branch(x), train)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionAux(nn.Module):
    """Auxiliary classifier on the 17x17 ``Mixed_6e`` map: 5x5 s3 average pool, 1x1 BasicConv2d to 128
    (``conv0``), 5x5 BasicConv2d to 768 (``conv1``), global average pool, ``fc``."""

    num_classes: int
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        x = _conv(self, 128, 1, "conv0")(avg_pool(x, 5, 3), train)
        x = _conv(self, 768, 5, "conv1", stddev=0.01)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return Dense(self.num_classes, kernel_init=normal_init(0.001), name="fc")(x)


class Inception3(nn.Module):
    """``[N, H, W, 3] -> [N, num_classes]`` logits, or :class:`InceptionOutputs` in train mode with
    ``aux_logits``; ``dropout_rate`` before ``fc`` (torchvision's ``dropout``)."""

    num_classes: int = 1000
    aux_logits: bool = False
    transform_input: bool = False
    dropout_rate: float = 0.5
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array | InceptionOutputs:
        if x.ndim != 4:
            raise UsageError(f"Inception v3 expects an [N, H, W, C] array, got shape {tuple(x.shape)}")
        if min(x.shape[1:3]) < MIN_SIZE:
            raise UsageError(f"Inception v3 needs inputs of at least {MIN_SIZE}x{MIN_SIZE}, got {tuple(x.shape[1:3])}")
        if self.transform_input:
            x = transform_input(x)
        x = _conv(self, 32, 3, "Conv2d_1a_3x3", stride=2)(x, train)
        x = _conv(self, 32, 3, "Conv2d_2a_3x3")(x, train)
        x = _conv(self, 64, 3, "Conv2d_2b_3x3", padding=1)(x, train)
        x = max_pool(x, 3, 2)
        x = _conv(self, 80, 1, "Conv2d_3b_1x1")(x, train)
        x = _conv(self, 192, 3, "Conv2d_4a_3x3")(x, train)
        x = max_pool(x, 3, 2)
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pool_features, self.axis_name, name=name)(x, train)
        x = InceptionB(self.axis_name, name="Mixed_6a")(x, train)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c7, self.axis_name, name=name)(x, train)
        aux = None
        if self.aux_logits and train:
            if min(x.shape[1:3]) < AUX_MIN_MAP:
                raise UsageError("Inception v3's auxiliary head needs inputs of at least 299x299 in train mode, got "
                                 f"{tuple(x.shape[1:3])} at Mixed_6e (use aux_logits=False)")
            aux = InceptionAux(self.num_classes, self.axis_name, name="AuxLogits")(x, train)
        elif self.aux_logits and self.is_initializing():  # create the head's parameters for eval-mode inits too
            dummy = jnp.zeros((1, AUX_MIN_MAP, AUX_MIN_MAP, x.shape[-1]), x.dtype)
            InceptionAux(self.num_classes, self.axis_name, name="AuxLogits")(dummy, train)
        x = InceptionD(self.axis_name, name="Mixed_7a")(x, train)
        x = InceptionE(self.axis_name, name="Mixed_7b")(x, train)
        x = InceptionE(self.axis_name, name="Mixed_7c")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        x = Dropout(self.dropout_rate, name="dropout")(x, train)
        logits = Dense(self.num_classes, kernel_init=normal_init(0.1), name="fc")(x)
        if self.aux_logits and train:
            return InceptionOutputs(logits, aux)
        return logits


MODELS = {"inception_v3": (Inception3, 1000, (299, 299, 3))}
WEIGHTS = {"inception_v3": "inception_v3_google-0cc3c7bd.pth"}
