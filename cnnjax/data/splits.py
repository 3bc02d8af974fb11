"""Which examples a split keeps: a stratified, seeded validation hold-out (model selection never looks at
the test split), seeded per-class samples, and class selection with relabelling.

Each rule works on label arrays (int32 ``[N]``) and is applied either to an in-memory :class:`Dataset`
or to an example source of :mod:`cnnjax.data.stream` (:func:`relabel`), with the same result.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cnnjax.data.sources import Dataset
from cnnjax.data.stream import Source, subset
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


def subsample_per_class(ds: Dataset, k: int, seed: int) -> Dataset:
    """``ds`` with ``k`` training images per class (:func:`per_class_sample`); val and test unchanged."""
    idx = per_class_sample(ds.train_labels, k, seed, ds.num_classes)
    return dataclasses.replace(ds, train_images=ds.train_images[idx], train_labels=ds.train_labels[idx])


def class_remap(num_classes: int, classes: tuple[int, ...]) -> np.ndarray:
    """int32 ``[num_classes]``: the new label of each old class (its position in ``classes``), -1 if dropped.

    Raises:
      ConfigError: ``classes`` are not distinct indices in ``0..num_classes - 1`` (reported as ``data.classes``).
    """
    if any(not 0 <= int(c) < num_classes for c in classes) or len(set(classes)) != len(classes):
        raise ConfigError("data.classes", f"must be distinct class indices in 0..{num_classes - 1}, got "
                                          f"{tuple(classes)}")
    remap = np.full(num_classes, -1, np.int32)
    remap[list(classes)] = np.arange(len(classes))
    return remap


def relabel(source: Source, remap: np.ndarray) -> Source:
    """The examples of ``source`` (a :mod:`cnnjax.data.stream` source) whose class ``remap`` keeps, in their
    order, with the new labels."""
    keep = np.nonzero(remap[source.labels] >= 0)[0]
    return subset(source, keep, remap[source.labels[keep]])


def select_classes(ds: Dataset, classes: tuple[int, ...]) -> Dataset:
    """Keep only ``classes`` and relabel them 0..len-1 in the given order (every split)."""
    remap = class_remap(ds.num_classes, classes)
    out = {}
    for split in ("train", "val", "test"):
        images, labels = getattr(ds, f"{split}_images"), getattr(ds, f"{split}_labels")
        if images is not None:
            keep = remap[labels] >= 0
            out |= {f"{split}_images": images[keep], f"{split}_labels": remap[labels[keep]]}
    return dataclasses.replace(ds, class_names=tuple(ds.class_names[c] for c in classes), **out)
