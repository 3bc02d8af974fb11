"""The accelerator path on the CPU: ``loop.scan=on`` (a chunk of steps is one ``lax.scan``, padded with masked steps
to one length) against the CPU's host loop (``loop.scan=off``), in jit, pmap and sharded placements, resident and
streamed, under a time budget, stopped and resumed."""

from __future__ import annotations

import time

import jax
import numpy as np
import pytest

from cnnjax import checkpoint, models
from cnnjax.train import budget
from cnnjax.train.loop import fit
from cnnjax.train.runner import Runner
from cnnjax.train.state import create_train_state
from cnnjax.train.steps import StepSpec
from tests.test_experiments import _rows, stripes
from tests.test_train_steps import _data, _opt

# stripes: 288 training images, batch 32 -> 9 steps an epoch; log_every 4 -> chunks of 4, 4, 1: the last is padded.
SCAN_CHUNKS = {"log_every": 4, "optimizer": "sgd", "learning_rate": 0.05}


def _params(workdir) -> list[np.ndarray]:
    variables, _ = checkpoint.restore_variables(str(workdir), "latest")
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(variables)]


def _run(tmp_path, name: str, scan: str, **overrides) -> list[np.ndarray]:
    fit(stripes(**SCAN_CHUNKS, **{"loop.scan": scan}, **overrides), str(tmp_path / name), progress=False)
    return _params(tmp_path / name)


