"""A config's data as train / val / test splits: :func:`load_splits` is the one call a trainer makes.

``load_splits(config)`` reads ``config.data`` (and ``config.seed``) and returns :class:`DataSplits`: three
example sources of :mod:`cnnjax.data.stream` with the class names. Images are uint8 ``[H, W, C]``, labels
int32 in ``0..num_classes - 1``. Every data rule applies here, in this order:

1. **Source.** ``data.name == "folder"``: an image folder (:func:`cnnjax.data.folder.scan_folder` over
   ``data.dir``, split by ``data.split_fractions`` / ``data.split_seed``, images resized to
   ``data.image_size`` with ``data.channels``). A TFDS dataset of :data:`TFDS_STREAMABLE` without a local
   ``data.dir``, when streamed (below): read from ``tfds.data_source`` on access. Otherwise the dataset
   in memory (:func:`cnnjax.data.load`: raw files in ``data.dir``, TFDS, or the synthetic stripes).
2. **Classes.** ``data.classes``: only those classes, relabelled ``0..len - 1`` in the given order
   (before the hold-out, so a class subset holds out the same validation images in every mode).
3. **Validation.** The source's own validation split, else ``data.val_fraction`` of train held out,
   stratified and seeded by ``data.split_seed`` (:func:`cnnjax.data.splits.stratified_holdout`).
4. **Subsampling.** ``data.train_per_class``: that many training examples per class, seeded by ``seed``.
5. **Padding.** ``data.pad_to``: images zero-padded centrally to ``pad_to`` x ``pad_to``.
6. **Mode.** ``data.mode``: ``resident`` decodes every split into memory; ``stream`` keeps them as sources
   decoded on access; ``auto`` is resident when the decoded training split fits ``data.resident_max_gb``
   GiB (and half of the free memory of each local accelerator). ``data.skip_bad_images`` leaves out image files
   that do not decode instead of raising.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections
import numpy as np

from cnnjax.data.folder import scan_folder
from cnnjax.data.sources import CLASS_NAMES, Dataset, brief_error, load, tfds_unavailable
from cnnjax.data.splits import (
    class_remap,
    per_class_sample,
    relabel,
    select_classes,
    stratified_holdout,
    subsample_per_class,
    with_validation,
)
from cnnjax.data.stream import ArraySource, FileSource, Source, TFDSSource, decodable, decoded_bytes, subset, to_arrays
from cnnjax.errors import ConfigError
from cnnjax.train import device_memory

__all__ = ["MODES", "TFDS_STREAMABLE", "DataSplits", "load_data", "load_splits", "prepare_images", "splits_of"]

MODES = ("resident", "stream", "auto")
"""The values of ``data.mode``."""

TFDS_STREAMABLE = ("mnist", "fashion_mnist", "cifar10", "cifar100", "imagenette", "imagenet2012")
"""TFDS datasets that ``stream`` / ``auto`` read from ``tfds.data_source`` on access (when ``data.dir`` is unset)."""

_SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class DataSplits:
    """train / val / test example sources (:class:`cnnjax.data.stream.ArraySource` in memory, or
    :class:`cnnjax.data.stream.FileSource` / :class:`cnnjax.data.stream.TFDSSource` decoded on access) and
    whether training streams them (``streamed``; False: every split is an ``ArraySource``)."""

    name: str
    class_names: tuple[str, ...]
    train: Source
    val: Source
    test: Source
    streamed: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one training image."""
        return self.train.image_shape


