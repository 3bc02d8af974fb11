"""Write a learnable CIFAR-10 stand-in in the real ``cifar-10-batches-py`` format (CIFAR-10 itself
cannot be downloaded here): ``python -m experiments.make_synthetic_cifar --out DIR [--train N --test N]``.

Each 32x32x3 uint8 image is noise plus a class-coloured square whose corner depends on the class
and jitters by up to 3 pixels. It checks loaders and recipes end to end; its accuracies say nothing
about CIFAR-10.
"""

from __future__ import annotations

# ruff: noqa: E402  (the program's first step below comes before its imports)
if __name__ == "__main__":  # first: SIGTERM / Ctrl-C is one line and status 75 from here on (experiments.startup)
    from experiments import startup

    startup.install()

import os
import pickle
import sys

import numpy as np
from absl import flags

from cnnjax.data import CLASS_NAMES
from cnnjax.errors import UsageError
from experiments import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "directory to create cifar-10-batches-py in")
flags.DEFINE_integer("train", 50_000, "training images (split over 5 batches)")
flags.DEFINE_integer("test", 10_000, "test images")
flags.DEFINE_integer("seed", 0, "random seed")


def images_for(labels: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """uint8 ``[N, 32, 32, 3]``: noise, then a 10x10 square of class colour at a class position."""
    n = labels.shape[0]
    x = rng.normal(110, 45, (n, 32, 32, 3)).clip(0, 255)
    palette = np.array([[230, 40, 40], [40, 230, 40], [40, 40, 230], [230, 230, 40], [230, 40, 230],
                        [40, 230, 230], [240, 240, 240], [20, 20, 20], [230, 130, 40], [130, 40, 230]], float)
    corners = [(2 + 6 * (c % 4), 2 + 5 * (c // 4)) for c in range(10)]
    jitter = rng.randint(-3, 4, (n, 2))
    for i, c in enumerate(labels):
        y0 = int(np.clip(corners[c][0] + jitter[i, 0], 0, 22))
        x0 = int(np.clip(corners[c][1] + jitter[i, 1], 0, 22))
        x[i, y0:y0 + 10, x0:x0 + 10] = palette[c] * rng.uniform(0.7, 1.0)
    return x.astype(np.uint8)


def _dump(path: str, images: np.ndarray, labels: np.ndarray, extra: dict) -> None:
    rows = images.transpose(0, 3, 1, 2).reshape(images.shape[0], -1)  # channel-major rows, as CIFAR's
    with open(path, "wb") as f:
        pickle.dump({b"data": rows, b"labels": [int(v) for v in labels], **extra}, f)


def write(root: str, n_train: int, n_test: int, seed: int = 0) -> str:
    """Create ``root/cifar-10-batches-py`` and return its path."""
    if n_train < 5 or n_test < 1:
        raise UsageError("--train must be >= 5 (five batches) and --test >= 1")
    d = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d, exist_ok=True)
    rng = np.random.RandomState(seed)
    train_labels = rng.randint(0, 10, n_train)
    train = images_for(train_labels, rng)
    for i, part in enumerate(np.array_split(np.arange(n_train), 5)):
        _dump(os.path.join(d, f"data_batch_{i + 1}"), train[part], train_labels[part],
              {b"batch_label": f"training batch {i + 1} of 5".encode()})
    test_labels = rng.randint(0, 10, n_test)
    _dump(os.path.join(d, "test_batch"), images_for(test_labels, rng), test_labels, {})
    with open(os.path.join(d, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in CLASS_NAMES["cifar10"]]}, f)
    return d


def main(argv):
    del argv
    print(write(FLAGS.out, FLAGS.train, FLAGS.test, FLAGS.seed))


if __name__ == "__main__":
    flags.mark_flags_as_required(["out"])
    sys.exit(cli.run(main))
