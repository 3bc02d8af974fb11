"""Image folders in torchvision's ImageFolder layout, decoded with Pillow into uint8 ``[N, H, W, C]`` arrays.

Two layouts are understood by :func:`scan_folder`:

* **ImageFolder** ``ROOT/<class>/<image>``: every immediate, non-hidden subdirectory of ``ROOT`` is a class;
  each class directory is walked recursively (``os.walk(followlinks=True)``, symlink loops are cut) and the
  files whose extension is in :data:`IMG_EXTENSIONS` (case-insensitive) are kept; other files are ignored.
  Unlike torchvision, hidden files and directories (names starting with ``.``, e.g. macOS ``._x.jpg``
  AppleDouble files or ``.ipynb_checkpoints``) are skipped at every level. The images are split into
  train / val / test with ``fractions``, stratified per class (see below).
* **Pre-split** ``ROOT/train/<class>/...`` plus ``ROOT/val/...`` and/or ``ROOT/test/...``: used when ``ROOT``
  has a ``train`` directory and at least one of ``val`` / ``test``, and none of those split directories holds
  images directly (only class directories). Other entries of ``ROOT`` are then ignored. Each split directory
  is read like an ImageFolder root; the class names are the sorted union of the class directories of all
  splits (a class may be missing from a split). When only ``val`` or only ``test`` exists, the missing split
  is held out of ``train``, stratified per class, with fraction ``fractions[1]`` (val) or ``fractions[2]``
  (test) of each class's train images.

Conventions:

* Class names are the folder names sorted as Python strings; a class's label is its position in that order.
* Paths are absolute (``os.path.abspath``, symlinks not resolved); each split is sorted by ``(label, path)``.
* Stratified split: class ``c``'s files, sorted by path, are permuted by
  ``np.random.default_rng([seed, c]).permutation``; ``n_val = round(n * f_val)`` and
  ``n_test = round(n * f_test)`` (Python ``round``, half to even) take the first ``n_val`` then the next
  ``n_test`` permuted files, the rest is train. A class with at least 3 images gets at least one val (test)
  image whenever ``f_val`` (``f_test``) is nonzero, and every class keeps at least one train image. The split
  depends only on the file names, ``fractions`` and ``seed`` (never on ``os.listdir`` order).
* Decoding (:func:`decode_image`) follows torchvision's PIL path: EXIF orientation applied, alpha dropped
  (``convert("RGB")``, no compositing), shorter side resized to ``size`` with bilinear filtering, then a
  ``size`` x ``size`` centre crop.

This module imports only numpy and Pillow (no jax): it also runs in data-loader worker processes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import os
import struct
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

from cnnjax.data.sources import DataFormatError
from cnnjax.errors import ConfigError, MissingFileError
from cnnjax.io import check_readable_dir

__all__ = ["IMG_EXTENSIONS", "FolderSplits", "decode_files", "decode_image", "decode_pil_image", "scan_folder"]

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_SPLITS = ("train", "val", "test")
_LAYOUT_HINT = ("expected ROOT/<class>/<image> (torchvision ImageFolder) or ROOT/train/<class>/<image> with "
                "ROOT/val/... and/or ROOT/test/...; images: " + " ".join(IMG_EXTENSIONS))
# What a malformed file can make Pillow raise (UnidentifiedImageError and truncation are OSErrors; some
# plugins raise SyntaxError, EOFError, struct.error, IndexError or KeyError on corrupt headers).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, KeyError,
                  Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True)
class FolderSplits:
    """An image folder's files per split.

    ``class_names``: sorted class folder names (label = position). ``train`` / ``val`` / ``test``: tuples of
    ``(absolute path, label)`` sorted by ``(label, path)``. ``presplit``: True when ``ROOT/train`` and
    ``ROOT/val`` and/or ``ROOT/test`` were used as the splits.
    """

    class_names: tuple[str, ...]
    train: tuple[tuple[str, int], ...]
    val: tuple[tuple[str, int], ...]
    test: tuple[tuple[str, int], ...]
    presplit: bool


# ----------------------------------------------------------------------------------------------- scanning


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _class_dirs(root: str) -> list[str]:
    """The non-hidden immediate subdirectories of ``root`` (symlinks to directories included), sorted."""
    with os.scandir(root) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())


def _has_direct_images(directory: str) -> bool:
    with os.scandir(directory) as entries:
        return any(not e.name.startswith(".") and _is_image(e.name) and not e.is_dir() for e in entries)


def _walk_images(class_dir: str) -> list[str]:
    """Absolute paths of the image files below ``class_dir`` (recursive, links followed once), sorted."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop, or a directory reached twice through links
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.abspath(os.path.join(dirpath, f)) for f in filenames
                     if not f.startswith(".") and _is_image(f))
    return sorted(found)


