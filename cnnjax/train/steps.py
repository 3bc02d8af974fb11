"""Pure train / eval steps (placement lives in :mod:`cnnjax.train.runner`).

A step takes uint8 images ``[B, H, W, C]`` already on the device, augments and normalises them
inside the compiled computation, and returns summed metrics (``loss_sum``, ``correct``,
``count``) so that accumulation across steps and devices is exact and stays on the device.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnnjax.data.pipeline import AugmentConfig, augment, normalize
from cnnjax.errors import UsageError
from cnnjax.train.state import TrainState, model_variables
from cnnjax.train.timeline import Replans, planned_steps, warp_step

Array = jax.Array
Metrics = dict[str, Array]
AXIS = "batch"
_FLIP_STREAM = 0x0F11  # fold_in constant: the run's fixed key for alternating flips
TTA_LEVELS = (0, 1, 2)


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static description of what a step does to a batch."""

    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: AugmentConfig = AugmentConfig()
    label_smoothing: float = 0.0
    compute_dtype: Any = jnp.float32  # jnp.bfloat16: bf16 compute, fp32 params and BN statistics
    resize_to: int = 0  # bilinear resize to resize_to x resize_to after augmentation (0: off)
    tta: int = 0  # eval test-time augmentation: 0 none, 1 + mirror, 2 + mirror and 1-pixel translations
    lookahead: Lookahead | None = None
    precision: str | None = None  # float32 matmul / conv precision while traced: None (XLA's), 'high', 'highest'


@dataclasses.dataclass(frozen=True)
class Lookahead:
    """airbench's lookahead: every ``every`` steps the slow weights move toward the fast ones,
    ``slow += (1 - d) (fast - slow)`` with ``d = decay * (step / total_steps) ** power``, and the
    fast weights restart from them; at ``total_steps`` the fast weights become the slow ones.
    Covers params and BatchNorm running statistics. A re-planned run (``replans``, see
    :mod:`cnnjax.train.timeline`) takes ``step / total_steps`` from its first plan's timeline."""

    every: int
    total_steps: int
    decay: float = 0.95 ** 5
    power: float = 3.0
    replans: Replans = ()


def init_lookahead(state: TrainState) -> TrainState:
    """``state`` with slow weights equal to its params and BatchNorm statistics.

    They are host copies, so the slow and fast trees never share a buffer: the runner donates the
    state, and one buffer cannot be donated twice.
    """
    fast = {"params": state.params, "batch_stats": state.batch_stats}
    return state.replace(slow=jax.tree_util.tree_map(np.array, fast))


def lookahead_update(state: TrainState, la: Lookahead) -> TrainState:
    """Apply the lookahead rule for the (already incremented) ``state.step``; pure, jittable."""
    step = state.step
    last = step >= la.total_steps
    due = (step % la.every == 0) | last
    frac = jnp.minimum(warp_step(step, la.replans) / planned_steps(la.total_steps, la.replans), 1.0)
    decay = jnp.where(last, 1.0, la.decay * frac ** la.power)
    fast = {"params": state.params, "batch_stats": state.batch_stats}
    moved = jax.tree_util.tree_map(lambda s, f: s + (1.0 - decay) * (f - s), state.slow, fast)
    slow = jax.tree_util.tree_map(lambda m, s: jnp.where(due, m, s), moved, state.slow)
    fast = jax.tree_util.tree_map(lambda s, f: jnp.where(due, s, f), slow, fast)
    return state.replace(params=fast["params"], batch_stats=fast["batch_stats"], slow=slow)


def prepare_batch(images: Array, spec: StepSpec) -> Array:
    """uint8 ``[B, H, W, C]`` (already augmented) -> normalised, optionally resized model input."""
    x = normalize(images, spec.mean, spec.std, spec.compute_dtype)
    if spec.resize_to:
        x = jax.image.resize(x, (x.shape[0], spec.resize_to, spec.resize_to, x.shape[3]), "bilinear")
    return x


