"""Top-5 predictions: ``python -m experiments.predict --checkpoint DIR IMAGE...``.

DIR is a ported ImageNet checkpoint (experiments.port): images are preprocessed as torchvision does
(resize 256, centre crop 224, ImageNet mean / std) and ranked over the 1000 ImageNet classes. Or DIR
is a workdir trained on an image folder (``data.name=folder``): images are decoded as in training
(shorter side to ``data.image_size``, centre crop, ``data.channels``) and ranked over the folder's
classes (its best checkpoint, chosen on validation accuracy).
"""

from __future__ import annotations

# ruff: noqa: E402  (the program's first steps below come before its imports)
if __name__ == "__main__":  # first: SIGTERM / Ctrl-C is one line and status 75 from here on (experiments.startup)
    from experiments import startup

    startup.begin()  # the signal handler, then the process settings (cnnjax.cpu.process)

import os
import sys

import numpy as np
from absl import flags

from cnnjax.errors import CorruptFileError, DataFormatError, MissingFileError, UsageError
from experiments import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "directory written by experiments.port (or a 1000-class training workdir)")
flags.DEFINE_integer("top", 5, "how many classes to print per image (>= 1)", lower_bound=1)


def unreadable(path: str, reason: str) -> DataFormatError:
    return DataFormatError(f"cannot read image {path}: {reason}; pass an image file (PNG, JPEG, ...)")


def preprocess(path: str, crop: int = 224) -> np.ndarray:
    """Image file -> float32 ``[crop, crop, 3]`` normalised as torchvision's ImageNet eval transform: the shorter
    side resized to ``round(crop * 256 / 224)`` (256 for 224, 342 for Inception's 299), centre-cropped."""
    from PIL import Image

    from cnnjax.data.folder import DECODE_ERRORS
    from cnnjax.port.imagenet import preprocess_image

    try:
        with Image.open(path) as image:
            return preprocess_image(image, resize=round(crop * 256 / 224), crop=crop)
    except DECODE_ERRORS as err:  # missing, a directory, truncated, not an image, a decompression bomb
        raise unreadable(path, " ".join(str(err).split()) or type(err).__name__) from None


def folder_inputs(config: dict, paths: list[str]) -> tuple[tuple[str, ...], np.ndarray]:
    """Class names of a folder-trained workdir and ``paths`` as its model input ``[N, S, S, C]``."""
    from cnnjax.data import normalization
    from cnnjax.data.folder import decode_image, scan_folder
    from cnnjax.data.pipeline import normalize

    d = config["data"]
    names = scan_folder(d["dir"], tuple(d["split_fractions"]), d["split_seed"]).class_names
    if d.get("classes"):
        names = tuple(names[c] for c in d["classes"])
    mean, std = normalization("folder", d["channels"])
    images = []
    for path in paths:
        try:
            images.append(decode_image(path, d["image_size"], d["channels"]))
        except DataFormatError as err:
            raise unreadable(path, err.reason) from None
    return names, np.asarray(normalize(np.stack(images), mean, std))


def main(argv):
    import jax

    from cnnjax import checkpoint, models
    from cnnjax.io import read_json
    from cnnjax.port.imagenet import CLASS_NAMES

    images = argv[1:]
    if not FLAGS.checkpoint or not images:
        raise UsageError("usage: python -m experiments.predict --checkpoint DIR IMAGE...")
    path = os.path.join(FLAGS.checkpoint, "config.json")
    if not os.path.isfile(path):
        raise MissingFileError(f"{path} not found: --checkpoint must be a directory written by experiments.port or "
                               "experiments.train")
    config = read_json(path, "port or train the checkpoint again")
    if not isinstance(config, dict) or not {"model", "num_classes"} <= set(config):
        raise CorruptFileError(f"{path} is not a cnnjax config (no model / num_classes); pass a directory written by "
                               "experiments.port or experiments.train")
    folder = config.get("data", {}).get("name") == "folder"
    if config["num_classes"] != 1000 and not folder:
        raise UsageError(f"{FLAGS.checkpoint} has {config['num_classes']} classes; predict needs an ImageNet model "
                         "or a model trained on an image folder")
    if folder:  # every image is read before the weights: a bad file costs nothing
        class_names, batch = folder_inputs(config, images)
    else:
        crop = models.DEFAULT_INPUT_SHAPES.get(config["model"]["name"], (224,))[0]
        class_names, batch = CLASS_NAMES, np.stack([preprocess(p, crop) for p in images])
    variables, _ = checkpoint.restore_variables(FLAGS.checkpoint, "best")
    model = models.create(config["model"]["name"], num_classes=config["num_classes"],
                          **config["model"].get("kwargs", {}))
    logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, batch), np.float64)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    for path, z, p in zip(images, logits, probs, strict=True):
        print(path)
        # Ranked by logits: probabilities that underflow to exactly 0 would tie.
        for rank, idx in enumerate(np.argsort(-z, kind="stable")[: FLAGS.top], start=1):
            print(f"  {rank}. {class_names[idx]:30s} {p[idx]:.4f}")


if __name__ == "__main__":
    sys.exit(cli.run(main))
