"""A time budget for a run: as many epochs as fit, planned from timed steps and re-planned as it goes.

With ``config.time_budget_s > 0``, ``fit`` treats ``num_epochs`` as the most it may train and, before the
run starts, times its train step here, on the run's own program: one chunk (its compilation, timed apart by
:attr:`cnnjax.train.runner.Runner.compile_s`), then one more chunk of the compiled length (scan) or
``PLAN_WARMUP_STEPS`` untimed and ``PLAN_STEPS`` timed steps (host loop, whose chunk lengths share one program),
and one batch of validation images twice (a whole pass is scaled from the second), on a scratch copy of the
initial state (nothing is written; the run itself starts from the initial state again). The plan is the
largest epoch count whose estimated wall time, counted from the start of ``fit``, fits the budget; the
learning-rate schedule is then built for that many epochs, so a budgeted run ends its schedule as a run of
that length would. A resumed run keeps the epoch count its first launch planned (``config.json``).

The plan can only be as good as its timing, and a shared machine drifts: after every epoch the loop asks
:func:`epochs_left_fit` whether the epochs left, at the pace of those trained (the mean, or the last epoch's
if slower), still end before the deadline, and if not it trains fewer. The schedule is then *compressed*,
not cut: a re-plan at step ``at`` from ``old`` to ``new`` total steps maps each later step ``s`` to ``at + (s
- at) (old - at) / (new - at)`` of the schedule as planned (:func:`cnnjax.train.timeline.warp_step`), so the
learning rate (and the lookahead's decay) still anneals to its planned end value, at the new last step. The
re-plans are kept in ``config.budget_replans`` as ``(at, old, new)`` triples (``config.json``), which rebuild
the same schedule on resume.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time

import jax
import ml_collections
import numpy as np

from cnnjax import distributed
from cnnjax.checkpoint import CheckpointStore
from cnnjax.data import DataSplits
from cnnjax.data.stream import EpochOrder, subset
from cnnjax.errors import ConfigError
from cnnjax.train import feed as feeds
from cnnjax.train.experiment import Experiment, build, runner_for
from cnnjax.train.runner import Runner
from cnnjax.train.timeline import Replans, check_replans

PLAN_STEPS = 5  # steady steps timed after the first (compiling) call and the warm-up
# Untimed steps between the first call and the timed ones: with tcmalloc preloaded (cnnjax.cpu.process) the first
# few steps still fault in the memory its heap grows by, and a plan timed on them would give too few epochs.
PLAN_WARMUP_STEPS = 3


@dataclasses.dataclass(frozen=True)
class StepTimes:
    """Seconds measured for one configuration: ``setup_s`` (build the experiment, place the data),
    ``compile_s`` (the first call less one step), ``step_s`` (one steady train step), ``first_val_s`` (the
    first validation pass, with its compilation), ``val_s`` (a later one, from a timed batch), ``test_s`` (a
    test pass, scaled from ``val_s`` by size) and ``save_s`` (one checkpoint written to a temporary directory; 0 in a
    multi-process run, whose checkpoints are collective writes to the workdir)."""

    setup_s: float
    compile_s: float
    step_s: float
    first_val_s: float
    val_s: float
    test_s: float
    save_s: float


def evaluations(epochs: int, eval_every: int) -> int:
    """How many validation passes a run of ``epochs`` makes: every ``eval_every``-th epoch and the last."""
    every = max(1, eval_every)
    return epochs // every + (epochs % every != 0)


def estimate_s(epochs: int, elapsed_s: float, times: StepTimes, steps_per_epoch: int, eval_every: int,
               rebuild: bool = True) -> float:
    """Estimated seconds from the start of ``fit`` to the end of a run of ``epochs``, planned ``elapsed_s``
    after that start: setting up and compiling again (``rebuild``: the run's schedule differs from the timed
    one's; else the run goes on with the timed program), the steps, the validation passes, the final test
    pass, one more test pass for the best checkpoint when there is more than one evaluation, and a
    checkpoint after each evaluation. Plots are not in it."""
    evals = evaluations(epochs, eval_every)
    tests = 1 + (evals > 1)
    again = times.setup_s + times.compile_s if rebuild else 0.0
    return (elapsed_s + again + epochs * steps_per_epoch * times.step_s
            + times.first_val_s + (evals - 1) * times.val_s + tests * times.test_s + evals * times.save_s)


def epochs_within(budget_s: float, elapsed_s: float, times: StepTimes, steps_per_epoch: int, eval_every: int,
                  max_epochs: int) -> int:
    """The largest epoch count in ``0 .. max_epochs`` whose :func:`estimate_s` is at most ``budget_s`` (a run of
    ``max_epochs`` keeps the timed program; a shorter one builds and compiles its own)."""
    fits = [e for e in range(1, max_epochs + 1)
            if estimate_s(e, elapsed_s, times, steps_per_epoch, eval_every, e < max_epochs) <= budget_s]
    return max(fits, default=0)


def time_steps(config: ml_collections.ConfigDict, data: DataSplits, steps_per_epoch: int,
               devices: list) -> tuple[StepTimes, Experiment, Runner]:
    """Time ``config``'s train step and validation pass (see the module docstring); every process calls it
    and gets the same figures (their means over processes). Also returns the experiment and runner it timed
    (for the run itself when it keeps ``num_epochs``: its program is then already compiled)."""
    t0 = time.perf_counter()
    exp = build(config, data, steps_per_epoch)
    runner = runner_for(config, exp, devices, steps_per_epoch)
    order = EpochOrder(int(config.seed), len(data.train), int(config.batch_size))
    # Chunks of the compiled length (scan) or, in a host loop, of steps that all share one program.
    first = runner.chunk_steps or 1
    warm = 0 if runner.chunk_steps else PLAN_WARMUP_STEPS
    count = runner.chunk_steps or PLAN_STEPS
    feed = feeds.open_feed(runner, data.train, order, 0, first + warm + count, streamed=data.streamed,
                           workers=int(config.data.get("workers", 2)))
    try:
        state = runner.put_state(exp.state)
        t1, stamps = time.perf_counter(), []
        for at, n in ((0, first), (first, warm), (first + warm, count)):
            if n:
                state, _ = feed.train(state, at, n)
                jax.block_until_ready(state)
            stamps.append(time.perf_counter())
        _, t_warm, t3 = stamps
        sample = subset(data.val, np.arange(min(len(data.val), int(config.eval_batch_size))))
        marks = [time.perf_counter()]
        for _ in range(2):  # one batch of validation images, twice: the first call compiles
            feeds.evaluate(runner, state.params, state.batch_stats, sample, config.eval_batch_size,
                           streamed=data.streamed)
            marks.append(time.perf_counter())
        save_s = _time_save(runner.get_state(state)) if jax.process_count() == 1 else 0.0
    finally:
        feed.close()
    step_s = (t3 - t_warm) / count
    batch_s = marks[2] - marks[1]
    val_s = batch_s * len(data.val) / len(sample)
    local = np.array([t1 - t0, runner.compile_s, step_s, marks[1] - marks[0] - batch_s + val_s, val_s])
    setup_s, compile_s, step_s, first_val_s, val_s = distributed.sum_over_processes(local) / jax.process_count()
    times = StepTimes(float(setup_s), float(compile_s), float(step_s), float(first_val_s), float(val_s),
                      float(val_s) * len(data.test) / max(1, len(data.val)), save_s)
    return times, exp, runner


def _time_save(host_state) -> float:
    """Seconds to write ``host_state`` as a checkpoint, into a temporary directory that is then removed."""
    with tempfile.TemporaryDirectory(prefix="cnnjax-budget-") as tmp:
        store = CheckpointStore(tmp)
        try:
            t0 = time.perf_counter()
            store.save(1, host_state, {"epoch": 1, "step": 1, "partial": None},
                       metrics={"val_loss": 0.0, "val_accuracy": 0.0})
            return time.perf_counter() - t0
        finally:
            store.close()


def epochs_left_fit(epoch: int, planned: int, epoch_s: float, left_s: float, times: StepTimes,
                    eval_every: int) -> int:
    """The epoch count (in all) to train after ``epoch`` of ``planned`` epochs, with ``left_s`` seconds to the
    deadline and epochs of ``epoch_s`` seconds: ``planned`` while the rest of it still fits (its epochs, the
    validation passes and checkpoints still due, the final test passes), else the most that fit with one
    recompilation of the step for the new schedule, and ``epoch + 1`` when not even that does."""
    every = max(1, eval_every)

    def need(total: int) -> float:
        evals = total // every - epoch // every + (total % every != 0)  # still due: every `every`-th, the last
        first = times.first_val_s - times.val_s if epoch < every else 0.0  # none yet: the first one compiles
        tests = 1 + (evaluations(total, every) > 1)
        return (total - epoch) * epoch_s + first + evals * (times.val_s + times.save_s) + tests * times.test_s

    if need(planned) <= left_s:
        return planned
    fits = [t for t in range(epoch + 1, planned) if need(t) + times.compile_s <= left_s]
    return max(fits, default=epoch + 1)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The epochs to train; ``times`` the figures they were planned from (None on resume, which does not time
    its steps again: such a run is not re-planned); ``replans`` those its earlier launches made."""

    epochs: int
    message: str
    times: StepTimes | None = None
    replans: Replans = ()
    built: tuple[Experiment, Runner] | None = None  # what was timed, when the plan keeps `num_epochs`


def plan_epochs(config: ml_collections.ConfigDict, data: DataSplits, steps_per_epoch: int, devices: list,
                saved: ml_collections.ConfigDict | None, started: float) -> Plan:
    """The epoch count for ``config.time_budget_s`` seconds from ``started`` (``time.perf_counter()`` at the
    start of ``fit``), at most ``config.num_epochs``. ``saved``: the config a workdir with checkpoints was
    started with (:func:`cnnjax.train.checks.check_workdir`), whose count a resumed run keeps. Raises
    :class:`ConfigError` when not even one epoch fits."""
    budget = float(config.time_budget_s)
    if saved is not None:
        epochs = int(saved.num_epochs)
        return Plan(epochs, f"time budget: resuming the {epochs} epochs planned at the first launch",
                    replans=check_replans(saved.get("budget_replans", ())))  # fit checks them against the run
    times, exp, runner = time_steps(config, data, steps_per_epoch, devices)
    elapsed = distributed.mean_over_processes(time.perf_counter() - started)  # every process plans alike
    epochs = epochs_within(budget, elapsed, times, steps_per_epoch, config.eval_every, config.num_epochs)
    one = estimate_s(1, elapsed, times, steps_per_epoch, config.eval_every)
    if epochs == 0:
        raise ConfigError("time_budget_s", f"({budget:g} s) leaves no time for one epoch here (about {one:.0f} s "
                                           "with set-up and evaluation); raise it, or set 0 to train `num_epochs`")
    total = estimate_s(epochs, elapsed, times, steps_per_epoch, config.eval_every, epochs < config.num_epochs)
    return Plan(epochs, f"time budget {budget:.0f} s: {times.step_s:.3f} s/step x {steps_per_epoch} steps/epoch "
                        f"(compile {times.compile_s:.1f} s, validation {times.first_val_s:.1f} s, checkpoint "
                        f"{times.save_s:.2f} s, planned after {elapsed:.1f} s) -> {epochs} of at most "
                        f"{config.num_epochs} epochs, about {total:.0f} s in all", times,
                built=(exp, runner) if epochs == config.num_epochs and runner is not None else None)

