"""Evaluation sharded over this process's local devices.

Each process evaluates its contiguous :func:`process_range` of a split. Every batch of it is split along the
batch axis over a 1-D ``Mesh`` of the process's local devices (axis :data:`cnnjax.train.steps.AXIS`), with the
params and BatchNorm statistics replicated; each device runs :func:`cnnjax.train.steps.eval_step` (or
:func:`~cnnjax.train.steps.ensemble_eval_step`) on its rows inside ``jax.shard_map``, the per-device sums are
``psum``-ed over the mesh and added to a running total on the devices. The mesh spans one process only, so
no collective crosses processes inside the program; the totals are summed over processes on the host
(:func:`cnnjax.distributed.sum_over_processes`).

``shard_map`` rather than sharding propagation: each device's program is written out, so the partitioning does
not depend on XLA seeing through the CPU backend's custom calls (which it would replicate) or through the
confusion matrix's scatter.

Equal to a one-device evaluation up to float32 reassociation of the loss sum (each device sums its rows, then
the devices' sums are added); ``correct``, ``count`` and the confusion matrix are sums of 0 / 1 and are exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cnnjax import distributed
from cnnjax.train.steps import AXIS, StepSpec, ensemble_eval_step, eval_step

Array = jax.Array
_METRIC_KEYS = ("loss_sum", "correct", "count")
_BATCH_KEYS = ("images", "labels", "mask")


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


def sharded_batch_size(n: int, batch_size: int, device_count: int) -> int:
    """:func:`eval_batch_size` rounded up to a multiple of ``device_count``: the rows of each batch an
    evaluation of ``n`` examples over ``device_count`` devices feeds (a streamed evaluation that decodes batches
    of this size needs no padding rows added on the host)."""
    return -(-eval_batch_size(n, batch_size) // device_count) * device_count


def zero_totals(num_classes: int) -> dict:
    """Summed eval metrics of no example: scalar ``loss_sum`` / ``correct`` / ``count``, ``confusion [K, K]``."""
    return {k: np.zeros((), np.float32) for k in _METRIC_KEYS} | {
        "confusion": np.zeros((num_classes, num_classes), np.float32)}


def _device_list(devices: Any) -> list:
    """``devices`` (one device or a sequence of them) as a list."""
    return list(devices) if isinstance(devices, Sequence | np.ndarray) else [devices]


def _padded_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, devices: Any) -> Iterator[dict]:
    """``images [n, ...]`` / ``labels [n]`` as ``{'images' [b, ...], 'labels' [b], 'mask' [b]}`` batches placed
    over ``devices`` (one device or a sequence): ``b`` is :func:`eval_batch_size` rounded up to a multiple of
    the device count, the split is zero-padded to whole batches (``mask`` 0 on padding) and each batch is
    sharded along its first axis, ``b / len(devices)`` rows per device (``b``: :func:`sharded_batch_size`).
    Nothing is yielded when ``n == 0``.

    The split is put once, as ``[batches, b, ...]`` sharded along ``b``: each device then holds only the rows it
    evaluates (``1 / len(devices)`` of the split, not a replica), and taking batch ``k`` is a local slice on
    every device, with no transfer. With one device it is today's batching exactly."""
    n = images.shape[0]
    if n == 0:
        return
    devices = _device_list(devices)
    b = sharded_batch_size(n, batch_size, len(devices))
    count = -(-n // b)
    pad = count * b - n
    mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    host = {"images": np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)]),
            "labels": np.concatenate([labels, np.zeros((pad,), labels.dtype)]), "mask": mask}
    sharding = NamedSharding(Mesh(np.array(devices), (AXIS,)), PartitionSpec(None, AXIS))
    placed = {k: jax.device_put(v.reshape(count, b, *v.shape[1:]), sharding) for k, v in host.items()}
    for k in range(count):
        yield {key: placed[key][k] for key in _BATCH_KEYS}


def summarize_eval(total: dict) -> dict:
    """Summed eval metrics -> loss, accuracy, per-class accuracy and confusion (numpy)."""
    confusion = np.asarray(total["confusion"])
    support = confusion.sum(axis=1)
    per_class = np.divide(np.diag(confusion), support, out=np.zeros_like(support), where=support > 0)
    count = float(total["count"])
    return {"loss": float(total["loss_sum"]) / count, "accuracy": float(total["correct"]) / count,
            "per_class_accuracy": per_class, "confusion": confusion, "count": int(count)}


