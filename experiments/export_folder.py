"""Write a dataset's real images as an image folder (torchvision ImageFolder layout) that
:func:`cnnjax.data.folder.scan_folder` reads.

``python -m experiments.export_folder --dataset fashion_mnist --out DIR [--classes 0,1,2] [--per_class K]
[--size S] [--format png|jpg] [--data_dir /usr/share/datasets/fashion-mnist] [--split train|test]
[--channels 1|3]`` writes ``DIR/<NN>_<class name>/<split>_<index>.<ext>``:

* ``<NN>`` is the class index, zero-padded to two digits (more for > 100 classes), so that the sorted folder
  names -- the class order of ImageFolder and ``scan_folder`` -- equal the dataset's class order;
  ``<class name>`` is the dataset's name made filesystem-safe (``/``, spaces and other characters outside
  ``[A-Za-z0-9._-]`` become ``_``): ``00_T-shirt_top`` ... ``09_Ankle_boot``.
* ``<index>`` is the image's index in the dataset split, zero-padded (``train_00001.png``), so sorted file
  names keep the dataset order.
* ``--per_class K`` keeps the first K images of each class in dataset order (0: all); ``--size S`` resizes to
  S x S with PIL bilinear (0: native size); ``--channels 3`` writes grey images as RGB, ``--channels 1``
  writes colour images as PIL luminance; ``--format png`` is lossless, ``jpg`` is JPEG quality 95.

Each file is written atomically; an ``--out`` that already holds anything is refused.
"""

from __future__ import annotations

# ruff: noqa: E402  (the program's first step below comes before its imports)
if __name__ == "__main__":  # first: SIGTERM / Ctrl-C is one line and status 75 from here on (experiments.startup)
    from experiments import startup

    startup.install()

import os
import re
import sys

from absl import flags

from cnnjax.errors import UsageError
from experiments import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "fashion_mnist", "dataset to export: fashion_mnist | mnist | cifar10 | cifar100")
flags.DEFINE_string("out", None, "output directory (must not exist or be empty)")
flags.DEFINE_string("classes", "", "comma-separated class indices or names to export ('' : all)")
flags.DEFINE_integer("per_class", 0, "the first K images of each class in dataset order (0 : all)")
flags.DEFINE_integer("size", 0, "resize to SIZE x SIZE with PIL bilinear (0 : keep the native size)")
flags.DEFINE_enum("format", "png", ["png", "jpg"], "png (lossless) or jpg (JPEG quality 95)")
flags.DEFINE_string("data_dir", "/usr/share/datasets/fashion-mnist",
                    "directory of the raw dataset files ('' : TFDS)")
flags.DEFINE_enum("split", "train", ["train", "test"], "dataset split to export")
flags.DEFINE_integer("channels", 1, "1 (greyscale) or 3 (RGB)")

_PIL_FORMAT = {"png": ("PNG", {}), "jpg": ("JPEG", {"quality": 95})}


def folder_name(index: int, name: str, num_classes: int) -> str:
    """``NN_<safe name>``: zero-padded class index (sorted order = class order) and a filesystem-safe name."""
    width = max(2, len(str(num_classes - 1)))
    return f"{index:0{width}d}_{re.sub(r'[^A-Za-z0-9._-]', '_', name)}"


def parse_classes(spec: str, class_names: tuple[str, ...]) -> list[int]:
    """Sorted class indices from ``--classes`` (indices or names, case-insensitive; '' : all)."""
    if not spec.strip():
        return list(range(len(class_names)))
    lookup = {}
    for i, name in enumerate(class_names):
        lookup[name.lower()] = i
        lookup[folder_name(i, name, len(class_names)).split("_", 1)[1].lower()] = i
    chosen = set()
    for token in (t.strip() for t in spec.split(",") if t.strip()):
        if token.isdigit() and int(token) < len(class_names):
            chosen.add(int(token))
        elif token.lower() in lookup:
            chosen.add(lookup[token.lower()])
        else:
            raise UsageError(f"--classes: unknown class {token!r}; use indices 0..{len(class_names) - 1} or names "
                             f"({', '.join(class_names)})")
    return sorted(chosen)


def main(argv):
    del argv
    import numpy as np
    from PIL import Image

    from cnnjax.data import DATASETS, load
    from cnnjax.io import atomic_write

    if not FLAGS.out:
        raise UsageError("--out is required")
    if FLAGS.dataset not in DATASETS or FLAGS.dataset == "stripes":
        raise UsageError(f"--dataset must be one of {', '.join(d for d in DATASETS if d != 'stripes')}, "
                         f"got {FLAGS.dataset!r}")
    if FLAGS.channels not in (1, 3):
        raise UsageError(f"--channels must be 1 or 3, got {FLAGS.channels}")
    if FLAGS.size < 0 or FLAGS.per_class < 0:
        raise UsageError("--size and --per_class must be >= 0 (0: native size / all images)")
    out = os.path.abspath(os.path.expanduser(FLAGS.out))
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UsageError(f"--out {out} already exists and is not an empty directory; choose a new --out")

    ds = load(FLAGS.dataset, data_dir=FLAGS.data_dir or None, cache_dir=None)
    images = ds.train_images if FLAGS.split == "train" else ds.test_images
    labels = np.asarray(ds.train_labels if FLAGS.split == "train" else ds.test_labels)
    classes = parse_classes(FLAGS.classes, tuple(ds.class_names))
    pil_format, save_kwargs = _PIL_FORMAT[FLAGS.format]
    width = len(str(len(labels) - 1))
    mode = "RGB" if FLAGS.channels == 3 else "L"
    written = 0
    for c in classes:
        indices = np.flatnonzero(labels == c)
        if FLAGS.per_class:
            indices = indices[:FLAGS.per_class]
        class_dir = os.path.join(out, folder_name(c, ds.class_names[c], len(ds.class_names)))
        os.makedirs(class_dir, exist_ok=True)
        for i in indices:
            pixels = images[i]
            img = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
            if FLAGS.size:
                img = img.resize((FLAGS.size, FLAGS.size), Image.BILINEAR)
            img = img.convert(mode)
            with atomic_write(os.path.join(class_dir, f"{FLAGS.split}_{i:0{width}d}.{FLAGS.format}"), "wb") as f:
                img.save(f, format=pil_format, **save_kwargs)
            written += 1
    h, w = (FLAGS.size, FLAGS.size) if FLAGS.size else images.shape[1:3]
    print(f"wrote {written} {FLAGS.dataset} {FLAGS.split} images ({len(classes)} classes, {h}x{w}x{FLAGS.channels} "
          f"{FLAGS.format}) to {out}")


if __name__ == "__main__":
    sys.exit(cli.run(main))
