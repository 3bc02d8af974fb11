"""SqueezeNet 1.0 / 1.1 and AlexNet: exact parameter counts (Flax and the torch twins), torch parity (eval and
train mode), classifier dropout, the smallest inputs, and the ceil-mode max-pool (forward and gradient) that
SqueezeNet uses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cnnjax import models
from cnnjax.errors import UsageError
from cnnjax.layers import max_pool
from experiments.bench import torch_zoo
from tests.onednn_marks import use_path
from tests.parity import assert_parity, check_model_parity, nchw, nhwc, param_count, port_twin

PARAM_COUNTS = {
    "squeezenet1_0": 1_248_424,
    "squeezenet1_1": 1_235_496,
    "alexnet": 61_100_840,
}
WEIGHT_FILES = {
    "squeezenet1_0": "squeezenet1_0-b66bff10.pth",
    "squeezenet1_1": "squeezenet1_1-b8a52dc0.pth",
    "alexnet": "alexnet-owt-7be5be79.pth",
}
NO_DROPOUT = {"jax_kwargs": {"dropout_rate": 0.0}, "torch_kwargs": {"dropout": 0.0}}



def test_registered_with_weight_files():
    files = models.weight_files()
    assert {name: files.get(name) for name in PARAM_COUNTS} == WEIGHT_FILES


@pytest.mark.parametrize("name", list(PARAM_COUNTS))
def test_parameter_count(name):
    model = models.create(name)
    shape = models.DEFAULT_INPUT_SHAPES[name]
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)), train=False))
    assert param_count(variables["params"]) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", list(PARAM_COUNTS))
def test_torch_twin_parameter_count(name):
    assert sum(p.numel() for p in torch_zoo.build(name).parameters()) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", list(PARAM_COUNTS))
def test_parity_224(name, monkeypatch):
    use_path(monkeypatch, "xla")
    check_model_parity(name, (224, 224, 3), 2, "xla", **NO_DROPOUT)


# 113x127: SqueezeNet's ceil-mode pools add a row of -inf on one axis and not the other; AlexNet's 2x3 last map
# goes through the non-divisible adaptive 6x6 average pool.
@pytest.mark.parametrize("name", list(PARAM_COUNTS))
def test_parity_odd_size(name, path):
    check_model_parity(name, (113, 127, 3), 2, path, **NO_DROPOUT)


@pytest.mark.parametrize("name,shape", [("squeezenet1_1", (33, 33, 3)), ("alexnet", (63, 63, 3))])
def test_classifier_dropout_drops_and_rescales(name, shape):
    """``classifier.0`` in train mode with the default rate 0.5: about half of its input is zeroed and the rest
    doubled (its input is its eval-mode output: nothing before it depends on the mode)."""
    model = models.create(name)
    x = np.random.RandomState(0).randn(4, *shape).astype(np.float32)
    torch.manual_seed(0)
    variables = port_twin(model, torch_zoo.build(name), shape)

    def dropout_output(train: bool) -> jax.Array:
        _, state = model.apply(variables, x, train=train, rngs={"dropout": jax.random.PRNGKey(2)},
                               capture_intermediates=lambda m, _: m.name == "classifier.0")
        return state["intermediates"]["classifier.0"]["__call__"][0]

    base, dropped = np.asarray(dropout_output(False)), np.asarray(dropout_output(True))
    live = base != 0
    kept = dropped[live] != 0
    assert live.sum() > 4000 and abs(kept.mean() - 0.5) < 0.03
    np.testing.assert_allclose(dropped[live][kept], 2.0 * base[live][kept], rtol=1e-6)
    assert np.all(dropped[~live] == 0)


# At the minimum size SqueezeNet's last ceil-mode pool sees a 2x2 map with its 3x3 window: one output, as torch.
MIN_SIZES = [("squeezenet1_0", 21), ("squeezenet1_1", 17), ("alexnet", 63)]


@pytest.mark.parametrize("name,min_size", [("squeezenet1_0", 21), ("squeezenet1_1", 17), ("alexnet", 63)])
def test_too_small_input_is_a_one_line_error(name, min_size):
    model = models.create(name)
    with pytest.raises(UsageError, match=rf"at least {min_size}x{min_size}") as info:
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, min_size + 5, min_size - 1, 3)),
                                          train=False))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name,min_size", MIN_SIZES)
def test_smallest_input_gives_logits(name, min_size):
    model = models.create(name)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, min_size, min_size, 3)),
                                                  train=False))
    logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, min_size, min_size, 3)), train=False), variables)
    assert logits.shape == (2, 1000)


# Ceil-mode max-pool against torch: (H, W, window, stride, padding). SqueezeNet's 3x3 / 2 pools at its odd map
# sizes; a padded window; the last window dropped because it would start in the right padding (5 + 2 * 1 with
# window 2, stride 2: torch gives 3, not 4); stride 3; non-square windows and strides.
CEIL_CASES = [
    (54, 61, 3, 2, 0),
    (27, 30, 3, 2, 0),
    (13, 14, 3, 2, 0),
    (7, 9, 3, 2, 1),
    (5, 6, 2, 2, 1),
    (10, 11, 3, 3, 0),
    (11, 8, (3, 2), (2, 1), (1, 0)),
]
# The window wider than the input (2 with window 3, stride 2): torch gives one output from the 2 inputs (SqueezeNet
# 1.0 / 1.1 at their minimum sizes 21 / 17 reach this in their last pool).
WIDER_THAN_INPUT = (2, 5, 3, 2, 0)


@pytest.mark.parametrize("case", [*CEIL_CASES, WIDER_THAN_INPUT], ids=str)
def test_ceil_mode_max_pool_matches_torch(case, path):
    h, w, window, stride, padding = case
    rng = np.random.RandomState(0)
    x = rng.randn(2, h, w, 3).astype(np.float32)
    xt = nchw(x).requires_grad_(True)
    want = F.max_pool2d(xt, window, stride, padding, ceil_mode=True)
    cotangent = rng.randn(*nhwc(want).shape).astype(np.float32)
    (want * nchw(cotangent)).sum().backward()

    def pool(a):
        return max_pool(a, window, stride, padding, ceil_mode=True)

    got, vjp = jax.vjp(jax.jit(pool), jnp.asarray(x))
    assert got.shape == nhwc(want).shape
    assert_parity(f"ceil-mode max_pool {case} {path}", got, nhwc(want), 0.0)
    # Overlapping windows add up gradients in another order on the CPU backend: float32 rounding only.
    assert_parity(f"ceil-mode max_pool grad {case} {path}", vjp(jnp.asarray(cotangent))[0], nhwc(xt.grad), 1e-6)


@pytest.mark.parametrize("name", ["squeezenet1_0", "squeezenet1_1", "alexnet"])
def test_any_batch_and_class_count(name):
    model = models.create(name, num_classes=7)
    shape = (75, 67, 3)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)), train=False))
    logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((3, *shape)), train=False), variables)
    assert logits.shape == (3, 7)
