"""The time budget (cnnjax/train/budget.py): the estimate, the plan, and fit under a budget."""

from __future__ import annotations

import json
import os

import chex
import jax
import numpy as np
import pytest

from cnnjax import checkpoint
from cnnjax.errors import ConfigError
from cnnjax.train import budget
from cnnjax.train.budget import StepTimes, epochs_left_fit, epochs_within, estimate_s, evaluations
from cnnjax.train.loop import fit
from tests.helpers import slow_clock
from tests.test_experiments import _rows, stripes

TIMES = StepTimes(setup_s=1.0, compile_s=2.0, step_s=0.5, first_val_s=3.0, val_s=1.0, test_s=2.0, save_s=0.25)


@pytest.mark.parametrize("epochs,every,expected", [(1, 1, 1), (5, 1, 5), (5, 2, 3), (4, 2, 2), (3, 10, 1)])
def test_evaluations_count_every_nth_epoch_and_the_last(epochs, every, expected):
    assert evaluations(epochs, every) == expected


def test_estimate_adds_up_what_a_run_does():
    # 4 epochs of 10 steps, evaluated after epochs 2 and 4: set-up, compile, 40 steps, the first and one more
    # validation pass, the final test and the best checkpoint's test, a checkpoint per evaluation.
    assert estimate_s(4, 7.0, TIMES, 10, 2) == pytest.approx(7 + 1 + 2 + 40 * 0.5 + 3 + 1 + 2 * 2 + 2 * 0.25)
    # One evaluation (at the last epoch): one validation pass, one test pass.
    assert estimate_s(4, 7.0, TIMES, 10, 4) == pytest.approx(7 + 1 + 2 + 20 + 3 + 2 + 0.25)


def test_epochs_within_is_the_largest_count_that_fits():
    spe, every, elapsed = 10, 1, 5.0
    for budget_s in (20.0, 40.0, 100.0):
        e = epochs_within(budget_s, elapsed, TIMES, spe, every, max_epochs=50)
        assert estimate_s(e, elapsed, TIMES, spe, every) <= budget_s < estimate_s(e + 1, elapsed, TIMES, spe, every)
    assert epochs_within(1e6, elapsed, TIMES, spe, every, max_epochs=7) == 7  # num_epochs is the most
    assert epochs_within(estimate_s(1, elapsed, TIMES, spe, every) - 0.01, elapsed, TIMES, spe, every, 7) == 0


def test_epochs_left_fit_keeps_the_plan_while_it_fits_and_else_the_most_that_do():
    # after epoch 3 of 10 (evaluated every 5th and the last), epochs of 10 s: 7 epochs, the evaluations after
    # epochs 5 and 10 (the first compiles: 3 s; then 1 s, each with a 0.25 s checkpoint), 2 test passes of 2 s.
    need_all = 7 * 10 + (3 + 0.25) + (1 + 0.25) + 2 * 2
    assert epochs_left_fit(3, 10, 10.0, need_all, TIMES, 5) == 10
    # 0.1 s short: fewer epochs, each count paying one recompilation (2 s); 8 epochs need 50 + 4.5 + 4 + 2 s
    assert epochs_left_fit(3, 10, 10.0, need_all - 0.1, TIMES, 5) == 9
    assert epochs_left_fit(3, 10, 10.0, 5 * 10 + 4.5 + 4 + 2, TIMES, 5) == 8
    assert epochs_left_fit(3, 10, 10.0, 1.0, TIMES, 5) == 4  # nothing fits: one more epoch, to anneal into


def _params(workdir) -> dict:
    """The variables of the latest checkpoint in ``workdir``."""
    return checkpoint.restore_variables(str(workdir), "latest")[0]


def _timed(step_s: float):
    """A stand-in for the timing: every step takes ``step_s``, everything else nothing."""
    return lambda *args: (StepTimes(0.0, 0.0, step_s, 0.0, 0.0, 0.0, 0.0), None, None)


