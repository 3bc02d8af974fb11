"""optax optimizers and learning-rate schedules from an ml_collections config."""

from __future__ import annotations

from typing import Any

import optax

OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "onecycle", "triangular", "piecewise")


def make_schedule(cfg: Any, steps_per_epoch: int, num_epochs: int) -> optax.Schedule:
    """``cfg.schedule``: constant | cosine | onecycle | triangular | piecewise (with linear warm-up).

    * cosine: ``warmup_epochs`` linear warm-up from 0, then cosine decay to 0.
    * onecycle: optax's one-cycle (cosine up for ``pct_start``, then down).
    * triangular: linear 0 -> peak at ``pct_start`` -> 0 at the end (airbench style).
    * piecewise: multiply by ``decay_factor`` at each epoch in ``boundaries_epochs``.
    """
    lr = float(cfg.learning_rate)
    total = max(1, steps_per_epoch * num_epochs)
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
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, peak), optax.linear_schedule(lr, 0.0, total - peak)], [peak])
    if name == "piecewise":
        bounds = {int(e * steps_per_epoch): float(cfg.get("decay_factor", 0.1)) for e in cfg.boundaries_epochs}
        return optax.piecewise_constant_schedule(lr, bounds)
    raise ValueError(f"unknown schedule {name!r}; choose one of: {', '.join(SCHEDULES)}")


def make_optimizer(cfg: Any, steps_per_epoch: int, num_epochs: int) -> tuple[optax.GradientTransformation,
                                                                              optax.Schedule]:
    """``cfg.optimizer`` in sgd | nesterov | adam | adamw, with ``weight_decay`` and ``grad_clip_norm``.

    For sgd / nesterov / adam, ``weight_decay`` is L2 added to the gradient (torch's ``weight_decay``);
    for adamw it is decoupled. BatchNorm scales / biases and all biases are not decayed.
    """
    schedule = make_schedule(cfg, steps_per_epoch, num_epochs)
    name = cfg.optimizer
    wd = float(cfg.get("weight_decay", 0.0))
    momentum = float(cfg.get("momentum", 0.9))
    decay_mask = lambda params: _kernel_mask(params)  # noqa: E731
    parts = []
    clip = float(cfg.get("grad_clip_norm", 0.0) or 0.0)
    if clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    if name in ("sgd", "nesterov", "adam") and wd > 0:
        parts.append(optax.add_decayed_weights(wd, mask=decay_mask))
    if name == "sgd":
        parts.append(optax.sgd(schedule, momentum=momentum or None))
    elif name == "nesterov":
        parts.append(optax.sgd(schedule, momentum=momentum, nesterov=True))
    elif name == "adam":
        parts.append(optax.adam(schedule))
    elif name == "adamw":
        parts.append(optax.adamw(schedule, weight_decay=wd, mask=decay_mask))
    else:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    return optax.chain(*parts), schedule


def _kernel_mask(params: Any) -> Any:
    """True for conv / dense kernels (decayed), False for biases and BN scales."""
    import jax

    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) == "kernel", params)
