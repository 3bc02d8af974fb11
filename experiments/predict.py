"""Top-5 ImageNet predictions: ``python -m experiments.predict --checkpoint DIR IMAGE...``.

DIR is a ported checkpoint (experiments.port). Images are preprocessed as torchvision does:
resize 256, centre crop 224, ImageNet mean / std.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import flags

from experiments import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "directory written by experiments.port (or a 1000-class training workdir)")
flags.DEFINE_integer("top", 5, "how many classes to print per image")


def preprocess(path: str) -> np.ndarray:
    """Image file -> float32 ``[224, 224, 3]`` normalised as torchvision's ImageNet eval transform."""
    from PIL import Image, UnidentifiedImageError

    from cnnjax.port.imagenet import preprocess_image

    try:
        with Image.open(path) as image:
            return preprocess_image(image)
    except (FileNotFoundError, UnidentifiedImageError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None


def main(argv):
    import jax

    from cnnjax import checkpoint, models
    from cnnjax.port.imagenet import CLASS_NAMES

    images = argv[1:]
    if not FLAGS.checkpoint or not images:
        raise ValueError("usage: python -m experiments.predict --checkpoint DIR IMAGE...")
    with open(os.path.join(FLAGS.checkpoint, "config.json")) as f:
        config = json.load(f)
    if config["num_classes"] != 1000:
        raise ValueError(f"{FLAGS.checkpoint} has {config['num_classes']} classes; predict needs an ImageNet model")
    variables, _ = checkpoint.restore_variables(FLAGS.checkpoint, "best")
    model = models.create(config["model"]["name"], num_classes=1000, **config["model"].get("kwargs", {}))
    batch = np.stack([preprocess(p) for p in images])
    probs = np.asarray(jax.nn.softmax(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, batch)))
    for path, p in zip(images, probs, strict=True):
        print(path)
        for rank, idx in enumerate(np.argsort(-p)[: FLAGS.top], start=1):
            print(f"  {rank}. {CLASS_NAMES[idx]:30s} {p[idx]:.4f}")


if __name__ == "__main__":
    sys.exit(cli.run(main))
