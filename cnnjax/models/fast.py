"""airbench94-style fast CIFAR net (Keller Jordan's public recipe): the architecture only.

``[N, 32, 32, C] -> [N, num_classes]``: a 2x2 patch-whitening conv (``2 * C * 4`` channels, no
padding) + GELU, three groups ``conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU``
of widths 64 / 256 / 256, a 3x3 max-pool, a bias-free linear head and a fixed 1/9 logit scale.
``residual=True`` gives each group airbench96's third conv and a residual over its last two convs
(``... -> GELU = x0 -> conv2 -> BN -> GELU -> conv3 -> BN -> + x0 -> GELU``).
BatchNorm has no scale (bias only), eps 1e-12 and Flax momentum 0.6 (torch 0.4). Group convs
start as partial identities (torch ``dirac_`` on the first ``C_in`` filters), as in airbench.
:func:`whitening_kernel` computes the whitening filters from training images; training keeps
them frozen.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.layers import BatchNorm, Conv, Dense, MaxPool, check_head_input, torch_default_kernel_init

Array = jax.Array


def partial_dirac_init(key: Array, shape: Sequence[int], dtype=jnp.float32) -> Array:
    """torch default init, then the first ``C_in`` output filters set to identity (HWIO kernel)."""
    kh, kw, c_in, c_out = shape
    kernel = torch_default_kernel_init(key, shape, dtype)
    n = min(c_in, c_out)
    kernel = kernel.at[:, :, :, :n].set(0.0)
    return kernel.at[kh // 2, kw // 2, jnp.arange(n), jnp.arange(n)].set(1.0)


def gelu(x: Array) -> Array:
    """Exact (erf) GELU, torch's ``nn.GELU()`` default."""
    return jax.nn.gelu(x, approximate=False)


class ConvGroup(nn.Module):
    """``[N, H, W, C] -> [N, H/2, W/2, features]``: conv, pool, BN, GELU, conv, BN, GELU; with
    ``residual`` a third conv and BN, then the sum with the first GELU's output, then GELU."""

    features: int
    bn_momentum: float = 0.6
    residual: bool = False

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        bn = lambda name: BatchNorm(momentum=self.bn_momentum, epsilon=1e-12, use_scale=False, name=name)  # noqa: E731
        conv = lambda name: Conv(self.features, 3, padding=1, use_bias=False,  # noqa: E731
                                 kernel_init=partial_dirac_init, name=name)
        x = gelu(bn("norm1")(MaxPool(2, name="pool")(conv("conv1")(x)), train))
        y = gelu(bn("norm2")(conv("conv2")(x), train))
        if not self.residual:
            return y
        return gelu(bn("norm3")(conv("conv3")(y), train) + x)


class FastNet(nn.Module):
    """airbench94-style net for 32x32 inputs (CIFAR, or Fashion-MNIST padded to 32x32)."""

    num_classes: int = 10
    widths: Sequence[int] = (64, 256, 256)
    bn_momentum: float = 0.6
    logit_scale: float = 1.0 / 9.0
    residual: bool = False  # airbench96's groups: three convs, a residual over the last two

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        whiten_width = 2 * x.shape[-1] * 2 * 2
        x = gelu(Conv(whiten_width, 2, padding=0, use_bias=True, bias_init=nn.initializers.zeros,
                      name="whiten")(x))
        for i, width in enumerate(self.widths, start=1):
            x = ConvGroup(width, self.bn_momentum, self.residual, name=f"block{i}")(x, train)
        x = MaxPool(3, name="pool")(x)
        check_head_input("fast_cnn", x, (1, 1, self.widths[-1]),
                         "feed 32x32 images (pad 28x28 ones with data.pad_to=32)")
        return Dense(self.num_classes, use_bias=False, name="head")(x.reshape(x.shape[0], -1)) * self.logit_scale


def whitening_kernel(images: np.ndarray, eps: float = 5e-4) -> np.ndarray:
    """Patch-whitening filters ``[2, 2, C, 2 * 4C]`` from float images ``[N, H, W, C]``.

    Eigenvectors of the 2x2-patch covariance scaled by ``1 / sqrt(eigenvalue + eps)``, largest
    eigenvalue first, followed by their negatives (so GELU sees both signs).
    """
    x = np.asarray(images, np.float64)
    n, h, w, c = x.shape
    patches = np.stack([x[:, i:h - 1 + i, j:w - 1 + j, :] for i in range(2) for j in range(2)], axis=3)
    flat = patches.reshape(-1, 4 * c)  # (patch row, patch col, channel) order == HWC of the kernel
    cov = flat.T @ flat / flat.shape[0]
    eigenvalues, eigenvectors = np.linalg.eigh(cov)
    order = np.argsort(eigenvalues)[::-1]
    scaled = eigenvectors[:, order] / np.sqrt(eigenvalues[order] + eps)
    kernel = np.concatenate([scaled, -scaled], axis=1).reshape(2, 2, c, 8 * c)
    return kernel.astype(np.float32)
