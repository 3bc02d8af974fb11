"""Train steps: jit, pmap and sharded-jit agree on one step; eval metrics; optimizers; augmentation."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cnnjax import models
from cnnjax.data.pipeline import AugmentConfig, augment, epoch_batches
from cnnjax.data.stream import ArraySource
from cnnjax.models.cifar_resnet import CifarResNet
from cnnjax.train import feed
from cnnjax.train.optim import make_optimizer
from cnnjax.train.runner import Runner, summarize_eval
from cnnjax.train.state import TrainState, create_train_state, init_variables
from cnnjax.train.steps import AXIS, StepSpec

SPEC = StepSpec(num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                augment=AugmentConfig(crop_padding=4, flip=True), label_smoothing=0.1)


def _opt(name="nesterov", **kw):
    cfg = ml_collections.ConfigDict(dict(optimizer=name, learning_rate=0.1, momentum=0.9, weight_decay=5e-4,
                                         schedule="constant", grad_clip_norm=1.0, **kw))
    return make_optimizer(cfg, steps_per_epoch=10, num_epochs=2)[0]


def _data(n=64, seed=0):
    rng = np.random.RandomState(seed)
    return rng.randint(0, 256, (n, 32, 32, 3)).astype(np.uint8), rng.randint(0, 10, n).astype(np.int32)


def _small_resnet(axis_name=None):
    """CIFAR ResNet-8: one block per stage, so BatchNorm, both option-A shortcuts and global pooling at
    a third of ResNet-20's compile time."""
    return CifarResNet(8, axis_name=axis_name)


def _one_step(mode, devices=None):
    axis = AXIS if mode == "pmap" else None
    model = _small_resnet(axis)
    state = create_train_state(model, _opt(), (32, 32, 3), jax.random.PRNGKey(0))
    runner = Runner(SPEC, model.apply, mode, devices)
    images, labels = _data()
    img_d, lab_d = runner.put_data(images, labels)
    idx = np.arange(32, dtype=np.int32)[None]  # one step, global batch 32
    state, metrics = runner.train(runner.put_state(state), img_d, lab_d, idx)
    return runner.get_state(state), jax.device_get(metrics)


@pytest.mark.skipif(jax.local_device_count() < 4, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=4")
def test_jit_pmap_sharded_one_step_agree():
    ref_state, ref_metrics = _one_step("jit")
    for mode in ("pmap", "sharded"):
        state, metrics = _one_step(mode, jax.local_devices()[:4])
        diffs = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                                       (state.params, state.batch_stats), (ref_state.params, ref_state.batch_stats))
        worst = max(jax.tree_util.tree_leaves(diffs))
        assert worst <= 1e-5, f"{mode}: params/batch_stats max |Δ| {worst}"
        for k in ref_metrics:
            np.testing.assert_allclose(metrics[k], ref_metrics[k], atol=1e-5, err_msg=f"{mode} {k}")
        assert int(state.step) == 1
    # The step actually moved the parameters.
    init = create_train_state(_small_resnet(), _opt(), (32, 32, 3), jax.random.PRNGKey(0))
    moved = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), ref_state.params, init.params)))
    assert moved > 1e-4
    assert ref_metrics["count"] == 32


def test_training_reduces_loss_and_eval_reports_confusion():
    model = models.create("simple_cnn")
    spec = StepSpec(num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3)
    state = create_train_state(model, _opt("adam", ), (32, 32, 3), jax.random.PRNGKey(0))
    runner = Runner(spec, model.apply)
    images, labels = _data(64)
    img_d, lab_d = runner.put_data(images, labels)
    state = runner.put_state(state)
    first = None
    for epoch in range(8):
        idx = epoch_batches(jax.random.PRNGKey(epoch), 64, 16)
        state, m = runner.train(state, img_d, lab_d, idx)
        loss = float(m["loss_sum"] / m["count"])
        first = loss if first is None else first
    assert loss < 0.5 * first  # memorises 64 random images
    ev = runner.evaluate(state, images[:50], labels[:50], batch_size=16)  # 50: exercises padding
    assert ev["count"] == 50 and ev["confusion"].sum() == 50
    np.testing.assert_allclose(np.trace(ev["confusion"]) / 50, ev["accuracy"])
    assert ev["per_class_accuracy"].shape == (10,)


