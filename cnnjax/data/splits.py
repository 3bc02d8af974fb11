"""Stratified, seeded splits: hold a validation set out of a training set (model selection never
looks at the test split)."""

from __future__ import annotations

import dataclasses

import numpy as np

from cnnjax.data.sources import Dataset
from cnnjax.errors import ConfigError


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(keep, held)``: sorted indices into ``labels [N]``; from each class ``round(n_c * fraction)``
    examples (at least one when ``fraction > 0`` and the class has two or more) are held out, chosen by
    ``np.random.default_rng([seed, c])``. Deterministic, and independent of the other classes."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError("data.val_fraction", f"must be in (0, 1), got {fraction!r}")
    held = []
    for c in np.unique(labels):
        members = np.nonzero(labels == c)[0]
        k = int(round(len(members) * fraction))
        if fraction > 0 and k == 0 and len(members) >= 2:
            k = 1
        held.append(np.random.default_rng([seed, int(c)]).permutation(members)[:k])
    held = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    keep = np.setdiff1d(np.arange(len(labels)), held)
    return keep, held


def per_class_sample(labels: np.ndarray, k: int, seed: int, num_classes: int) -> np.ndarray:
    """Sorted indices of ``k`` examples of each class (fewer if it has fewer), drawn with ``RandomState(seed)``."""
    rng = np.random.RandomState(seed)
    return np.sort(np.concatenate([rng.permutation(np.nonzero(labels == c)[0])[:k] for c in range(num_classes)]))


def with_validation(ds: Dataset, fraction: float, seed: int) -> Dataset:
    """``ds`` with a validation split: its own if it has one, else ``fraction`` of train held out."""
    if ds.val_images is not None:
        return ds
    keep, held = stratified_holdout(ds.train_labels, fraction, seed)
    return dataclasses.replace(ds, train_images=ds.train_images[keep], train_labels=ds.train_labels[keep],
                               val_images=ds.train_images[held], val_labels=ds.train_labels[held])
