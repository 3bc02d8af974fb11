"""Dataset sources: local raw files (IDX, CIFAR python batches), TFDS, and the synthetic stripes set.

Every source yields the same in-memory :class:`Dataset` of uint8 NHWC images and int32 labels, optionally
cached as one ``.npz`` per (dataset, source). ``tensorflow_datasets`` is imported lazily, only on the TFDS
path, so importing this module pulls in neither TensorFlow, TFDS nor torch.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import logging
import os
import pickle
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from cnnjax.errors import CnnjaxError, DataFormatError, MissingFileError, UsageError
from cnnjax.io import atomic_write, check_readable_dir

__all__ = [
    "CLASS_NAMES",
    "DATASETS",
    "MEAN_STD",
    "DataFormatError",
    "Dataset",
    "TFDSUnavailableError",
    "brief_error",
    "load",
    "normalization",
    "tfds_unavailable",
]

log = logging.getLogger(__name__)

DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100", "stripes")

# Per-channel mean and std of uint8/255 training pixels.
MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # Measured on the generated training split (320 images) with
    #   python -c "from cnnjax.data import load; x = load('stripes').train_images / 255.0; print(x.mean(), x.std())"
    # -> 0.41642137714460786 0.15848058778540172 (re-checked by tests/test_data_sources.py).
    "stripes": ((0.4164,), (0.1585,)),
}

# ImageNet's per-channel statistics (RGB; grey: the channel averages), used for image folders: the statistics
# the ported torchvision backbones were trained with.
_IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_IMAGENET_MEAN_STD_GREY = ((0.449,), (0.226,))

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "mnist": tuple(str(i) for i in range(10)),
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    # cifar100: the 100 fine label names are read from the `meta` file or from the TFDS dataset info.
    "stripes": ("vertical", "horizontal"),
}


def normalization(dataset: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel ``(mean, std)`` of uint8/255 pixels of ``dataset`` (``channels`` long each): the
    :data:`MEAN_STD` entry, or ImageNet's for image folders (``dataset == "folder"``)."""
    if dataset == "folder":
        return _IMAGENET_MEAN_STD if channels == 3 else _IMAGENET_MEAN_STD_GREY
    return MEAN_STD[dataset]


_CACHE_VERSION = 1
_CACHE_KEYS = ("train_images", "train_labels", "test_images", "test_labels", "class_names")


class TFDSUnavailableError(CnnjaxError, RuntimeError):
    """A TFDS dataset cannot be read here: TFDS missing, or the dataset is unprepared and cannot be prepared."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A whole dataset in memory: images uint8 ``[N, H, W, C]``, labels int32 ``[N]`` per split.

    ``val_images`` / ``val_labels`` are None for sources without a validation split of their own
    (the experiment then holds one out of the training split, see :func:`cnnjax.data.splits.with_validation`).
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    val_images: np.ndarray | None = None
    val_labels: np.ndarray | None = None

    def __post_init__(self):
        for split in ("train", "test") + (("val",) if self.val_images is not None else ()):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels):
                raise DataFormatError(f"{self.name} {split}: images must be [N, H, W, C] and labels [N], got "
                                 f"{images.shape} and {labels.shape}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one image."""
        h, w, c = self.train_images.shape[1:]
        return int(h), int(w), int(c)


def load(name: str, data_dir: str | None = None, cache_dir: str | None = None,
         tfds_data_dir: str | None = None) -> Dataset:
    """Load ``name`` (one of :data:`DATASETS`) as uint8 NHWC images and int32 labels.

    * ``name == 'stripes'``: the deterministic synthetic 8x8 set (``data_dir`` and ``cache_dir`` are ignored).
    * ``data_dir`` set: local raw files, offline. MNIST / Fashion-MNIST read the four IDX files (``.gz`` or
      not); CIFAR-10 / CIFAR-100 read the python batches, from ``cifar-10-batches-py`` / ``cifar-100-python``
      itself or from its parent.
    * otherwise: TFDS via ``tfds.data_source`` (ArrayRecord, random access; reading a prepared dataset needs no
      TensorFlow, preparing it needs TensorFlow and network).

    With ``cache_dir`` the decoded arrays are kept in ``cache_dir/<name>-<source id>-v1.npz`` (written atomically;
    an unreadable cache is rebuilt).

    Raises:
      ValueError: unknown ``name``.
      FileNotFoundError: ``data_dir`` or one of the files expected in it is missing.
      DataFormatError: a raw file is malformed.
      TFDSUnavailableError: the TFDS path cannot work here (message says why and what to do).
    """
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if name == "stripes":
        return _stripes()
    if data_dir:
        data_dir = os.path.expanduser(data_dir)
        check_readable_dir(data_dir, "data.dir")
        if name in ("mnist", "fashion_mnist"):
            files = _idx_files(name, data_dir)
            source_id = _files_identity(files.values())
            build = lambda: _load_idx(name, files)
        else:
            batch_dir, files = _cifar_files(name, data_dir)
            source_id = _files_identity(files)
            build = lambda: _load_cifar(name, batch_dir)
    else:
        tfds_data_dir = os.path.expanduser(tfds_data_dir) if tfds_data_dir else None
        source_id = "tfds-" + _digest(os.path.realpath(tfds_data_dir) if tfds_data_dir else "<tfds default data_dir>")
        build = lambda: _load_tfds(name, tfds_data_dir)
    if not cache_dir:
        return build()
    return _cached(name, source_id, os.path.expanduser(cache_dir), build)


