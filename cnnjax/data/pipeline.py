"""Device-resident input pipeline: permutation, augmentation and normalisation as jittable functions.

Images stay uint8 ``[N, H, W, C]`` on the device; every function here runs inside ``jit`` and
takes randomness only through explicit keys. Per-example keys are ``fold_in(key, global_index)``
so an example is augmented identically however the batch is split across devices.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Random crop from ``crop_padding`` zero-padding, horizontal flip, optional ``cutout`` square."""

    crop_padding: int = 0
    flip: bool = False
    cutout: int = 0

    @property
    def enabled(self) -> bool:
        return self.crop_padding > 0 or self.flip or self.cutout > 0


def epoch_batches(key: Array, num_examples: int, batch_size: int) -> Array:
    """Shuffled example indices ``[steps, batch_size]`` for one epoch (the remainder is dropped)."""
    steps = num_examples // batch_size
    if steps == 0:
        raise ValueError(f"batch size {batch_size} is larger than the {num_examples} training examples; "
                         "lower --config.batch_size")
    perm = jax.random.permutation(key, num_examples)
    return perm[: steps * batch_size].reshape(steps, batch_size)


def normalize(images: Array, mean, std, dtype=jnp.float32) -> Array:
    """uint8 ``[..., C]`` -> ``(x / 255 - mean) / std`` in ``dtype``."""
    x = images.astype(jnp.float32) / 255.0
    return ((x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)).astype(dtype)


def _augment_one(key: Array, image: Array, cfg: AugmentConfig) -> Array:
    h, w, _ = image.shape
    k_crop, k_flip, k_cut = jax.random.split(key, 3)
    if cfg.crop_padding:
        p = cfg.crop_padding
        padded = jnp.pad(image, ((p, p), (p, p), (0, 0)))
        dy, dx = jax.random.randint(k_crop, (2,), 0, 2 * p + 1)
        image = jax.lax.dynamic_slice(padded, (dy, dx, 0), image.shape)
    if cfg.flip:
        image = jnp.where(jax.random.bernoulli(k_flip), image[:, ::-1, :], image)
    if cfg.cutout:
        y0, x0 = jax.random.randint(k_cut, (2,), 0, jnp.array([h, w])) - cfg.cutout // 2
        rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
        inside = (rows >= y0) & (rows < y0 + cfg.cutout) & (cols >= x0) & (cols < x0 + cfg.cutout)
        image = jnp.where(inside[:, :, None], jnp.zeros_like(image), image)
    return image


def augment(key: Array, images: Array, cfg: AugmentConfig, offset: Array | int = 0) -> Array:
    """Augment a uint8 batch ``[B, H, W, C]``; example ``i`` uses ``fold_in(key, offset + i)``."""
    if not cfg.enabled:
        return images
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(offset + jnp.arange(images.shape[0]))
    return jax.vmap(lambda k, im: _augment_one(k, im, cfg))(keys, images)
