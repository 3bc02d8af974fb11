"""The fast recipe's pieces: airbench optimizer == torch's SGD param groups on a summed loss,
lookahead, alternating flip, reflect translate, TTA, whitening init, and the cifar10_fast config
end to end on CIFAR-format files."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from cnnjax import models
from cnnjax.data.pipeline import AugmentConfig, alternating_flips, augment
from cnnjax.train import airbench
from cnnjax.train.optim import make_optimizer, make_schedule
from cnnjax.train.state import TrainState, init_variables
from cnnjax.train.steps import Lookahead, lookahead_update, tta_logits


def test_param_labels_follow_fastnet_names():
    variables = jax.eval_shape(lambda: models.create("fast_cnn").init(jax.random.PRNGKey(0),
                                                                      jnp.zeros((1, 32, 32, 3))))
    labels = airbench.param_labels(variables["params"])
    assert labels["whiten"] == {"kernel": "frozen", "bias": "whiten_bias"}
    assert labels["block2"]["norm1"] == {"bias": "norm_bias"} and labels["block3"]["norm2"] == {"bias": "norm_bias"}
    assert labels["block1"]["conv1"] == {"kernel": "other"} and labels["head"] == {"kernel": "other"}


def test_airbench_schedule_is_point_two_to_one_to_point_zero_seven():
    cfg = ml_collections.ConfigDict(dict(learning_rate=2.0, schedule="triangular", pct_start=0.23,
                                         lr_start_factor=0.2, lr_end_factor=0.07))
    sched = make_schedule(cfg, steps_per_epoch=10, num_epochs=10)  # 100 steps, peak at 23
    np.testing.assert_allclose([float(sched(s)) for s in (0, 23, 100)], [0.4, 2.0, 0.14], rtol=1e-6)
    np.testing.assert_allclose(float(sched(61)), 2.0 * (1.0 + (0.07 - 1.0) * (61 - 23) / 77), rtol=1e-6)


def test_airbench_optimizer_matches_torch_param_groups_on_a_summed_loss():
    """The recipe as airbench writes it (torch SGD, loss summed over the batch, lr / wd per 1024,
    coupled weight decay, LambdaLR, whitening bias frozen after N steps) vs cnnjax's mean-loss form."""
    batch, steps, bias_steps = 256, 6, 3
    lr, wd, momentum, bias_scale = 11.5, 0.0153, 0.85, 64.0
    rng = np.random.RandomState(0)
    params = {"whiten": {"kernel": rng.randn(2, 2, 1, 8), "bias": rng.randn(8)},
              "block1": {"conv1": {"kernel": rng.randn(3, 3, 8, 4)}, "norm1": {"bias": rng.randn(4)}},
              "head": {"kernel": rng.randn(4, 10)}}
    params = jax.tree_util.tree_map(lambda a: a.astype(np.float32), params)
    mean_grads = [jax.tree_util.tree_map(lambda a: rng.randn(*a.shape).astype(np.float32), params)
                  for _ in range(steps)]
    factor = lambda s: 0.2 + 0.8 * s / 2 if s < 2 else 1.0 - 0.93 * (s - 2) / (steps - 2)  # noqa: E731

    tx = airbench.optimizer(lr, wd, momentum, batch, factor, bias_scale, whiten_bias_steps=bias_steps)
    p, opt = params, tx.init(params)
    for g in mean_grads:
        updates, opt = tx.update(g, opt, p)
        p = jax.tree_util.tree_map(jnp.add, p, updates)

    def flat(tree):
        return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}

    t = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in flat(params).items()}
    kilostep = 1024 * (1 + 1 / (1 - momentum))
    lr_t, wd_abs = lr / kilostep, wd * batch / kilostep
    norm = [v for k, v in t.items() if "norm" in k]
    other = [v for k, v in t.items() if "norm" not in k and "['whiten']['kernel']" not in k]
    opt_t = torch.optim.SGD([dict(params=norm, lr=lr_t * bias_scale, weight_decay=wd_abs / (lr_t * bias_scale)),
                             dict(params=other, lr=lr_t, weight_decay=wd_abs / lr_t)],
                            momentum=momentum, nesterov=True)
    sched_t = torch.optim.lr_scheduler.LambdaLR(opt_t, factor)
    for step, g in enumerate(mean_grads):
        grads = flat(g)
        for k, v in t.items():
            frozen = "['whiten']['kernel']" in k or ("['whiten']['bias']" in k and step >= bias_steps)
            v.grad = None if frozen else torch.tensor(grads[k] * batch)  # gradient of the summed loss
        opt_t.step()
        sched_t.step()
    chex.assert_trees_all_close(flat(p), {k: v.detach().numpy() for k, v in t.items()}, rtol=2e-5, atol=2e-5)
    chex.assert_trees_all_equal(p["whiten"]["kernel"], params["whiten"]["kernel"])


