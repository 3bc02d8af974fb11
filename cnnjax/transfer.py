"""Transfer learning for torchvision-layout ResNets: head replacement, freezing, per-group rates.

Stages, in order: ``stem`` (conv1, bn1), ``layer1`` .. ``layer4``; the head is ``fc``.
* feature extraction: every stage frozen (``freeze_until=5``): BN in eval mode, no gradients,
  no updates; only the fresh head trains.
* fine-tuning from a stage (e.g. ``layer4``): the stages before it are frozen; the rest trains
  with its own (smaller) learning rate, the head with the head rate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnnjax.errors import UsageError

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
MODES = ("scratch", "feature_extraction", "finetune")


def freeze_until(mode: str, unfreeze_from: str = "stem") -> int:
    """Number of leading stages to freeze: 5 for feature extraction, ``STAGES.index(from)`` for
    fine-tuning, 0 from scratch."""
    if mode not in MODES:
        raise UsageError(f"transfer mode must be one of {', '.join(MODES)}, got {mode!r}")
    if unfreeze_from not in STAGES:
        raise UsageError(f"unfreeze_from must be one of {', '.join(STAGES)}, got {unfreeze_from!r}")
    return {"scratch": 0, "feature_extraction": len(STAGES)}.get(mode, STAGES.index(unfreeze_from))


def _stage_of(top_level: str) -> int | None:
    """Index in STAGES of a top-level param name; None for the head."""
    if top_level in ("conv1", "bn1"):
        return 0
    if top_level.startswith("layer"):
        return int(top_level[len("layer")])  # layer1..layer4 -> 1..4
    return None


def param_labels(params: dict, frozen_stages: int) -> dict:
    """Tree like ``params`` with 'frozen', 'backbone' or 'head' per leaf."""

    def label(name: str) -> str:
        stage = _stage_of(name)
        if stage is None:
            return "head"
        return "frozen" if stage < frozen_stages else "backbone"

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


def transplant(source: dict, target: dict, head: str = "fc") -> dict:
    """Copy every backbone leaf of ``source`` variables into ``target`` (same structure but the head);
    the head of ``target`` (freshly initialised for the new classes) is kept."""
    out = {}
    for collection, tree in target.items():
        out[collection] = {}
        for name, sub in tree.items():
            if name == head:
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


__all__ = ["MODES", "STAGES", "after_steps", "count_params", "freeze_until", "param_labels",
           "transfer_optimizer", "transplant"]


