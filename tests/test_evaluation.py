"""Evaluation sharded over the local devices equals the one-device evaluation, and is really partitioned."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import models
from cnnjax.train.evaluation import Evaluator, _padded_batches, eval_batch_size, process_range, sharded_batch_size
from cnnjax.train.runner import Runner
from cnnjax.train.state import init_variables
from cnnjax.train.steps import StepSpec, ensemble_eval_step

SPEC = StepSpec(num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3)
needs_4 = pytest.mark.skipif(jax.local_device_count() < 4,
                             reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=4")


@functools.cache
def _model():
    """ImprovedCNN (BatchNorm, so batch_stats matter) with non-trivial running statistics."""
    return models.create("improved_cnn")


def _variables(seed: int) -> tuple[dict, dict]:
    v = init_variables(_model(), (32, 32, 3), jax.random.PRNGKey(seed))
    rng = np.random.RandomState(seed)
    stats = jax.tree_util.tree_map(lambda x: np.asarray(x) + rng.uniform(0.1, 0.5, x.shape).astype(x.dtype),
                                   v["batch_stats"])
    return jax.device_get(v["params"]), stats


def _data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(seed)
    return rng.randint(0, 256, (n, 32, 32, 3)).astype(np.uint8), rng.randint(0, 10, n).astype(np.int32)


def _one_device_reference(params, stats, images, labels, batch_size: int) -> dict:
    """Today's single-device evaluation written out: batches of eval_batch_size on device 0, summed there."""
    fn = jax.jit(lambda p, s, x, y, m: ensemble_eval_step(p, s, _model().apply, x, y, m, SPEC))
    n = len(labels)
    b = eval_batch_size(n, batch_size)
    total = None
    for lo in range(0, n, b):
        rows = slice(lo, min(lo + b, n))
        pad = b - (rows.stop - lo)
        x = np.concatenate([images[rows], np.zeros((pad, *images.shape[1:]), np.uint8)])
        y = np.concatenate([labels[rows], np.zeros(pad, np.int32)])
        m = np.concatenate([np.ones(b - pad, np.float32), np.zeros(pad, np.float32)])
        out = fn(params, stats, x, y, m)
        total = out if total is None else jax.tree_util.tree_map(jnp.add, total, out)
    total = jax.device_get(total)
    return {"loss": float(total["loss_sum"]) / float(total["count"]), "confusion": np.asarray(total["confusion"]),
            "count": int(total["count"])}


def _assert_same(got: dict, want: dict) -> None:
    assert got["count"] == want["count"]
    np.testing.assert_array_equal(got["confusion"], want["confusion"])  # exact: sums of 0 / 1
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=2e-6)  # float32 reassociation only
    if "accuracy" in want:
        assert got["accuracy"] == want["accuracy"]
        np.testing.assert_array_equal(got["per_class_accuracy"], want["per_class_accuracy"])


@needs_4
@pytest.mark.parametrize(("n", "batch_size"), [(50, 10), (10, 2000)])  # 10: not a multiple of 4; a tiny split
def test_four_devices_equal_one_device(path, n, batch_size):
    params, stats = _variables(0)
    images, labels = _data(n)
    four = Evaluator(SPEC, _model().apply, jax.local_devices()[:4])
    got = four.evaluate_variables(params, stats, images, labels, batch_size)
    _assert_same(got, _one_device_reference((params,), (stats,), images, labels, batch_size))
    _assert_same(got, Runner(SPEC, _model().apply).evaluate_variables(params, stats, images, labels, batch_size))
    one = Evaluator(SPEC, _model().apply, jax.local_devices()[:1])
    _assert_same(got, one.evaluate_variables(params, stats, images, labels, batch_size))
    assert got["count"] == n and 0.0 < got["loss"] < 20.0


