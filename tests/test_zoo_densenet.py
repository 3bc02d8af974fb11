"""DenseNet-121 / 161 / 169 / 201: exact parameter counts (Flax and the torch twins), torch parity (eval and train
mode, running statistics), the dense layer / block / transition contracts, dense-layer dropout and the smallest
input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cnnjax import models
from cnnjax.errors import UsageError
from cnnjax.layers.dense_block import DenseBlock, DenseLayer, Transition
from experiments.bench import torch_zoo
from experiments.bench.torch_zoo import densenet as tv_densenet
from tests.onednn_marks import use_path
from tests.parity import assert_parity, check_model_parity, nchw, nhwc, param_count, variables_of

PARAM_COUNTS = {
    "densenet121": 7_978_856,
    "densenet161": 28_681_000,
    "densenet169": 14_149_480,
    "densenet201": 20_013_928,
}
NO_DROPOUT = {"jax_kwargs": {"dropout_rate": 0.0}, "torch_kwargs": {"drop_rate": 0.0}}



def test_registered_with_weight_files():
    files = models.weight_files()
    assert {name: files.get(name) for name in PARAM_COUNTS} == {
        "densenet121": "densenet121-a639ec97.pth", "densenet161": "densenet161-8d451a50.pth",
        "densenet169": "densenet169-b2777c0a.pth", "densenet201": "densenet201-c1103571.pth"}


@pytest.mark.parametrize("name", list(PARAM_COUNTS))
def test_parameter_count(name):
    model = models.create(name)
    shape = models.DEFAULT_INPUT_SHAPES[name]
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)), train=False))
    assert param_count(variables["params"]) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", list(PARAM_COUNTS))
def test_torch_twin_parameter_count(name):
    assert sum(p.numel() for p in torch_zoo.build(name).parameters()) == PARAM_COUNTS[name]


def test_parity_224(monkeypatch):
    use_path(monkeypatch, "xla")
    check_model_parity("densenet121", (224, 224, 3), 2, "xla", **NO_DROPOUT)


def test_parity_odd_size(path):
    """113x127: odd sides through the stride-2 stem, the padded max-pool and three floor-mode 2x2 pools."""
    check_model_parity("densenet121", (113, 127, 3), 2, path, **NO_DROPOUT)


@pytest.mark.slow
@pytest.mark.parametrize("name,shape", [("densenet161", (96, 96, 3)), ("densenet169", (97, 97, 3)),
                                        ("densenet201", (112, 112, 3))])
def test_parity_other_members(name, shape, path):
    check_model_parity(name, shape, 2, path, **NO_DROPOUT)


def test_dense_block_concatenates_input_then_each_layer(path):
    """A 3-layer block against torchvision's ``_DenseBlock`` (eval and train mode), and its output is the input
    followed by each layer's new features, in order."""
    torch.manual_seed(0)
    tm = tv_densenet._DenseBlock(3, 10, bn_size=2, growth_rate=4, drop_rate=0.0)
    torch_zoo.randomize_bn_stats(tm, torch.Generator().manual_seed(1))
    block, variables = DenseBlock(3, 4, bn_size=2), variables_of(tm, rename=lambda p: p.replace(".", "/"))
    x = np.random.RandomState(0).randn(2, 9, 7, 10).astype(np.float32)
    tm.eval()
    with torch.no_grad():
        want = nhwc(tm.denselayer1([nchw(x)]))
    layer1 = DenseLayer(4, bn_size=2).apply({"params": variables["params"]["denselayer1"],
                                              "batch_stats": variables["batch_stats"]["denselayer1"]}, x, train=False)
    assert_parity(f"DenseLayer eval {path}", layer1, want, 1e-5)
    for train in (False, True):
        tm.train(train)
        with torch.no_grad():
            want = nhwc(tm(nchw(x)))
        got, updated = block.apply(variables, x, train=train, mutable=["batch_stats"])
        assert got.shape == (2, 9, 7, 10 + 3 * 4)
        mode = "train" if train else "eval"
        assert_parity(f"DenseBlock {mode} {path}", got, want, 1e-5)
    assert_parity(f"DenseBlock running stats {path}", updated["batch_stats"], variables_of(
        tm, rename=lambda p: p.replace(".", "/"))["batch_stats"], 1e-6)
    np.testing.assert_array_equal(got[..., :10], x)

def test_transition_halves_the_map_with_floor():
    variables = jax.eval_shape(lambda: Transition(6).init(jax.random.PRNGKey(0), jnp.zeros((1, 7, 5, 12)),
                                                          train=False))
    assert variables["params"]["conv"]["kernel"].shape == (1, 1, 12, 6)
    assert set(variables["params"]) == {"norm", "conv"}
    y = jax.eval_shape(lambda v: Transition(6).apply(v, jnp.zeros((2, 7, 5, 12)), train=False), variables)
    assert y.shape == (2, 3, 2, 6)


def test_dense_layer_dropout_drops_and_rescales_the_new_features():
    """Train mode with ``dropout_rate=0.3``: each new feature is zeroed with probability 0.3 and the rest scaled by
    1 / 0.7 (the batch statistics, computed before the dropout, are unchanged); eval mode ignores the rate."""
    x = np.random.RandomState(0).randn(8, 6, 6, 16).astype(np.float32)
    layer, plain = DenseLayer(32, dropout_rate=0.3), DenseLayer(32)
    torch.manual_seed(0)
    variables = variables_of(tv_densenet._DenseLayer(16, 32, 4, 0.0), rename=lambda p: p.replace(".", "/"))
    rngs = {"dropout": jax.random.PRNGKey(2)}
    dropped, _ = layer.apply(variables, x, train=True, mutable=["batch_stats"], rngs=rngs)
    full, _ = plain.apply(variables, x, train=True, mutable=["batch_stats"])
    dropped, full = np.asarray(dropped), np.asarray(full)
    kept = dropped != 0
    assert abs(1.0 - kept.mean() - 0.3) < 0.01
    np.testing.assert_allclose(dropped[kept], full[kept] / 0.7, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(layer.apply(variables, x, train=False), plain.apply(variables, x, train=False))


def test_too_small_input_is_a_one_line_error():
    model = models.create("densenet121")
    with pytest.raises(UsageError, match=r"at least 29x29") as info:
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 40, 3)), train=False))
    assert "\n" not in str(info.value)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 29, 29, 3)), train=False))
    logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((3, 29, 29, 3)), train=False), variables)
    assert logits.shape == (3, 1000)
