"""Placement and compiled execution of the train / eval steps, in one process or many.

Two placements share one step function (:func:`cnnjax.train.steps.train_step`):

* ``'jit'`` / ``'sharded'``: ``jax.jit`` over a ``Mesh`` of devices (``'jit'`` is the one-device mesh;
  ``'sharded'`` spans every device of every process). The state and the resident data are
  replicated over the mesh; each step's global batch of indices is sharded along the mesh axis, so
  BatchNorm and the gradient mean are over the global batch (XLA inserts the collectives).
* ``'pmap'``: ``jax.pmap`` over the devices of all processes; each process feeds its local devices;
  gradients, metrics and BatchNorm statistics are ``pmean`` / ``psum``-ed across all of them.

What each process holds in device memory (resident data): on every one of its devices a replica
of the state (params, BatchNorm statistics, optimizer state) and of the whole uint8 training
split with its labels, plus its own slice of each chunk of batch indices. Every process passes
the same host arrays (every process loads the split and draws the same permutation); each
contributes only the shards that live on its devices (``jax.make_array_from_callback``).
Evaluation splits the eval set between processes, runs on each process's first device, and sums
the totals across processes.

On the CPU a chunk of steps is a host loop of compiled steps (XLA:CPU runs convolutions inside a
``lax.scan`` through a slow generic path); on accelerators it is one ``lax.scan``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cnnjax import distributed
from cnnjax.errors import UsageError
from cnnjax.train.state import TrainState
from cnnjax.train.steps import AXIS, StepSpec, ensemble_eval_step, eval_step, train_step

Array = jax.Array
MODES = ("jit", "pmap", "sharded")


def eval_compiler_options(platform: str, jax_version: str, xla_flags: str) -> dict[str, str] | None:
    """XLA options for the eval programs compiled for devices of ``platform``: YNN fusions without REDUCE
    (:data:`cnnjax.cpu.xla_flags.EVAL_YNN_FUSION_TYPES`) on the CPU with jax 0.10, unless ``xla_flags`` sets its
    own YNN fusion types; else None."""
    if platform != "cpu":
        return None
    from cnnjax.cpu import xla_flags as cpu_flags

    if not cpu_flags.on_measured_line(jax_version) or cpu_flags.sets_own_ynn_types(xla_flags):
        return None
    return {cpu_flags.YNN_FUSION_OPTION: cpu_flags.EVAL_YNN_FUSION_TYPES}


_METRIC_KEYS = ("loss_sum", "correct", "count")


def select_devices(per_process: int = 0) -> list:
    """The first ``per_process`` local devices of every process (0: all), in global order."""
    chosen, seen = [], {}
    for d in jax.devices():
        seen[d.process_index] = seen.get(d.process_index, 0) + 1
        if not per_process or seen[d.process_index] <= per_process:
            chosen.append(d)
    return chosen


def _chunk_fn(spec: StepSpec, scan: bool, axis_name: str | None, gather: bool):
    """``(state, acc, images, labels, ids) -> (state, acc)``: the step over a chunk of steps
    (``lax.scan``), or one step (a host loop calls it per step with ``steps = 1``, so every chunk
    length shares one compiled step).

    ``gather=True`` (resident): ``images [N, ...]`` / ``labels [N]`` are the whole split and ``ids
    [steps, B]`` index it. ``gather=False`` (streamed): ``images [steps, B, ...]``, ``labels`` and ``ids
    [steps, B]`` are the batches themselves. ``ids`` are training-set indices either way."""

    def step(state, acc, row):
        images, labels, ids = row
        offset = jax.lax.axis_index(axis_name) * ids.shape[0] if axis_name else 0
        state, m = train_step(state, images, labels, spec, axis_name, offset, ids)
        return state, {k: acc[k] + m[k] for k in _METRIC_KEYS} | {"pos": acc["pos"] + 1}

    def run(state, acc, images, labels, ids):
        if gather:
            rows = ids
            take = lambda r: (images[r], labels[r], r)  # noqa: E731
        else:
            rows = (images, labels, ids)
            take = lambda r: r  # noqa: E731
        if scan:
            (state, acc), _ = jax.lax.scan(lambda c, r: (step(*c, take(r)), None), (state, acc), rows)
            return state, acc
        return step(state, acc, take(jax.tree_util.tree_map(lambda x: x[0], rows)))

    return run


class Runner:
    """Compiled train / eval functions for one placement: ``'jit' | 'pmap' | 'sharded'``.

    ``put_state`` / ``get_state`` move a ``TrainState`` in (from host or device) and out (a host
    copy), ``put_data`` places a split once, ``train(state, images, labels, idx)`` runs the chunk of
    global batches ``idx [steps, global_batch]`` (numpy, the same in every process), ``evaluate``
    returns metrics over a split. For ``pmap`` the model must carry ``axis_name='batch'`` for
    cross-replica BatchNorm. ``train`` donates the state it is given: keep using the returned one.
    """

    def __init__(self, spec: StepSpec, apply_fn, mode: str = "jit", devices: list | None = None,
                 scan: bool | None = None):
        if mode not in MODES:
            raise UsageError(f"parallelism must be 'jit', 'pmap' or 'sharded', got {mode!r}")
        if mode == "jit" and jax.process_count() > 1:
            raise UsageError("parallelism 'jit' trains on one device of one process; use 'sharded' or 'pmap' "
                             "for a multi-process run")
        self.spec, self.mode = spec, mode
        devices = list(devices or jax.devices())
        self.devices = devices[:1] if mode == "jit" else devices
        # The platform the programs are compiled for (the devices', not jax.default_backend()'s).
        self.platform = self.devices[0].platform
        self.scan = self.platform != "cpu" if scan is None else scan
        self.n = len(self.devices)
        me = jax.process_index()
        self.local_positions = [i for i, d in enumerate(self.devices) if d.process_index == me]
        self.local_devices = [self.devices[i] for i in self.local_positions]
        if not self.local_devices:
            raise ValueError(f"none of the {self.n} devices belongs to process {me}")
        self.mesh = Mesh(np.array(self.devices if mode != "pmap" else self.local_devices), (AXIS,))
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        if mode == "pmap":
            self._leading = NamedSharding(self.mesh, PartitionSpec(AXIS))
            self._train, self._train_batches = (
                jax.pmap(_chunk_fn(spec, self.scan, AXIS, gather), axis_name=AXIS, devices=self.devices,
                         donate_argnums=(0, 1)) for gather in (True, False))
        else:
            self._batch_sharded = NamedSharding(self.mesh, PartitionSpec(None, AXIS))
            self._train, self._train_batches = (
                jax.jit(_chunk_fn(spec, self.scan, None, gather), donate_argnums=(0, 1),
                        out_shardings=(self._replicated, self._replicated)) for gather in (True, False))
        # eval_fn(params, batch_stats, images, labels, mask) -> summed metrics (see eval_step).
        options = eval_compiler_options(self.local_devices[0].platform, jax.__version__,
                                        os.environ.get("XLA_FLAGS", ""))
        self.eval_fn = jax.jit(lambda params, stats, images, labels, mask: eval_step(
            params, stats, apply_fn, images, labels, mask, spec), compiler_options=options)
        # The same for an ensemble: params / stats are tuples of the members' trees (see ensemble_eval_step).
        self.ensemble_eval_fn = jax.jit(lambda params, stats, images, labels, mask: ensemble_eval_step(
            params, stats, apply_fn, images, labels, mask, spec), compiler_options=options)

    # --- placement ---------------------------------------------------------------------------
    def first_local(self, x: Any) -> Any:
        """This process's first-device copy of an array placed by this runner (other values unchanged)."""
        if not isinstance(x, jax.Array):
            return x
        shard = x.addressable_data(0)
        return shard[0] if self.mode == "pmap" else shard

    def _place(self, tree: Any) -> Any:
        """A host / single-device tree (the same value in every process) where this placement keeps it:
        replicated over the mesh, or stacked per local device for pmap."""
        def put(x):
            host = np.asarray(x)
            if self.mode == "pmap":
                stacked = np.broadcast_to(host[None], (len(self.local_devices), *host.shape))
                return jax.device_put(stacked, self._leading)
            return jax.make_array_from_callback(host.shape, self._replicated, lambda index: host[index])

        return jax.tree_util.tree_map(put, tree)

    def put_state(self, state: TrainState) -> TrainState:
        return self._place(state)

    def get_state(self, state: TrainState) -> TrainState:
        """Host (numpy) copy of the state: the same in every process."""
        return jax.tree_util.tree_map(lambda x: np.asarray(self.first_local(x)), state)

    def put_data(self, images: np.ndarray, labels: np.ndarray) -> tuple[Array, Array]:
        return self._place((images, labels))

    def local_columns(self, global_batch: int) -> np.ndarray:
        """Which columns of a global batch this process feeds (its devices' shards, in device order)."""
        if global_batch % self.n:
            raise UsageError(f"batch size {global_batch} must be divisible by the {self.n} devices")
        per = global_batch // self.n
        return np.concatenate([np.arange(g * per, (g + 1) * per) for g in self.local_positions])

    def put_batches(self, local: np.ndarray, global_batch: int) -> Array:
        """This process's columns ``[steps, b_local, ...]`` of ``[steps, global_batch, ...]`` (the columns
        :meth:`local_columns` names) -> the global array, sharded along the batch axis (pmap: stacked
        per local device)."""
        local = np.asarray(local)
        per = global_batch // self.n
        if self.mode == "pmap":
            steps = local.shape[0]
            stacked = local.reshape(steps, len(self.local_devices), per, *local.shape[2:]).swapaxes(0, 1)
            return jax.device_put(np.ascontiguousarray(stacked), self._leading)
        start = {int(g) * per: k * per for k, g in enumerate(self.local_positions)}  # global column -> local

        def shard(index):
            cols = index[1]
            lo = start[cols.start or 0]
            return local[(index[0], slice(lo, lo + per), *index[2:])]

        sharding = NamedSharding(self.mesh, PartitionSpec(None, AXIS))
        return jax.make_array_from_callback((local.shape[0], global_batch, *local.shape[2:]), sharding, shard)

    # --- compute -----------------------------------------------------------------------------
    def train(self, state: TrainState, images: Array, labels: Array, idx: np.ndarray,
              stop: Callable[[], bool] | None = None) -> tuple[TrainState, dict]:
        """Run the chunk ``idx [steps, B]`` of indices into the resident split; metrics are summed over steps
        and devices, on this process's first device, with ``'steps'``: how many steps ran.

        ``stop``: asked after each step (host-loop mode: each step is then waited for); when it returns
        True the chunk ends there. Every process must give the same answer (see ``distributed.any_process``).
        In ``scan`` mode (accelerators) the chunk is one computation and always runs to its end."""
        idx = np.asarray(idx, np.int32)
        local = idx[:, self.local_columns(idx.shape[-1])]  # this process's columns, chosen once per chunk
        calls = ((images, labels, self.put_batches(local[c], idx.shape[-1])) for c in self._step_slices(len(idx)))
        return self._run(self._train, state, calls, len(idx), stop)

    def train_batches(self, state: TrainState, batch: dict, global_batch: int,
                      stop: Callable[[], bool] | None = None) -> tuple[TrainState, dict]:
        """Run a chunk of streamed batches: this process's columns ``{'images' [steps, b, H, W, C], 'labels',
        'ids' [steps, b]}`` of ``global_batch``-example batches (``stop`` and the metrics as :meth:`train`)."""
        arrays = [np.asarray(batch[k]) for k in ("images", "labels", "ids")]
        steps = len(arrays[-1])
        calls = ([self.put_batches(a[c], global_batch) for a in arrays] for c in self._step_slices(steps))
        return self._run(self._train_batches, state, calls, steps, stop)

    def _step_slices(self, steps: int) -> list[slice]:
        """What each call of a chunk of ``steps`` takes: the whole chunk (scan), or one step at a time."""
        return [slice(None)] if self.scan else [slice(s, s + 1) for s in range(steps)]

    def _run(self, fn, state, calls, steps: int, stop):
        """Call ``fn(state, acc, *args)`` for each ``args`` of ``calls`` (host loop: one step each, placed just
        before its call; scan: the whole chunk once)."""
        acc = self._place({k: np.zeros((), np.float32) for k in (*_METRIC_KEYS, "pos")})
        ran = 0
        for args in calls:
            state, acc = fn(state, acc, *args)
            ran = steps if self.scan else ran + 1
            if stop is not None and ran < steps:
                jax.block_until_ready(acc["pos"])  # the signal is seen within one step, not one chunk
                if stop():
                    break
        return state, {k: self.first_local(acc[k]) for k in _METRIC_KEYS} | {"steps": ran}

    def evaluate(self, state: TrainState, images: np.ndarray, labels: np.ndarray, batch_size: int) -> dict:
        """Eval-mode metrics of ``state`` over a whole split (see :meth:`evaluate_variables`)."""
        return self.evaluate_variables(state.params, state.batch_stats, images, labels, batch_size)

    def evaluate_variables(self, params, batch_stats, images: np.ndarray, labels: np.ndarray,
                           batch_size: int, ensemble: bool = False) -> dict:
        """Eval-mode metrics of in-memory ``images`` / ``labels`` (see :meth:`evaluate_batches`); each
        process evaluates its :func:`process_range` of them. Every process must call it."""
        lo, hi = process_range(len(labels))
        return self.evaluate_batches(params, batch_stats,
                                     _padded_batches(images[lo:hi], labels[lo:hi], batch_size, self.local_devices[0]),
                                     ensemble)

    def evaluate_batches(self, params, batch_stats, batches, ensemble: bool = False) -> dict:
        """Eval-mode metrics over this process's padded ``{'images', 'labels', 'mask'}`` batches, evaluated on
        its first device, totals summed over processes: loss, accuracy, per-class accuracy ``[K]``,
        confusion ``[K, K]`` (numpy). ``ensemble``: ``params`` / ``batch_stats`` are tuples of several
        members' trees, evaluated by their mean logits. Every process must call it."""
        eval_fn = self.ensemble_eval_fn if ensemble else self.eval_fn
        params, stats = (jax.tree_util.tree_map(self.first_local, t) for t in (params, batch_stats))
        device = self.local_devices[0]
        total = {k: np.zeros((), np.float32) for k in _METRIC_KEYS} | {
            "confusion": np.zeros((self.spec.num_classes,) * 2, np.float32)}
        params, stats = jax.device_put((params, stats), device)
        acc = None
        for b in batches:
            m = eval_fn(params, stats, *(jax.device_put(b[k], device) for k in ("images", "labels", "mask")))
            acc = m if acc is None else jax.tree_util.tree_map(jnp.add, acc, m)
        if acc is not None:
            total = jax.tree_util.tree_map(np.asarray, jax.device_get(acc))
        return summarize_eval(distributed.sum_over_processes(total))