def _read_tree(root: str) -> dict[str, list[str]]:
    """``{class name: sorted image paths}`` of an ImageFolder tree; every class must hold an image."""
    classes = _class_dirs(root)
    if not classes:
        raise DataFormatError(f"image folder {root} has no class folders; {_LAYOUT_HINT}")
    files = {}
    for name in classes:
        class_dir = os.path.join(root, name)
        check_readable_dir(class_dir, "data.dir")
        files[name] = _walk_images(class_dir)
        if not files[name]:
            raise DataFormatError(f"class folder {class_dir} holds no images ({' '.join(IMG_EXTENSIONS)}); "
                                  f"add images to it or remove it")
    return files


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        values = ()
    if (len(values) != 3 or not all(math.isfinite(f) and f >= 0 for f in values)
            or abs(sum(values) - 1.0) > 1e-6 or values[0] <= 0):
        raise ConfigError("data.split_fractions",
                          f"must be 3 non-negative numbers (train, val, test) summing to 1 with train > 0, "
                          f"got {tuple(fractions) if isinstance(fractions, Sequence) else fractions!r}")
    return values  # type: ignore[return-value]


def _split_counts(n: int, f_val: float, f_test: float) -> tuple[int, int]:
    """``(n_val, n_test)`` for a class of ``n`` images (see the module docstring)."""
    n_val, n_test = round(n * f_val), round(n * f_test)
    if n >= 3:
        n_val = max(n_val, 1) if f_val > 0 else n_val
        n_test = max(n_test, 1) if f_test > 0 else n_test
    while n - n_val - n_test < 1 and n_val + n_test > 0:  # keep at least one train image
        if n_val > n_test:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def _stratified(files: dict[int, list[str]], f_val: float, f_test: float, seed: int):
    """Split ``{label: sorted paths}`` into (train, val, test) lists of ``(path, label)``."""
    train, val, test = [], [], []
    for label, paths in files.items():
        n_val, n_test = _split_counts(len(paths), f_val, f_test)
        order = np.random.default_rng([seed, label]).permutation(len(paths))
        shuffled = [(paths[i], label) for i in order]
        val += shuffled[:n_val]
        test += shuffled[n_val:n_val + n_test]
        train += shuffled[n_val + n_test:]
    return train, val, test


def _sorted(items) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(items, key=lambda item: (item[1], item[0])))


def _presplit_dirs(root: str) -> dict[str, str] | None:
    """``{split: directory}`` when ``root`` is a pre-split tree, else None."""
    dirs = {s: os.path.join(root, s) for s in _SPLITS if os.path.isdir(os.path.join(root, s))}
    if "train" not in dirs or len(dirs) < 2:
        return None
    if any(_has_direct_images(d) for d in dirs.values()):
        return None
    return dirs


def scan_folder(root: str, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), seed: int = 0) -> FolderSplits:
    """List an image folder's images and labels per split (layouts and rules: see the module docstring).

    Args:
      root: the folder (``ROOT/<class>/...`` or ``ROOT/{train,val,test}/<class>/...``).
      fractions: ``(train, val, test)`` fractions for a single tree, non-negative, summing to 1, train > 0.
        A pre-split tree lacking ``val`` (``test``) holds out ``fractions[1]`` (``fractions[2]``) of train.
      seed: seeds the stratified split (with the class index).

    Raises:
      FileNotFoundError: ``root`` does not exist.
      DataFormatError: no class folders, no images, or a class folder without images.
      ConfigError: bad ``fractions``.
    """
    f_train, f_val, f_test = _check_fractions(fractions)
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    check_readable_dir(root, "data.dir")
    if not os.path.isdir(root):
        what = "is not a directory" if os.path.exists(root) else "does not exist"
        raise MissingFileError(f"image folder {root} {what}; set `data.dir` to a directory of class folders")
    split_dirs = _presplit_dirs(root)
    if split_dirs is None:
        trees = {"all": _read_tree(root)}
    else:
        trees = {split: _read_tree(d) for split, d in split_dirs.items()}
    class_names = tuple(sorted(set().union(*trees.values())))
    label = {name: i for i, name in enumerate(class_names)}

    def by_label(tree: dict[str, list[str]]) -> dict[int, list[str]]:
        return {label[name]: paths for name, paths in sorted(tree.items(), key=lambda kv: label[kv[0]])}

    if split_dirs is None:
        train, val, test = _stratified(by_label(trees["all"]), f_val, f_test, seed)
    else:
        listed = {split: [(p, lab) for lab, paths in by_label(tree).items() for p in paths]
                  for split, tree in trees.items()}
        train, val, test = listed["train"], listed.get("val", []), listed.get("test", [])
        if "val" not in listed:
            train, val, _ = _stratified(by_label(trees["train"]), f_val, 0.0, seed)
        elif "test" not in listed:
            train, _, test = _stratified(by_label(trees["train"]), 0.0, f_test, seed)
    return FolderSplits(class_names, _sorted(train), _sorted(val), _sorted(test), split_dirs is not None)