def cross_entropy(logits: Array, labels: Array, num_classes: int, smoothing: float = 0.0) -> Array:
    """Per-example softmax cross-entropy ``[B]`` with optional label smoothing (torch convention)."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing) if smoothing else \
        jax.nn.one_hot(labels, num_classes)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def train_step(state: TrainState, images: Array, labels: Array, spec: StepSpec,
               axis_name: str | None = None, offset: Array | int = 0,
               example_ids: Array | None = None) -> tuple[TrainState, Metrics]:
    """One SGD step on a (local) batch. With ``axis_name`` gradients are ``pmean``-ed and metrics
    ``psum``-ed over that axis; ``offset`` is this shard's index into the global batch;
    ``example_ids [B]`` (training-set indices) drive alternating flips."""
    step_key = jax.random.fold_in(state.rng, state.step)
    aug_key, drop_key = jax.random.split(step_key)
    if axis_name is not None:
        drop_key = jax.random.fold_in(drop_key, jax.lax.axis_index(axis_name))
    flip_key = jax.random.fold_in(state.rng, _FLIP_STREAM)
    with jax.named_scope("input"):  # named scopes label the ops for profiles (experiments.bench.profile)
        x = prepare_batch(augment(aug_key, images, spec.augment, offset, example_ids, state.step, flip_key), spec)

    def loss_fn(params):
        logits, updates = state.apply_fn(model_variables(params, state.batch_stats), x, train=True,
                                         mutable=["batch_stats"], rngs={"dropout": drop_key})
        with jax.named_scope("loss"):
            losses = cross_entropy(logits, labels, spec.num_classes, spec.label_smoothing)
        return losses.mean(), (logits, losses, updates)

    grads, (logits, losses, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
    with jax.named_scope("optimizer"):
        state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
        if spec.lookahead is not None:
            if state.slow is None:
                raise ValueError("StepSpec.lookahead needs a TrainState with slow weights (see init_lookahead)")
            state = lookahead_update(state, spec.lookahead)
    metrics = {
        "loss_sum": losses.sum(),
        "correct": (jnp.argmax(logits, -1) == labels).sum().astype(jnp.float32),
        "count": jnp.asarray(labels.shape[0], jnp.float32),
    }
    if axis_name is not None:
        metrics = jax.lax.psum(metrics, axis_name)
    return state, metrics


def eval_step(params: Any, batch_stats: Any, apply_fn, images: Array, labels: Array, mask: Array,
              spec: StepSpec) -> Metrics:
    """Eval-mode metrics on a padded batch: summed loss / correct / count and a ``[K, K]`` confusion
    matrix (rows true, columns predicted); ``mask`` ``[B]`` is 0 for padding examples."""
    return ensemble_eval_step((params,), (batch_stats,), apply_fn, images, labels, mask, spec)


def ensemble_eval_step(params: tuple, batch_stats: tuple, apply_fn, images: Array, labels: Array, mask: Array,
                       spec: StepSpec) -> Metrics:
    """:func:`eval_step` of an ensemble: ``params`` / ``batch_stats`` are tuples of the members' trees (one
    model), and the ensemble's logits are the mean of the members' logits (each with ``spec.tta``)."""
    if len(params) != len(batch_stats) or not params:
        raise UsageError(f"an ensemble needs one batch_stats tree per member; got {len(params)} params and "
                         f"{len(batch_stats)} batch_stats")
    x = prepare_batch(images, spec)
    logits = [tta_logits(lambda v, p=p, s=s: apply_fn(model_variables(p, s), v, train=False), x, spec.tta)
              for p, s in zip(params, batch_stats, strict=True)]
    mean = logits[0] if len(logits) == 1 else sum(logits[1:], logits[0]) / len(logits)
    return eval_metrics(mean, labels, mask, spec.num_classes)


def eval_metrics(logits: Array, labels: Array, mask: Array, num_classes: int) -> Metrics:
    """Summed loss / correct / count and the ``[K, K]`` confusion matrix of ``logits [B, K]``, padding
    (``mask`` 0) left out."""
    losses = cross_entropy(logits, labels, num_classes)
    pred = jnp.argmax(logits, -1)
    m = mask.astype(jnp.float32)
    confusion = jnp.zeros((num_classes, num_classes), jnp.float32).at[labels, pred].add(m)
    return {"loss_sum": (losses * m).sum(), "correct": ((pred == labels) * m).sum(), "count": m.sum(),
            "confusion": confusion}


def tta_logits(forward, x: Array, level: int) -> Array:
    """Test-time augmentation (airbench): level 0 ``forward(x)``; 1 the mean over ``x`` and its mirror;
    2 half that plus half the mean of the level-1 logits of ``x`` translated by one pixel up-left and
    down-right (reflect padding). ``x`` is ``[B, H, W, C]``."""
    if level not in TTA_LEVELS:
        raise UsageError(f"tta level must be 0, 1 or 2, got {level!r}")
    if level == 0:
        return forward(x)
    mirror = lambda v: 0.5 * (forward(v) + forward(v[:, :, ::-1, :]))  # noqa: E731
    logits = mirror(x)
    if level == 1:
        return logits
    h, w = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    shifted = 0.5 * (mirror(padded[:, :h, :w]) + mirror(padded[:, 2:h + 2, 2:w + 2]))
    return 0.5 * logits + 0.5 * shifted