@pytest.mark.parametrize("streamed", [False, True])
def test_a_split_smaller_than_the_eval_batch_is_one_unpadded_batch(streamed):
    model = models.create("simple_cnn")
    spec = StepSpec(num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3)
    runner = Runner(spec, model.apply)
    state = runner.put_state(create_train_state(model, _opt("adam"), (32, 32, 3), jax.random.PRNGKey(0)))
    images, labels = _data(10)
    shapes, eval_fn = [], runner.eval_fn
    runner.eval_fn = lambda *args: shapes.append(args[2].shape) or eval_fn(*args)
    split = ArraySource(images, labels)
    whole = feed.evaluate(runner, state.params, state.batch_stats, split, 2000, streamed=streamed)
    assert shapes == [(10, 32, 32, 3)]  # not padded up to 2000 rows
    shapes.clear()
    batched = feed.evaluate(runner, state.params, state.batch_stats, split, 4, streamed=streamed)  # 4, 4, 2 + 2 pad
    assert shapes == [(4, 32, 32, 3)] * 3
    assert whole["count"] == batched["count"] == 10
    np.testing.assert_allclose(whole["loss"], batched["loss"], rtol=1e-5)
    np.testing.assert_array_equal(whole["confusion"], batched["confusion"])


def test_summarize_eval_per_class():
    confusion = np.array([[3, 1], [0, 0]], np.float32)
    out = summarize_eval({"confusion": confusion, "loss_sum": 2.0, "correct": 3.0, "count": 4.0})
    np.testing.assert_allclose(out["per_class_accuracy"], [0.75, 0.0])
    assert out["accuracy"] == 0.75 and out["loss"] == 0.5


@pytest.mark.parametrize("name", ["sgd", "nesterov", "adam", "adamw"])
@pytest.mark.parametrize("schedule", ["constant", "cosine", "onecycle", "triangular", "piecewise"])
def test_optimizers_and_schedules_build_and_step(name, schedule):
    cfg = ml_collections.ConfigDict(dict(optimizer=name, learning_rate=0.1, momentum=0.9, weight_decay=1e-4,
                                         schedule=schedule, warmup_epochs=1, boundaries_epochs=[1],
                                         decay_factor=0.1, grad_clip_norm=0.0))
    tx, sched = make_optimizer(cfg, steps_per_epoch=10, num_epochs=3)
    params = {"kernel": jnp.ones(3), "bias": jnp.ones(3)}
    updates, _ = tx.update({"kernel": jnp.ones(3), "bias": jnp.ones(3)}, tx.init(params), params)
    assert np.all(np.asarray(updates["kernel"]) <= 0)
    assert 0 <= float(sched(29)) <= 0.1 + 1e-6
    if schedule == "piecewise":
        assert np.isclose(float(sched(5)), 0.1) and np.isclose(float(sched(15)), 0.01)


def test_unknown_optimizer_or_schedule_is_clear():
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'; choose one of"):
        make_optimizer(ml_collections.ConfigDict(dict(optimizer="rmsprop", learning_rate=0.1)), 1, 1)
    with pytest.raises(ValueError, match="unknown schedule 'exp'"):
        make_optimizer(ml_collections.ConfigDict(dict(optimizer="sgd", learning_rate=0.1, schedule="exp")), 1, 1)


def test_augment_is_per_example_deterministic_and_split_invariant():
    images = jnp.asarray(_data(8)[0])
    cfg = AugmentConfig(crop_padding=4, flip=True, cutout=8)
    key = jax.random.PRNGKey(3)
    full = augment(key, images, cfg)
    halves = jnp.concatenate([augment(key, images[:4], cfg, 0), augment(key, images[4:], cfg, 4)])
    np.testing.assert_array_equal(full, halves)
    assert full.dtype == jnp.uint8 and full.shape == images.shape
    assert not np.array_equal(full, images)
    np.testing.assert_array_equal(augment(key, images, AugmentConfig()), images)


def test_epoch_batches_is_a_permutation():
    idx = np.asarray(epoch_batches(jax.random.PRNGKey(0), 100, 32))
    assert idx.shape == (3, 32) and len(set(idx.ravel())) == 96
    with pytest.raises(ValueError, match="lower `batch_size`"):
        epoch_batches(jax.random.PRNGKey(0), 10, 32)