def _accumulating_eval(spec: StepSpec, apply_fn, mesh: Mesh, ensemble: bool, compiler_options: dict | None):
    """``(acc, params, batch_stats, images [b, ...], labels [b], mask [b]) -> acc + metrics``, jitted over
    ``mesh``: ``acc`` / params / stats replicated, the batch split along ``b`` (``b`` a multiple of the mesh
    size); the metrics are ``eval_step``'s (``ensemble``: ``ensemble_eval_step``'s), summed over the mesh, traced
    at ``spec.precision`` (float32 matmul / conv precision, as the runner's steps)."""
    step = ensemble_eval_step if ensemble else eval_step

    def local(acc, params, stats, images, labels, mask):
        with jax.default_matmul_precision(spec.precision):
            m = jax.lax.psum(step(params, stats, apply_fn, images, labels, mask, spec), AXIS)
        return {k: acc[k] + m[k] for k in acc}

    rows = PartitionSpec(AXIS)
    # check_vma=False: the CPU backend's custom calls (ffi_call) return values without the varying-axis type.
    fn = jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(),) * 3 + (rows,) * 3, out_specs=PartitionSpec(),
                       check_vma=False)
    return jax.jit(fn, compiler_options=compiler_options)


class Evaluator:
    """Eval-mode metrics of a model over this process's share of a split, sharded over ``local_devices``
    (all of them this process's). ``apply_fn`` is the model's ``apply``; ``compiler_options`` go to XLA for
    the eval programs (see :func:`cnnjax.train.runner.eval_compiler_options`).

    ``eval_fn`` / ``ensemble_eval_fn``: the compiled ``(acc, params, batch_stats, images, labels, mask) -> acc``
    programs (see :func:`_accumulating_eval`)."""

    def __init__(self, spec: StepSpec, apply_fn, local_devices: Sequence, compiler_options: dict | None = None):
        self.spec = spec
        self.devices = list(local_devices)
        me = jax.process_index()
        if not self.devices or any(d.process_index != me for d in self.devices):
            raise ValueError(f"an Evaluator needs one or more devices of process {me}, got {self.devices}")
        self.mesh = Mesh(np.array(self.devices), (AXIS,))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(AXIS))
        self.eval_fn, self.ensemble_eval_fn = (
            _accumulating_eval(spec, apply_fn, self.mesh, ensemble, compiler_options) for ensemble in (False, True))

    def evaluate_variables(self, params: Any, batch_stats: Any, images: np.ndarray, labels: np.ndarray,
                           batch_size: int, ensemble: bool = False) -> dict:
        """Eval-mode metrics of in-memory ``images [N, H, W, C]`` (uint8) / ``labels [N]`` (see
        :meth:`evaluate_batches`); each process evaluates its :func:`process_range` of them, in batches of
        :func:`sharded_batch_size` rows. Every process must call it."""
        lo, hi = process_range(len(labels))
        batches = _padded_batches(images[lo:hi], labels[lo:hi], batch_size, self.devices)
        return self.evaluate_batches(params, batch_stats, batches, ensemble)

    def evaluate_batches(self, params: Any, batch_stats: Any, batches: Iterable[dict], ensemble: bool = False) -> dict:
        """Eval-mode metrics over this process's padded ``{'images' [b, ...], 'labels' [b], 'mask' [b]}``
        batches (host arrays, or device arrays as :func:`_padded_batches` places them; a batch whose ``b`` is
        not a multiple of the device count gains mask-0 rows), totals summed over processes: ``loss``,
        ``accuracy``, ``per_class_accuracy [K]``, ``confusion [K, K]`` (numpy), ``count``.

        ``params`` / ``batch_stats``: host or single-device trees (or arrays replicated over a mesh); they
        are replicated over this evaluator's devices. ``ensemble``: they are tuples of several members'
        trees, evaluated by their mean logits. Every process must call it."""
        fn = self.ensemble_eval_fn if ensemble else self.eval_fn
        params, stats = self.put_variables((params, batch_stats))
        total = zero_totals(self.spec.num_classes)
        acc = None
        for batch in batches:
            acc = fn(jax.device_put(total, self.replicated) if acc is None else acc, params, stats,
                     *self.put_batch(batch))
        if acc is not None:
            total = jax.tree_util.tree_map(np.asarray, jax.device_get(acc))
        return summarize_eval(distributed.sum_over_processes(total))

    def put_variables(self, tree: Any) -> Any:
        """``tree`` replicated over this evaluator's devices; a leaf replicated over devices of other
        processes too contributes its local copy."""
        def local(x):
            return x.addressable_data(0) if isinstance(x, jax.Array) and not x.is_fully_addressable else x

        return jax.device_put(jax.tree_util.tree_map(local, tree), self.replicated)

    def put_batch(self, batch: dict) -> tuple[Array, Array, Array]:
        """``(images, labels, mask)`` of ``batch`` sharded along the batch axis over the devices; a batch
        of ``b`` rows, ``b`` not a multiple of the device count, is padded with zero rows of mask 0."""
        arrays = [batch[key] for key in _BATCH_KEYS]
        pad = -arrays[0].shape[0] % len(self.devices)
        if pad:
            arrays = [np.concatenate([np.asarray(a), np.zeros((pad, *a.shape[1:]), a.dtype)]) for a in arrays]
        return tuple(jax.device_put(a, self.batch_sharding) for a in arrays)
