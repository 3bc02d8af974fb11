"""orbax checkpoints: save / resume the full TrainState, restore params + batch_stats for evaluation.

Layout under ``workdir/checkpoints``: ``latest/<step>`` (last two kept) and ``best/<step>`` (the
best test accuracy so far). Each step directory holds ``state`` (params, batch_stats, opt_state,
step, rng as nested dicts) and ``meta`` (JSON: epoch, position within the epoch, metrics).
orbax writes to a temporary directory and renames it, so an interrupted save leaves no partial
checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

from cnnjax.train.state import model_variables

KINDS = ("latest", "best")


def _manager(workdir: str, kind: str, create: bool = True) -> ocp.CheckpointManager:
    path = os.path.abspath(os.path.join(workdir, "checkpoints", kind))
    keep = 2 if kind == "latest" else 1
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=False)
    return ocp.CheckpointManager(path, options=options, item_names=("state", "meta"))


def _to_saveable(state: Any) -> dict:
    # orbax drops empty subtrees (batch_stats of a model without BN): restore_state puts it back.
    return jax.tree_util.tree_map(np.asarray, serialization.to_state_dict(jax.device_get(state)))


def save(workdir: str, kind: str, step: int, state: Any, meta: dict) -> None:
    """Save ``state`` (host or device) with JSON ``meta`` as checkpoint ``step`` of ``kind``."""
    mgr = _manager(workdir, kind)
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_to_saveable(state)),
                                           meta=ocp.args.JsonSave(meta)), force=True)
    mgr.wait_until_finished()
    mgr.close()


def steps(workdir: str, kind: str) -> list[int]:
    path = os.path.join(workdir, "checkpoints", kind)
    if not os.path.isdir(path):
        return []
    mgr = _manager(workdir, kind, create=False)
    out = list(mgr.all_steps())
    mgr.close()
    return sorted(out)


def _restore_raw(workdir: str, kind: str, step: int) -> tuple[dict, dict]:
    """State dict and meta of an existing checkpoint (callers have checked that ``step`` exists)."""
    mgr = _manager(workdir, kind, create=False)
    out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    mgr.close()
    return out["state"], out["meta"]


def restore_state(workdir: str, target: Any, kind: str = "latest") -> tuple[Any, dict] | None:
    """Latest full ``TrainState`` shaped like ``target`` plus its meta, or None without checkpoints."""
    available = steps(workdir, kind)
    if not available:
        return None
    raw, meta = _restore_raw(workdir, kind, available[-1])
    raw.setdefault("batch_stats", {})
    return serialization.from_state_dict(target, raw), meta


def find(workdir: str, which: str = "best") -> tuple[str, int]:
    """Resolve ``best | latest | STEP`` to ``(kind, step)``; STEP is searched in latest, then best."""
    if which in KINDS:
        available = steps(workdir, which)
        if not available:
            raise FileNotFoundError(f"no {which!r} checkpoint in {workdir}/checkpoints; train first")
        return which, available[-1]
    try:
        step = int(which)
    except ValueError:
        raise ValueError(f"--checkpoint must be 'best', 'latest' or a step number, got {which!r}") from None
    for kind in KINDS:
        if step in steps(workdir, kind):
            return kind, step
    have = sorted(set(steps(workdir, "latest")) | set(steps(workdir, "best")))
    raise FileNotFoundError(f"no checkpoint at step {step} in {workdir}; available steps: {have}")


def restore_variables(workdir: str, which: str = "best") -> tuple[dict, dict]:
    """``({'params', 'batch_stats'?}, meta)`` for evaluation; the optimizer is never needed."""
    kind, step = find(workdir, which)
    raw, meta = _restore_raw(workdir, kind, step)
    return model_variables(raw["params"], raw.get("batch_stats")), meta