def test_make_optimizer_airbench_uses_config_units():
    cfg = ml_collections.ConfigDict(dict(optimizer="airbench", learning_rate=11.5, momentum=0.85, weight_decay=0.0,
                                         batch_size=1024, schedule="constant", bias_lr_scale=64.0,
                                         whiten_bias_epochs=0))
    tx, _ = make_optimizer(cfg, steps_per_epoch=1, num_epochs=1)
    params = {"whiten": {"kernel": jnp.ones(2), "bias": jnp.ones(2)}, "norm1": {"bias": jnp.ones(2)},
              "conv": {"kernel": jnp.ones(2)}}
    updates, _ = tx.update(jax.tree_util.tree_map(jnp.ones_like, params), tx.init(params), params)
    # mean-loss lr = 11.5 * 1024 / (1024 * (1 + 1 / 0.15)) = 1.5; Nesterov's first step is (1 + m) * lr * g.
    # atol=0: the whitening updates are exactly zero (whiten_bias_epochs=0: its bias is never trained either).
    want = {"conv": {"kernel": np.full(2, -1.5 * 1.85)}, "norm1": {"bias": np.full(2, -1.5 * 64 * 1.85)},
            "whiten": {"kernel": np.zeros(2), "bias": np.zeros(2)}}
    chex.assert_trees_all_close(updates, want, rtol=1e-6, atol=0.0)


def _state(params, slow, step):
    return TrainState(step=step, apply_fn=None, params=params, tx=None, opt_state=None, batch_stats={}, rng=None,
                      slow={"params": slow, "batch_stats": {}})


def test_lookahead_moves_slow_weights_every_k_steps_and_ends_on_them():
    la = Lookahead(every=5, total_steps=20, decay=0.5, power=1.0)
    fast, slow = {"w": jnp.array(10.0)}, {"w": jnp.array(0.0)}
    off = lookahead_update(_state(fast, slow, jnp.array(3)), la)  # not due: nothing changes
    chex.assert_trees_all_equal((off.params, off.slow), ({"w": 10.0}, {"params": {"w": 0.0}, "batch_stats": {}}))
    due = lookahead_update(_state(fast, slow, jnp.array(10)), la)  # decay 0.5 * 10/20 = 0.25
    chex.assert_trees_all_close((due.params, due.slow), ({"w": 7.5}, {"params": {"w": 7.5}, "batch_stats": {}}),
                                rtol=1e-7, atol=0.0)
    end = lookahead_update(_state(fast, slow, jnp.array(20)), la)  # last step: fast <- slow, slow kept
    chex.assert_trees_all_equal((end.params, end.slow), ({"w": 0.0}, {"params": {"w": 0.0}, "batch_stats": {}}))


def test_alternating_flips_swap_halves_each_epoch_and_augment_applies_them():
    key, ids = jax.random.PRNGKey(3), jnp.arange(1000)
    even, odd, later = (alternating_flips(key, ids, e) for e in (0, 1, 2))
    np.testing.assert_array_equal(odd, ~even)
    np.testing.assert_array_equal(later, even)
    assert 400 < int(even.sum()) < 600
    images = np.random.RandomState(0).randint(0, 256, (6, 4, 5, 1)).astype(np.uint8)
    cfg = AugmentConfig(flip=True, flip_mode="alternate", steps_per_epoch=10)
    ids6 = jnp.array([5, 17, 2, 900, 33, 4])
    out = augment(jax.random.PRNGKey(0), images, cfg, example_ids=ids6, step=13, run_key=key)  # epoch 1
    flips = np.asarray(alternating_flips(key, ids6, 1))
    np.testing.assert_array_equal(np.asarray(out), np.where(flips[:, None, None, None], images[:, :, ::-1], images))
    with pytest.raises(ValueError, match="needs example_ids and run_key"):
        augment(jax.random.PRNGKey(0), images, cfg)
    with pytest.raises(ValueError, match="flip_mode must be 'random' or 'alternate'"):
        AugmentConfig(flip=True, flip_mode="sometimes")