def _assert_close(a: list[np.ndarray], b: list[np.ndarray], rtol: float = 2e-5, atol: float = 2e-6) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("parallelism", ["jit", "pmap", "sharded"])
def test_scan_chunks_equal_the_host_loop(tmp_path, parallelism):
    common = {"num_epochs": 2, "parallelism": parallelism}
    scanned = _run(tmp_path, "scan", "on", **common)
    looped = _run(tmp_path, "loop", "off", **common)
    _assert_close(scanned, looped)
    for a, b in zip(_rows(tmp_path / "scan"), _rows(tmp_path / "loop"), strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_accuracy"] == b["val_accuracy"]


def test_streamed_scan_chunks_equal_the_resident_host_loop(tmp_path):
    scanned = _run(tmp_path, "stream", "on", **{"num_epochs": 2, "data.mode": "stream", "data.workers": 0})
    looped = _run(tmp_path, "resident", "off", num_epochs=2)
    _assert_close(scanned, looped)


def test_stop_and_resume_under_scan_is_bit_identical(tmp_path):
    whole = _run(tmp_path, "whole", "on", num_epochs=2)
    config = stripes(**SCAN_CHUNKS, **{"loop.scan": "on"}, num_epochs=2)
    out = fit(config, str(tmp_path / "parts"), progress=False, stop_after_steps=6)  # mid-epoch, mid-chunk
    assert out["interrupted"] and out["step_in_epoch"] == 6
    fit(stripes(**SCAN_CHUNKS, **{"loop.scan": "on"}, num_epochs=2), str(tmp_path / "parts"), progress=False)
    for a, b in zip(whole, _params(tmp_path / "parts"), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_budgeted_scan_run_plans_alike_and_equals_the_host_loop(tmp_path, monkeypatch, capsys):
    # 9 steps an epoch at 50 s a step: 1000 s hold 2 epochs, not 3; the schedule is cosine over the plan.
    times = budget.StepTimes(0.0, 0.0, 50.0, 0.0, 0.0, 0.0, 0.0)
    monkeypatch.setattr(budget, "time_steps", lambda *a: (times, None, None))
    common = {"num_epochs": 5, "time_budget_s": 1000.0, "schedule": "cosine"}
    scanned = _run(tmp_path, "scan", "on", **common)
    looped = _run(tmp_path, "loop", "off", **common)
    assert capsys.readouterr().out.count("-> 2 of at most 5 epochs") == 2
    _assert_close(scanned, looped)


def test_the_budget_times_the_runs_own_compiled_chunk_and_hands_it_over(tmp_path):
    from cnnjax.data import load_splits

    config = stripes(**SCAN_CHUNKS, **{"loop.scan": "on"}, num_epochs=3, time_budget_s=3600.0)
    data = load_splits(config)
    times, exp, runner = budget.time_steps(config, data, 9, jax.devices()[:1])
    assert runner.scan and runner.chunk_steps == 4 and len(runner.programs) == 1  # every timed chunk: one program
    assert times.compile_s == runner.compile_s > 0 and 0 < times.step_s < times.compile_s
    plan = budget.plan_epochs(config, data, 9, jax.devices()[:1], None, time.perf_counter())
    assert plan.epochs == 3 and plan.built is not None  # all fit: the run goes on with the timed program


def _tiny_runner(chunk_steps: int):
    spec = StepSpec(num_classes=10, mean=(0.5,), std=(0.25,))
    model = models.create("tiny_cnn", num_classes=10)
    images, labels = _data(64)
    runner = Runner(spec, model.apply, "jit", scan=True, chunk_steps=chunk_steps)
    state = runner.put_state(create_train_state(model, _opt(), (8, 8, 1), jax.random.PRNGKey(0)))
    return runner, state, runner.put_data(images[:, :8, :8, :1], labels)


def test_one_program_serves_every_chunk_length_and_padding_steps_change_nothing():
    idx = np.arange(64, dtype=np.int32).reshape(8, 8)
    runner, state, data = _tiny_runner(chunk_steps=4)
    outs = []
    for rows in (idx[:4], idx[4:7], idx[7:]):  # 4, 3 and 1 real steps
        state, m = runner.train(state, *data, rows)
        outs.append(m)
    assert [m["steps"] for m in outs] == [4, 3, 1] and len(runner.programs) == 1
    assert [int(m["count"]) for m in outs] == [32, 24, 8]
    assert int(runner.get_state(state).step) == 8
    plain, pstate, pdata = _tiny_runner(chunk_steps=0)  # each length its own program, no padding
    for rows in (idx[:4], idx[4:7], idx[7:]):
        pstate, _ = plain.train(pstate, *pdata, rows)
    assert len(plain.programs) == 3
    for a, b in zip(jax.tree_util.tree_leaves(runner.get_state(state).params),
                    jax.tree_util.tree_leaves(plain.get_state(pstate).params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(Exception, match="longer than this runner's 4"):
        runner.train(state, *data, idx[:5])


def test_a_scan_chunk_runs_to_its_end_whatever_stop_says():
    runner, state, data = _tiny_runner(chunk_steps=8)
    asked = []
    _, m = runner.train(state, *data, np.arange(64, dtype=np.int32).reshape(8, 8), stop=lambda: asked.append(1) or True)
    assert m["steps"] == 8 and int(m["count"]) == 64 and asked == []


def test_a_chunks_metrics_are_read_after_the_next_chunk_is_dispatched(tmp_path, monkeypatch):
    from cnnjax.train import feed as feeds
    from cnnjax.train import loop

    events = []
    real_train, real_absorb = feeds.ResidentFeed.train, loop._absorb

    def train(self, state, step, count, stop=None, upcoming=0):
        events.append(("dispatch", step, count, upcoming))
        return real_train(self, state, step, count, stop, upcoming)

    def absorb(run, acc, pending, *args):
        if pending is not None:
            events.append(("read", pending[3] - pending[1]))  # the chunk's first step
        return real_absorb(run, acc, pending, *args)

    monkeypatch.setattr(feeds.ResidentFeed, "train", train)
    monkeypatch.setattr(loop, "_absorb", absorb)
    fit(stripes(**SCAN_CHUNKS, **{"loop.scan": "on"}, num_epochs=1), str(tmp_path / "w"), progress=False)
    # 9 steps: chunks of 4, 4 and 1; each chunk's metrics are read once the next is queued, the last at the epoch's end
    assert events == [("dispatch", 0, 4, 4), ("dispatch", 4, 4, 1), ("read", 0), ("dispatch", 8, 1, 0), ("read", 4),
                      ("read", 8)]


def test_a_stream_places_the_next_chunk_while_this_one_runs(tmp_path):
    from cnnjax.data import load_splits
    from cnnjax.data.stream import EpochOrder
    from cnnjax.train import feed as feeds
    from cnnjax.train.experiment import build, runner_for

    config = stripes(**SCAN_CHUNKS, **{"loop.scan": "on", "data.mode": "stream", "data.workers": 0})
    data = load_splits(config)
    exp = build(config, data, 9)
    runner = runner_for(config, exp, jax.devices()[:1], 9)
    feed = feeds.open_feed(runner, data.train, EpochOrder(0, len(data.train), 32), 0, 9, streamed=True, workers=0)
    try:
        state, m = feed.train(runner.put_state(exp.state), 0, 4, upcoming=4)
        step, count, chunk = feed._ready
        assert (step, count, chunk.steps) == (4, 4, 4)
        assert all(isinstance(a, jax.Array) for call in chunk.calls for a in call)  # already on the device
        state, m = feed.train(state, 4, 4)  # takes the placed chunk
        assert feed._ready is None and m["steps"] == 4
        with pytest.raises(RuntimeError, match="stream is at step 8"):
            feed.train(state, 0, 4)
    finally:
        feed.close()


@pytest.mark.parametrize("precision, text", [("high", "HIGH"), ("highest", "HIGHEST")])
def test_the_precision_key_sets_the_steps_float32_precision(precision, text):
    from cnnjax.train.runner import _chunk_fn

    spec = StepSpec(num_classes=10, mean=(0.5,), std=(0.25,), precision=precision)
    model = models.create("tiny_cnn", num_classes=10)
    state = create_train_state(model, _opt(), (8, 8, 1), jax.random.PRNGKey(0))
    f32 = jax.ShapeDtypeStruct((), np.float32)
    args = (state, {"loss_sum": f32, "correct": f32, "count": f32}, jax.ShapeDtypeStruct((16, 8, 8, 1), np.uint8),
            jax.ShapeDtypeStruct((16,), np.int32), jax.ShapeDtypeStruct((2, 8), np.int32),
            jax.ShapeDtypeStruct((2,), np.bool_))
    with jax.default_matmul_precision("bfloat16"):  # the spec's precision wins over the ambient one
        mlir = jax.jit(_chunk_fn(spec, scan=True, axis_name=None, gather=True)).lower(*args).as_text()
    assert f"precision = [{text}, {text}]" in mlir or f"precision_config = [#stablehlo<precision {text}>" in mlir
    assert "DEFAULT" not in mlir
