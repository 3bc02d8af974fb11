"""The step timeline of a re-planned run: which step of its first plan each of its steps stands for.

A budgeted run (:mod:`cnnjax.train.budget`) that re-plans at step ``at`` from ``old`` to ``new`` total steps
compresses what is left of its schedule: each later step ``s`` stands for step ``at + (s - at) (old - at) /
(new - at)`` of the plan before, so the new last step stands for the old last one. Re-plans are recorded as
``(at, old, new)`` triples, oldest first (``config.budget_replans``).
"""

from __future__ import annotations

import jax.numpy as jnp

from cnnjax.errors import ConfigError

Replans = tuple[tuple[int, int, int], ...]


def warp_step(step, replans: Replans):
    """The step of the schedule as first planned that ``step`` (an int or a jax array) of a run re-planned at
    ``replans`` stands for: unchanged before the first re-plan, and stretched linearly after each, so that a
    run's new last step maps to its old last step. Float; jittable."""
    step = jnp.asarray(step, jnp.float32)
    for at, old, new in reversed(replans):  # the newest re-plan maps onto the timeline before it
        step = jnp.where(step <= at, step, at + (step - at) * ((old - at) / (new - at)))
    return step


def planned_steps(total_steps: int, replans: Replans) -> int:
    """The total step count of the first plan of a run that now has ``total_steps`` after ``replans``."""
    return int(replans[0][1]) if replans else int(total_steps)


def check_replans(replans, steps_per_epoch: int | None = None, total_steps: int | None = None) -> Replans:
    """``replans`` as a tuple of int triples, each ``0 <= at < new < old``, each ``old`` the ``new`` of the one
    before (and whole epochs, given ``steps_per_epoch``; the last ``new`` equal to ``total_steps``, given that);
    raises :class:`ConfigError` for anything else."""
    try:
        out = tuple((int(at), int(old), int(new)) for at, old, new in (replans or ()))
    except (TypeError, ValueError):
        out = None
    chained = out is not None and all(0 <= at < new < old for at, old, new in out) and all(
        b[1] == a[2] and b[0] >= a[0] for a, b in zip(out, out[1:], strict=False))
    if not chained or (steps_per_epoch and any(v % steps_per_epoch for r in out for v in r)):
        raise ConfigError("budget_replans", f"is written by a budgeted run's re-plans (`(at, old, new)` steps, "
                                            f"at < new < old, chained); leave it as the run wrote it, got {replans!r}")
    if out and total_steps is not None and out[-1][2] != total_steps:
        raise ConfigError("budget_replans", f"ends its re-planned run at step {out[-1][2]} but this run has "
                                            f"{total_steps} steps; keep `num_epochs` as config.json has it")
    return out
