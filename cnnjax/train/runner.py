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
Evaluation splits the eval set between processes, is sharded over each process's local devices
(:mod:`cnnjax.train.evaluation`), and sums the totals across processes.

On the CPU a chunk of steps is a host loop of compiled steps (XLA:CPU runs convolutions inside a
``lax.scan`` through a slow generic path); on accelerators it is one ``lax.scan`` (``loop.scan`` forces either),
padded with masked steps to one length, so that one program serves the whole run.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cnnjax.errors import UsageError
from cnnjax.train.evaluation import Evaluator
from cnnjax.train.state import TrainState
from cnnjax.train.steps import AXIS, StepSpec, train_step

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
SCAN_CHOICES = ("auto", "on", "off")


def scan_choice(value: str | bool | None) -> bool | None:
    """``loop.scan`` as the Runner's ``scan``: ``'on'`` True, ``'off'`` False, ``'auto'`` None (scan unless the
    devices are CPUs)."""
    if value in (None, "auto"):
        return None
    if value in ("on", True):
        return True
    if value in ("off", False):
        return False
    raise UsageError(f"loop.scan must be auto, on or off, got {value!r}")


def resolve_parallelism(parallelism: str, devices: list) -> str:
    """``parallelism`` with ``'auto'`` resolved for ``devices``: ``'sharded'`` in a multi-process run or over
    several accelerators, else ``'jit'`` (one device)."""
    if parallelism != "auto":
        return parallelism
    several = len(devices) > 1 and devices[0].platform != "cpu"
    return "sharded" if jax.process_count() > 1 or several else "jit"


def select_devices(per_process: int = 0) -> list:
    """The first ``per_process`` local devices of every process (0: all), in global order."""
    chosen, seen = [], {}
    for d in jax.devices():
        seen[d.process_index] = seen.get(d.process_index, 0) + 1
        if not per_process or seen[d.process_index] <= per_process:
            chosen.append(d)
    return chosen


def _chunk_fn(spec: StepSpec, scan: bool, axis_name: str | None, gather: bool):
    """``(state, acc, images, labels, ids, valid) -> (state, acc)``: the step over a chunk of steps (``lax.scan``),
    or one step (a host loop calls it per step with ``steps = 1``, so every chunk length shares one compiled step).

    ``gather=True`` (resident): ``images [N, ...]`` / ``labels [N]`` are the whole split and ``ids [steps, B]``
    index it. ``gather=False`` (streamed): ``images [steps, B, ...]``, ``labels`` and ``ids [steps, B]`` are the
    batches themselves. ``ids`` are training-set indices either way. ``valid [steps]`` (scan): 0 marks a padding
    step, which leaves the state and the metrics as they are (every chunk then has one length: one compile).
    The float32 matmul / conv precision is ``spec.precision`` while the step is traced."""

    def step(state, acc, row):
        images, labels, ids = row
        offset = jax.lax.axis_index(axis_name) * ids.shape[0] if axis_name else 0
        state, m = train_step(state, images, labels, spec, axis_name, offset, ids)
        return state, {k: acc[k] + m[k] for k in _METRIC_KEYS}

    def run(state, acc, images, labels, ids, valid):
        if gather:
            rows = ids
            take = lambda r: (images[r], labels[r], r)  # noqa: E731
        else:
            rows = (images, labels, ids)
            take = lambda r: r  # noqa: E731
        with jax.default_matmul_precision(spec.precision):
            if scan:
                def body(carry, row_ok):
                    row, ok = row_ok
                    return jax.lax.cond(ok, lambda c: step(*c, take(row)), lambda c: c, carry), None

                (state, acc), _ = jax.lax.scan(body, (state, acc), (rows, valid))
                return state, acc
            return step(state, acc, take(jax.tree_util.tree_map(lambda x: x[0], rows)))

    return run


@dataclasses.dataclass
class Chunk:
    """A chunk of steps placed on the device(s), ready to run: the arguments of each call after the state and the
    accumulators (scan: one call; host loop: one per step) and how many real steps it holds."""

    calls: list[tuple]
    steps: int