def test_scan_and_host_loop_runners_agree():
    """The accelerator path (lax.scan over a chunk) equals the CPU path (host loop of steps)."""
    model = _small_resnet()
    images, labels = _data(64)
    idx = np.asarray(epoch_batches(jax.random.PRNGKey(0), 64, 32))[:1]  # one step, batch 32
    out = {}
    for scan in (True, False):
        runner = Runner(SPEC, model.apply, scan=scan)
        state = runner.put_state(create_train_state(model, _opt(), (32, 32, 3), jax.random.PRNGKey(0)))
        img_d, lab_d = runner.put_data(images, labels)
        state, metrics = runner.train(state, img_d, lab_d, idx)
        out[scan] = runner.get_state(state), jax.device_get(metrics)
    (s1, m1), (s2, m2) = out[True], out[False]
    assert int(s1.step) == int(s2.step) == 1
    worst = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), (s1.params, s1.batch_stats),
        (s2.params, s2.batch_stats))))
    assert worst <= 1e-5
    assert m1["count"] == m2["count"] == 32
    np.testing.assert_allclose(m1["loss_sum"], m2["loss_sum"], rtol=1e-5)


def test_mixed_precision_keeps_fp32_params_and_bn_stats():
    model = _small_resnet()
    spec = StepSpec(num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3, compute_dtype=jnp.bfloat16)
    state = create_train_state(model, _opt(), (32, 32, 3), jax.random.PRNGKey(0))
    before = jax.device_get(state)  # the runner donates the state it trains
    runner = Runner(spec, model.apply)
    images, labels = _data(32)
    img_d, lab_d = runner.put_data(images, labels)
    new, metrics = runner.train(runner.put_state(state), img_d, lab_d, np.arange(32)[None])
    new = runner.get_state(new)
    dtypes = {x.dtype for x in jax.tree_util.tree_leaves((new.params, new.batch_stats))}
    assert dtypes == {np.dtype("float32")}
    assert np.isfinite(float(metrics["loss_sum"]))
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                   new.batch_stats, before.batch_stats)
    assert max(jax.tree_util.tree_leaves(moved)) > 0
    # bf16 compute really happens: activations follow the bf16 input through convs and BN.
    out = model.apply({"params": before.params, "batch_stats": before.batch_stats},
                      jnp.ones((1, 8, 8, 3), jnp.bfloat16), train=False)
    assert out.dtype == jnp.bfloat16


def test_random_resized_crop_is_keyed_shape_preserving_and_the_identity_at_full_scale():
    from cnnjax.data.pipeline import random_resized_crop

    square = jnp.asarray(np.random.RandomState(0).randint(0, 256, (12, 12, 3)), jnp.uint8)
    full = random_resized_crop(jax.random.PRNGKey(0), square, 1.0, log_ratio=(0.0, 0.0))
    np.testing.assert_array_equal(np.asarray(full), np.asarray(square))  # the whole image, unscaled
    image = jnp.asarray(np.random.RandomState(0).randint(0, 256, (16, 12, 3)), jnp.uint8)
    a, b = (random_resized_crop(jax.random.PRNGKey(k), image, 0.1) for k in (1, 2))
    assert a.shape == image.shape and a.dtype == jnp.uint8 and not np.array_equal(a, b)
    np.testing.assert_array_equal(a, random_resized_crop(jax.random.PRNGKey(1), image, 0.1))
    flat = jnp.full((16, 12, 3), 77, jnp.uint8)
    assert set(np.unique(random_resized_crop(jax.random.PRNGKey(3), flat, 0.1))) == {77}
    cfg = AugmentConfig(random_resized_crop=0.3)
    batch = jnp.stack([image, image])
    out = augment(jax.random.PRNGKey(4), batch, cfg)
    assert out.shape == batch.shape and not np.array_equal(out[0], out[1])  # per-example keys
    with pytest.raises(ValueError, match="min area fraction"):
        AugmentConfig(random_resized_crop=1.5)