# ----------------------------------------------------------------------------------------------- stripes


def _stripes() -> Dataset:
    """Seed-004 stripes: 400 images 8x8x1, even index vertical (cols 3:5), odd horizontal (rows 3:5); 320/80.

    Pixels are ``randn * 0.2`` plus 1.0 on the stripe, quantised to uint8 by
    ``clip(round((v + 1.0) * 255 / 3), 0, 255)``, i.e. the range [-1, 2] mapped linearly onto [0, 255].
    """
    rng = np.random.RandomState(0)
    n = 400
    x = rng.randn(n, 8, 8) * 0.2
    x[0::2, :, 3:5] += 1.0  # class 0: vertical stripe
    x[1::2, 3:5, :] += 1.0  # class 1: horizontal stripe
    y = (np.arange(n) % 2).astype(np.int32)
    images = np.clip(np.round((x + 1.0) * 255.0 / 3.0), 0, 255).astype(np.uint8)[..., None]
    return Dataset("stripes", images[:320], y[:320], images[320:], y[320:], CLASS_NAMES["stripes"])


# ----------------------------------------------------------------------------------------------- IDX files

_IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_MAGIC_IMAGES = 2051  # 0x00000803: unsigned byte, 3 dimensions
_IDX_MAGIC_LABELS = 2049  # 0x00000801: unsigned byte, 1 dimension


def _idx_hint(name: str) -> str:
    if name == "fashion_mnist":
        return ("on Debian run 'apt-get install dataset-fashion-mnist' and pass "
                "`data.dir`=/usr/share/datasets/fashion-mnist")
    return ("download the four MNIST IDX .gz files into one directory and pass `data.dir`=<that dir>, "
            "or leave data.dir empty to use TFDS")


def _idx_files(name: str, data_dir: str) -> dict[str, str]:
    """Resolve the four IDX files in ``data_dir`` (``X.gz`` preferred over ``X``)."""
    found, missing = {}, []
    for key, base in _IDX_NAMES.items():
        for candidate in (base + ".gz", base):
            path = os.path.join(data_dir, candidate)
            if os.path.isfile(path):
                found[key] = path
                break
        else:
            missing.append(base + ".gz")
    if missing:
        what = "directory does not exist" if not os.path.isdir(data_dir) else f"missing {', '.join(missing)}"
        raise MissingFileError(
            f"no IDX files for {name} in {data_dir} ({what}): expected "
            f"{', '.join(n + '.gz' for n in _IDX_NAMES.values())} (or un-gzipped); {_idx_hint(name)}")
    return found


