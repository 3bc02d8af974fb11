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
from cnnjax.train.runner import Runner, eval_batch_size, process_range


class ResidentFeed:
    """The whole training split on the device(s); the step gathers each batch by index."""

    def __init__(self, runner: Runner, train: ArraySource, order: EpochOrder):
        self.runner, self.order = runner, order
        self._data = runner.put_data(train.images, train.labels)

    def train(self, state, step: int, count: int, stop=None):
        """Steps ``step .. step + count - 1`` (fewer if ``stop`` says so; see :meth:`Runner.train`)."""
        return self.runner.train(state, *self._data, self.order.batches(step, count), stop)

    def close(self) -> None:
        pass


class StreamFeed:
    """Training batches decoded on the host by ``workers`` grain processes, from ``start_step`` on."""

    def __init__(self, runner: Runner, train, order: EpochOrder, start_step: int, total_steps: int,
                 workers: int, buffer: int = 2):
        self.runner, self.order, self._next = runner, order, start_step
        cols = runner.local_columns(order.batch_size)
        self._it = stream(StepBatch(train, order, cols), start_step, total_steps, workers, buffer)

    def train(self, state, step: int, count: int, stop=None):
        """Steps ``step .. step + count - 1`` (fewer if ``stop`` says so: the loop then ends the run, so the
        batches decoded past the stop are dropped)."""
        if step != self._next:
            raise RuntimeError(f"the stream is at step {self._next}, not {step}")
        parts = [next(self._it) for _ in range(count)]
        batch = {k: np.stack([p[k] for p in parts]) for k in ("images", "labels", "ids")}
        state, metrics = self.runner.train_batches(state, batch, self.order.batch_size, stop)
        self._next += metrics["steps"]
        return state, metrics

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
        self._it = None


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
    first device). ``streamed``: decode the part in batches on the host instead of holding it (by default
    with reader threads in this process: an evaluation pass is too short to pay for starting workers).
    ``ensemble``: ``params`` / ``batch_stats`` are tuples of members' trees, scored by their mean logits."""
    if not streamed:
        return runner.evaluate_variables(params, batch_stats, source.images, source.labels, batch_size, ensemble)
    lo, hi = process_range(len(source))
    batch_size = eval_batch_size(hi - lo, batch_size)
    return runner.evaluate_batches(params, batch_stats, stream(EvalBatch(source, lo, hi, batch_size), 0,
                                                               math.ceil((hi - lo) / batch_size), workers), ensemble)
