"""optax optimizers and learning-rate schedules from an ml_collections config."""

from __future__ import annotations

from typing import Any

import jax
import optax

from cnnjax.errors import UsageError
from cnnjax.train import timeline

OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw", "airbench")
SCHEDULES = ("constant", "cosine", "onecycle", "triangular", "piecewise")


def make_schedule(cfg: Any, steps_per_epoch: int, num_epochs: int) -> optax.Schedule:
    """``cfg.schedule``: constant | cosine | onecycle | triangular | piecewise (with linear warm-up), over
    ``num_epochs``; a budgeted run's re-plans (``cfg.budget_replans``, see :mod:`cnnjax.train.timeline`) compress
    the schedule as first planned into its new length.

    * cosine: ``warmup_epochs`` linear warm-up from 0, then cosine decay to 0.
    * onecycle: optax's one-cycle (cosine up for ``pct_start``, then down).
    * triangular: linear ``lr_start_factor * lr`` -> ``lr`` at ``pct_start`` -> ``lr_end_factor * lr``
      at the end (factors default to 0; airbench94 uses 0.2, 0.23, 0.07).
    * piecewise: multiply by ``decay_factor`` at each epoch in ``boundaries_epochs``.
    """
    replans = timeline.check_replans(cfg.get("budget_replans", ()))
    schedule = _schedule(cfg, steps_per_epoch, timeline.planned_steps(steps_per_epoch * num_epochs, replans))
    return (lambda count: schedule(timeline.warp_step(count, replans))) if replans else schedule


def _schedule(cfg: Any, steps_per_epoch: int, total: int) -> optax.Schedule:
    lr = float(cfg.learning_rate)
    total = max(1, total)
    warmup = int(cfg.get("warmup_epochs", 0) * steps_per_epoch)
    name = cfg.get("schedule", "constant")
    pct = float(cfg.get("pct_start", 0.25))
    if name == "constant":
        sched = optax.constant_schedule(lr)
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), sched], [warmup]) if warmup else sched
    if name == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total, end_value=0.0)
    if name == "onecycle":
        return optax.cosine_onecycle_schedule(total, lr, pct_start=pct)
    if name == "triangular":
        peak = max(1, int(pct * total))
        start, end = lr * float(cfg.get("lr_start_factor", 0.0)), lr * float(cfg.get("lr_end_factor", 0.0))
        return optax.join_schedules(
            [optax.linear_schedule(start, lr, peak), optax.linear_schedule(lr, end, total - peak)], [peak])
    if name == "piecewise":
        bounds = {int(e * steps_per_epoch): float(cfg.get("decay_factor", 0.1)) for e in cfg.boundaries_epochs}
        return optax.piecewise_constant_schedule(lr, bounds)
    raise UsageError(f"unknown schedule {name!r}; choose one of: {', '.join(SCHEDULES)}")


def make_optimizer(cfg: Any, steps_per_epoch: int, num_epochs: int) -> tuple[optax.GradientTransformation,
                                                                              optax.Schedule]:
    """``cfg.optimizer`` in sgd | nesterov | adam | adamw, with ``weight_decay`` and ``grad_clip_norm``.

    For sgd / nesterov / adam, ``weight_decay`` is L2 added to the gradient (torch's ``weight_decay``);
    for adamw it is decoupled. BatchNorm scales / biases and all biases are not decayed.
    ``airbench``: :func:`cnnjax.train.airbench.optimizer` (FastNet's parameter groups, the recipe's
    units for ``learning_rate`` / ``weight_decay``; ``bias_lr_scale``, ``whiten_bias_epochs``).
    """
    schedule = make_schedule(cfg, steps_per_epoch, num_epochs)
    name = cfg.optimizer
    if name == "airbench":
        from cnnjax.train import airbench

        lr = float(cfg.learning_rate)
        tx = airbench.optimizer(lr, float(cfg.get("weight_decay", 0.0)), float(cfg.get("momentum", 0.85)),
                                int(cfg.batch_size), lambda s: schedule(s) / lr,
                                float(cfg.get("bias_lr_scale", 64.0)),
                                int(cfg.get("whiten_bias_epochs", 0) * steps_per_epoch))
        return tx, schedule
    wd = float(cfg.get("weight_decay", 0.0))
    momentum = float(cfg.get("momentum", 0.9))
    parts = []
    clip = float(cfg.get("grad_clip_norm", 0.0) or 0.0)
    if clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    if name in ("sgd", "nesterov", "adam") and wd > 0:
        parts.append(optax.add_decayed_weights(wd, mask=_kernel_mask))
    if name == "sgd":
        parts.append(optax.sgd(schedule, momentum=momentum or None))
    elif name == "nesterov":
        parts.append(optax.sgd(schedule, momentum=momentum, nesterov=True))
    elif name == "adam":
        parts.append(optax.adam(schedule))
    elif name == "adamw":
        parts.append(optax.adamw(schedule, weight_decay=wd, mask=_kernel_mask))
    else:
        raise UsageError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    return optax.chain(*parts), schedule


def _kernel_mask(params: Any) -> Any:
    """True for conv / dense kernels (decayed), False for biases and BN scales."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) == "kernel", params)
