"""Pure train / eval steps and their jit, pmap and sharded-jit wrappers.

A step takes uint8 images ``[B, H, W, C]`` already on the device, augments and normalises them
inside the compiled computation, and returns summed metrics (``loss_sum``, ``correct``,
``count``) so that accumulation across steps and devices is exact and stays on the device.
``Runner.train`` runs a ``[steps, B]`` index chunk per call: one ``lax.scan`` dispatch on
accelerators, a host loop of compiled steps on the CPU.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cnnjax.data.pipeline import AugmentConfig, augment, normalize
from cnnjax.train.state import TrainState, model_variables

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


@dataclasses.dataclass(frozen=True)
class Lookahead:
    """airbench's lookahead: every ``every`` steps the slow weights move toward the fast ones,
    ``slow += (1 - d) (fast - slow)`` with ``d = decay * (step / total_steps) ** power``, and the
    fast weights restart from them; at ``total_steps`` the fast weights become the slow ones.
    Covers params and BatchNorm running statistics."""

    every: int
    total_steps: int
    decay: float = 0.95 ** 5
    power: float = 3.0


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
    frac = jnp.minimum(step / la.total_steps, 1.0)
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
    x = prepare_batch(augment(aug_key, images, spec.augment, offset, example_ids, state.step, flip_key), spec)

    def loss_fn(params):
        logits, updates = state.apply_fn(model_variables(params, state.batch_stats), x, train=True,
                                         mutable=["batch_stats"], rngs={"dropout": drop_key})
        losses = cross_entropy(logits, labels, spec.num_classes, spec.label_smoothing)
        return losses.mean(), (logits, losses, updates)

    grads, (logits, losses, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
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
    x = prepare_batch(images, spec)
    logits = tta_logits(lambda v: apply_fn(model_variables(params, batch_stats), v, train=False), x, spec.tta)
    losses = cross_entropy(logits, labels, spec.num_classes)
    pred = jnp.argmax(logits, -1)
    m = mask.astype(jnp.float32)
    confusion = jnp.zeros((spec.num_classes, spec.num_classes), jnp.float32).at[labels, pred].add(m)
    return {"loss_sum": (losses * m).sum(), "correct": ((pred == labels) * m).sum(), "count": m.sum(),
            "confusion": confusion}


def tta_logits(forward, x: Array, level: int) -> Array:
    """Test-time augmentation (airbench): level 0 ``forward(x)``; 1 the mean over ``x`` and its mirror;
    2 half that plus half the mean of the level-1 logits of ``x`` translated by one pixel up-left and
    down-right (reflect padding). ``x`` is ``[B, H, W, C]``."""
    if level not in TTA_LEVELS:
        raise ValueError(f"tta level must be 0, 1 or 2, got {level!r}")
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


_METRIC_KEYS = ("loss_sum", "correct", "count")


def _zero_metrics() -> Metrics:
    return {k: jnp.zeros((), jnp.float32) for k in _METRIC_KEYS}


def _scan_steps(state: TrainState, images: Array, labels: Array, idx: Array, spec: StepSpec,
                axis_name: str | None, offset: Array | int) -> tuple[TrainState, Metrics]:
    """Run ``train_step`` over index chunk ``idx [steps, B]`` gathered from resident ``images``."""

    def body(carry, batch_idx):
        state, acc = carry
        state, m = train_step(state, images[batch_idx], labels[batch_idx], spec, axis_name, offset, batch_idx)
        return (state, jax.tree_util.tree_map(jnp.add, acc, m)), None

    (state, metrics), _ = jax.lax.scan(body, (state, _zero_metrics()), idx)
    return state, metrics


def _indexed_step(state: TrainState, acc: Metrics, images: Array, labels: Array, idx: Array, spec: StepSpec,
                  axis_name: str | None, offset: Array | int) -> tuple[TrainState, Metrics]:
    """One step on row ``acc['pos']`` of the device-resident chunk ``idx``; adds to ``acc``.

    The row counter lives on the device, so a host loop over this function sends nothing per step.
    """
    batch_idx = jax.lax.dynamic_index_in_dim(idx, acc["pos"].astype(jnp.int32), keepdims=False)
    state, m = train_step(state, images[batch_idx], labels[batch_idx], spec, axis_name, offset, batch_idx)
    acc = {k: acc[k] + m[k] for k in _METRIC_KEYS} | {"pos": acc["pos"] + 1}
    return state, acc


class Runner:
    """Compiled train / eval functions for one parallelism mode: ``'jit' | 'pmap' | 'sharded'``.

    The host-facing interface is the same for all modes: ``put_state`` / ``get_state`` move a
    ``TrainState`` in and out, ``put_data`` places a split on the device(s) once, ``train(state,
    images, labels, idx)`` runs the index chunk ``[steps, global_batch]``, ``evaluate`` returns
    summed metrics. For ``pmap`` the model must carry ``axis_name='batch'`` for cross-replica BN.
    ``train`` donates the state it is given (its buffers are reused): keep using the returned one.
    """

    def __init__(self, spec: StepSpec, apply_fn, mode: str = "jit", devices: list | None = None,
                 scan: bool | None = None):
        if mode not in ("jit", "pmap", "sharded"):
            raise ValueError(f"parallelism must be 'jit', 'pmap' or 'sharded', got {mode!r}")
        self.spec, self.mode = spec, mode
        # XLA:CPU runs convolutions inside a while loop (lax.scan) through a slow generic path
        # (~30x slower here), so on the CPU a host loop dispatches one compiled step at a time.
        self.scan = jax.default_backend() != "cpu" if scan is None else scan
        self.devices = devices or (jax.local_devices() if mode != "jit" else jax.local_devices()[:1])
        self.n = len(self.devices)
        if self.scan:
            def local(state, images, labels, idx, axis_name=None):
                offset = jax.lax.axis_index(axis_name) * idx.shape[-1] if axis_name else 0
                return _scan_steps(state, images, labels, idx, spec, axis_name, offset)
        else:
            def local(state, acc, images, labels, idx, axis_name=None):
                offset = jax.lax.axis_index(axis_name) * idx.shape[-1] if axis_name else 0
                return _indexed_step(state, acc, images, labels, idx, spec, axis_name, offset)
        donate = (0,) if self.scan else (0, 1)
        if mode == "jit":
            self._train = jax.jit(local, donate_argnums=donate)
        elif mode == "pmap":
            self._train = jax.pmap(functools.partial(local, axis_name=AXIS), axis_name=AXIS, devices=self.devices,
                                   donate_argnums=donate)
            self._leading = NamedSharding(Mesh(np.array(self.devices), (AXIS,)), PartitionSpec(AXIS))
        else:
            self.mesh = Mesh(np.array(self.devices), (AXIS,))
            self._replicated = NamedSharding(self.mesh, PartitionSpec())
            self._batch_sharded = NamedSharding(self.mesh, PartitionSpec(None, AXIS))
            self._train = jax.jit(local, donate_argnums=donate, out_shardings=(self._replicated, self._replicated))
        # eval_fn(params, batch_stats, images, labels, mask) -> summed metrics (see eval_step).
        self.eval_fn = jax.jit(lambda params, stats, images, labels, mask: eval_step(
            params, stats, apply_fn, images, labels, mask, spec))

    # --- placement ---------------------------------------------------------------------------
    def _place(self, tree: Any) -> Any:
        """Put a host / device tree where this mode keeps state: replicated per device (pmap),
        replicated over the mesh (sharded) or on the one device (jit)."""
        if self.mode == "pmap":
            return self._replicate(tree)
        if self.mode == "sharded":
            return jax.device_put(tree, self._replicated)
        return jax.device_put(tree, self.devices[0])

    def put_state(self, state: TrainState) -> TrainState:
        return self._place(state)

    def _replicate(self, tree: Any) -> Any:
        """A copy of every leaf on each device, stacked on a leading device axis (pmap layout)."""
        return jax.tree_util.tree_map(
            lambda x: jax.device_put(np.broadcast_to(np.asarray(x)[None], (self.n, *np.shape(x))), self._leading),
            tree)

    def get_state(self, state: TrainState) -> TrainState:
        """Host copy of the (first replica of the) state."""
        if self.mode == "pmap":
            state = jax.tree_util.tree_map(lambda x: x[0], state)
        return jax.device_get(state)

    def put_data(self, images: np.ndarray, labels: np.ndarray) -> tuple[Array, Array]:
        return self._place((images, labels))

    def put_indices(self, idx: Array) -> Array:
        """``[steps, global_batch]`` -> the layout this mode's train function takes."""
        if idx.shape[-1] % self.n:
            raise ValueError(f"batch size {idx.shape[-1]} must be divisible by the {self.n} devices")
        if self.mode == "pmap":
            steps, batch = idx.shape
            per_device = jnp.asarray(idx).reshape(steps, self.n, batch // self.n).transpose(1, 0, 2)
            return jax.device_put(per_device, self._leading)
        if self.mode == "sharded":
            return jax.device_put(idx, self._batch_sharded)
        return jax.device_put(idx, self.devices[0])

    # --- compute -----------------------------------------------------------------------------
    def train(self, state: TrainState, images: Array, labels: Array, idx: Array) -> tuple[TrainState, Metrics]:
        """Run the chunk; metrics are summed over steps (and devices) and stay on the device."""
        idx_d = self.put_indices(idx)
        if self.scan:
            state, metrics = self._train(state, images, labels, idx_d)
        else:
            acc = self._place({k: np.zeros((), np.float32) for k in (*_METRIC_KEYS, "pos")})
            for _ in range(idx.shape[0]):
                state, acc = self._train(state, acc, images, labels, idx_d)
            metrics = {k: acc[k] for k in _METRIC_KEYS}
        if self.mode == "pmap":
            metrics = jax.tree_util.tree_map(lambda x: x[0], metrics)
        return state, metrics

    def evaluate(self, state: TrainState, images: np.ndarray, labels: np.ndarray, batch_size: int) -> dict:
        """Eval-mode metrics over a whole split on the first device: loss, accuracy, per-class
        accuracy ``[K]`` and confusion matrix ``[K, K]`` (numpy, fetched once)."""
        trees = (state.params, state.batch_stats)
        if self.mode == "pmap":  # the first replica, without a round trip through the host
            trees = jax.tree_util.tree_map(lambda x: x[0], trees)
        params, stats = jax.device_put(trees, self.devices[0])
        return evaluate_split(self.eval_fn, params, stats, images, labels, batch_size, self.devices[0])


def evaluate_split(eval_fn, params, batch_stats, images: np.ndarray, labels: np.ndarray, batch_size: int,
                   device=None) -> dict:
    """Evaluate a whole split in padded batches; accumulate on the device, fetch once."""
    n = images.shape[0]
    pad = (-n) % batch_size
    images_d = jax.device_put(np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)]), device)
    labels_d = jax.device_put(np.concatenate([labels, np.zeros((pad,), labels.dtype)]), device)
    mask_d = jax.device_put(np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)]), device)
    total = None
    for start in range(0, n + pad, batch_size):
        sl = slice(start, start + batch_size)
        m = eval_fn(params, batch_stats, images_d[sl], labels_d[sl], mask_d[sl])
        total = m if total is None else jax.tree_util.tree_map(jnp.add, total, m)
    total = jax.device_get(total)
    return summarize_eval(total)


def summarize_eval(total: dict) -> dict:
    """Summed eval metrics -> loss, accuracy, per-class accuracy and confusion (numpy)."""
    confusion = np.asarray(total["confusion"])
    support = confusion.sum(axis=1)
    per_class = np.divide(np.diag(confusion), support, out=np.zeros_like(support), where=support > 0)
    count = float(total["count"])
    return {"loss": float(total["loss_sum"]) / count, "accuracy": float(total["correct"]) / count,
            "per_class_accuracy": per_class, "confusion": confusion, "count": int(count)}
