"""Transfer learning for every zoo model: head replacement, frozen stages, per-group learning rates.

A model's **stages** are its top-level submodules in the order its forward pass calls them (ResNet: ``conv1``,
``bn1``, ``layer1_0`` ...; MobileNetV2: ``features.0`` ... ``features.18``); its **head** is the top-level
modules whose shapes follow the number of classes (``fc``, ``classifier.1``, ...). :func:`stage_layout` finds
both by tracing the model, so nothing here is model-specific.

* feature extraction: every stage frozen; only the fresh head trains.
* fine-tuning from a stage (``unfreeze_from``, a top-level name or its prefix such as ``layer4`` or
  ``features.14``; ``stem`` is the first stage): the stages before it are frozen; the rest trains with its own
  (smaller) learning rate, the head with the head rate.

A frozen stage runs in eval mode (BatchNorm on its running statistics, which stay unchanged; no dropout or
stochastic depth) and passes no gradient (:class:`Frozen`); the optimizer gives its parameters zero updates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnnjax.errors import UsageError
from cnnjax.layers import BatchNorm, Dropout, StochasticDepth

MODES = ("scratch", "feature_extraction", "finetune")
FIRST_STAGE = "stem"
_TRAIN_DEPENDENT = (BatchNorm, Dropout, StochasticDepth)


@dataclass(frozen=True)
class StageLayout:
    """Top-level module names of a model: ``stages`` (call order, head excluded) and ``head``."""

    stages: tuple[str, ...]
    head: tuple[str, ...]


def _abstract_init(model: nn.Module, input_shape: tuple[int, int, int], calls: list | None = None) -> Any:
    def record(next_fun, args, kwargs, context):
        path = context.module.path
        if calls is not None and len(path) == 1 and path[0] not in calls:
            calls.append(path[0])
        return next_fun(*args, **kwargs)

    def init():
        with nn.intercept_methods(record):
            return model.init(jax.random.PRNGKey(0), jnp.zeros((1, *input_shape)), train=False)

    return jax.eval_shape(init)


def stage_layout(name: str, input_shape: tuple[int, int, int], **kwargs: Any) -> StageLayout:
    """The :class:`StageLayout` of zoo model ``name`` built with ``kwargs`` at ``input_shape`` ``(H, W, C)``."""
    from cnnjax import models

    calls: list[str] = []
    a = _abstract_init(models.create(name, num_classes=2, **kwargs), input_shape, calls)
    b = _abstract_init(models.create(name, num_classes=3, **kwargs), input_shape)
    shapes = lambda tree: jax.tree_util.tree_map(lambda leaf: leaf.shape, tree)  # noqa: E731
    head = tuple(n for n in a["params"] if shapes(a["params"][n]) != shapes(b["params"][n]))
    with_vars = {n for collection in a.values() for n in collection}
    return StageLayout(tuple(n for n in calls if n in with_vars and n not in head), head)


def frozen_stages(layout: StageLayout, mode: str, unfreeze_from: str = FIRST_STAGE) -> tuple[str, ...]:
    """The stages ``mode`` freezes: none from scratch, all for feature extraction, those before
    ``unfreeze_from`` for fine-tuning."""
    if mode not in MODES:
        raise UsageError(f"transfer mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "scratch":
        return ()
    if mode == "feature_extraction":
        return layout.stages
    if unfreeze_from == FIRST_STAGE:
        return ()
    for i, name in enumerate(layout.stages):
        if name == unfreeze_from or name.startswith((unfreeze_from + "_", unfreeze_from + ".")):
            return layout.stages[:i]
    shown = ", ".join(layout.stages[:3] + ("...",) + layout.stages[-2:]) if len(layout.stages) > 6 \
        else ", ".join(layout.stages)
    raise UsageError(f"unfreeze_from must be {FIRST_STAGE!r} or a stage of the model or its prefix ({shown}), got "
                     f"{unfreeze_from!r}")


class Frozen(nn.Module):
    """``model`` with the top-level modules ``frozen`` in eval mode and cut from the gradient; same variables
    (the scope is shared), same call signature."""

    model: nn.Module
    frozen: tuple[str, ...]

    def setup(self) -> None:
        nn.share_scope(self, self.model)

    def __getattr__(self, name: str) -> Any:  # num_classes and the other fields of the wrapped model
        if name.startswith("_") or name in ("model", "frozen"):
            return super().__getattr__(name)
        return getattr(self.model, name)

    def __call__(self, x: jax.Array, train: bool = False, **kwargs: Any) -> Any:
        frozen = set(self.frozen)

        def intercept(next_fun, args, kwargs, context):
            path = context.module.path
            if not path or path[0] not in frozen or context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            if isinstance(context.module, _TRAIN_DEPENDENT):
                args, kwargs = _eval_mode(args, kwargs)
            out = next_fun(*args, **kwargs)
            return jax.tree_util.tree_map(jax.lax.stop_gradient, out) if len(path) == 1 else out

        with nn.intercept_methods(intercept):
            return self.model(x, train, **kwargs)


def _eval_mode(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if "train" in kwargs:
        return args, {**kwargs, "train": False}
    return (args[0], False, *args[2:]), kwargs


def param_labels(params: dict, frozen: tuple[str, ...], head: tuple[str, ...]) -> dict:
    """Tree like ``params`` with ``'frozen'``, ``'backbone'`` or ``'head'`` per leaf."""

    def label(name: str) -> str:
        return "head" if name in head else "frozen" if name in frozen else "backbone"

    return {name: jax.tree_util.tree_map(lambda _, n=name: label(n), sub) for name, sub in params.items()}


def count_params(params: dict, labels: dict) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts under ``labels``."""
    sizes = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda p: int(np.prod(np.shape(p))), params))
    flags = jax.tree_util.tree_leaves(labels)
    return sum(s for s, f in zip(sizes, flags, strict=True) if f != "frozen"), sum(sizes)