def test_host_loop_compiles_one_step_for_every_chunk_length():
    """An epoch of 5 steps logged every 3 runs chunks of 3 and 2 steps: one compiled step serves both,
    and the result is the same as one 5-step chunk."""
    spec = StepSpec(num_classes=10, mean=(0.5,), std=(0.25,))
    model = models.create("tiny_cnn", num_classes=10)
    images, labels = _data(40)
    images = images[:, :8, :8, :1]
    idx = np.arange(40, dtype=np.int32).reshape(5, 8)

    def run(chunks):
        runner = Runner(spec, model.apply, "jit", scan=False)
        state = runner.put_state(create_train_state(model, _opt(), (8, 8, 1), jax.random.PRNGKey(0)))
        img_d, lab_d = runner.put_data(images, labels)
        for chunk in chunks:
            state, _ = runner.train(state, img_d, lab_d, chunk)
        return runner, state

    split, split_state = run([idx[:3], idx[3:]])
    assert split._train._cache_size() == 1
    _, whole_state = run([idx])
    chex.assert_trees_all_equal(split_state.params, whole_state.params)


@pytest.mark.parametrize("build,shape,opt", [
    (lambda: models.create("simple_cnn", image_size=28), (28, 28, 1), "adam"),
    (_small_resnet, (32, 32, 3), "nesterov"),  # BatchNorm statistics; clipping and weight decay state
])
def test_create_train_state_equals_flax_create_with_eager_optimizer_init(build, shape, opt):
    """The variables and optimizer state compiled in one call are exactly what Flax's ``TrainState.create``
    (optax's init run op by op) gives, tree structure included."""
    model, tx = build(), _opt(opt)
    init_key, state_key = jax.random.split(jax.random.PRNGKey(3))
    variables = init_variables(model, shape, init_key, train=False)
    want = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables.get("batch_stats", {}), rng=state_key)
    got = create_train_state(model, tx, shape, jax.random.PRNGKey(3))
    fields = lambda s: (s.step, s.params, s.opt_state, s.batch_stats, s.rng)  # noqa: E731
    chex.assert_trees_all_equal(fields(got), fields(want))
    chex.assert_trees_all_equal_structs(got.opt_state, want.opt_state)


# --- eval programs without YNN's reduce fusions on the CPU ---------------------------------------------------


def test_eval_compiler_options_only_on_the_cpu_with_jax_0_10_and_never_over_a_users_own_ynn_setting():
    from cnnjax.train.runner import eval_compiler_options
    from cnnjax.xla_cpu import EVAL_YNN_FUSION_TYPES

    want = {"xla_cpu_experimental_ynn_fusion_type": EVAL_YNN_FUSION_TYPES}
    entry_flag = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
    assert eval_compiler_options("cpu", "0.10.2", "") == want
    assert eval_compiler_options("cpu", "0.10.2", f"--xla_force_host_platform_device_count=2 {entry_flag}") == want
    assert eval_compiler_options("gpu", "0.10.2", "") is None
    assert eval_compiler_options("cpu", "0.11.2", "") is None  # option values read from 0.10 only
    assert eval_compiler_options("cpu", "0.10.2", "--xla_cpu_experimental_ynn_fusion_type=") is None


def test_runner_eval_gives_the_same_metrics_as_a_plain_jit_of_eval_step():
    from cnnjax.train.steps import eval_step

    model = models.create("lenet5")
    spec = StepSpec(10, (0.5,), (0.25,))
    runner = Runner(spec, model.apply)
    state = create_train_state(model, optax.sgd(0.01, momentum=0.9), (32, 32, 1), jax.random.PRNGKey(0))
    rng = np.random.RandomState(0)
    images = jnp.asarray(rng.randint(0, 256, (64, 32, 32, 1)).astype(np.uint8))
    labels = jnp.asarray(rng.randint(0, 10, 64).astype(np.int32))
    mask = jnp.ones(64).at[60:].set(0.0)
    ours = runner.eval_fn(state.params, state.batch_stats, images, labels, mask)
    plain = jax.jit(lambda p, s: eval_step(p, s, model.apply, images, labels, mask, spec))(
        state.params, state.batch_stats)
    chex.assert_trees_all_close(ours, plain, rtol=1e-5, atol=1e-4)
    assert float(ours["count"]) == 60.0
