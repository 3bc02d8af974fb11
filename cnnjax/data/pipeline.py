"""Device-resident input pipeline: permutation, augmentation and normalisation as jittable functions.

Images stay uint8 ``[N, H, W, C]`` on the device; every function here runs inside ``jit`` and
takes randomness only through explicit keys. Per-example keys are ``fold_in(key, global_index)``
so an example is augmented identically however the batch is split across devices.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cnnjax.errors import UsageError

Array = jax.Array
PAD_MODES = ("constant", "reflect")
FLIP_MODES = ("random", "alternate")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Random crop from ``crop_padding`` padding (``pad_mode`` 'constant' zeros or 'reflect'),
    horizontal flip, optional ``cutout`` square.

    ``flip_mode='random'`` flips each example with probability 1/2 at every step;
    ``'alternate'`` (airbench) flips a fixed random half of the training set in even epochs and
    the other half in odd epochs, so every image is seen both ways every two epochs. It needs the
    example ids and the epoch (``steps_per_epoch``).
    """

    crop_padding: int = 0
    flip: bool = False
    cutout: int = 0
    pad_mode: str = "constant"
    flip_mode: str = "random"
    steps_per_epoch: int = 0
    random_resized_crop: float = 0.0  # min area fraction of a random-resized crop (torchvision: 0.08); 0 = off

    def __post_init__(self):
        if self.pad_mode not in PAD_MODES:
            raise UsageError(f"pad_mode must be 'constant' or 'reflect', got {self.pad_mode!r}")
        if self.flip_mode not in FLIP_MODES:
            raise UsageError(f"flip_mode must be 'random' or 'alternate', got {self.flip_mode!r}")
        if self.flip and self.flip_mode == "alternate" and self.steps_per_epoch < 1:
            raise UsageError("flip_mode='alternate' needs steps_per_epoch >= 1")
        if not 0.0 <= self.random_resized_crop <= 1.0:
            raise UsageError(f"random_resized_crop must be a min area fraction in [0, 1], got "
                             f"{self.random_resized_crop}")

    @property
    def enabled(self) -> bool:
        return self.crop_padding > 0 or self.flip or self.cutout > 0 or self.random_resized_crop > 0


def epoch_batches(key: Array, num_examples: int, batch_size: int) -> Array:
    """Shuffled example indices ``[steps, batch_size]`` for one epoch (the remainder is dropped)."""
    steps = num_examples // batch_size
    if steps == 0:
        raise UsageError(f"batch size {batch_size} is larger than the {num_examples} training examples; "
                         "lower `batch_size`")
    perm = jax.random.permutation(key, num_examples)
    return perm[: steps * batch_size].reshape(steps, batch_size)


def normalize(images: Array, mean, std, dtype=jnp.float32) -> Array:
    """uint8 ``[..., C]`` -> ``(x / 255 - mean) / std`` in ``dtype``."""
    x = images.astype(jnp.float32) / 255.0
    return ((x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)).astype(dtype)


def random_resized_crop(key: Array, image: Array, min_area: float,
                        log_ratio: tuple[float, float] = (-0.2877, 0.2877)) -> Array:
    """torchvision-style RandomResizedCrop of one uint8 ``[H, W, C]`` image back to ``[H, W, C]``: a box of
    area fraction ``U(min_area, 1)`` and aspect ratio ``exp(U(log 3/4, log 4/3))`` (clipped to the image)
    at a uniform position, resized bilinearly (antialiased) to the full size."""
    h, w, c = image.shape
    k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
    area = jax.random.uniform(k_area, (), minval=min_area, maxval=1.0) * h * w
    ratio = jnp.exp(jax.random.uniform(k_ratio, (), minval=log_ratio[0], maxval=log_ratio[1]))
    cw = jnp.clip(jnp.sqrt(area * ratio), 1.0, w)
    ch = jnp.clip(jnp.sqrt(area / ratio), 1.0, h)
    y0 = jax.random.uniform(k_y, ()) * (h - ch)
    x0 = jax.random.uniform(k_x, ()) * (w - cw)
    scale = jnp.stack([h / ch, w / cw])
    out = jax.image.scale_and_translate(image.astype(jnp.float32), (h, w, c), (0, 1), scale,
                                        -jnp.stack([y0, x0]) * scale, method="linear")
    return jnp.clip(jnp.round(out), 0, 255).astype(image.dtype)


def _augment_one(key: Array, image: Array, flip: Array | None, cfg: AugmentConfig) -> Array:
    h, w, _ = image.shape
    k_crop, k_flip, k_cut = jax.random.split(key, 3)
    if cfg.random_resized_crop:
        image = random_resized_crop(jax.random.fold_in(k_crop, 1), image, cfg.random_resized_crop)
    if cfg.crop_padding:
        p = cfg.crop_padding
        padded = jnp.pad(image, ((p, p), (p, p), (0, 0)), mode=cfg.pad_mode)
        dy, dx = jax.random.randint(k_crop, (2,), 0, 2 * p + 1)
        image = jax.lax.dynamic_slice(padded, (dy, dx, 0), image.shape)
    if cfg.flip:
        flip = jax.random.bernoulli(k_flip) if flip is None else flip
        image = jnp.where(flip, image[:, ::-1, :], image)
    if cfg.cutout:
        y0, x0 = jax.random.randint(k_cut, (2,), 0, jnp.array([h, w])) - cfg.cutout // 2
        rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
        inside = (rows >= y0) & (rows < y0 + cfg.cutout) & (cols >= x0) & (cols < x0 + cfg.cutout)
        image = jnp.where(inside[:, :, None], jnp.zeros_like(image), image)
    return image


def alternating_flips(run_key: Array, example_ids: Array, epoch: Array | int) -> Array:
    """``[B]`` bools: a fixed random half of the examples (by id) in even epochs, the rest in odd ones."""
    base = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(run_key, i)))(example_ids)
    return base ^ (jnp.asarray(epoch) % 2 == 1)


def augment(key: Array, images: Array, cfg: AugmentConfig, offset: Array | int = 0,
            example_ids: Array | None = None, step: Array | int = 0, run_key: Array | None = None) -> Array:
    """Augment a uint8 batch ``[B, H, W, C]``; example ``i`` uses ``fold_in(key, offset + i)``.

    ``flip_mode='alternate'`` also needs ``example_ids [B]`` (indices into the training set), the
    global ``step`` (its epoch is ``step // cfg.steps_per_epoch``) and a ``run_key`` fixed for the run.
    """
    if not cfg.enabled:
        return images
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(offset + jnp.arange(images.shape[0]))
    flips = None  # random flips: drawn per example inside _augment_one
    if cfg.flip and cfg.flip_mode == "alternate":
        if example_ids is None or run_key is None:
            raise UsageError("flip_mode='alternate' needs example_ids and run_key")
        flips = alternating_flips(run_key, example_ids, jnp.asarray(step) // cfg.steps_per_epoch)
    return jax.vmap(lambda k, im, f: _augment_one(k, im, f, cfg))(keys, images, flips)
