"""orbax checkpoints: one ``CheckpointManager`` per run, restore for resuming or for evaluation.

Layout: ``workdir/checkpoints/<step>/`` holds ``state`` (params, batch_stats, opt_state, step, rng
as nested numpy dicts), ``meta`` (JSON: epoch, the in-epoch metric accumulators, evaluation
results) and, for checkpoints taken after an evaluation, orbax's ``metrics`` item. orbax keeps
the latest ``keep_latest`` checkpoints plus the best one by :data:`SELECTION_METRIC`
(``LatestN`` + ``BestN`` preservation); one save writes one checkpoint, so "best" can never lag
behind "latest". Saves are atomic (written under a temporary name, renamed when complete).

In a multi-process run every process calls :meth:`CheckpointStore.save` with the same host state;
orbax has the primary process write the arrays and the metadata (no file is written twice) and
synchronises the processes around it. A checkpoint written by N processes restores in any number
of processes: it holds plain host arrays, not device layouts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization
from orbax.checkpoint import checkpoint_managers as policies

from cnnjax.errors import CheckpointError, UsageError
from cnnjax.io import fs_condition, write_json_atomic
from cnnjax.train.state import model_variables

SELECTION_METRIC = "val_accuracy"  # the metric that picks the "best" checkpoint (higher is better)
WHICH = ("best", "latest")


def _directory(workdir: str) -> str:
    return os.path.abspath(os.path.join(workdir, "checkpoints"))


def _best_fn(metrics: dict) -> float:
    return float(metrics[SELECTION_METRIC])


def _manager(workdir: str, keep_latest: int = 2, read_only: bool = False) -> ocp.CheckpointManager:
    policy = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep_latest),
        policies.BestN(get_metric_fn=_best_fn, n=1, keep_checkpoints_without_metrics=False),
    ])
    # A reading manager never saves, so it never deletes (orbax's read_only mode only adds log noise).
    options = ocp.CheckpointManagerOptions(
        best_fn=_best_fn, best_mode="max", preservation_policy=None if read_only else policy,
        create=not read_only, enable_async_checkpointing=False, cleanup_tmp_directories=not read_only)
    return ocp.CheckpointManager(_directory(workdir), options=options, item_names=("state", "meta"))


def _check_layout(workdir: str) -> None:
    for old in ("latest", "best"):
        if os.path.isdir(os.path.join(_directory(workdir), old)):
            raise CheckpointError(f"{workdir} holds checkpoints in the layout of an older cnnjax (checkpoints/{old}/); "
                                  "train again in a new `workdir`")


CHECKSUMS = "cnnjax_checksums.json"


def _step_dir(workdir: str, step: int) -> str:
    return os.path.join(_directory(workdir), str(step))


def _file_digests(directory: str) -> dict[str, str]:
    """sha256 of every file below ``directory`` (relative paths), except the checksum file itself."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if rel != CHECKSUMS:
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                out[rel] = h.hexdigest()
    return out


def write_checksums(workdir: str, step: int) -> None:
    """Record the sha256 of every file of checkpoint ``step`` (process 0, after the save completed)."""
    directory = _step_dir(workdir, step)
    write_json_atomic(os.path.join(directory, CHECKSUMS), _file_digests(directory))


def verify(workdir: str, step: int) -> str | None:
    """None if checkpoint ``step`` matches its recorded checksums, else what is wrong (one line). A
    checkpoint without a checksum file (a save interrupted right after orbax finished) is accepted."""
    directory = _step_dir(workdir, step)
    path = os.path.join(directory, CHECKSUMS)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            recorded = json.load(f)
    except (OSError, ValueError) as err:
        return f"its checksum file is unreadable ({err})"
    actual = _file_digests(directory)
    bad = sorted(k for k in recorded if actual.get(k) != recorded[k])
    if bad:
        what = "missing" if bad[0] not in actual else "changed"
        return f"{len(bad)} file(s) differ from their checksums ({bad[0]} {what})"
    return None


def _to_saveable(state: Any) -> dict:
    # orbax drops empty subtrees (batch_stats of a model without BN): restore puts it back.
    return jax.tree_util.tree_map(np.asarray, serialization.to_state_dict(state))


