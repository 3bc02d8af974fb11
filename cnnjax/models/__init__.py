"""Model zoo registry: ``create(name, num_classes=..., **kwargs) -> flax.linen.Module``.

Every model maps ``[N, H, W, C]`` images to ``[N, num_classes]`` logits via
``model.apply(variables, x, train=...)``; ``train=True`` needs ``mutable=['batch_stats']`` for
models with BatchNorm and ``rngs={'dropout': key}`` for models with Dropout.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from cnnjax.errors import UsageError
from cnnjax.models import (
    alexnet,
    convnext,
    densenet,
    efficientnet,
    googlenet,
    inception,
    mnasnet,
    mobilenet,
    regnet,
    resnet,
    shufflenetv2,
    squeezenet,
    vgg,
)
from cnnjax.models.cifar_resnet import CifarResNet
from cnnjax.models.fast import FastNet
from cnnjax.models.lenet import LeNet5
from cnnjax.models.resnet import ResNet
from cnnjax.models.simple import GapCNN, ImprovedCNN, SimpleCNN, TinyCNN
from cnnjax.models.vgg import VGG

Factory = Callable[..., nn.Module]

# name -> (factory, default number of classes, input shape (H, W, C) the model is built for).
_REGISTRY: dict[str, tuple[Factory, int, tuple[int, int, int]]] = {
    "tiny_cnn": (TinyCNN, 2, (8, 8, 1)),
    "lenet5": (LeNet5, 10, (32, 32, 1)),
    "simple_cnn": (SimpleCNN, 10, (32, 32, 3)),
    "improved_cnn": (ImprovedCNN, 10, (32, 32, 3)),
    "gap_cnn": (GapCNN, 10, (32, 32, 3)),
    "fast_cnn": (FastNet, 10, (32, 32, 3)),
    **{f"cifar_resnet{depth}": (functools.partial(CifarResNet, depth), 10, (32, 32, 3))
       for depth in (20, 32, 44, 56, 110)},
}
# The torchvision families: each module's MODELS (same layout) and WEIGHTS (name -> torchvision's weight file).
_FAMILIES = (vgg, resnet, alexnet, squeezenet, googlenet, inception, densenet, shufflenetv2, mobilenet, mnasnet,
             efficientnet, regnet, convnext)
for _family in _FAMILIES:
    _REGISTRY.update(_family.MODELS)

# Input shape (H, W, C) each model is built for; used by summaries, benchmarks, ports and tests.
DEFAULT_INPUT_SHAPES: dict[str, tuple[int, int, int]] = {name: entry[2] for name, entry in _REGISTRY.items()}


def default_num_classes(name: str) -> int:
    """The number of classes ``name`` has by default (1000 for the ImageNet / torchvision models)."""
    return _REGISTRY[name][1]


def weight_files() -> dict[str, str]:
    """torchvision model name -> file name of its official ImageNet weights (``IMAGENET1K_V1``)."""
    return {name: file for family in _FAMILIES for name, file in family.WEIGHTS.items()}


def available() -> list[str]:
    """Names accepted by :func:`create`, in registry order."""
    return list(_REGISTRY)


def create(name: str, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """Build model ``name`` with ``num_classes`` outputs (its default when None) and ``kwargs``."""
    if name not in _REGISTRY:
        raise UsageError(f"unknown model {name!r}; choose one of: {', '.join(available())}")
    factory, default_classes, _ = _REGISTRY[name]
    classes = default_classes if num_classes is None else int(num_classes)
    if classes < 1:
        raise UsageError(f"num_classes must be >= 1, got {num_classes}")
    try:
        return factory(num_classes=classes, **kwargs)
    except TypeError as err:
        raise UsageError(f"model {name!r} does not take these options {sorted(kwargs)}: {err}") from None


__all__ = ["available", "create", "DEFAULT_INPUT_SHAPES", "CifarResNet", "FastNet", "GapCNN", "ImprovedCNN",
           "LeNet5", "ResNet", "SimpleCNN", "TinyCNN", "VGG"]
