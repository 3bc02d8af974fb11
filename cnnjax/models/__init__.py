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
from cnnjax.models.cifar_resnet import CifarResNet
from cnnjax.models.fast import FastNet
from cnnjax.models.lenet import LeNet5
from cnnjax.models.resnet import STAGES, ResNet
from cnnjax.models.simple import GapCNN, ImprovedCNN, SimpleCNN, TinyCNN
from cnnjax.models.vgg import CONFIGS, VGG

_REGISTRY: dict[str, tuple[Callable[..., nn.Module], int]] = {
    "tiny_cnn": (TinyCNN, 2),
    "lenet5": (LeNet5, 10),
    "simple_cnn": (SimpleCNN, 10),
    "improved_cnn": (ImprovedCNN, 10),
    "gap_cnn": (GapCNN, 10),
    "fast_cnn": (FastNet, 10),
}
for _name in ("vgg11", "vgg16"):
    _REGISTRY[_name] = (functools.partial(VGG, CONFIGS[_name], False), 1000)
    _REGISTRY[_name + "_bn"] = (functools.partial(VGG, CONFIGS[_name], True), 1000)
for _name, (_block, _sizes) in STAGES.items():
    _REGISTRY[_name] = (functools.partial(ResNet, _block, _sizes), 1000)
for _depth in (20, 32, 44, 56, 110):
    _REGISTRY[f"cifar_resnet{_depth}"] = (functools.partial(CifarResNet, _depth), 10)

# Input shape (H, W, C) each model is built for; used by summaries, benchmarks and tests.
DEFAULT_INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "tiny_cnn": (8, 8, 1),
    "lenet5": (32, 32, 1),
    **{n: (32, 32, 3) for n in ("simple_cnn", "improved_cnn", "gap_cnn", "fast_cnn")},
    **{n: (224, 224, 3) for n in _REGISTRY if n.startswith(("vgg", "resnet"))},
    **{n: (32, 32, 3) for n in _REGISTRY if n.startswith("cifar_resnet")},
}


def available() -> list[str]:
    """Names accepted by :func:`create`, in registry order."""
    return list(_REGISTRY)


def create(name: str, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """Build model ``name`` with ``num_classes`` outputs (its default when None) and ``kwargs``."""
    if name not in _REGISTRY:
        raise UsageError(f"unknown model {name!r}; choose one of: {', '.join(available())}")
    factory, default_classes = _REGISTRY[name]
    classes = default_classes if num_classes is None else int(num_classes)
    if classes < 1:
        raise UsageError(f"num_classes must be >= 1, got {num_classes}")
    try:
        return factory(num_classes=classes, **kwargs)
    except TypeError as err:
        raise UsageError(f"model {name!r} does not take these options {sorted(kwargs)}: {err}") from None


__all__ = ["available", "create", "DEFAULT_INPUT_SHAPES", "CifarResNet", "FastNet", "GapCNN", "ImprovedCNN",
           "LeNet5", "ResNet", "SimpleCNN", "TinyCNN", "VGG"]
