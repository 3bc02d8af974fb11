"""GoogLeNet and Inception v3 (torchvision layout): exact parameter counts with and without the auxiliary heads,
torch parity (eval + train mode, aux outputs, running statistics), ``transform_input``, dropout, input limits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cnnjax import models
from cnnjax.errors import UsageError
from cnnjax.layers import Dropout
from cnnjax.models import googlenet, inception
from cnnjax.port.torch_state import torch_layout
from cnnjax.port.torchvision import convert
from experiments.bench import torch_zoo
from experiments.bench.torch_zoo import googlenet as googlenet_twin
from tests.onednn_marks import use_path
from tests.parity import assert_parity, check_model_parity, nchw, nhwc, param_count, port_twin

# torchvision's figures (1000 classes); the aux variants are the twins' counts with aux_logits=True (Inception v3's
# equals torchvision's IMAGENET1K_V1 num_params, whose file carries the aux head).
PARAM_COUNTS = {
    ("googlenet", False): 6_624_904,
    ("googlenet", True): 13_004_888,
    ("inception_v3", False): 23_834_568,
    ("inception_v3", True): 27_161_264,
}
NO_DROPOUT = {
    "googlenet": ({"dropout_rate": 0.0, "dropout_aux_rate": 0.0}, {"dropout": 0.0, "dropout_aux": 0.0}),
    "inception_v3": ({"dropout_rate": 0.0}, {"dropout": 0.0}),
}
# torchvision's Inception v3 init (N(0, 0.1^2) weights) with random BN statistics gives eval logits of ~1e10 at any
# size; the parity runs use torch's default init (init_weights=False) there, so the logits are O(1).
TWIN_INIT = {"googlenet": {}, "inception_v3": {"init_weights": False}}


def _abstract(name: str, shape: tuple[int, int, int], train: bool = False, **kwargs):
    model = models.create(name, **kwargs)
    rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
    return jax.eval_shape(lambda: model.init(rngs, jnp.zeros((1, *shape)), train=train))



# Inception v3's train-mode logits amplify float32 rounding through 94 BatchNorms over small maps (batch 2): they
# agree to ~8e-5 on logits of ~1 at 161x141 (test_inception_v3_parity_fp64 checks train mode in float64).
TRAIN_TOL = {"googlenet": 1e-4, "inception_v3": 2e-4}
INCEPTION_ODD = (161, 141, 3)  # odd, non-square, 3x3 Mixed_7 maps


def _parity(name: str, shape: tuple[int, int, int], path: str, **kwargs) -> None:
    jax_kwargs, torch_kwargs = NO_DROPOUT[name]
    check_model_parity(name, shape, 2, path, jax_kwargs={**jax_kwargs, **kwargs},
                       torch_kwargs={**torch_kwargs, **TWIN_INIT[name], **kwargs}, tol=TRAIN_TOL[name])


@pytest.mark.parametrize("name, aux", list(PARAM_COUNTS))
def test_parameter_count(name, aux):
    shape = models.DEFAULT_INPUT_SHAPES[name]
    assert param_count(_abstract(name, shape, aux_logits=aux)["params"]) == PARAM_COUNTS[name, aux]


@pytest.mark.parametrize("name, aux", list(PARAM_COUNTS))
def test_torch_twin_count(name, aux):
    twin = torch_zoo.build(name, aux_logits=aux, init_weights=False)  # torchvision's init costs seconds here
    assert sum(p.numel() for p in twin.parameters()) == PARAM_COUNTS[name, aux]


def test_default_input_shapes():
    assert models.DEFAULT_INPUT_SHAPES["googlenet"] == (224, 224, 3)
    assert models.DEFAULT_INPUT_SHAPES["inception_v3"] == (299, 299, 3)


def test_aux_parameters_exist_for_any_init():
    # The aux heads' parameters do not depend on the mode or (Inception v3) the input size of the init.
    for name, small in (("googlenet", (15, 15, 3)), ("inception_v3", (75, 75, 3))):
        full = _abstract(name, models.DEFAULT_INPUT_SHAPES[name], train=True, aux_logits=True)
        assert jax.tree_util.tree_map(lambda a: a.shape, _abstract(name, small, aux_logits=True)) == \
            jax.tree_util.tree_map(lambda a: a.shape, full)


def test_googlenet_parity_224(monkeypatch):
    use_path(monkeypatch, "xla")
    _parity("googlenet", (224, 224, 3), "xla")


def test_googlenet_parity_odd_size(path):
    _parity("googlenet", (97, 97, 3), path, transform_input=True)


def check_aux_parity(name: str, shape: tuple[int, int, int], path: str, tol: float = 1e-4,
                     stats_tol: float = 1e-5) -> None:
    """``name`` with ``aux_logits=True`` against its twin: eval mode returns the logits alone; train mode (dropout
    off) the torchvision namedtuple (same fields, same order), each output and the running statistics equal.

    Jitted (one compile per mode; the eager per-op compiles of ``check_model_parity`` cost twice as much here, and
    the training loop runs jitted)."""
    jax_kwargs, torch_kwargs = NO_DROPOUT[name]
    torch.manual_seed(0)
    tm = torch_zoo.build(name, aux_logits=True, **torch_kwargs, **TWIN_INIT[name])
    torch_zoo.randomize_bn_stats(tm, torch.Generator().manual_seed(1))
    model = models.create(name, aux_logits=True, **jax_kwargs)
    variables = port_twin(model, tm, shape)
    x = np.random.RandomState(0).randn(2, *shape).astype(np.float32)
    label = f"{name} aux {shape[0]}x{shape[1]} {path}"
    apply = jax.jit(model.apply, static_argnames=("train", "mutable"))

    tm.eval()
    with torch.no_grad():
        want = tm(nchw(x))
    assert isinstance(want, torch.Tensor)
    assert_parity(f"{label} eval logits", apply(variables, x, train=False), want.numpy(), tol)

    tm.train()
    with torch.no_grad():
        want = tm(nchw(x))
    got, updated = apply(variables, x, train=True, mutable=("batch_stats",))
    assert type(got).__name__ == type(want).__name__ and got._fields == want._fields
    for field in want._fields:
        assert_parity(f"{label} train {field}", getattr(got, field), getattr(want, field).numpy(), tol)
    assert_parity(f"{label} train running stats", updated["batch_stats"], port_twin(model, tm, shape)["batch_stats"],
                  stats_tol)


def test_googlenet_aux_heads(monkeypatch):
    use_path(monkeypatch, "xla")
    check_aux_parity("googlenet", (97, 97, 3), "xla")


# 161x141 stands for both the reduced size and the odd size: 299x299 (and the aux head, which needs it) is slow.
def test_inception_v3_parity_odd_size(path):
    _parity("inception_v3", INCEPTION_ODD, path, transform_input=True)


@pytest.mark.slow
def test_inception_v3_parity_299(monkeypatch):
    use_path(monkeypatch, "xla")
    _parity("inception_v3", (299, 299, 3), "xla")


@pytest.mark.slow
def test_inception_v3_parity_fp64(monkeypatch):
    """Train mode in float64 on both sides, logits and running statistics to 1e-9 (the statistics reference is
    read from the twin directly: the port casts to float32)."""
    use_path(monkeypatch, "xla")
    name, shape = "inception_v3", INCEPTION_ODD
    jax_kwargs, torch_kwargs = NO_DROPOUT[name]
    torch.manual_seed(0)
    tm = torch_zoo.build(name, **torch_kwargs, **TWIN_INIT[name])
    torch_zoo.randomize_bn_stats(tm, torch.Generator().manual_seed(1))
    model = models.create(name, **jax_kwargs)
    variables = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), port_twin(model, tm, shape))
    x = np.random.RandomState(0).randn(2, *shape)
    tm = tm.double().train()
    with torch.no_grad():
        want = tm(nchw(x)).numpy()
    want_stats: dict = {}
    for key, entry in torch_layout(variables).items():
        if entry.collection == "batch_stats":
            node = want_stats
            for part in entry.path:
                node = node.setdefault(part, {})
            node[entry.leaf] = tm.state_dict()[key].numpy()
    with jax.enable_x64(True):
        got, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
        assert_parity(f"{name} {shape[0]}x{shape[1]} xla train logits (fp64)", got, want, 1e-9)
        assert_parity(f"{name} {shape[0]}x{shape[1]} xla train running stats (fp64)", updated["batch_stats"],
                      want_stats, 1e-9)


@pytest.mark.slow
def test_inception_v3_aux_head(monkeypatch):
    use_path(monkeypatch, "xla")  # the aux head needs 299x299 inputs
    # Its conv1 gives 1x1 maps: in train mode that BatchNorm normalises over 2 values per channel (batch 2), which
    # amplifies float32 rounding (aux logits agree to ~2e-4 here).
    check_aux_parity("inception_v3", (299, 299, 3), "xla", tol=5e-4, stats_tol=3e-5)


def test_transform_input_matches_twin():
    x = np.random.RandomState(0).randn(2, 5, 4, 3).astype(np.float32)
    want = nhwc(googlenet_twin.transform_input(nchw(x)))
    np.testing.assert_allclose(np.asarray(googlenet.transform_input(jnp.asarray(x))), want, rtol=1e-6, atol=1e-6)


def test_dropout_defaults_and_rates():
    # torchvision's rates: GoogLeNet 0.2 before fc and 0.7 in the aux heads, Inception v3 0.5 before fc.
    assert (googlenet.GoogLeNet.dropout_rate, googlenet.GoogLeNet.dropout_aux_rate) == (0.2, 0.7)
    assert inception.Inception3.dropout_rate == 0.5
    x = jnp.ones((64, 1024))
    for rate in (0.2, 0.5, 0.7):
        y = np.asarray(Dropout(rate).apply({}, x, True, rngs={"dropout": jax.random.PRNGKey(1)}))
        kept = y != 0
        assert abs(kept.mean() - (1 - rate)) < 0.02
        np.testing.assert_allclose(y[kept], 1 / (1 - rate), rtol=1e-6)


def test_too_small_inputs():
    with pytest.raises(UsageError, match="at least 15x15"):
        _abstract("googlenet", (14, 64, 3))
    with pytest.raises(UsageError, match="at least 75x75"):
        _abstract("inception_v3", (75, 74, 3))
    with pytest.raises(UsageError, match="auxiliary head needs inputs of at least 299x299"):
        _abstract("inception_v3", (298, 299, 3), train=True, aux_logits=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_official_file_layout_ports(name):
    # torchvision's IMAGENET1K_V1 files hold the aux heads' weights: the port builds the model with aux_logits and
    # transform_input (as torchvision does for these weights) and takes every key.
    twin = torch_zoo.build(name, aux_logits=True, init_weights=False)
    state_dict = {k: v.numpy() for k, v in twin.state_dict().items()}
    model, variables = convert(name, state_dict)
    assert model.aux_logits and model.transform_input and model.num_classes == 1000
    assert param_count(variables["params"]) == PARAM_COUNTS[name, True]
