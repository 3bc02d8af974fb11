"""PyTorch twins of the zoo in torchvision's exact module layout (torchvision itself is not a dependency).

``build(name, **kwargs)`` returns the twin of ``cnnjax.models.create(name, ...)``; kwargs are torchvision's
constructor arguments (``num_classes``, ``dropout``, ``stochastic_depth_prob``...). The families after ResNet /
VGG live one per module here, each with a ``BUILDERS`` dict; the earlier models are in
:mod:`experiments.bench.torch_twins`.
"""

from __future__ import annotations

import torch

from experiments.bench import torch_twins
from experiments.bench.torch_twins import randomize_bn_stats
from experiments.bench.torch_zoo import (
    alexnet,
    convnext,
    densenet,
    efficientnet,
    googlenet,
    inception,
    mnasnet,
    mobilenet,
    regnet,
    shufflenetv2,
    squeezenet,
)

BUILDERS = {name: builder
            for family in (alexnet, squeezenet, googlenet, inception, densenet, shufflenetv2, mobilenet, mnasnet,
                           efficientnet, regnet, convnext)
            for name, builder in family.BUILDERS.items()}


def build(name: str, **kwargs) -> torch.nn.Module:
    """The torch twin of zoo model ``name``."""
    if name in BUILDERS:
        return BUILDERS[name](**kwargs)
    return torch_twins.build(name, **kwargs)


__all__ = ["BUILDERS", "build", "randomize_bn_stats"]