# ----------------------------------------------------------------------------------------------- decoding


def _check_size_channels(size: int, channels: int) -> None:
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ConfigError("data.image_size", f"must be an integer >= 1, got {size!r}")
    if isinstance(channels, bool) or channels not in (1, 3):
        raise ConfigError("data.channels", f"must be 1 (greyscale) or 3 (RGB), got {channels!r}")


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float images as mode "L" (others unchanged)."""
    if img.mode.startswith("I;16"):  # I;16, I;16B, I;16L, I;16N, I;16S
        pixels = np.asarray(img).astype(np.float64)
        return Image.fromarray(np.round(np.clip(pixels, 0, 65535) / 257.0).astype(np.uint8), "L")
    if img.mode == "I":
        pixels = np.asarray(img).astype(np.float64)
        return Image.fromarray(np.round(np.clip(pixels, 0, 65535) / 257.0).astype(np.uint8), "L")
    if img.mode == "F":
        pixels = np.nan_to_num(np.asarray(img).astype(np.float64))
        return Image.fromarray(np.round(np.clip(pixels, 0, 255)).astype(np.uint8), "L")
    return img


def decode_pil_image(img: Image.Image, size: int, channels: int) -> np.ndarray:
    """An open PIL image as uint8 ``[size, size, channels]``, by :func:`decode_image`'s rules (EXIF rotation,
    8-bit, RGB or "L", shorter side resized to ``size``, centre crop). Raises what Pillow raises."""
    img.load()
    img = ImageOps.exif_transpose(img)
    img = _to_8bit(img)
    target = "RGB" if channels == 3 else "L"
    if img.mode != target:
        with warnings.catch_warnings():  # palette transparency as bytes: dropped, as torchvision does
            warnings.filterwarnings("ignore", message="Palette images with Transparency", category=UserWarning)
            img = img.convert(target)
    w, h = img.size
    short = min(w, h)
    if short != size:
        new_w = size if w == short else max(1, round(w * size / short))
        new_h = size if h == short else max(1, round(h * size / short))
        img = img.resize((new_w, new_h), Image.BILINEAR, reducing_gap=None)
        w, h = img.size
    if (w, h) != (size, size):
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    pixels = np.array(img, dtype=np.uint8)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def _decode_error(path: str, err: BaseException) -> DataFormatError:
    reason = " ".join(str(err).split()) or type(err).__name__
    error = DataFormatError(f"cannot decode image {path}: {reason}; replace or delete the file, or set "
                            f"`data.skip_bad_images`=True to skip unreadable images")
    error.path, error.reason = path, reason
    return error


def decode_image(path: str, size: int, channels: int = 3) -> np.ndarray:
    """One image file as uint8 ``[size, size, channels]``: EXIF-rotated, alpha dropped, 16-bit scaled to 8,
    RGB (channels 3) or PIL luminance "L" (channels 1), shorter side resized to ``size`` (bilinear), then
    centre-cropped.

    Raises:
      DataFormatError: the file cannot be read or decoded (one line naming ``path``).
      ConfigError: ``size`` < 1 or ``channels`` not 1 or 3.
    """
    _check_size_channels(size, channels)
    try:
        with Image.open(path) as img:
            return decode_pil_image(img, int(size), channels)
    except DECODE_ERRORS as err:
        raise _decode_error(os.fspath(path), err) from None


def decode_files(paths: Sequence[str], size: int, channels: int = 3,
                 skip_bad: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``paths`` with :func:`decode_image`.

    Returns ``(images, kept)``: uint8 ``[N_kept, size, size, channels]`` and a bool mask ``[len(paths)]`` of
    the files decoded. With ``skip_bad=False`` the first bad file raises; with ``skip_bad=True`` bad files are
    skipped (and logged), and DataFormatError is raised only when every file fails.
    """
    _check_size_channels(size, channels)
    images = np.empty((len(paths), int(size), int(size), channels), np.uint8)
    kept = np.zeros(len(paths), bool)
    first_error, n = "", 0
    for i, path in enumerate(paths):
        try:
            images[n] = decode_image(path, size, channels)
        except DataFormatError as err:
            if not skip_bad:
                raise
            first_error = first_error or f"{getattr(err, 'path', '?')}: {getattr(err, 'reason', err)}"
            continue
        kept[i] = True
        n += 1
    if len(paths) and n == 0:
        raise DataFormatError(f"none of the {len(paths)} images could be decoded (first: {first_error}); "
                              f"check that they are image files of a format Pillow reads")
    if n < len(paths):
        log.warning("skipped %d of %d unreadable images (first: %s)", len(paths) - n, len(paths), first_error)
        images = images[:n].copy()
    return images, kept