class CheckpointStore:
    """The checkpoints of one run, kept open for its whole length (every process opens it)."""

    def __init__(self, workdir: str, keep_latest: int = 2):
        _check_layout(workdir)
        self.workdir = workdir
        self._mgr = _manager(workdir, keep_latest)

    def steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None) -> None:
        """Save host ``state`` with JSON ``meta``; ``metrics`` (holding :data:`SELECTION_METRIC`) make it
        a candidate for "best". Blocks until the checkpoint is complete on disk.

        A full, read-only or forbidden file system raises :class:`CheckpointError` (checked before
        writing when there is visibly too little space); the partial checkpoint is removed and the
        earlier ones stay intact."""
        saveable = _to_saveable(state)
        if jax.process_index() == 0:
            _check_space(self.workdir, step, saveable)
        try:
            self._mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(saveable),
                                                         meta=ocp.args.JsonSave(meta)),
                           metrics=metrics, force=True)
            self._mgr.wait_until_finished()
            if jax.process_index() == 0:
                write_checksums(self.workdir, step)
        except Exception as err:
            condition = fs_condition(err)
            if condition is None:
                raise
            try:  # orbax's writer threads may still be failing: stop them before the partial goes
                self._mgr.close()
            except Exception:  # noqa: BLE001, S110 - the same failure again
                pass
            _remove_partial(self.workdir, step)
            raise CheckpointError(_cannot_save(self.workdir, step, condition[0])) from None

    def best_step(self) -> int | None:
        """The step with the highest :data:`SELECTION_METRIC` (None if no checkpoint was evaluated)."""
        return self._mgr.best_step()

    def restore_variables(self, step: int) -> tuple[dict, dict]:
        """``({'params', 'batch_stats'?}, meta)`` of checkpoint ``step``."""
        raw, meta = _restore_raw(self._mgr, step)
        return model_variables(raw["params"], raw.get("batch_stats")), meta

    def restore_latest(self, target: Any) -> tuple[Any, dict] | None:
        """The newest intact full state shaped like ``target`` (host) and its meta; None without
        checkpoints. A newer checkpoint that fails its checksums or cannot be read is skipped with a
        warning; ``ValueError`` means an intact checkpoint does not fit ``target``."""
        for step in reversed(self.steps()):
            problem = verify(self.workdir, step)
            if problem is None:
                try:
                    raw, meta = _restore_raw(self._mgr, step)
                except Exception as err:  # noqa: BLE001 - unreadable data (truncated, deleted files)
                    problem = f"it cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:160]})"
            if problem is None:
                raw.setdefault("batch_stats", {})
                return serialization.from_state_dict(target, raw), meta
            warnings.warn(f"checkpoint {step} in {self.workdir} is damaged: {problem}; deleted it, resuming from "
                          "an older one", stacklevel=2)
            self._mgr.delete(step)  # the run will save this step again
        if self.steps():
            raise CheckpointError(f"every checkpoint in {self.workdir} is damaged; delete its checkpoints/ "
                                  "directory to start over, or use a new `workdir`")
        return None

    def close(self) -> None:
        self._mgr.close()


def _cannot_save(workdir: str, step: int, problem: str) -> str:
    return (f"cannot save checkpoint {step} in {_directory(workdir)}: {problem}; the earlier checkpoints are intact "
            "— free some space (or make it writable) and run the same command again to resume")


def _check_space(workdir: str, step: int, saveable: Any) -> None:
    """Refuse a save that visibly cannot fit: less free space than the arrays plus 1 MiB."""
    need = sum(int(np.asarray(x).nbytes) for x in jax.tree_util.tree_leaves(saveable)) + (1 << 20)
    free = free_bytes(_directory(workdir))
    if free < need:
        raise CheckpointError(_cannot_save(workdir, step, f"{free / 2**20:.1f} MiB free, about {need / 2**20:.1f} "
                                                          "MiB needed"))


def free_bytes(path: str) -> int:
    """Bytes available to this user on the file system holding ``path``."""
    return shutil.disk_usage(path).free


def _remove_partial(workdir: str, step: int) -> None:
    for name in os.listdir(_directory(workdir)):
        if name.startswith(f"{step}.orbax-checkpoint-tmp"):
            shutil.rmtree(os.path.join(_directory(workdir), name), ignore_errors=True)


def save(workdir: str, step: int, state: Any, meta: dict, metrics: dict | None = None) -> None:
    """One-off save (ported weights, tests); a run keeps one :class:`CheckpointStore` instead."""
    store = CheckpointStore(workdir)
    try:
        store.save(step, state, meta, metrics)
    finally:
        store.close()


def steps(workdir: str) -> list[int]:
    """Steps of the complete checkpoints in ``workdir`` (ascending; [] if none)."""
    if not os.path.isdir(_directory(workdir)):
        return []
    _check_layout(workdir)
    mgr = _manager(workdir, read_only=True)
    try:
        return sorted(mgr.all_steps())
    finally:
        mgr.close()


def find(workdir: str, which: str = "best") -> int:
    """Resolve ``best | latest | STEP`` to a step. "best" is the highest :data:`SELECTION_METRIC`
    (the latest checkpoint when none was evaluated, e.g. ported weights)."""
    available = steps(workdir)
    if not available:
        raise CheckpointError(f"no checkpoint in {workdir}/checkpoints; train first")
    if which in WHICH:
        mgr = _manager(workdir, read_only=True)
        try:
            step = mgr.best_step() if which == "best" else mgr.latest_step()
        finally:
            mgr.close()
        return available[-1] if step is None else step
    try:
        step = int(which)
    except ValueError:
        raise UsageError(f"`checkpoint` must be 'best', 'latest' or a step number, got {which!r}") from None
    if step not in available:
        raise CheckpointError(f"no checkpoint at step {step} in {workdir}; available steps: {available}")
    return step


def _restore_raw(mgr: ocp.CheckpointManager, step: int) -> tuple[dict, dict]:
    out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]


def restore_variables(workdir: str, which: str = "best") -> tuple[dict, dict]:
    """``({'params', 'batch_stats'?}, meta)`` for evaluation; the optimizer is never needed. A checkpoint
    that fails its checksums raises :class:`CheckpointError` naming it and the intact ones."""
    step = find(workdir, which)
    problem = verify(workdir, step)
    if problem is not None:
        intact = [s for s in steps(workdir) if s != step and verify(workdir, s) is None]
        raise CheckpointError(f"checkpoint {step} in {workdir} is damaged: {problem}; intact checkpoints: "
                              f"{intact or 'none'} (pass `checkpoint`=STEP)")
    mgr = _manager(workdir, read_only=True)
    try:
        raw, meta = _restore_raw(mgr, step)
    finally:
        mgr.close()
    return model_variables(raw["params"], raw.get("batch_stats")), meta | {"step": step}
