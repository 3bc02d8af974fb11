"""ConvNeXt-Tiny/Small/Base/Large: exact parameter counts, torch parity (eval and train mode), the stochastic-depth
schedule and statistics, channel LayerNorm against torch, and the too-small-input error."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cnnjax import models
from cnnjax.errors import UsageError
from cnnjax.layers import ChannelLayerNorm
from cnnjax.models.convnext import CNBlock, ConvNeXt
from experiments.bench import torch_zoo
from experiments.bench.torch_zoo import convnext as twins
from tests.onednn_marks import use_path
from tests.parity import assert_parity, nchw, nhwc, param_count, port_twin

PARAM_COUNTS = {
    "convnext_tiny": 28_589_128,
    "convnext_small": 50_223_688,
    "convnext_base": 88_591_464,
    "convnext_large": 197_767_336,
}
DEFAULT_SD_PROB = {"convnext_tiny": 0.1, "convnext_small": 0.4, "convnext_base": 0.5, "convnext_large": 0.5}



def test_registry_has_the_family_and_weight_files():
    assert set(PARAM_COUNTS) <= set(models.available())
    files = models.weight_files()
    assert {name: files[name] for name in PARAM_COUNTS} == {
        "convnext_tiny": "convnext_tiny-983f1562.pth",
        "convnext_small": "convnext_small-0c510722.pth",
        "convnext_base": "convnext_base-6075fbad.pth",
        "convnext_large": "convnext_large-ea097f82.pth",
    }


@pytest.mark.parametrize("name", list(PARAM_COUNTS))
def test_parameter_count(name):
    model = models.create(name)
    x = jnp.zeros((1, *models.DEFAULT_INPUT_SHAPES[name]), jnp.float32)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    assert set(abstract) == {"params"}
    assert param_count(abstract["params"]) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", list(PARAM_COUNTS))
def test_torch_twin_parameter_count(name):
    with torch.device("meta"):
        tm = torch_zoo.build(name)
    assert sum(p.numel() for p in tm.parameters()) == PARAM_COUNTS[name]


def _randomize_norms_and_layer_scale(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Non-trivial LayerNorm affines and ``layer_scale`` (the twin's init has (1, 0) and 1e-6)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)
            if isinstance(m, twins.CNBlock):
                m.layer_scale.copy_(torch.rand(m.layer_scale.shape, generator=generator) + 0.5)


def check_convnext_parity(name: str, shape: tuple[int, int, int], batch: int, path: str, tol: float = 1e-4,
                          seed: int = 0) -> None:
    """:func:`tests.parity.check_model_parity` for ConvNeXt (no BatchNorm): the twin's LayerNorm affines and
    ``layer_scale`` are randomised first; eval logits, then train-mode logits with stochastic depth off."""
    torch.manual_seed(seed)
    tm = torch_zoo.build(name, stochastic_depth_prob=0.0)
    _randomize_norms_and_layer_scale(tm, torch.Generator().manual_seed(seed + 1))
    model = models.create(name, stochastic_depth_prob=0.0)
    variables = port_twin(model, tm, shape)
    assert set(variables) == {"params"}
    x = np.random.RandomState(seed).randn(batch, *shape).astype(np.float32)
    label = f"{name} {shape[0]}x{shape[1]} {path}"
    for train in (False, True):
        tm.train(train)
        with torch.no_grad():
            want = tm(nchw(x)).numpy()
        got = model.apply(variables, x, train=train)
        assert got.shape == want.shape == (batch, 1000)
        assert np.std(want) > 0.1  # the logits carry signal at this tolerance
        assert_parity(f"{label} {'train' if train else 'eval'} logits", got, want, tol)


def test_parity_tiny_224_xla(monkeypatch):
    use_path(monkeypatch, "xla")
    check_convnext_parity("convnext_tiny", (224, 224, 3), 2, "xla")


def test_parity_tiny_odd_size(path):
    # 97 -> 24 (stem, floor) -> 12 -> 6 -> 3: every k2 s2 downsampling floors an odd or even size.
    check_convnext_parity("convnext_tiny", (97, 97, 3), 2, path)


@pytest.mark.slow
@pytest.mark.parametrize("name, shape", [("convnext_small", (64, 64, 3)), ("convnext_base", (96, 80, 3)),
                                         ("convnext_large", (64, 64, 3))])
def test_parity_slow(name, shape):
    check_convnext_parity(name, shape, 2, "xla")


def test_channel_layer_norm_matches_torch():
    rng = np.random.RandomState(0)
    x = (rng.randn(2, 5, 7, 12) * 3 + 1).astype(np.float32)
    ln = torch.nn.LayerNorm(12, eps=1e-6)
    ln2d = twins.LayerNorm2d(12, eps=1e-6)
    with torch.no_grad():
        for m in (ln, ln2d):
            m.weight.copy_(torch.from_numpy(rng.rand(12).astype(np.float32) + 0.5))
            m.bias.copy_(torch.from_numpy(rng.randn(12).astype(np.float32)))
    for m, want in ((ln, ln(torch.from_numpy(x)).detach().numpy()), (ln2d, nhwc(ln2d(nchw(x))))):
        params = {"params": {"scale": m.weight.detach().numpy(), "bias": m.bias.detach().numpy()}}
        assert_parity("convnext ChannelLayerNorm", ChannelLayerNorm(1e-6).apply(params, x), want, 1e-5)


def _block_rates(model: nn.Module, shape: tuple[int, int, int]) -> list[float]:
    rates = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, CNBlock) and context.method_name == "__call__":
            rates.append(context.module.stochastic_depth_prob)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)), train=False))
    return rates


@pytest.mark.parametrize("name", ["convnext_tiny", "convnext_large"])
def test_stochastic_depth_schedule_matches_torch(name):
    with torch.device("meta"):
        tm = torch_zoo.build(name)
    want = [m.stochastic_depth.p for m in tm.modules() if isinstance(m, twins.CNBlock)]
    got = _block_rates(models.create(name), (32, 32, 3))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert got[0] == 0.0 and got[-1] == pytest.approx(DEFAULT_SD_PROB[name])


def _check_torchvision_init(params, dim: int, layer_scale: float) -> None:
    """torchvision's init of a CNBlock: layer_scale constant, LayerNorm (1, 0), zero biases, trunc_normal(0.02)."""
    np.testing.assert_array_equal(params["layer_scale"], np.full((dim, 1, 1), layer_scale, np.float32))
    np.testing.assert_array_equal(params["block.2"]["scale"], np.ones(dim, np.float32))
    for name in ("block.0", "block.2", "block.3", "block.5"):
        assert not np.any(params[name]["bias"]), name
    kernels = np.concatenate([np.ravel(params[name]["kernel"]) for name in ("block.0", "block.3", "block.5")])
    assert kernels.size == 49 * dim + 8 * dim * dim
    assert abs(kernels.std() - 0.02) < 0.002 and abs(kernels.mean()) < 0.002