def test_a_budgeted_run_equals_a_run_of_the_planned_epochs(tmp_path, monkeypatch, capsys):
    # stripes has 9 steps per epoch: at 50 s a step, 1000 s hold 2 epochs (900 s) but not 3.
    monkeypatch.setattr(budget, "time_steps", _timed(50.0))
    cosine = {"schedule": "cosine", "optimizer": "sgd", "learning_rate": 0.1}  # its decay depends on the length
    fit(stripes(num_epochs=6, time_budget_s=1000.0, **cosine), str(tmp_path / "budget"), progress=False)
    assert "-> 2 of at most 6 epochs" in capsys.readouterr().out
    fit(stripes(num_epochs=2, **cosine), str(tmp_path / "plain"), progress=False)
    assert [r["epoch"] for r in _rows(tmp_path / "budget")] == [1, 2]
    # The schedule was built for 2 epochs.
    chex.assert_trees_all_equal(_params(tmp_path / "budget"), _params(tmp_path / "plain"))
    with open(tmp_path / "budget" / "config.json") as f:
        saved = json.load(f)
    assert saved["num_epochs"] == 2 and saved["time_budget_s"] == 1000.0


def test_a_resumed_budgeted_run_keeps_the_epochs_of_its_first_launch(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(budget, "time_steps", _timed(50.0))
    out = fit(stripes(num_epochs=6, time_budget_s=1000.0), str(tmp_path / "w"), progress=False, stop_after_steps=12)
    assert out["interrupted"]

    def not_again(*args):
        raise AssertionError("a resumed run must not plan again")

    monkeypatch.setattr(budget, "time_steps", not_again)
    capsys.readouterr()
    fit(stripes(num_epochs=9, time_budget_s=10.0), str(tmp_path / "w"), progress=False)
    assert "resuming the 2 epochs planned at the first launch" in capsys.readouterr().out
    fit(stripes(num_epochs=2), str(tmp_path / "plain"), progress=False)
    assert [r["epoch"] for r in _rows(tmp_path / "w")] == [1, 2]
    chex.assert_trees_all_equal(_params(tmp_path / "w"), _params(tmp_path / "plain"))


def test_real_timing_leaves_the_run_as_it_would_be_without_a_budget(tmp_path, capsys):
    fit(stripes(num_epochs=2, time_budget_s=3600.0), str(tmp_path / "budget"), progress=False)
    plan = [line for line in capsys.readouterr().out.splitlines() if line.startswith("time budget")]
    assert len(plan) == 1 and "-> 2 of at most 2 epochs" in plan[0], plan
    fit(stripes(num_epochs=2), str(tmp_path / "plain"), progress=False)
    # The scratch steps touched nothing.
    chex.assert_trees_all_equal(_params(tmp_path / "budget"), _params(tmp_path / "plain"))
    assert not [d for d in os.listdir(tmp_path) if d.startswith("cnnjax-budget-")]


def test_a_budget_too_small_for_one_epoch_is_refused_and_leaves_no_workdir(tmp_path):
    with pytest.raises(ConfigError, match=r"time_budget_s` \(0\.01 s\) leaves no time for one epoch"):
        fit(stripes(time_budget_s=0.01), str(tmp_path / "w"), progress=False)
    assert not (tmp_path / "w").exists()


def test_a_run_that_slows_down_replans_to_fewer_epochs_and_compresses_its_schedule(tmp_path, monkeypatch, capsys):
    # Planned at 50 s a step (9 steps an epoch): 3000 s hold 6 epochs. Epoch 1 runs at that speed, then every step
    # takes 100 s: after epoch 2 (1350 s) the 4 epochs left need 3600 s; 1 more fits -> 3 epochs in all.
    monkeypatch.setattr(budget, "time_steps", _timed(50.0))
    slow_clock(monkeypatch, lambda s: 50.0 if s < 9 else 100.0)
    cosine = {"schedule": "cosine", "optimizer": "sgd", "learning_rate": 0.1}
    fit(stripes(num_epochs=6, time_budget_s=3000.0, **cosine), str(tmp_path / "budget"), progress=False)
    out = capsys.readouterr().out
    assert "-> 6 of at most 6 epochs" in out, out
    assert "after epoch 2 of 6 do not hold the 4 more at 900.0 s an epoch -> 3 epochs in all" in out, out
    assert [r["epoch"] for r in _rows(tmp_path / "budget")] == [1, 2, 3]
    with open(tmp_path / "budget" / "config.json") as f:
        saved = json.load(f)
    assert saved["num_epochs"] == 3 and saved["budget_replans"] == [[18, 54, 27]]
    # The recorded re-plan rebuilds the same run without a budget: the schedule was compressed, not cut.
    monkeypatch.undo()
    plain = stripes(num_epochs=3, budget_replans=((18, 54, 27),), **cosine)
    fit(plain, str(tmp_path / "plain"), progress=False)
    chex.assert_trees_all_equal(_params(tmp_path / "budget"), _params(tmp_path / "plain"))
    fit(stripes(num_epochs=3, **cosine), str(tmp_path / "cut"), progress=False)
    budget_params, cut_params = _params(tmp_path / "budget"), _params(tmp_path / "cut")
    chex.assert_trees_all_equal_structs(budget_params, cut_params)
    assert not all(map(np.array_equal, jax.tree_util.tree_leaves(budget_params), jax.tree_util.tree_leaves(cut_params)))


def test_a_run_on_time_is_not_replanned(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(budget, "time_steps", _timed(50.0))
    slow_clock(monkeypatch, lambda s: 50.0)
    fit(stripes(num_epochs=6, time_budget_s=3000.0), str(tmp_path / "w"), progress=False)
    assert "epochs in all" not in capsys.readouterr().out
    assert [r["epoch"] for r in _rows(tmp_path / "w")] == list(range(1, 7))


def test_a_replanned_run_resumes_on_its_compressed_schedule(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(budget, "time_steps", _timed(50.0))
    slow_clock(monkeypatch, lambda s: 50.0 if s < 9 else 100.0)  # re-plans after epoch 2 to 3 epochs (above)
    cfg = lambda: stripes(num_epochs=6, time_budget_s=3000.0)  # noqa: E731
    out = fit(cfg(), str(tmp_path / "w"), progress=False, stop_after_steps=22)  # in epoch 3, after the re-plan
    assert out["interrupted"] and out["epoch"] == 3

    def not_again(*args):
        raise AssertionError("a resumed run must not plan again")

    monkeypatch.setattr(budget, "time_steps", not_again)
    capsys.readouterr()
    fit(cfg(), str(tmp_path / "w"), progress=False)
    assert "resuming the 3 epochs planned" in capsys.readouterr().out
    monkeypatch.undo()
    fit(stripes(num_epochs=3, budget_replans=((18, 54, 27),)), str(tmp_path / "plain"), progress=False)
    assert [r["epoch"] for r in _rows(tmp_path / "w")] == [1, 2, 3]
    chex.assert_trees_all_equal(_params(tmp_path / "w"), _params(tmp_path / "plain"))


def test_the_plan_times_steady_steps_after_an_untimed_warm_up(monkeypatch):
    """Steps right after the first call can be slow while an allocator grows its heap (tcmalloc): the plan
    times the steps after PLAN_WARMUP_STEPS untimed ones, so slow early steps do not shrink it."""
    import time

    from cnnjax.data import load_splits
    from cnnjax.train import feed as feeds

    config = stripes(num_epochs=2, batch_size=16)
    data = load_splits(config)
    spe = len(data.train) // config.batch_size
    assert spe >= 2 + budget.PLAN_WARMUP_STEPS + budget.PLAN_STEPS, "the check needs room for warm-up and timing"
    calls, real_open = [], feeds.open_feed

    def slow_start_feed(*args, **kwargs):
        feed = real_open(*args, **kwargs)
        real_train = feed.train

        def train(state, step, count, stop=None):
            calls.append((step, count))
            if 1 <= step <= budget.PLAN_WARMUP_STEPS:
                time.sleep(1.0 * count)  # warm-up steps 1 s slower each
            return real_train(state, step, count, stop)

        feed.train = train
        return feed

    monkeypatch.setattr(feeds, "open_feed", slow_start_feed)
    times, _, _ = budget.time_steps(config, data, spe, jax.devices()[:1])
    warm = budget.PLAN_WARMUP_STEPS
    assert calls == [(0, 1), (1, warm), (1 + warm, budget.PLAN_STEPS)]
    assert times.step_s < 0.5, times  # the slow warm-up is not in the step time
