"""A re-planned run's step timeline (cnnjax/train/timeline.py) and the schedules / lookahead built on it."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cnnjax.errors import ConfigError
from cnnjax.train.optim import make_schedule
from cnnjax.train.state import TrainState
from cnnjax.train.steps import Lookahead, lookahead_update
from cnnjax.train.timeline import check_replans, planned_steps, warp_step


class WarpTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_one_replan_keeps_the_past_and_stretches_the_rest_onto_the_old_end(self):
        replans = ((40, 100, 70),)  # at step 40, 100 steps became 70
        warp = self.variant(lambda s: warp_step(s, replans))
        steps = jnp.arange(0, 71)
        got = np.asarray(warp(steps))
        np.testing.assert_allclose(got[:41], np.arange(41))  # before (and at) the re-plan: unchanged
        np.testing.assert_allclose(got[70], 100.0)  # the new last step is the old last step
        np.testing.assert_allclose(got[55], 40 + 15 * 60 / 30)  # linear in between: 2 old steps per new one
        assert np.all(np.diff(got) > 0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_two_replans_compose_newest_first(self):
        replans = ((40, 100, 70), (55, 70, 60))
        got = np.asarray(self.variant(lambda s: warp_step(s, replans))(jnp.array([30, 55, 60, 58])))
        once = lambda s: s if s <= 40 else 40 + (s - 40) * 2.0  # noqa: E731  the first re-plan's map
        np.testing.assert_allclose(got, [30, once(55), once(70), once(55 + 3 * 15 / 5)])


def test_planned_steps_is_the_first_plans_length():
    assert planned_steps(70, ()) == 70
    assert planned_steps(60, ((40, 100, 70), (55, 70, 60))) == 100


@pytest.mark.parametrize("bad", [((40, 70, 100),), ((80, 100, 70),), ((40, 100, 70), (50, 90, 60)),
                                 ((40, 100),), "x", ((45, 100, 70),)])
def test_malformed_replans_are_refused_in_one_line(bad):
    with pytest.raises(ConfigError, match="budget_replans") as err:
        check_replans(bad, steps_per_epoch=10)
    assert "\n" not in str(err.value)


def test_replans_that_end_elsewhere_than_the_run_are_refused():
    assert check_replans(((40, 100, 70),), 10, total_steps=70) == ((40, 100, 70),)
    with pytest.raises(ConfigError, match="ends its re-planned run at step 70 but this run has 80 steps; keep"):
        check_replans(((40, 100, 70),), 10, total_steps=80)


def test_replans_read_back_from_json_lists():
    assert check_replans([[40, 100, 70]], steps_per_epoch=10) == ((40, 100, 70),)


@pytest.mark.parametrize("name", ["triangular", "cosine", "onecycle", "piecewise"])
def test_a_replanned_schedule_is_the_planned_one_compressed(name):
    cfg = ml_collections.ConfigDict({"learning_rate": 1.0, "schedule": name, "pct_start": 0.25, "warmup_epochs": 1.0,
                                     "lr_start_factor": 0.2, "lr_end_factor": 0.07, "boundaries_epochs": (5, 8),
                                     "decay_factor": 0.1})
    planned = make_schedule(cfg, steps_per_epoch=10, num_epochs=10)
    cfg.budget_replans = ((40, 100, 70),)
    replanned = make_schedule(cfg, steps_per_epoch=10, num_epochs=7)
    for s in (0, 13, 40):  # the steps already trained keep their rates
        np.testing.assert_allclose(replanned(s), planned(s), rtol=1e-6)
    np.testing.assert_allclose(replanned(70), planned(100), rtol=1e-6, atol=1e-7)  # it ends where the plan ended
    np.testing.assert_allclose(replanned(55), planned(70), rtol=1e-6, atol=1e-7)


def _state(step: int) -> TrainState:
    """Fast weight 1, slow weight 0, at ``step``."""
    state = TrainState.create(apply_fn=None, params={"w": jnp.ones(())}, tx=optax.sgd(0.1), batch_stats={},
                              rng=jax.random.PRNGKey(0))
    return state.replace(step=jnp.int32(step), slow={"params": {"w": jnp.zeros(())}, "batch_stats": {}})


def test_the_lookahead_ends_at_the_replanned_last_step():
    # every 5 steps, 20 planned, re-planned at 10 to 14: step 14 is now the last (the fast weights take the slow
    # ones); without the re-plan step 14 is not a lookahead step at all.
    replanned = lookahead_update(_state(14), Lookahead(every=5, total_steps=14, replans=((10, 20, 14),)))
    plain = lookahead_update(_state(14), Lookahead(every=5, total_steps=20))
    assert float(replanned.params["w"]) == 0.0 and float(plain.params["w"]) == 1.0


@pytest.mark.parametrize("step,planned_step", [(10, 10), (13, 15), (16, 20)])
def test_the_lookahead_decay_follows_the_replanned_timeline(step, planned_step):
    # every step, d = 0.5 (s / 20): re-planned at 10 from 20 to 16 steps, step 13 stands for planned step 15
    la = Lookahead(every=1, total_steps=16, decay=0.5, power=1.0, replans=((10, 20, 16),))
    moved = float(lookahead_update(_state(step), la).slow["params"]["w"])
    # slow += (1 - d) (fast - slow); at the last step d = 1: the slow weights stay and the fast ones take them
    expected = 0.0 if planned_step == 20 else 1.0 - 0.5 * planned_step / 20
    assert moved == pytest.approx(expected, rel=1e-6, abs=1e-7)