def transfer_optimizer(labels: dict | Callable[[Any], dict], head_tx: optax.GradientTransformation,
                       backbone_tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``multi_transform``: head and backbone optimizers; frozen params get exactly zero updates."""
    return optax.multi_transform({"head": head_tx, "backbone": backbone_tx, "frozen": optax.set_to_zero()}, labels)


def transplant(source: dict, target: dict, head: tuple[str, ...] = ("fc",)) -> dict:
    """Copy every non-head leaf of ``source`` variables into ``target`` (same structure but the head);
    the head of ``target`` (freshly initialised for the new classes) is kept."""
    out = {}
    for collection, tree in target.items():
        out[collection] = {}
        for name, sub in tree.items():
            if name in head:
                out[collection][name] = sub
                continue
            src = source.get(collection, {}).get(name)
            if src is None:
                raise UsageError(f"pretrained checkpoint has no {collection}/{name}: is it the same architecture?")
            same = jax.tree_util.tree_structure(src) == jax.tree_util.tree_structure(sub) and all(
                np.shape(a) == np.shape(b)
                for a, b in zip(jax.tree_util.tree_leaves(src), jax.tree_util.tree_leaves(sub), strict=True))
            if not same:
                raise UsageError(f"pretrained {collection}/{name} does not match the model (different input channels "
                                 "or architecture?)")
            out[collection][name] = jax.tree_util.tree_map(np.asarray, src)
    return out


def after_steps(tx: optax.GradientTransformation, steps: int) -> optax.GradientTransformation:
    """``tx`` with its updates zeroed for the first ``steps`` steps (head-only phase of fine-tuning)."""
    if steps <= 0:
        return tx
    return optax.chain(tx, optax.scale_by_schedule(lambda step: (step >= steps).astype(jnp.float32)))


__all__ = ["FIRST_STAGE", "MODES", "Frozen", "StageLayout", "after_steps", "count_params", "frozen_stages",
           "param_labels", "stage_layout", "transfer_optimizer", "transplant"]
