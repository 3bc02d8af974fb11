"""Ensembles (cnnjax/train/ensemble.py and steps.ensemble_eval_step): members, budget shares, scoring."""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import checkpoint
from cnnjax.data import load_splits
from cnnjax.errors import ConfigError, UsageError
from cnnjax.models.simple import TinyCNN
from cnnjax.train import budget
from cnnjax.train.ensemble import EVAL_RESERVE_S, fit_ensemble, member_budget_s
from cnnjax.train.experiment import build_model, build_spec
from cnnjax.train.steps import StepSpec, cross_entropy, ensemble_eval_step, eval_step, prepare_batch
from tests.test_budget import _timed
from tests.test_experiments import _cli, stripes

SPEC = StepSpec(num_classes=2, mean=(0.5,), std=(0.25,))


def _members(n: int):
    model = TinyCNN()
    x = jnp.zeros((1, 8, 8, 1))
    return model, [model.init(jax.random.PRNGKey(k), x) for k in range(n)]


class TestEnsembleEvalStep(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_it_scores_the_mean_of_the_members_logits(self):
        model, members = _members(3)
        images = jax.random.randint(jax.random.PRNGKey(9), (6, 8, 8, 1), 0, 256).astype(jnp.uint8)
        labels = jnp.array([0, 1, 0, 1, 1, 0])
        mask = jnp.array([1, 1, 1, 1, 1, 0], jnp.float32)
        params = tuple(v["params"] for v in members)
        stats = tuple({} for _ in members)
        got = self.variant(lambda p, s, i, y, m: ensemble_eval_step(p, s, model.apply, i, y, m, SPEC))(
            params, stats, images, labels, mask)
        x = prepare_batch(images, SPEC)
        logits = np.mean([np.asarray(model.apply(v, x)) for v in members], axis=0)
        losses = np.asarray(cross_entropy(jnp.asarray(logits), labels, 2))
        pred = logits.argmax(-1)
        np.testing.assert_allclose(got["loss_sum"], (losses * mask).sum(), rtol=1e-5)
        assert float(got["correct"]) == float(((pred == np.asarray(labels)) * mask).sum())
        assert float(got["count"]) == 5.0 and float(got["confusion"].sum()) == 5.0
        chex.assert_shape([got["loss_sum"], got["correct"], got["count"], got["confusion"]], [(), (), (), (2, 2)])
        # The members disagree, so the mean is not any one member's score.
        singles = [float(eval_step(v["params"], {}, model.apply, images, labels, mask, SPEC)["loss_sum"])
                   for v in members]
        assert all(abs(s - float(got["loss_sum"])) > 1e-4 for s in singles)


def test_an_ensemble_of_one_is_the_member_itself():
    model, members = _members(1)
    images = jax.random.randint(jax.random.PRNGKey(3), (4, 8, 8, 1), 0, 256).astype(jnp.uint8)
    labels, mask = jnp.array([0, 1, 1, 0]), jnp.ones(4)
    one = ensemble_eval_step((members[0]["params"],), ({},), model.apply, images, labels, mask, SPEC)
    plain = eval_step(members[0]["params"], {}, model.apply, images, labels, mask, SPEC)
    chex.assert_trees_all_close(one, plain)
    with pytest.raises(UsageError, match="one batch_stats tree per member"):
        ensemble_eval_step((members[0]["params"],), (), model.apply, images, labels, mask, SPEC)


def test_member_budget_is_an_equal_share_of_what_is_left_after_the_evaluation():
    assert member_budget_s(1000.0, 0.0, 2) == pytest.approx((1000.0 - EVAL_RESERVE_S) / 2)
    assert member_budget_s(1000.0, 400.0, 1) == pytest.approx(1000.0 - 400.0 - EVAL_RESERVE_S)


def test_fit_ensemble_trains_seeded_members_and_scores_their_mean_logits(tmp_path, capsys):
    config = stripes(num_epochs=1, ensemble_members=2, learning_rate=0.002)
    summary = fit_ensemble(config, str(tmp_path), progress=False)
    out = capsys.readouterr().out
    assert "ensemble member 1/2 (seed 0)" in out and "ensemble member 2/2 (seed 1)" in out
    assert "ensemble of 2: val_acc" in out
    seeds = [json.loads((tmp_path / f"member_{k}" / "config.json").read_text())["seed"] for k in range(2)]
    assert seeds == [0, 1]
    with open(tmp_path / "ensemble.json") as f:
        saved = json.load(f)
    assert saved["test_accuracy"] == summary["test_accuracy"] and len(saved["members"]) == 2
    # Recompute the ensemble's test loss from the members' final weights by hand.
    data = load_splits(config)
    model, _ = build_model(config)
    spec = build_spec(config, data.name, steps_per_epoch=1)
    x = prepare_batch(jnp.asarray(data.test.images), spec)
    logits = np.mean([np.asarray(model.apply(checkpoint.restore_variables(str(tmp_path / f"member_{k}"), "latest")[0],
                                             x, train=False)) for k in range(2)], axis=0)
    loss = float(np.mean(np.asarray(cross_entropy(jnp.asarray(logits), jnp.asarray(data.test.labels), 2))))
    assert summary["test_loss"] == pytest.approx(loss, rel=1e-4)
    assert summary["test_accuracy"] == pytest.approx(float(np.mean(logits.argmax(-1) == data.test.labels)))


def test_each_member_plans_its_share_of_the_budget(tmp_path, monkeypatch, capsys):
    # stripes: 9 steps per epoch; at 50 s a step an epoch is 450 s. Of 2000 s, member 1 gets (2000 - 90) / 2 =
    # 955 s: 2 epochs. Member 2 gets what is left (the fake timing used almost none): 4 epochs.
    monkeypatch.setattr(budget, "time_steps", _timed(50.0))
    fit_ensemble(stripes(num_epochs=6, ensemble_members=2, time_budget_s=2000.0), str(tmp_path), progress=False)
    out = capsys.readouterr().out
    saved = [json.loads((tmp_path / f"member_{k}" / "config.json").read_text()) for k in range(2)]
    assert saved[0]["time_budget_s"] == pytest.approx((2000.0 - EVAL_RESERVE_S) / 2, abs=2.0)
    assert saved[0]["num_epochs"] == 2
    assert saved[1]["time_budget_s"] > 1900.0 and saved[1]["num_epochs"] == 4
    assert "-> 2 of at most 6 epochs" in out and "-> 4 of at most 6 epochs" in out


def test_an_interrupted_ensemble_resumes_the_member_in_progress(tmp_path, capsys):
    config = stripes(num_epochs=2, ensemble_members=2)
    out = fit_ensemble(config, str(tmp_path), progress=False, stop_after_steps=12)  # member 1 stops in epoch 2
    assert out["interrupted"] and not (tmp_path / "member_1").exists() and not (tmp_path / "ensemble.json").exists()
    summary = fit_ensemble(stripes(num_epochs=2, ensemble_members=2), str(tmp_path), progress=False)
    assert (tmp_path / "ensemble.json").exists() and [m["epochs"] for m in summary["members"]] == [2, 2]


@pytest.mark.parametrize("members", [0, -1])
def test_a_bad_member_count_is_one_clear_error(tmp_path, members):
    with pytest.raises(ConfigError, match="ensemble_members"):
        from cnnjax.train.checks import check_config

        check_config(stripes(ensemble_members=members))


def test_a_budget_too_small_for_the_members_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"leaves nothing for 2 members"):
        fit_ensemble(stripes(ensemble_members=2, time_budget_s=30.0), str(tmp_path / "w"), progress=False)
    assert not (tmp_path / "w").exists()


def test_the_train_cli_runs_an_ensemble(tmp_path):
    out = _cli("experiments.train", "--config", "experiments/configs/stripes_tiny.py", "--workdir", str(tmp_path),
               "--config.num_epochs=1", "--config.plots=False", "--noprogress", "--config.ensemble_members=2")
    assert out.returncode == 0, out.stderr
    assert "ensemble of 2: val_acc" in out.stdout and (tmp_path / "ensemble.json").exists()
    recorded = json.loads((tmp_path / "ensemble.json").read_text())["test_accuracy"]
    ev = _cli("experiments.evaluate", "--workdir", str(tmp_path), "--checkpoint", "latest")
    assert ev.returncode == 0, ev.stderr
    assert f"recorded test_accuracy {recorded:.4f}" in ev.stdout
    assert ev.stdout.strip().splitlines()[-1] == f"test_accuracy: {recorded:.4f}"