def test_cnblock_init_and_stochastic_depth_statistics():
    dim, batch, rate = 16, 4000, 0.3
    block = CNBlock(dim, layer_scale_init=100.0, stochastic_depth_prob=rate)
    # A small input keeps `out - x` exact enough to read the branch back (LayerNorm rescales it anyway).
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, 3, 3, dim)) * 1e-2
    variables = jax.jit(block.init)(jax.random.PRNGKey(0), x)  # one compile instead of one per initialiser
    _check_torchvision_init(variables["params"], dim, 100.0)
    branch = np.asarray(block.apply(variables, x, train=False) - x).reshape(batch, -1)
    out = block.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    residual = np.asarray(out - x).reshape(batch, -1)
    assert np.abs(branch).mean() > 1e-2
    kept = np.all(np.isclose(residual, branch / (1.0 - rate), rtol=1e-4, atol=1e-6), axis=1)
    dropped = np.all(np.abs(residual) < 1e-6, axis=1)
    assert np.all(kept | dropped)  # a whole sample's branch is kept (scaled by 1 / (1 - p)) or dropped
    sigma = np.sqrt(rate * (1 - rate) / batch)
    assert abs(kept.mean() - (1.0 - rate)) < 5 * sigma
    # Another key draws another mask; with rate 0, train mode is eval mode.
    out2 = block.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(3)})
    assert not np.allclose(out, out2)
    off = CNBlock(dim, layer_scale_init=100.0, stochastic_depth_prob=0.0)
    np.testing.assert_allclose(off.apply(variables, x, train=True), block.apply(variables, x), rtol=0, atol=0)


def test_twin_stochastic_depth_statistics():
    torch.manual_seed(0)
    sd = twins.StochasticDepth(0.25).train()
    out = sd(torch.ones(4000, 2, 3, 3))
    per_sample = out[:, 0, 0, 0].numpy()
    assert np.all((per_sample == 0.0) | np.isclose(per_sample, 1 / 0.75))
    assert abs((per_sample > 0).mean() - 0.75) < 5 * np.sqrt(0.25 * 0.75 / 4000)


def test_too_small_input_is_a_one_line_error():
    model = ConvNeXt((8, 16, 16, 16), (1, 1, 1, 1), num_classes=3)
    with pytest.raises(UsageError, match=r"at least 32x32") as err:
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 31, 40, 3))))
    assert "\n" not in str(err.value)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 33, 47, 3))), abstract)
    assert out.shape == (2, 3)