def load_splits(config: ml_collections.ConfigDict) -> DataSplits:
    """The config's data as :class:`DataSplits`, resident or streamed per ``data.mode`` (the module
    docstring lists every rule applied).

    Raises:
      ConfigError: an invalid ``data.*`` setting (named in the error).
      TFDSUnavailableError, MissingFileError, DataFormatError: the data cannot be read.
    """
    d = config.data
    mode = d.get("mode", "resident")
    if mode not in MODES:
        raise ConfigError("data.mode", f"must be resident, stream or auto, got {mode!r}")
    streamable = mode != "resident" and not d.dir and d.name in TFDS_STREAMABLE
    train = _open_tfds(d.name, "train", config) if streamable else None  # opened once, read by both calls below
    if d.name == "folder":
        splits = _folder_splits(config)
    elif train is not None and _tfds_streams(train, config, mode):
        splits = _tfds_splits(config, train)
    else:
        splits = splits_of(load_data(config))
    if mode == "auto":
        mode = "resident" if decoded_bytes(splits.train) <= _resident_max_bytes(config) else "stream"
    skip = bool(d.get("skip_bad_images", False))
    if mode == "stream":
        return dataclasses.replace(splits, streamed=True, **(
            {k: _checked(getattr(splits, k)) for k in _SPLITS} if skip else {}))
    return dataclasses.replace(splits, **{k: to_arrays(getattr(splits, k), skip) for k in _SPLITS})


def splits_of(ds: Dataset) -> DataSplits:
    """An in-memory :class:`Dataset` as resident :class:`DataSplits` (an empty val split if it has none)."""
    val = (ArraySource(ds.val_images, ds.val_labels) if ds.val_images is not None
           else ArraySource(ds.train_images[:0], ds.train_labels[:0]))
    return DataSplits(ds.name, ds.class_names, ArraySource(ds.train_images, ds.train_labels), val,
                      ArraySource(ds.test_images, ds.test_labels))


def load_data(config: ml_collections.ConfigDict) -> Dataset:
    """The config's dataset in memory with train / val / test splits: class selection, a validation split
    held out of train (stratified, ``data.val_fraction``, ``data.split_seed``) unless the source has its
    own, per-class subsampling of train, and padding applied (rules 2-5 of the module docstring)."""
    d = config.data
    ds = load(d.name, data_dir=d.dir or None, cache_dir=os.path.expanduser(d.cache_dir) if d.cache_dir else None,
              tfds_data_dir=d.tfds_data_dir or None)
    if d.get("classes"):
        ds = select_classes(ds, tuple(d.classes))
    ds = with_validation(ds, float(d.get("val_fraction", 0.1)), int(d.get("split_seed", 0)))
    if d.get("train_per_class"):
        ds = subsample_per_class(ds, int(d.train_per_class), config.seed)
    pad = lambda images: prepare_images(images, d.pad_to)  # noqa: E731
    return dataclasses.replace(ds, train_images=pad(ds.train_images), val_images=pad(ds.val_images),
                               test_images=pad(ds.test_images))


def prepare_images(images: np.ndarray, pad_to: int) -> np.ndarray:
    """Zero-pad uint8 ``[N, H, W, C]`` centrally to ``pad_to`` x ``pad_to`` (0: unchanged); an odd
    margin puts the extra row / column at the bottom / right.

    Raises:
      ConfigError: ``pad_to`` is smaller than the images.
    """
    if not pad_to:
        return images
    h, w = images.shape[1:3]
    if pad_to < max(h, w):
        raise ConfigError("data.pad_to", f"is {pad_to}, smaller than the images ({h}x{w})")
    ph, pw = pad_to - h, pad_to - w
    return np.pad(images, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))


def _resident_max_bytes(config: ml_collections.ConfigDict) -> float:
    """``auto``'s limit for a resident training split: ``data.resident_max_gb`` of host memory, and the share of the
    local accelerators' free memory a resident split may take (:mod:`cnnjax.train.device_memory`)."""
    import jax

    host = float(config.data.get("resident_max_gb", 2.0)) * 2**30
    tightest = device_memory.tightest_device(jax.local_devices())
    return host if tightest is None else min(host, device_memory.RESIDENT_FRACTION * tightest[1])


def _checked(source: Source) -> Source:
    """``source`` without the files that do not decode (one decoding pass over it)."""
    if isinstance(source, ArraySource):
        return source
    return subset(source, np.nonzero(decodable(source))[0])