def _read_idx(path: str, magic: int) -> np.ndarray:
    """Parse one IDX file of unsigned bytes: big-endian magic, big-endian uint32 dims, then the data."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise DataFormatError(f"cannot read IDX file {path}: {err}") from err
    if len(raw) < 4:
        raise DataFormatError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise DataFormatError(f"{path}: IDX magic number {got}, expected {magic} "
                              f"({'images' if magic == _IDX_MAGIC_IMAGES else 'labels'} file of unsigned bytes)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    size = int(np.prod(dims))
    if len(raw) - header != size:
        raise DataFormatError(f"{path}: header says dims {dims} ({size} bytes) but the file has "
                              f"{len(raw) - header} data bytes")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _load_idx(name: str, files: dict[str, str]) -> Dataset:
    """IDX files -> images ``[N, 28, 28, 1]``, labels ``[N]``."""
    arrays = {}
    for split in ("train", "test"):
        images = _read_idx(files[f"{split}_images"], _IDX_MAGIC_IMAGES)
        labels = _read_idx(files[f"{split}_labels"], _IDX_MAGIC_LABELS)
        if len(images) != len(labels):
            raise DataFormatError(f"{name} {split}: {len(images)} images in {files[f'{split}_images']} but "
                                  f"{len(labels)} labels in {files[f'{split}_labels']}")
        _check_labels(name, split, labels, len(CLASS_NAMES[name]))
        arrays[f"{split}_images"] = images[..., None]
        arrays[f"{split}_labels"] = labels.astype(np.int32)
    return Dataset(name, class_names=CLASS_NAMES[name], **arrays)


# ----------------------------------------------------------------------------------------------- CIFAR batches

_CIFAR = {
    # name: (batches directory name, train files, test file, meta file, label key, label-names key)
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
                "batches.meta", "labels", "label_names"),
    "cifar100": ("cifar-100-python", ("train",), "test", "meta", "fine_labels", "fine_label_names"),
}


def _cifar_files(name: str, data_dir: str) -> tuple[str, list[str]]:
    """Resolve the batches directory (``data_dir`` itself or ``data_dir/<batches dir>``) and its files."""
    dirname, train, test, meta = _CIFAR[name][:4]
    needed = [*train, test] + ([meta] if name == "cifar100" else [])
    for candidate in (data_dir, os.path.join(data_dir, dirname)):
        if all(os.path.isfile(os.path.join(candidate, f)) for f in needed):
            return candidate, [os.path.join(candidate, f) for f in needed]
    what = "directory does not exist" if not os.path.isdir(data_dir) else "files missing"
    tarball = "cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz"
    raise MissingFileError(
        f"no {name} python batches in {data_dir} ({what}): expected {', '.join(needed)} in {data_dir} or in "
        f"{os.path.join(data_dir, dirname)}; download {tarball} from https://www.cs.toronto.edu/~kriz/cifar.html, "
        f"extract it and pass `data.dir`=<dir containing {dirname}>")


def _unpickle(path: str) -> dict[str, Any]:
    """One CIFAR python batch (a pickled dict with bytes keys) with its keys decoded to str."""
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DataFormatError(f"cannot unpickle CIFAR batch {path}: {type(err).__name__}: {err}") from err
    if not isinstance(d, dict):
        raise DataFormatError(f"{path}: expected a pickled dict, got {type(d).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar_batch(path: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """``b'data'`` uint8 ``[N, 3072]`` (channel-major rows of 32x32) -> NHWC ``[N, 32, 32, 3]``; labels ``[N]``."""
    d = _unpickle(path)
    if "data" not in d or label_key not in d:
        raise DataFormatError(f"{path}: expected keys b'data' and b'{label_key}', found {sorted(d)}")
    data = np.asarray(d["data"])
    labels = np.asarray(d[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataFormatError(f"{path}: expected data uint8 [N, 3072] and {len(data)} labels, got data "
                              f"{data.dtype} {data.shape} and {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int32)


def _load_cifar(name: str, batch_dir: str) -> Dataset:
    """CIFAR-10 / CIFAR-100 python batches -> images ``[N, 32, 32, 3]``, labels ``[N]``."""
    _, train, test, meta, label_key, names_key = _CIFAR[name]
    if name == "cifar100":
        meta_d = _unpickle(os.path.join(batch_dir, meta))
        if names_key not in meta_d:
            raise DataFormatError(f"{os.path.join(batch_dir, meta)}: no b'{names_key}' key")
        class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta_d[names_key])
    else:
        class_names = CLASS_NAMES[name]
    parts = [_cifar_batch(os.path.join(batch_dir, f), label_key) for f in train]
    train_images = np.concatenate([p[0] for p in parts])
    train_labels = np.concatenate([p[1] for p in parts])
    test_images, test_labels = _cifar_batch(os.path.join(batch_dir, test), label_key)
    _check_labels(name, "train", train_labels, len(class_names))
    _check_labels(name, "test", test_labels, len(class_names))
    return Dataset(name, np.ascontiguousarray(train_images), train_labels, np.ascontiguousarray(test_images),
                   test_labels, class_names)


def _check_labels(name: str, split: str, labels: np.ndarray, num_classes: int) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataFormatError(f"{name} {split}: labels span [{labels.min()}, {labels.max()}], expected "
                              f"[0, {num_classes - 1}]")


# ----------------------------------------------------------------------------------------------- TFDS


def tfds_unavailable(name: str, tfds_data_dir: str | None, reason: str) -> TFDSUnavailableError:
    """The one-line error for TFDS ``name`` that cannot be read from ``tfds_data_dir`` (None: TFDS's default)
    because of ``reason``, naming both ways out: prepare it with TensorFlow, or pass the raw files."""
    where = tfds_data_dir or "the TFDS default data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    local = ("`data.dir`=<dir with the four IDX files>" if name in ("mnist", "fashion_mnist")
             else f"`data.dir`=<dir with {_CIFAR[name][0]}>")
    reason = " ".join(reason.split())  # one line
    return TFDSUnavailableError(
        f"cannot load {name!r} from TFDS ({where}): {reason}; either 'pip install tensorflow tensorflow-datasets' "
        f"and run once online to prepare it (reading a prepared dataset needs no TensorFlow), or pass {local}")


def brief_error(err: BaseException) -> str:
    """``"TypeName: first line of the message"`` (at most 300 characters of it), for one-line errors."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


def _load_tfds(name: str, tfds_data_dir: str | None) -> Dataset:
    """TFDS ``name`` via ``tfds.data_source`` -> uint8 NHWC images, int32 labels."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise tfds_unavailable(name, tfds_data_dir,
                               f"tensorflow_datasets is not installed ({brief_error(err)})") from err
    splits = ["train", "test"]
    try:  # a prepared dataset: no TensorFlow, no network
        sources = tfds.data_source(name, split=splits, data_dir=tfds_data_dir, download=False)
    except Exception as err:  # noqa: BLE001 - not prepared (or unreadable): decide below
        if not _tensorflow_installed():
            reason = "the dataset is not prepared there and preparing it needs TensorFlow, which is not installed"
            raise tfds_unavailable(name, tfds_data_dir, f"{reason} ({brief_error(err)})") from err
        log.info("TFDS %s is not prepared (%s); downloading and preparing it", name, brief_error(err))
        try:  # the real download-and-prepare path (needs network)
            sources = tfds.data_source(name, split=splits, data_dir=tfds_data_dir)
        except Exception as err2:  # noqa: BLE001 - network, checksum, disk ... errors all end here
            raise tfds_unavailable(name, tfds_data_dir, f"the dataset is not prepared there and downloading and "
                                                        f"preparing it failed ({brief_error(err2)})") from err2
    arrays = {}
    for split, source in zip(splits, sources, strict=True):
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = _decode_source(source)
    if name == "cifar100":
        class_names = tuple(str(n) for n in sources[0].dataset_info.features["label"].names)
    else:
        class_names = CLASS_NAMES[name]
    for split in splits:
        _check_labels(name, split, arrays[f"{split}_labels"], len(class_names))
    return Dataset(name, class_names=class_names, **arrays)


def _tensorflow_installed() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _decode_source(source: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Random-access source of ``{'image': [H, W, C], 'label': ()}`` -> images ``[N, H, W, C]``, labels ``[N]``."""
    n = len(source)
    if n == 0:
        raise DataFormatError(f"TFDS source {source!r} is empty")
    first = source[0]
    images = np.empty((n, *np.shape(first["image"])), np.uint8)
    labels = np.empty((n,), np.int32)
    for i in range(n):
        ex = first if i == 0 else source[i]
        images[i] = ex["image"]
        labels[i] = ex["label"]
    return images, labels


# ----------------------------------------------------------------------------------------------- cache


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _files_identity(paths) -> str:
    """Hash of the resolved paths, sizes and mtimes of the source files: changes when the files change."""
    parts = []
    for p in sorted(os.path.realpath(p) for p in paths):
        st = os.stat(p)
        parts.append(f"{p}:{st.st_size}:{st.st_mtime_ns}")
    return "dir-" + _digest("\n".join(parts))


def _cache_path(cache_dir: str, name: str, source_id: str) -> str:
    return os.path.join(cache_dir, f"{name}-{source_id}-v{_CACHE_VERSION}.npz")


def _read_cache(path: str, name: str) -> Dataset:
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in _CACHE_KEYS if k not in z.files]
        if missing:
            raise KeyError(f"missing {missing}")
        a = {k: z[k] for k in _CACHE_KEYS}
    for split in ("train", "test"):
        if a[f"{split}_images"].dtype != np.uint8 or a[f"{split}_labels"].dtype != np.int32:
            raise TypeError(f"{split} dtypes {a[f'{split}_images'].dtype}, {a[f'{split}_labels'].dtype}")
    class_names = tuple(str(c) for c in a.pop("class_names"))
    return Dataset(name, class_names=class_names, **a)


def _write_cache(path: str, ds: Dataset) -> None:
    """Write ``ds`` to ``path`` atomically (see :func:`cnnjax.io.atomic_write`)."""
    with atomic_write(path, "wb") as f:
        np.savez(f, train_images=ds.train_images, train_labels=ds.train_labels, test_images=ds.test_images,
                 test_labels=ds.test_labels, class_names=np.array(ds.class_names, dtype=str))


def _cached(name: str, source_id: str, cache_dir: str, build) -> Dataset:
    path = _cache_path(cache_dir, name, source_id)
    if os.path.exists(path):
        try:
            return _read_cache(path, name)
        except Exception as err:  # noqa: BLE001 - any unreadable cache is rebuilt
            warnings.warn(f"rebuilding unreadable cache {path} ({brief_error(err)})", stacklevel=3)
    ds = build()
    try:
        _write_cache(path, ds)
    except OSError as err:  # a cache we cannot write (disk full, read-only) must not lose the loaded data
        warnings.warn(f"could not write cache {path} ({brief_error(err)}); continuing without it", stacklevel=3)
    return ds