@needs_4
def test_an_ensemble_of_two_on_four_devices_equals_one_device():
    (p0, s0), (p1, s1) = _variables(0), _variables(1)
    images, labels = _data(30, seed=2)
    four = Evaluator(SPEC, _model().apply, jax.local_devices()[:4])
    got = four.evaluate_variables((p0, p1), (s0, s1), images, labels, 7, ensemble=True)
    _assert_same(got, _one_device_reference((p0, p1), (s0, s1), images, labels, 7))
    single = four.evaluate_variables(p0, s0, images, labels, 7)
    assert single["loss"] != got["loss"]  # the second member really takes part


@needs_4
def test_host_batches_whose_size_is_not_a_multiple_of_the_devices_are_padded():
    params, stats = _variables(0)
    images, labels = _data(20, seed=3)
    four = Evaluator(SPEC, _model().apply, jax.local_devices()[:4])
    host = [{"images": images[lo:lo + 10], "labels": labels[lo:lo + 10], "mask": np.ones(10, np.float32)}
            for lo in (0, 10)]  # as the stream yields them: 10 rows, not a multiple of 4
    got = four.evaluate_batches(params, stats, host)
    _assert_same(got, _one_device_reference((params,), (stats,), images, labels, 10))
    x, y, m = four.put_batch(host[0])
    assert x.shape == (12, 32, 32, 3) and float(m.sum()) == 10.0 and x.sharding == four.batch_sharding


@needs_4
def test_the_split_is_placed_once_sharded_and_the_program_is_partitioned():
    devices = jax.local_devices()[:4]
    images, labels = _data(50)
    batches = list(_padded_batches(images, labels, 10, devices))
    assert [b["images"].shape[0] for b in batches] == [12] * 5  # 10 rounded up to 12, 50 rows padded to 60
    assert float(sum(b["mask"].sum() for b in batches)) == 50.0
    first = batches[0]["images"]
    assert {s.device for s in first.addressable_shards} == set(devices)
    assert {s.data.shape for s in first.addressable_shards} == {(3, 32, 32, 3)}  # each device holds its 3 rows
    four = Evaluator(SPEC, _model().apply, devices)
    assert four.put_batch(batches[0])[0] is first  # already where the program wants it: no copy
    params, stats = _variables(0)
    acc = {k: np.zeros((), np.float32) for k in ("loss_sum", "correct", "count")} | {
        "confusion": np.zeros((10, 10), np.float32)}
    args = (*four.put_variables((acc, params, stats)), *four.put_batch(batches[0]))
    compiled = four.eval_fn.lower(*args).compile()
    in_shardings = jax.tree_util.tree_leaves(compiled.input_shardings[0])
    assert in_shardings[-1].spec == four.batch_sharding.spec and in_shardings[-1].mesh.size == 4
    assert "u8[3,32,32,3]" in compiled.as_text()  # the per-device program sees its 3 rows, not 12


def test_one_device_batches_as_before_and_process_range_covers_the_split():
    images, labels = _data(10)
    batches = list(_padded_batches(images, labels, 4, jax.local_devices()[0]))
    assert [b["images"].shape[0] for b in batches] == [4, 4, 4]
    np.testing.assert_array_equal(batches[-1]["mask"], [1, 1, 0, 0])
    np.testing.assert_array_equal(np.concatenate([b["labels"] for b in batches])[:10], labels)
    assert list(_padded_batches(images[:0], labels[:0], 4, jax.local_devices()[0])) == []
    assert process_range(10) == (0, 10) and eval_batch_size(3, 8) == 3 and eval_batch_size(30, 8) == 8
    assert [sharded_batch_size(n, b, d) for n, b, d in [(10, 2000, 4), (50, 10, 4), (50, 16, 4), (3, 8, 1)]] == [
        12, 12, 16, 3]


def test_devices_of_another_process_are_refused():
    class Remote:
        process_index = jax.process_index() + 1

    with pytest.raises(ValueError, match="devices of process"):
        Evaluator(SPEC, _model().apply, [Remote()])
