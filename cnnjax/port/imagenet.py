"""ImageNet-1k class names (index order of torchvision's classifiers) and torchvision's eval transform."""

from __future__ import annotations

import os

import numpy as np

from cnnjax.port.torchvision import IMAGENET_MEAN, IMAGENET_STD

with open(os.path.join(os.path.dirname(__file__), "imagenet_classes.txt")) as _f:
    CLASS_NAMES: tuple[str, ...] = tuple(line.strip() for line in _f if line.strip())
assert len(CLASS_NAMES) == 1000, len(CLASS_NAMES)


def preprocess_image(image, resize: int = 256, crop: int = 224) -> np.ndarray:
    """PIL image -> float32 ``[crop, crop, 3]``: resize the shorter side to ``resize`` (bilinear,
    antialiased), centre-crop ``crop``, scale to [0, 1], normalise with ImageNet mean / std —
    torchvision's ``Resize(256), CenterCrop(224), ToTensor(), Normalize(...)``."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    if w <= h:
        new_w, new_h = resize, int(resize * h / w)
    else:
        new_w, new_h = int(resize * w / h), resize
    image = image.resize((new_w, new_h), Image.BILINEAR)
    left, top = int(round((new_w - crop) / 2.0)), int(round((new_h - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    x = np.asarray(image, np.float32) / 255.0
    return ((x - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)).astype(np.float32)