class Runner:
    """Compiled train / eval functions for one placement: ``'jit' | 'pmap' | 'sharded'``.

    ``put_state`` / ``get_state`` move a ``TrainState`` in (from host or device) and out (a host
    copy), ``put_data`` places a split once, ``train(state, images, labels, idx)`` runs the chunk of
    global batches ``idx [steps, global_batch]`` (numpy, the same in every process), ``evaluate``
    returns metrics over a split. For ``pmap`` the model must carry ``axis_name='batch'`` for
    cross-replica BatchNorm. ``train`` donates the state it is given: keep using the returned one.

    ``scan``: a chunk is one ``lax.scan`` (None: unless the devices are CPUs). ``chunk_steps`` (scan): every chunk
    is padded with masked steps to this length, so one program serves every chunk (0: each length compiles its
    own). ``compile_s``: the seconds this runner's train calls spent compiling (or loading from JAX's persistent
    cache), counted on the first call of each program; ``programs``: the train programs called so far.
    """

    def __init__(self, spec: StepSpec, apply_fn, mode: str = "jit", devices: list | None = None,
                 scan: bool | None = None, chunk_steps: int = 0):
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
        self.chunk_steps = int(chunk_steps) if self.scan else 0
        self.compile_s, self.programs = 0.0, set()
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
                         donate_argnums=(0,)) for gather in (True, False))
        else:
            self._train, self._train_batches = (
                jax.jit(_chunk_fn(spec, self.scan, None, gather), donate_argnums=(0,),
                        out_shardings=(self._replicated, self._replicated)) for gather in (True, False))
        self._zeros = self._place({k: np.zeros((), np.float32) for k in _METRIC_KEYS})  # never donated
        self._valid: dict[tuple[int, int], Array] = {}
        self._init_eval(spec, apply_fn)

    def _init_eval(self, spec: StepSpec, apply_fn) -> None:
        options = eval_compiler_options(self.local_devices[0].platform, jax.__version__,
                                        os.environ.get("XLA_FLAGS", ""))
        self.evaluator = Evaluator(spec, apply_fn, self.local_devices, options)

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

    def _padded(self, arrays: list[np.ndarray]) -> tuple[list[np.ndarray], int]:
        """``arrays`` of ``steps`` rows padded with zero rows to ``chunk_steps`` (scan), and ``steps``."""
        steps = len(arrays[0])
        if self.chunk_steps and steps > self.chunk_steps:
            raise UsageError(f"a chunk of {steps} steps is longer than this runner's {self.chunk_steps}")
        pad = self.chunk_steps - steps if self.chunk_steps else 0
        if pad:
            arrays = [np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) for a in arrays]
        return arrays, steps

    def _valid_mask(self, steps: int, call: slice) -> Array:
        """The placed ``valid`` flags of the call ``call`` of a chunk with ``steps`` real steps: ``[chunk_steps]``
        (scan: padding steps 0) or ``[1]`` (host loop; unused). Cached."""
        length = (self.chunk_steps or steps) if self.scan else 1
        real = min(steps, length)
        if (real, length) not in self._valid:
            self._valid[real, length] = self._place(np.arange(length) < real)
        return self._valid[real, length]

    def index_chunk(self, idx: np.ndarray) -> Chunk:
        """The chunk of global batches ``idx [steps, B]`` of indices into the resident split, placed."""
        (idx,), steps = self._padded([np.asarray(idx, np.int32)])
        local = idx[:, self.local_columns(idx.shape[-1])]  # this process's columns, chosen once per chunk
        return Chunk([(self.put_batches(local[c], idx.shape[-1]), self._valid_mask(steps, c))
                      for c in self._step_slices(steps)], steps)

    def batch_chunk(self, batch: dict, global_batch: int) -> Chunk:
        """The chunk of streamed batches (this process's columns ``{'images' [steps, b, H, W, C], 'labels', 'ids'
        [steps, b]}`` of ``global_batch``-example batches), placed: device transfers start now, so a chunk placed
        while the one before runs is double-buffered."""
        arrays, steps = self._padded([np.asarray(batch[k]) for k in ("images", "labels", "ids")])
        return Chunk([(*(self.put_batches(a[c], global_batch) for a in arrays), self._valid_mask(steps, c))
                      for c in self._step_slices(steps)], steps)

    # --- compute -----------------------------------------------------------------------------
    def train(self, state: TrainState, images: Array, labels: Array, idx: np.ndarray,
              stop: Callable[[], bool] | None = None) -> tuple[TrainState, dict]:
        """Run the chunk ``idx [steps, B]`` of indices into the resident split (see :meth:`run`)."""
        return self.run(state, self.index_chunk(idx), stop, data=(images, labels))

    def train_batches(self, state: TrainState, batch: dict, global_batch: int,
                      stop: Callable[[], bool] | None = None) -> tuple[TrainState, dict]:
        """Run a chunk of streamed batches (see :meth:`batch_chunk` and :meth:`run`)."""
        return self.run(state, self.batch_chunk(batch, global_batch), stop)

    def _step_slices(self, steps: int) -> list[slice]:
        """What each call of a chunk of ``steps`` takes: the whole chunk (scan), or one step at a time."""
        return [slice(None)] if self.scan else [slice(s, s + 1) for s in range(steps)]

    def run(self, state: TrainState, chunk: Chunk, stop: Callable[[], bool] | None = None,
            data: tuple[Array, Array] | None = None) -> tuple[TrainState, dict]:
        """Run a placed chunk: of indices into the resident split ``data = (images, labels)``, or of streamed
        batches (``data`` None). Returns the state and the chunk's metrics summed over steps and devices, still on
        this process's first device (read them later: the next chunk can be dispatched first), with ``'steps'``:
        how many steps ran.

        ``stop``: asked after each step (host-loop mode: each step is then waited for); when it returns
        True the chunk ends there. Every process must give the same answer (see ``distributed.any_process``).
        In ``scan`` mode (accelerators) the chunk is one computation and always runs to its end."""
        fn = self._train if data is not None else self._train_batches
        acc, ran = self._zeros, 0
        # The calls of a chunk share one program: new, its first call returns once it is compiled (or loaded).
        key = (data is not None, tuple(np.shape(a) for a in chunk.calls[0]))
        for args in chunk.calls:
            args = (*data, *args) if data is not None else args
            t0 = time.perf_counter()
            state, acc = fn(state, acc, *args)
            if key not in self.programs:
                self.programs.add(key)
                self.compile_s += time.perf_counter() - t0
            ran = chunk.steps if self.scan else ran + 1
            if stop is not None and ran < chunk.steps:
                jax.block_until_ready(acc["count"])  # the signal is seen within one step, not one chunk
                if stop():
                    break
        return state, {k: self.first_local(acc[k]) for k in _METRIC_KEYS} | {"steps": ran}

    def evaluate(self, state: TrainState, images: np.ndarray, labels: np.ndarray, batch_size: int) -> dict:
        """Eval-mode metrics of ``state`` over a whole split (see :meth:`evaluate_variables`)."""
        return self.evaluate_variables(state.params, state.batch_stats, images, labels, batch_size)

    def evaluate_variables(self, params, batch_stats, images: np.ndarray, labels: np.ndarray,
                           batch_size: int, ensemble: bool = False) -> dict:
        """Eval-mode metrics of in-memory ``images`` / ``labels``, sharded over this process's local devices
        (:meth:`cnnjax.train.evaluation.Evaluator.evaluate_variables`). Every process must call it."""
        params, stats = (jax.tree_util.tree_map(self.first_local, t) for t in (params, batch_stats))
        return self.evaluator.evaluate_variables(params, stats, images, labels, batch_size, ensemble)

    def evaluate_batches(self, params, batch_stats, batches, ensemble: bool = False) -> dict:
        """Eval-mode metrics over this process's padded ``{'images', 'labels', 'mask'}`` batches
        (:meth:`cnnjax.train.evaluation.Evaluator.evaluate_batches`). Every process must call it."""
        params, stats = (jax.tree_util.tree_map(self.first_local, t) for t in (params, batch_stats))
        return self.evaluator.evaluate_batches(params, stats, batches, ensemble)
