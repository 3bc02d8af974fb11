"""Feeding the step loop: training chunks and evaluation passes, from resident arrays or a stream.

A *feed* turns "steps ``s .. s + k - 1``" into a call of the runner: :class:`ResidentFeed` keeps the
training split on the device(s) and passes the order's indices; :class:`StreamFeed` has grain worker
processes decode this process's columns of each global batch ahead of time and passes the batches.
Both follow the same :class:`cnnjax.data.stream.EpochOrder`, so they train on the same examples in
the same order.
"""

from __future__ import annotations

import math

import numpy as np

from cnnjax.data.stream import ArraySource, EpochOrder, EvalBatch, StepBatch, stream
from cnnjax.train.evaluation import process_range, sharded_batch_size
from cnnjax.train.runner import Chunk, Runner


class ResidentFeed:
    """The whole training split on the device(s); the step gathers each batch by index."""

    def __init__(self, runner: Runner, train: ArraySource, order: EpochOrder):
        self.runner, self.order = runner, order
        self._data = runner.put_data(train.images, train.labels)

    def train(self, state, step: int, count: int, stop=None, upcoming: int = 0):
        """Steps ``step .. step + count - 1`` (fewer if ``stop`` says so; see :meth:`Runner.run`). ``upcoming``
        (the next chunk's length) is for :class:`StreamFeed`; indices need no prefetch."""
        del upcoming
        return self.runner.train(state, *self._data, self.order.batches(step, count), stop)

    def close(self) -> None:
        pass


class StreamFeed:
    """Training batches decoded on the host by ``workers`` grain processes, from ``start_step`` on; the next
    chunk's batches are placed on the device(s) while the current one runs (double-buffered)."""

    def __init__(self, runner: Runner, train, order: EpochOrder, start_step: int, total_steps: int,
                 workers: int, buffer: int = 2):
        self.runner, self.order, self._next = runner, order, start_step
        cols = runner.local_columns(order.batch_size)
        self._it = stream(StepBatch(train, order, cols), start_step, total_steps, workers, buffer)
        self._ready: tuple[int, int, Chunk] | None = None  # (step, count, placed chunk) prefetched

    def _placed(self, count: int) -> Chunk:
        parts = [next(self._it) for _ in range(count)]
        batch = {k: np.stack([p[k] for p in parts]) for k in ("images", "labels", "ids")}
        return self.runner.batch_chunk(batch, self.order.batch_size)

    def train(self, state, step: int, count: int, stop=None, upcoming: int = 0):
        """Steps ``step .. step + count - 1`` (fewer if ``stop`` says so: the loop then ends the run, so the
        batches decoded past the stop are dropped). ``upcoming`` > 0: decode and place the next ``upcoming``
        steps' batches once this chunk is dispatched."""
        if step != self._next:
            raise RuntimeError(f"the stream is at step {self._next}, not {step}")
        ready, self._ready = self._ready, None
        if ready is not None and ready[:2] != (step, count):
            raise RuntimeError(f"steps {ready[0]}..{ready[0] + ready[1] - 1} were prefetched, not {step}..")
        chunk = ready[2] if ready is not None else self._placed(count)
        state, metrics = self.runner.run(state, chunk, stop)
        self._next += metrics["steps"]
        if upcoming and metrics["steps"] == count:
            self._ready = (self._next, upcoming, self._placed(upcoming))
        return state, metrics

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
        self._it, self._ready = None, None


def open_feed(runner: Runner, train, order: EpochOrder, start_step: int, total_steps: int, *, streamed: bool,
              workers: int) -> ResidentFeed | StreamFeed:
    """The feed of ``train`` for steps ``start_step .. total_steps - 1``: a :class:`StreamFeed` with ``workers``
    decoding processes when ``streamed``, else a :class:`ResidentFeed`."""
    if streamed:
        return StreamFeed(runner, train, order, start_step, total_steps, workers)
    return ResidentFeed(runner, train, order)


def evaluate(runner: Runner, params, batch_stats, source, batch_size: int, *, streamed: bool = False,
             workers: int = 0, ensemble: bool = False) -> dict:
    """Eval-mode metrics of ``source`` (every process calls it; each evaluates its contiguous part on its
    local devices). ``streamed``: decode the part in batches on the host instead of holding it (by default
    with reader threads in this process: an evaluation pass is too short to pay for starting workers).
    ``ensemble``: ``params`` / ``batch_stats`` are tuples of members' trees, scored by their mean logits."""
    if not streamed:
        return runner.evaluate_variables(params, batch_stats, source.images, source.labels, batch_size, ensemble)
    lo, hi = process_range(len(source))
    batch_size = sharded_batch_size(hi - lo, batch_size, len(runner.evaluator.devices))
    return runner.evaluate_batches(params, batch_stats, stream(EvalBatch(source, lo, hi, batch_size), 0,
                                                               math.ceil((hi - lo) / batch_size), workers), ensemble)