def test_reflect_translate_never_shows_padding():
    images = np.full((16, 8, 8, 1), 200, np.uint8)
    out = augment(jax.random.PRNGKey(0), images, AugmentConfig(crop_padding=2, pad_mode="reflect"))
    assert int(jnp.min(out)) == 200
    zero_padded = augment(jax.random.PRNGKey(0), images, AugmentConfig(crop_padding=2))
    assert int(jnp.min(zero_padded)) == 0


def test_tta_weights_views_as_airbench():
    x = jnp.asarray(np.random.RandomState(0).randn(2, 5, 6, 3).astype(np.float32))
    forward = lambda v: v[:, 0, 0, :] * 2.0 + v[:, 1, 2, :]  # noqa: E731  position-sensitive "logits"
    chex.assert_trees_all_close(tta_logits(forward, x, 0), forward(x))
    mirror = lambda v: 0.5 * forward(v) + 0.5 * forward(v[:, :, ::-1])  # noqa: E731
    chex.assert_trees_all_close(tta_logits(forward, x, 1), mirror(x))
    p = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    want = 0.5 * mirror(x) + 0.25 * mirror(p[:, :5, :6]) + 0.25 * mirror(p[:, 2:7, 2:8])
    chex.assert_trees_all_close(jax.jit(lambda v: tta_logits(forward, v, 2))(x), want, rtol=1e-6)
    with pytest.raises(ValueError, match="tta level must be 0, 1 or 2"):
        tta_logits(forward, x, 3)


def test_init_whitening_sets_only_the_whitening_kernel():
    model = models.create("fast_cnn")
    params = init_variables(model, (32, 32, 1), jax.random.PRNGKey(0))["params"]
    images = np.random.RandomState(0).randint(0, 256, (64, 32, 32, 1)).astype(np.uint8)
    new = airbench.init_whitening(params, images, (0.5,), (0.25,))
    assert not np.allclose(new["whiten"]["kernel"], params["whiten"]["kernel"])
    chex.assert_trees_all_equal(new["block1"], params["block1"])
    with pytest.raises(ValueError, match="needs a model with a 'whiten' conv"):
        airbench.init_whitening({"conv": {}}, images, (0.5,), (0.25,))


def _fit_fast_on_synthetic_cifar(tmp_path, n_train: int, epochs: int, batch: int):
    """cifar10_fast as shipped, on CIFAR-format synthetic files; returns the last metrics row, the
    final variables and the whitening kernel the run started from."""
    from cnnjax import checkpoint
    from cnnjax.data import MEAN_STD
    from cnnjax.data.config_splits import load_data
    from cnnjax.train.loop import fit
    from experiments.configs import cifar10_fast
    from experiments.make_synthetic_cifar import write

    write(str(tmp_path / "data"), n_train, 256)
    cfg = cifar10_fast.get_config()
    cfg.data.dir, cfg.data.cache_dir = str(tmp_path / "data"), ""
    cfg.batch_size, cfg.num_epochs, cfg.eval_every, cfg.plots = batch, epochs, epochs, False
    cfg.whiten_init_images, cfg.whiten_bias_epochs = 256, 1
    row = fit(cfg, str(tmp_path / "run"), progress=False)
    variables, _ = checkpoint.restore_variables(str(tmp_path / "run"), "latest")
    ds = load_data(cfg)  # the training split as the run saw it (validation held out)
    start = airbench.init_whitening(variables["params"], ds.train_images[:256], *MEAN_STD["cifar10"])
    return row, variables, start["whiten"]["kernel"]


def test_cifar10_fast_config_runs_end_to_end_with_frozen_whitening(tmp_path):
    row, variables, whitening = _fit_fast_on_synthetic_cifar(tmp_path, 256, 2, 64)
    assert row["epoch"] == 2 and np.isfinite(row["test_loss"])
    np.testing.assert_allclose(variables["params"]["whiten"]["kernel"], whitening, rtol=1e-6)


@pytest.mark.slow
def test_cifar10_fast_learns_synthetic_cifar(tmp_path):
    row, _, _ = _fit_fast_on_synthetic_cifar(tmp_path, 2048, 4, 256)
    assert row["test_accuracy"] > 0.5  # chance is 0.1
