"""Train steps: jit, pmap and sharded-jit agree on one step; eval metrics; optimizers; augmentation."""

from __future__ import annotations

import dataclasses
import functools
import os
from unittest import mock

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from absl.testing import parameterized

from cnnjax import kernels, models
from cnnjax.data.pipeline import AugmentConfig, augment, epoch_batches
from cnnjax.data.stream import ArraySource
from cnnjax.layers import BatchNorm, Conv, Dense, MaxPool
from cnnjax.models.cifar_resnet import CifarResNet
from cnnjax.train import feed
from cnnjax.train.evaluation import summarize_eval, zero_totals
from cnnjax.train.optim import make_optimizer
from cnnjax.train.runner import Runner
from cnnjax.train.state import TrainState, create_train_state, init_variables
from cnnjax.train.steps import AXIS, StepSpec, eval_step, train_step

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
        chex.assert_trees_all_close((state.params, state.batch_stats), (ref_state.params, ref_state.batch_stats),
                                    atol=1e-5, rtol=0.0, custom_message=mode)
        chex.assert_trees_all_close(metrics, ref_metrics, atol=1e-5, rtol=1e-7, custom_message=mode)
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
    chex.assert_shape([ev["per_class_accuracy"], ev["confusion"]], [(10,), (10, 10)])


@pytest.mark.parametrize("streamed", [False, True])
def test_a_split_smaller_than_the_eval_batch_is_one_unpadded_batch(streamed):
    model = models.create("simple_cnn")
    spec = StepSpec(num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3)
    runner = Runner(spec, model.apply)
    state = runner.put_state(create_train_state(model, _opt("adam"), (32, 32, 3), jax.random.PRNGKey(0)))
    images, labels = _data(10)
    shapes, eval_fn = [], runner.evaluator.eval_fn
    runner.evaluator.eval_fn = lambda *args: shapes.append(args[3].shape) or eval_fn(*args)
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
    chex.assert_type(jax.tree_util.tree_leaves((new.params, new.batch_stats)), np.float32)
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
    from cnnjax.cpu.xla_flags import EVAL_YNN_FUSION_TYPES
    from cnnjax.train.runner import eval_compiler_options

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
    ours = runner.evaluator.eval_fn(zero_totals(10), state.params, state.batch_stats, images, labels, mask)
    plain = jax.jit(lambda p, s: eval_step(p, s, model.apply, images, labels, mask, spec))(
        state.params, state.batch_stats)
    chex.assert_trees_all_close(ours, plain, rtol=1e-5, atol=1e-4)
    assert float(ours["count"]) == 60.0


# --- chex variants: train_step, eval_step and cross-replica BatchNorm jitted, eager and pmapped -----------------
# Under with_pmap the mapped axis is named AXIS, the name the step's pmean / psum and the model's BatchNorm use
# (an unbound or mismatched name fails to trace). Every variant is compared with one single-device jitted
# reference computed without any axis name.

N_DEVICES = 4
VARIANTS = dict(with_jit=True, without_jit=True, with_pmap=True)
TINY_SPEC = StepSpec(num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3,
                     augment=AugmentConfig(crop_padding=2, flip=True), label_smoothing=0.1)
STATE_TOL = dict(rtol=1e-5, atol=1e-6)  # params / optimizer state / BN statistics after one step, fp32
METRIC_TOL = dict(rtol=1e-5, atol=1e-5)  # summed loss over the batch (O(10-100)), counts exact anyway
TINY_BATCH = (32, 1)  # (size, seed): one batch shape for every train-step test, so the eager variant's ops and
# the reference step compile once


class _TinyBNNet(nn.Module):
    """Conv 3->8 (no bias: BatchNorm cancels it) -> BatchNorm (cross-replica over ``axis_name``) -> ReLU ->
    max pool 2 -> Dense 10, on 8x8x3."""

    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = BatchNorm(axis_name=self.axis_name)(Conv(8, 3, padding=1, use_bias=False)(x), train)
        x = MaxPool(2)(nn.relu(x))
        return Dense(10)(x.reshape(x.shape[0], -1))


