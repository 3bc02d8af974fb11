"""``fit(config, workdir)``: the training loop, driven by the global step.

``for step in range(state.step, total_steps)`` in chunks of ``log_every`` steps; the epoch and the
position inside it are derived from the step. Periodic actions: a progress update after every chunk,
evaluation + checkpoint at the end of every ``eval_every``-th epoch and of the last, a checkpoint on a
signal (SIGTERM / SIGINT, agreed on by all processes) or after ``stop_after_steps``; under a time budget,
after every epoch, a re-plan to fewer epochs when the rest no longer fits (:mod:`cnnjax.train.budget`).

Reproducible and resumable, in any number of processes and in either data mode: the global batch of
each step comes from :class:`cnnjax.data.stream.EpochOrder` (every process draws the same
permutation), each step's augmentation /
dropout key is ``fold_in(state.rng, state.step)``, augmentation keys follow the example's position
in the global batch, and a checkpoint records the epoch's partial metric sums. A run interrupted and
resumed (with the same or another number of processes / devices) feeds the same global batches.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import signal
import time

import jax
import ml_collections
from tqdm.auto import tqdm

from cnnjax import distributed
from cnnjax.checkpoint import CheckpointStore
from cnnjax.data import DataSplits, load_splits
from cnnjax.data.stream import EpochOrder
from cnnjax.errors import ConfigError, TrainingError
from cnnjax.train import budget
from cnnjax.train import feed as feeds
from cnnjax.train.checks import check_config, check_deterministic, check_workdir, write_config
from cnnjax.train.device_memory import check_resident_fits, resident_bytes
from cnnjax.train.experiment import Experiment, build, retime, runner_for
from cnnjax.train.lock import WorkdirLock
from cnnjax.train.metrics import MetricsWriter
from cnnjax.train.runner import Runner, resolve_parallelism, select_devices
from cnnjax.train.timeline import check_replans

_clock = time.perf_counter  # the loop's clock (the budget's deadline, epoch times); tests may replace it


class StopFlag:
    """SIGTERM / SIGINT handling for a run. While ``abortable`` (start-up: loading data, building, restoring;
    nothing written yet) a signal runs :meth:`abort`: ``on_abort`` (which removes a workdir this run created
    and left empty), then what the signal did before the run (the experiments' CLIs: one line and exit 75).
    After that it only sets ``signal``: ``fit`` aborts if a process got one before all of them agreed to
    leave start-up, and otherwise the loop checkpoints after the current step (the first step's
    compilation, once started, runs to its end first)."""

    def __init__(self, on_abort=lambda: None):
        self.signal: int | None = None
        self.abortable = True
        self.on_abort = on_abort
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._set)
            except ValueError:  # not the main thread
                pass
        return self

    def _set(self, signum, frame):
        self.signal = signum
        if self.abortable:
            self.abort(signum, frame)

    def abort(self, signum: int, frame=None) -> None:
        """Stop start-up for ``signum``: ``on_abort``, then do what that signal did before the run. Under
        experiments.* that is one line and exit 75; in Python, Ctrl-C raises KeyboardInterrupt and SIGTERM
        ends the process. (Returns if that handler returns, e.g. the signal was ignored before the run.)"""
        self.on_abort()
        old = self._old.get(signum)
        if callable(old):
            old(signum, frame)
        elif old != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


@dataclasses.dataclass
class Run:
    """Everything the loop needs that does not change from step to step."""

    config: ml_collections.ConfigDict
    data: DataSplits
    exp: Experiment
    runner: Runner
    store: CheckpointStore
    writer: MetricsWriter
    order: EpochOrder
    progress: bool
    feed: feeds.ResidentFeed | feeds.StreamFeed
    deadline: float | None = None  # time budget: the _clock() it must end by (None: no re-planning)
    times: budget.StepTimes | None = None  # what the budget's plan measured

    @property
    def steps_per_epoch(self) -> int:
        return self.order.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.num_epochs

    def evaluate(self, params, batch_stats, split: str) -> dict:
        """Eval-mode metrics on ``split`` ('val' | 'test'); every process must call it."""
        return feeds.evaluate(self.runner, params, batch_stats, getattr(self.data, split),
                              self.config.eval_batch_size, streamed=self.data.streamed)


def steps_per_epoch(config: ml_collections.ConfigDict, data: DataSplits) -> int:
    if config.num_classes != data.num_classes:
        raise ConfigError("num_classes", f"is {config.num_classes} but {data.name} has {data.num_classes} classes")
    for split in ("val", "test"):
        if len(getattr(data, split)) == 0:
            raise ConfigError("data.name", f"{data.name}'s {split} split is empty; give it examples (image folders: "
                                           "`data.split_fractions`)")
        if getattr(data, split).image_shape != data.train.image_shape:
            raise ConfigError("data.pad_to", f"{data.name}'s {split} images are {getattr(data, split).image_shape} but "
                                             f"its train images are {data.train.image_shape}; make them one size")
    n = len(data.train) // config.batch_size
    if n == 0:
        raise ConfigError("batch_size", f"({config.batch_size}) exceeds the {len(data.train)} training images; "
                                        "lower it")
    return n


def devices_for(config: ml_collections.ConfigDict) -> list:
    per_process = int(config.get("num_devices", 0))
    if per_process > jax.local_device_count():
        raise ConfigError("num_devices", f"is {per_process} but this process has only {jax.local_device_count()} "
                                         "devices (on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    return select_devices(per_process)


def fit(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
        stop_after_steps: int | None = None, tensorboard: bool = False) -> dict:
    """Train ``config`` in ``workdir`` (resuming from its latest checkpoint); return the last metrics row.

    With ``config.time_budget_s`` > 0, ``num_epochs`` is the most it trains: it trains as many epochs as its
    timed steps say fit in that many seconds from this call (:mod:`cnnjax.train.budget`).

    Every process of a multi-process run calls this with the same arguments. ``stop_after_steps``
    simulates an interruption (as SIGTERM would) after that many steps of this call: the state is
    checkpointed and ``{'interrupted': True, 'epoch', 'step_in_epoch'}`` is returned.
    """
    started = _clock()
    check_config(config)
    devices = devices_for(config)
    check_deterministic(config, devices[0].platform, os.environ.get("XLA_FLAGS", ""))
    config.parallelism = resolve_parallelism(config.parallelism, devices)
    if not workdir:
        raise ConfigError("workdir", "must name a directory")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError("workdir", f"{workdir} is a file; pass a directory")
    # A signal during start-up stops the run at once; from the first step on, after the current step.
    with WorkdirLock(workdir, enabled=distributed.is_primary()) as lock, StopFlag(lock.remove_if_unused) as stop:
        data = load_splits(config)
        if config.num_classes == 0:  # take the number of classes from the data (image folders)
            config.num_classes = data.num_classes
        spe = steps_per_epoch(config, data)
        if not data.streamed:  # before anything is written: a split the devices cannot hold is one line
            check_resident_fits(resident_bytes(data.train.images, data.train.labels), jax.local_devices())
        saved = check_workdir(config, workdir)
        plan = None
        if config.get("time_budget_s", 0.0):  # num_epochs is the most that may be trained
            plan = budget.plan_epochs(config, data, spe, devices, saved, started)
            _say(plan.message)
            config.num_epochs = plan.epochs
            config.budget_replans = plan.replans
        check_replans(config.get("budget_replans", ()), spe, spe * config.num_epochs)
        exp, runner = plan.built if plan is not None and plan.built else (build(config, data, spe), None)
        store, run = CheckpointStore(workdir), None
        try:
            state, step, acc = _resume(store, exp.state, spe, workdir)
            # The processes leave start-up together, through one collective that agrees on a signal. From here a
            # signal is only recorded: one that any process got before or while they met aborts them all (a
            # process that got none stops as SIGTERM would); a later one, even in a process still leaving the
            # collective, stops them all after the first step, with a checkpoint.
            stop.abortable = False
            if distributed.any_process(stop.signal is not None):
                stop.abort(stop.signal or signal.SIGTERM)
            run = _open_run(config, workdir, data, exp, runner or runner_for(config, exp, devices, spe), store, step,
                            progress, tensorboard)
            if plan is not None and plan.times is not None:
                run = dataclasses.replace(run, deadline=started + float(config.time_budget_s), times=plan.times)
            return _train(run, run.runner.put_state(state), step, acc, stop, stop_after_steps)
        finally:
            if run is not None:
                run.feed.close()
            store.close()


def _open_run(config, workdir, data: DataSplits, exp, runner: Runner, store, step, progress, tensorboard) -> Run:
    """Write config.json (process 0), start the feed, open the metrics writer, print the header."""
    primary = distributed.is_primary()
    if primary:
        write_config(config, workdir)
    order = EpochOrder(int(config.seed), len(data.train), int(config.batch_size))
    feed = feeds.open_feed(runner, data.train, order, step, order.steps_per_epoch * config.num_epochs,
                           streamed=data.streamed, workers=int(config.data.get("workers", 2)))
    writer = MetricsWriter(workdir, step, enabled=primary, tensorboard=tensorboard)
    _say(f"{config.model.name} on {data.name}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} "
         f"test images ({'streamed' if data.streamed else 'resident'}), {config.parallelism} on {runner.n} "
         f"{runner.platform} device(s) in {jax.process_count()} process(es), batch {config.batch_size}, "
         f"{order.steps_per_epoch} steps/epoch, " + (f"chunks of {runner.chunk_steps} steps in one lax.scan"
                                                      if runner.scan else "a host loop of one-step calls"))
    return Run(config, data, exp, runner, store, writer, order, progress and primary, feed)


def _say(message: str) -> None:
    if distributed.is_primary():
        print(message, flush=True)


def _resume(store: CheckpointStore, initial, spe: int, workdir: str):
    """``(host state, step, partial metric sums)`` from the latest checkpoint, or the initial state."""
    try:
        restored = store.restore_latest(initial)
    except ValueError as err:
        raise TrainingError(f"cannot resume from {workdir}: its checkpoint does not fit this config's optimizer or "
                            f"model ({str(err).splitlines()[0][:160]}); keep `optimizer` as it was or use a new "
                            "`workdir`") from None
    if restored is None:
        return initial, 0, {}
    state, meta = restored
    step = int(state.step)
    return state, step, (meta.get("partial") or {}) if step % spe else {}


def _chunk_length(run: Run, step: int, end: int) -> int:
    """Steps in the chunk that starts at ``step``: up to ``log_every``, within the epoch, before ``end``."""
    return max(0, min(int(run.config.log_every), run.steps_per_epoch - step % run.steps_per_epoch, end - step))


def _train(run: Run, state, step: int, acc: dict, stop: StopFlag, stop_after_steps: int | None) -> dict:
    """The step loop: chunks of ``log_every`` steps, periodic evaluation / checkpoints, signals. A chunk's metrics
    are read after the next chunk is dispatched (the device never waits for the host within an epoch)."""
    spe, start = run.steps_per_epoch, step
    end = start + max(1, stop_after_steps) if stop_after_steps is not None else None
    bar, last_eval, trained = None, None, _Pace()
    pending, seen, t0, compiled = None, 0, _clock(), run.runner.compile_s
    while step < run.total_steps:
        epoch, pos = step // spe + 1, step % spe
        if bar is None or pos == 0:
            bar = _bar(run, epoch, pos)
        limit = min(run.total_steps, end if end is not None else run.total_steps)
        n = _chunk_length(run, step, limit)
        upcoming = _chunk_length(run, step + n, limit)
        state, m = run.feed.train(state, step, n, stop=lambda: distributed.any_process(stop.signal is not None),
                                  upcoming=upcoming)
        ran = m.pop("steps")
        acc = _absorb(run, acc, pending, bar, seen, t0)  # the chunk before, now that this one is queued
        pending, step, seen = (m, ran, epoch, step + ran), step + ran, seen + ran * run.config.batch_size
        stop_now = distributed.any_process(stop.signal is not None or (end is not None and step >= end))
        if step % spe == 0 or stop_now:
            acc, pending = _absorb(run, acc, pending, bar, seen, t0), None
            bar.close()
        if step % spe == 0:
            seconds = _clock() - t0
            last_eval = _end_epoch(run, state, epoch, acc, seconds, seen, stop_now) or last_eval
            trained.add(seconds, run.runner.compile_s - compiled)
            if run.runner.compile_s > compiled:
                _say(f"epoch {epoch}: {run.runner.compile_s - compiled:.1f} s of it compiling the train step "
                     f"(or loading it from JAX's compilation cache: {jax.config.jax_compilation_cache_dir or 'off'})")
            if run.deadline is not None and not stop_now and step < run.total_steps:
                run, state = _keep_deadline(run, state, epoch, trained)
            acc, t0, seen, compiled = {}, _clock(), 0, run.runner.compile_s
        elif stop_now:
            run.store.save(step, run.runner.get_state(state), {"epoch": epoch, "step": step, "partial": acc})
        if stop_now:
            why = f"signal {stop.signal}" if stop.signal is not None else "stop_after_steps"
            _say(f"interrupted ({why}) at epoch {epoch}, step {step % spe or spe}: checkpoint saved in "
                 f"{run.store.workdir}; run the same command again to resume")
            return {"interrupted": True, "epoch": epoch, "step_in_epoch": step % spe or spe}
    return _finish(run, state, last_eval)


def _absorb(run: Run, acc: dict, pending, bar, seen: int, t0: float) -> dict:
    """``acc`` plus the metrics of the chunk ``pending`` = ``(metrics on the device, steps, epoch, step after)``
    (None: nothing to add): read from the device, checked finite, shown on the progress bar."""
    if pending is None:
        return acc
    m, ran, epoch, after = pending
    acc = {k: acc.get(k, 0.0) + float(v) for k, v in jax.device_get(m).items()}
    _check_finite(acc, epoch, after)
    _update_bar(bar, ran, acc, seen, t0)
    return acc


@dataclasses.dataclass
class _Pace:
    """Epoch times of this call without compilation: their sum, count and the last one."""

    total_s: float = 0.0
    epochs: int = 0
    last_s: float = 0.0

    def add(self, seconds: float, compile_s: float) -> None:
        self.last_s = max(seconds - compile_s, 0.0)
        self.total_s += self.last_s
        self.epochs += 1


def _keep_deadline(run: Run, state, epoch: int, pace: _Pace):
    """After ``epoch``: ``(run, state)`` unchanged while the epochs left still end before ``run.deadline``, else
    re-planned to the most that do (:func:`cnnjax.train.budget.epochs_left_fit`), with the schedule compressed
    into them, the step rebuilt for it and config.json rewritten. ``pace``: this call's epoch times less the
    time spent compiling (a re-plan's own compile is then not taken for the pace of its epochs); the epochs left
    are counted at the mean or at the last one's time, whichever is longer (a machine that slowed down tends to
    stay slow). Every process calls it and decides alike (on means over processes)."""
    config, spe = run.config, run.steps_per_epoch
    epoch_s = distributed.mean_over_processes(max(pace.total_s / pace.epochs, pace.last_s))
    left_s = distributed.mean_over_processes(run.deadline - _clock())
    total = budget.epochs_left_fit(epoch, config.num_epochs, epoch_s, left_s, run.times, config.eval_every)
    if total >= config.num_epochs:
        return run, state
    _say(f"time budget: {left_s:.0f} s left after epoch {epoch} of {config.num_epochs} do not hold the "
         f"{config.num_epochs - epoch} more at {epoch_s:.1f} s an epoch -> {total} epochs in all, the learning-rate "
         "schedule compressed into them")
    config = copy.deepcopy(config)
    config.num_epochs = total
    config.budget_replans = (*config.get("budget_replans", ()), (epoch * spe, run.total_steps, total * spe))
    exp, tx = retime(config, run.exp, run.data.name, spe)
    runner = runner_for(config, exp, run.runner.devices, spe)
    run.feed.runner = runner
    if distributed.is_primary():
        write_config(config, run.store.workdir)
    return dataclasses.replace(run, config=config, exp=exp, runner=runner), state.replace(tx=tx)


def _bar(run: Run, epoch: int, pos: int):
    return tqdm(total=run.steps_per_epoch, initial=pos, desc=f"epoch {epoch}/{run.config.num_epochs}",
                disable=not run.progress, leave=False, dynamic_ncols=True)


def _update_bar(bar, n: int, acc: dict, seen: int, t0: float) -> None:
    bar.update(n)
    bar.set_postfix(loss=f"{acc['loss_sum'] / acc['count']:.4f}", acc=f"{acc['correct'] / acc['count']:.4f}",
                    img_s=f"{seen / (_clock() - t0):.0f}")


def _check_finite(acc: dict, epoch: int, step: int) -> None:
    loss = acc["loss_sum"] / acc["count"]
    if not math.isfinite(loss):
        raise TrainingError(f"loss became {loss} at epoch {epoch}, step {step}; stopped and kept the last good "
                            "checkpoint — lower `learning_rate` or set `grad_clip_norm`")


def _end_epoch(run: Run, state, epoch: int, acc: dict, seconds: float, seen: int, stopping: bool) -> dict | None:
    """Log the epoch; when evaluation is due, evaluate on val (and test at the last epoch or when asked),
    append the metrics row and checkpoint. Returns the test evaluation if one was made."""
    config = run.config
    train = {"train_loss": acc["loss_sum"] / acc["count"], "train_accuracy": acc["correct"] / acc["count"]}
    last = epoch == config.num_epochs
    if epoch % max(1, config.get("eval_every", 1)) and not last and not stopping:
        _say(f"epoch {epoch:3d}/{config.num_epochs}  train_loss {train['train_loss']:.4f}  "
             f"train_acc {train['train_accuracy']:.4f}  {seconds:.1f}s")
        return None
    evals = {"val": run.evaluate(state.params, state.batch_stats, "val")}
    if last or config.data.get("test_every_epoch", False):
        evals["test"] = run.evaluate(state.params, state.batch_stats, "test")
    scores = {f"{split}_{k}": ev[k] for split, ev in evals.items() for k in ("loss", "accuracy")}
    if not math.isfinite(scores["val_loss"]):
        raise TrainingError(f"validation loss is {scores['val_loss']} after epoch {epoch}; stopped and kept the last "
                            "good checkpoint — lower `learning_rate`")
    step = epoch * run.steps_per_epoch
    row = {"epoch": epoch, "step": step, **train, **scores, "epoch_time_s": seconds, "images_per_s": seen / seconds,
           "per_class_accuracy": [float(a) for a in evals["val"]["per_class_accuracy"]]}
    run.writer.write(row)  # before the checkpoint: a resume drops rows past its checkpoint
    run.store.save(step, run.runner.get_state(state), {"epoch": epoch, "step": step, "partial": None, **scores},
                   metrics=scores)
    _say(f"epoch {epoch:3d}/{config.num_epochs}  train_loss {row['train_loss']:.4f}  "
         f"train_acc {row['train_accuracy']:.4f}  " + "  ".join(
             f"{split}_loss {scores[split + '_loss']:.4f}  {split}_acc {scores[split + '_accuracy']:.4f}"
             for split in evals) + f"  {seconds:.1f}s  {row['images_per_s']:.0f} img/s")
    return evals.get("test")


def _finish(run: Run, state, final_test: dict | None) -> dict:
    """Once per run: test of the best (by val) checkpoint as a summary row; plots (process 0)."""
    rows = run.writer.rows
    summary = next((r for r in rows if "best_step" in r), None)
    if summary is None and rows:
        summary = _best_checkpoint_summary(run, run.writer.epoch_rows)
        run.writer.write(summary)
    run.writer.close()
    if run.config.plots and rows:
        if final_test is None:  # nothing trained in this call (the run was already complete)
            final_test = run.evaluate(state.params, state.batch_stats, "test")
        if distributed.is_primary():
            from cnnjax.train.plots import write_plots

            write_plots(run.store.workdir, run.exp.model, run.runner.get_state(state), run.data.class_names,
                        run.data.test.image(0), run.writer.epoch_rows, run.exp.spec, final_test)
    epochs = run.writer.epoch_rows
    return {**(epochs[-1] if epochs else {}), **(summary or {})}


def _best_checkpoint_summary(run: Run, rows: list[dict]) -> dict:
    """Test metrics of the checkpoint with the best validation accuracy (every process evaluates)."""
    best = run.store.best_step()
    by_step = {r["step"]: r for r in rows}
    row = by_step[best]
    if "test_accuracy" not in row:
        variables, _ = run.store.restore_variables(best)
        ev = run.evaluate(variables["params"], variables.get("batch_stats", {}), "test")
        row = row | {"test_loss": ev["loss"], "test_accuracy": ev["accuracy"]}
    last = max(by_step)
    _say(f"best checkpoint: epoch {row['epoch']} (step {best}), val_acc {row['val_accuracy']:.4f}, "
         f"test_acc {row['test_accuracy']:.4f}; final: test_acc {by_step[last].get('test_accuracy', float('nan')):.4f}")
    return {"epoch": by_step[last]["epoch"], "step": last, "best_step": best, "best_epoch": row["epoch"],
            "best_val_accuracy": row["val_accuracy"], "best_test_loss": row["test_loss"],
            "best_test_accuracy": row["test_accuracy"], "final_test_accuracy": by_step[last].get("test_accuracy")}
