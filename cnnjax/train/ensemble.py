"""Ensembles: ``config.ensemble_members = K`` trains K members of one config and scores their mean logits.

Member ``k`` is the config with ``seed + k`` trained by :func:`cnnjax.train.loop.fit` in
``WORKDIR/member_k`` (the same validation split: ``data.split_seed`` is shared). With a time budget, each
member plans its epochs for an equal share of what is left of ``time_budget_s`` (counted from the start of
:func:`fit_ensemble`) after the ensemble's own evaluation, so the whole run fits the budget. The ensemble is
then evaluated on val and test from each member's final weights (nothing is selected on test) and the
result is written to ``WORKDIR/ensemble.json``. Running the same command again resumes the member in
progress; finished members are not trained again.
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections

from cnnjax import checkpoint, distributed
from cnnjax.data import DataSplits, load_splits
from cnnjax.errors import ConfigError
from cnnjax.io import write_json_atomic
from cnnjax.train import feed
from cnnjax.train.checks import check_config
from cnnjax.train.experiment import build_model, build_spec
from cnnjax.train.runner import Runner

# Seconds kept back from the members' budget for the ensemble's evaluation: loading the data, restoring the
# members, one compilation and K members' forward passes over val and test with their test-time augmentation.
EVAL_RESERVE_S = 90.0


def member_dir(workdir: str, k: int) -> str:
    return os.path.join(workdir, f"member_{k}")


def member_config(config: ml_collections.ConfigDict, k: int, budget_s: float) -> ml_collections.ConfigDict:
    """Member ``k``'s config: ``seed + k``, one member, and ``budget_s`` as its time budget (if budgeted)."""
    member = ml_collections.ConfigDict(config.to_dict())
    member.seed = int(config.seed) + k
    member.ensemble_members = 1
    if config.get("time_budget_s", 0.0):
        member.time_budget_s = budget_s
    return member


def member_budget_s(budget_s: float, elapsed_s: float, members_left: int) -> float:
    """An equal share, for each of the ``members_left`` members still to train, of the budget left after
    ``elapsed_s`` and the ensemble's evaluation (:data:`EVAL_RESERVE_S`)."""
    return (budget_s - elapsed_s - EVAL_RESERVE_S) / members_left


def fit_ensemble(config: ml_collections.ConfigDict, workdir: str, **fit_kwargs) -> dict:
    """Train ``config.ensemble_members`` members in ``workdir/member_k`` and evaluate their ensemble; returns
    ``{'members': [...], 'val_accuracy', 'test_accuracy', ...}``, or a member's ``{'interrupted': True, ...}``
    when it was stopped (run the same command again to resume). ``fit_kwargs`` go to every member's ``fit``."""
    from cnnjax.train.loop import fit

    started = time.perf_counter()
    check_config(config)
    count = int(config.ensemble_members)
    budget = float(config.get("time_budget_s", 0.0))
    if budget and member_budget_s(budget, 0.0, count) <= 0:
        raise ConfigError("time_budget_s", f"({budget:g} s) leaves nothing for {count} members after the ensemble's "
                                           f"{EVAL_RESERVE_S:g} s evaluation; raise it or lower `ensemble_members`")
    dirs = [member_dir(workdir, k) for k in range(count)]
    members = []
    for k, directory in enumerate(dirs):
        share = member_budget_s(budget, distributed.mean_over_processes(time.perf_counter() - started), count - k)
        member = member_config(config, k, max(share, 1.0))
        if distributed.is_primary():
            print(f"ensemble member {k + 1}/{count} (seed {member.seed}) in {directory}"
                  + (f", {share:.0f} s of the budget" if budget else ""), flush=True)
        result = fit(member, directory, **fit_kwargs)
        if result.get("interrupted"):
            return result
        members.append({"workdir": directory, "seed": member.seed, "epochs": int(result.get("epoch", 0)),
                        "test_accuracy": result.get("final_test_accuracy", result.get("test_accuracy"))})
    evals, _ = evaluate_checkpoints(dirs, config)
    scores = {f"{split}_{k}": ev[k] for split, ev in evals.items() for k in ("loss", "accuracy")}
    summary = {"members": members, **scores, "wall_s": time.perf_counter() - started}
    if distributed.is_primary():
        write_json_atomic(os.path.join(workdir, "ensemble.json"), summary)
        each = ", ".join(f"{m['test_accuracy']:.4f}" for m in members)
        print(f"ensemble of {count}: val_acc {scores['val_accuracy']:.4f}, test_acc {scores['test_accuracy']:.4f} "
              f"(members' test_acc {each}); {os.path.join(workdir, 'ensemble.json')}", flush=True)
    return summary


def member_dirs(workdir: str) -> list[str]:
    """The member workdirs of an ensemble run in ``workdir`` (``member_0``, ``member_1``, ...; [] if none)."""
    dirs = []
    while os.path.exists(os.path.join(member_dir(workdir, len(dirs)), "config.json")):
        dirs.append(member_dir(workdir, len(dirs)))
    return dirs


def evaluate_checkpoints(workdirs: list[str], config: ml_collections.ConfigDict, which: str = "latest",
                         splits: tuple[str, ...] = ("val", "test"), data: DataSplits | None = None
                         ) -> tuple[dict[str, dict], list[dict]]:
    """``({split: metrics}, [checkpoint meta per workdir])``: the metrics (loss, accuracy, per-class accuracy,
    confusion) of the checkpoint ``which`` of one workdir, or of the mean logits of several (an ensemble),
    runs of ``config``'s model and data (``data``: already loaded). Every process must call it."""
    restored = [checkpoint.restore_variables(d, which) for d in workdirs]
    data = load_splits(config) if data is None else data
    model, _ = build_model(config)  # no optimizer, no weight loading: the checkpoints have the weights
    parallelism = "jit" if jax.process_count() == 1 else "sharded"
    runner = Runner(build_spec(config, data.name, steps_per_epoch=1), model.apply, parallelism)
    params = tuple(v["params"] for v, _ in restored)
    stats = tuple(v.get("batch_stats", {}) for v, _ in restored)
    if len(restored) == 1:
        params, stats = params[0], stats[0]
    evals = {split: feed.evaluate(runner, params, stats, getattr(data, split), config.eval_batch_size,
                                  streamed=data.streamed, ensemble=len(restored) > 1) for split in splits}
    return evals, [meta for _, meta in restored]