@functools.cache
def _tiny_state(axis_name=None):
    """The same initial state for every axis name (the name only matters in training-mode BatchNorm). SGD with
    momentum: a non-trivial optimizer state in few ops, since the eager variant compiles every op on first use."""
    return create_train_state(_TinyBNNet(axis_name), optax.sgd(0.1, momentum=0.9), (8, 8, 3), jax.random.PRNGKey(0))


def _tiny_data(n, seed=0):
    images, labels = _data(n, seed)
    return images[:, :8, :8], labels


_reference_train_step = jax.jit(functools.partial(train_step, spec=TINY_SPEC))


@functools.cache
def _reference_step(n, seed):
    """One jitted single-device train step on the whole batch ``_tiny_data(n, seed)``, no axis name anywhere."""
    return _reference_train_step(_tiny_state(), *_tiny_data(n, seed))


def _state_fields(state):
    return state.step, state.params, state.opt_state, state.batch_stats, state.rng


def _per_device(x):
    """``[B, ...]`` -> ``[N_DEVICES, B / N_DEVICES, ...]``, device ``d`` holding rows ``d B/N ..``."""
    return np.asarray(x).reshape(N_DEVICES, -1, *np.shape(x)[1:])


@pytest.mark.skipif(jax.device_count() < N_DEVICES, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=4")
class StepVariantsTest(chex.TestCase):
    """``train_step`` / ``eval_step`` / ``BatchNorm(axis_name=AXIS)`` under ``jax.jit``, eagerly and under
    ``jax.pmap`` over the 4 host CPU devices, each against the jitted single-device computation."""

    def _pmapped(self) -> bool:
        return self.variant.type is chex.ChexVariantType.WITH_PMAP

    @chex.variants(**VARIANTS)
    def test_train_step_on_a_replicated_batch_equals_the_single_device_step(self):
        """Every replica holding the same batch: the pmean-ed gradients, so the new params and optimizer
        state, and the BatchNorm mean are the single-device step's; the psum-ed metrics are N times its
        metrics; the running variance's unbiased correction counts the rows of all N replicas."""
        axis, n = (AXIS, N_DEVICES) if self._pmapped() else (None, 1)
        images, labels = _tiny_data(*TINY_BATCH)
        step = self.variant(lambda s, x, y: train_step(s, x, y, TINY_SPEC, axis_name=axis), axis_name=AXIS)
        state, metrics = step(_tiny_state(axis), images, labels)
        want_state, want_metrics = _reference_step(*TINY_BATCH)

        chex.assert_trees_all_close(state.params, want_state.params, **STATE_TOL)
        chex.assert_trees_all_close(state.opt_state, want_state.opt_state, **STATE_TOL)
        chex.assert_trees_all_equal(state.rng, want_state.rng)
        assert int(state.step) == 1
        bn, want_bn = state.batch_stats["BatchNorm_0"], want_state.batch_stats["BatchNorm_0"]
        chex.assert_trees_all_close(bn["mean"], want_bn["mean"], **STATE_TOL)
        rows = 32 * 8 * 8  # BatchNorm's rows per replica: batch x height x width
        correction = (n * rows / (n * rows - 1)) / (rows / (rows - 1))
        momentum = 0.9  # running var starts at 1: var' = m + (1 - m) * unbiased batch variance
        chex.assert_trees_all_close(bn["var"], momentum + (want_bn["var"] - momentum) * correction, **STATE_TOL)
        if n > 1:  # the correction is large enough for the tolerance to tell the two counts apart
            assert np.max(np.abs(np.asarray(bn["var"]) - np.asarray(want_bn["var"]))) > 1e-5
        chex.assert_trees_all_close(metrics, jax.tree_util.tree_map(lambda m: n * m, want_metrics), **METRIC_TOL)
        assert float(metrics["count"]) == 32 * n

    @chex.variants(**VARIANTS)
    def test_train_step_on_per_device_shards_equals_the_single_device_step_on_the_whole_batch(self):
        """A global batch of 32 split into 4 shards of 8 (``offset`` keeps each example's augmentation key):
        cross-replica BatchNorm normalises with, and records, the statistics of all 32 images, so every
        replica ends with the single-device step's state and the psum-ed metrics of the whole batch."""
        images, labels = _tiny_data(*TINY_BATCH)
        if self._pmapped():
            args = (_tiny_state(AXIS), _per_device(images), _per_device(labels), np.arange(N_DEVICES) * 8)
            axis = AXIS
        else:
            args, axis = (_tiny_state(), images, labels, 0), None
        step = self.variant(lambda s, x, y, off: train_step(s, x, y, TINY_SPEC, axis_name=axis, offset=off),
                            axis_name=AXIS, in_axes=(None, 0, 0, 0), broadcast_args_to_devices=False,
                            reduce_fn="identity")
        state, metrics = step(*args)
        replicas = N_DEVICES if self._pmapped() else 1
        if not self._pmapped():  # one leading "replica" axis for the comparisons below
            state, metrics = jax.tree_util.tree_map(lambda x: np.asarray(x)[None], (state, metrics))
        chex.assert_tree_shape_prefix((state.params, state.opt_state, state.batch_stats, metrics), (replicas,))
        chex.assert_shape(list(metrics.values()), (replicas,))
        want_state, want_metrics = _reference_step(*TINY_BATCH)
        moved = jax.tree_util.tree_map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(),
                                       want_state.params, _tiny_state().params)
        assert min(jax.tree_util.tree_leaves(moved)) > 1e-4  # the step moved every parameter
        for r in range(replicas):
            got = jax.tree_util.tree_map(lambda x, r=r: x[r], (_state_fields(state), metrics))
            chex.assert_trees_all_close(got[0], _state_fields(want_state), **STATE_TOL)
            chex.assert_trees_all_close(got[1], want_metrics, **METRIC_TOL)
        assert np.all(np.asarray(metrics["count"]) == 32)

    @chex.variants(**VARIANTS)
    def test_eval_step_summed_over_per_device_shards_equals_the_whole_batch(self):
        """eval_step (running statistics, no collectives) on 4 shards of a padded batch of 32 with 5 padding
        rows: the per-device sums of loss / correct / count and the confusion matrices add up to the
        single-device eval of the whole batch."""
        images, labels = _tiny_data(32, seed=2)
        trained, _ = _reference_step(*TINY_BATCH)  # non-trivial BatchNorm running statistics
        mask = np.ones(32, np.float32)
        mask[27:] = 0.0
        spec = dataclasses.replace(TINY_SPEC, tta=1)
        apply_fn = _TinyBNNet().apply

        def evaluate(params, stats, x, y, m):
            return eval_step(params, stats, apply_fn, x, y, m, spec)

        want = jax.jit(evaluate)(trained.params, trained.batch_stats, images, labels, mask)
        fn = self.variant(evaluate, axis_name=AXIS, in_axes=(None, None, 0, 0, 0),
                          broadcast_args_to_devices=False, reduce_fn="identity")
        if self._pmapped():
            per_device = fn(trained.params, trained.batch_stats, *map(_per_device, (images, labels, mask)))
            chex.assert_tree_shape_prefix(per_device, (N_DEVICES,))
            chex.assert_shape(per_device["confusion"], (N_DEVICES, 10, 10))
            counts = np.asarray(per_device["count"])
            np.testing.assert_array_equal(counts, [8, 8, 8, 3])
            got = jax.tree_util.tree_map(lambda x: np.asarray(x).sum(0), per_device)
        else:
            got = fn(trained.params, trained.batch_stats, images, labels, mask)
        chex.assert_shape(got["confusion"], (10, 10))
        chex.assert_shape([got["loss_sum"], got["correct"], got["count"]], ())
        chex.assert_trees_all_close(got, want, **METRIC_TOL)
        assert float(got["count"]) == 27.0 and float(np.sum(got["confusion"])) == 27.0

    @chex.variants(**VARIANTS)
    @parameterized.named_parameters(("cpu_backend", "1"), ("plain_xla", "0"))
    def test_cross_replica_batch_norm_uses_the_whole_batch_statistics(self, cpu_backend):
        """BatchNorm(axis_name=AXIS) in training mode on 4 shards of a [32, 3, 3, 4] batch, on both paths (the
        CPU backend's closed-form backward with psum-ed sums; plain XLA's pmean-ed statistics under autodiff, what
        accelerators run): the output, the running statistics (unbiased variance over all 288 rows per channel),
        the input gradient and the psum of the per-replica scale / bias gradients are those of a jnp BatchNorm of
        the whole batch (autodiff through jnp.mean / jnp.var)."""
        rng = np.random.RandomState(3)
        x = (rng.randn(32, 3, 3, 4) * [0.5, 1.0, 2.0, 4.0] + [1.0, -2.0, 0.0, 3.0]).astype(np.float32)
        w = rng.randn(32, 3, 3, 4).astype(np.float32)  # loss = sum(y * w): a non-uniform output cotangent
        params = {"scale": jnp.asarray([0.5, 1.0, 1.5, 2.0]), "bias": jnp.asarray([0.1, -0.2, 0.3, 0.0])}
        stats = {"mean": jnp.full(4, 0.25), "var": jnp.full(4, 2.0)}
        axis = AXIS if self._pmapped() else None

        def forward_backward(params, stats, x, w):
            bn = BatchNorm(axis_name=axis)

            def loss(p, x):
                y, updates = bn.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
                return jnp.sum(y * w), (y, updates["batch_stats"])

            (g_params, g_x), (y, new_stats) = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)
            if axis is not None:
                g_params = jax.lax.psum(g_params, axis)
            return y, new_stats, g_params, g_x

        fn = self.variant(forward_backward, axis_name=AXIS, in_axes=(None, None, 0, 0),
                          broadcast_args_to_devices=False, reduce_fn="identity")
        with mock.patch.dict(os.environ, {"CNNJAX_CPU_BACKEND": cpu_backend}):  # read when the layer is traced
            backend_bn = kernels.backend_implementations(
                "batch_norm_train", (x, params["scale"], params["bias"]), {"epsilon": 1e-5, "axis_name": axis})
            if cpu_backend == "1" and not backend_bn:
                self.skipTest(f"no CPU backend BatchNorm here ({kernels.describe()})")
            assert cpu_backend == "1" or not backend_bn
            out = fn(params, stats, *((_per_device(x), _per_device(w)) if self._pmapped() else (x, w)))
        if self._pmapped():
            y, new_stats, g_params, g_x = out
            chex.assert_shape([y, g_x], (N_DEVICES, 8, 3, 3, 4))
            chex.assert_tree_shape_prefix((new_stats, g_params), (N_DEVICES,))
            for r in range(1, N_DEVICES):  # every replica records the same statistics and parameter gradients
                chex.assert_trees_all_equal(jax.tree_util.tree_map(lambda a, r=r: a[r], (new_stats, g_params)),
                                            jax.tree_util.tree_map(lambda a: a[0], (new_stats, g_params)))
            y, g_x = (np.asarray(a).reshape(x.shape) for a in (y, g_x))
            new_stats, g_params = jax.tree_util.tree_map(lambda a: a[0], (new_stats, g_params))
        else:
            y, new_stats, g_params, g_x = out
        chex.assert_shape([y, g_x], x.shape)
        chex.assert_shape([new_stats["mean"], new_stats["var"], g_params["scale"], g_params["bias"]], (4,))

        def plain(p, x):
            mean, var = jnp.mean(x, axis=(0, 1, 2)), jnp.var(x, axis=(0, 1, 2))
            return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]

        want_y = plain(params, x)
        want_g_params, want_g_x = jax.grad(lambda p, x: jnp.sum(plain(p, x) * w), argnums=(0, 1))(params, x)
        rows = 32 * 3 * 3
        want_stats = {"mean": 0.9 * 0.25 + 0.1 * x.mean((0, 1, 2)),
                      "var": 0.9 * 2.0 + 0.1 * x.var((0, 1, 2), dtype=np.float64) * rows / (rows - 1)}
        chex.assert_trees_all_close(y, want_y, rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_close(new_stats, want_stats, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(g_params, want_g_params, rtol=1e-4, atol=1e-4)
        chex.assert_trees_all_close(g_x, want_g_x, rtol=1e-4, atol=1e-4)