def _folder_splits(config: ml_collections.ConfigDict) -> DataSplits:
    """An image folder's splits as :class:`cnnjax.data.stream.FileSource` s, narrowed by :func:`_narrow`."""
    d = config.data
    if int(d.get("image_size", 0)) < 1:
        raise ConfigError("data.image_size", "must be set (>= 1) for an image folder: images are resized to it")
    fs = scan_folder(d.dir, tuple(d.get("split_fractions", (0.7, 0.15, 0.15))), int(d.get("split_seed", 0)))
    sources = {}
    for split in _SPLITS:
        items = getattr(fs, split)
        if not items:
            raise ConfigError("data.split_fractions", f"leave the {split} split of {d.dir} empty; give it a share")
        sources[split] = FileSource([p for p, _ in items], [lab for _, lab in items], int(d.image_size),
                                    int(d.get("channels", 3)))
    return _narrow(DataSplits("folder", fs.class_names, **sources), config)


def _open_tfds(name: str, split: str, config: ml_collections.ConfigDict) -> TFDSSource:
    """TFDS ``name``'s ``split`` opened for streaming with ``data.pad_to`` / ``data.image_size``.

    Raises:
      TFDSUnavailableError: TFDS is not installed or the split is not prepared in ``data.tfds_data_dir``.
    """
    d = config.data
    try:
        return TFDSSource.open(name, split, d.tfds_data_dir or None, int(d.pad_to), int(d.get("image_size", 0)))
    except ImportError as err:
        raise tfds_unavailable(name, d.tfds_data_dir or None,
                               f"tensorflow_datasets is not installed ({brief_error(err)})") from err
    except Exception as err:  # noqa: BLE001 - not prepared, unreadable: one message either way
        raise tfds_unavailable(name, d.tfds_data_dir or None, f"cannot open its {split} split for streaming; "
                                                              f"prepare it first ({brief_error(err)})") from err


def _tfds_streams(train: TFDSSource, config: ml_collections.ConfigDict, mode: str) -> bool:
    """stream: always; auto: when the training split's decoded size (from the dataset info) exceeds the budget."""
    if mode == "stream":
        return True
    return train.info.splits["train"].num_examples * int(np.prod(train.image_shape)) > _resident_max_bytes(config)


def _tfds_splits(config: ml_collections.ConfigDict, train: TFDSSource) -> DataSplits:
    """A TFDS dataset streamed through ``tfds.data_source`` (``train``: its train split, opened): test is its
    ``test`` split (else ``validation``); val is ``validation`` when both exist, else held out of train
    (stratified, ``data.val_fraction``)."""
    d = config.data
    info = train.info
    have = set(info.splits.keys())
    names = tuple(CLASS_NAMES.get(d.name) or (str(n) for n in info.features["label"].names))
    splits = {"train": train, "test": _open_tfds(d.name, "test" if "test" in have else "validation", config)}
    if "test" in have and "validation" in have:
        splits["val"] = _open_tfds(d.name, "validation", config)
    if d.get("classes"):  # before the hold-out, as for in-memory datasets (the same validation split)
        remap = class_remap(len(names), tuple(d.classes))
        splits = {k: relabel(v, remap) for k, v in splits.items()}
        names = tuple(names[c] for c in d.classes)
    if "val" not in splits:
        keep, held = stratified_holdout(splits["train"].labels, float(d.get("val_fraction", 0.1)),
                                        int(d.get("split_seed", 0)))
        splits["train"], splits["val"] = subset(splits["train"], keep), subset(splits["train"], held)
    return _narrow(DataSplits(d.name, names, **splits), config, classes=False)


def _narrow(splits: DataSplits, config: ml_collections.ConfigDict, classes: bool = True) -> DataSplits:
    """``data.classes`` (kept and relabelled, when ``classes``) and ``data.train_per_class`` applied to
    source splits."""
    d = config.data
    if classes and d.get("classes"):
        remap = class_remap(splits.num_classes, tuple(d.classes))
        splits = dataclasses.replace(splits, class_names=tuple(splits.class_names[c] for c in d.classes),
                                     **{k: relabel(getattr(splits, k), remap) for k in _SPLITS})
    if d.get("train_per_class"):
        idx = per_class_sample(splits.train.labels, int(d.train_per_class), config.seed, splits.num_classes)
        splits = dataclasses.replace(splits, train=subset(splits.train, idx))
    return splits