def process_range(n: int) -> tuple[int, int]:
    """``[lo, hi)``: this process's contiguous share of ``n`` examples (``np.array_split`` sizes)."""
    size, extra = divmod(n, jax.process_count())
    p = jax.process_index()
    lo = p * size + min(p, extra)
    return lo, lo + size + (p < extra)


def eval_batch_size(n: int, batch_size: int) -> int:
    """The batch size an evaluation of ``n`` examples uses: ``batch_size``, or ``n`` when the split is
    smaller (one unpadded batch instead of one padded up to ``batch_size``)."""
    return max(1, min(batch_size, n))


def _padded_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, device):
    """The split put on ``device`` once, zero-padded to whole batches of :func:`eval_batch_size`, sliced
    there."""
    n = images.shape[0]
    if n == 0:
        return
    batch_size = eval_batch_size(n, batch_size)
    pad = (-n) % batch_size
    images_d = jax.device_put(np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)]), device)
    labels_d = jax.device_put(np.concatenate([labels, np.zeros((pad,), labels.dtype)]), device)
    mask_d = jax.device_put(np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)]), device)
    for start in range(0, n + pad, batch_size):
        sl = slice(start, start + batch_size)
        yield {"images": images_d[sl], "labels": labels_d[sl], "mask": mask_d[sl]}


def summarize_eval(total: dict) -> dict:
    """Summed eval metrics -> loss, accuracy, per-class accuracy and confusion (numpy)."""
    confusion = np.asarray(total["confusion"])
    support = confusion.sum(axis=1)
    per_class = np.divide(np.diag(confusion), support, out=np.zeros_like(support), where=support > 0)
    count = float(total["count"])
    return {"loss": float(total["loss_sum"]) / count, "accuracy": float(total["correct"]) / count,
            "per_class_accuracy": per_class, "confusion": confusion, "count": int(count)}
