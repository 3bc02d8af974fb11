"""Building blocks vs torch on identical weights (fp32, max |Δ| <= 1e-5 unless said), on both paths: the plain XLA
path (``CNNJAX_CPU_BACKEND=0``: what GPUs and TPUs run) and the CPU backend. The switch is read when a function is
traced, so each test jits a fresh function after setting it; chex jit / no-jit / pmap variants."""

from __future__ import annotations

import dataclasses
import os
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cnnjax import layers
from cnnjax.cpu import onednn
from cnnjax.errors import UsageError
from experiments.bench import torch_twins as ref
from tests.onednn_marks import needs_onednn
from tests.parity import assert_parity, nchw, nhwc, variables_of

TOL = 1e-5
rng = np.random.RandomState(0)


def rand(*shape):
    return rng.randn(*shape).astype(np.float32)


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def available_paths() -> list[str]:
    built = onednn.built() is not None and onednn.load().available
    return ["xla", "cpu"] if built else ["xla"]


def on_path(path: str):
    """``CNNJAX_CPU_BACKEND`` for ``path`` within a block (chex.TestCase methods take no fixtures)."""
    return mock.patch.dict(os.environ, {"CNNJAX_CPU_BACKEND": "1" if path == "cpu" else "0"})


def torch_grads_hwio(tconv):
    """A torch conv's parameter gradients as the Flax tree (``kernel`` HWIO, ``bias``)."""
    grads = {"kernel": tconv.weight.grad.numpy().transpose(2, 3, 1, 0)}
    if tconv.bias is not None:
        grads["bias"] = tconv.bias.grad.numpy()
    return grads


CONV_CASES = [
    # (c_in, c_out, kernel, stride, padding, dilation, groups, bias, hw)
    (3, 8, 3, 1, 1, 1, 1, True, (32, 32)),
    (3, 8, 3, 1, 0, 1, 1, True, (9, 11)),
    (4, 6, (3, 5), (2, 1), (1, 2), 1, 1, False, (15, 16)),
    (4, 8, 3, 2, 1, 2, 1, True, (17, 17)),
    (8, 8, 3, 1, 1, 1, 8, False, (10, 10)),  # depthwise
    (6, 9, 1, 2, 0, 1, 3, True, (8, 8)),
    (3, 5, 7, 2, 3, 1, 1, False, (23, 20)),
    (1, 16, 3, 1, 1, 1, 1, True, (28, 28)),  # greyscale: the shifted sum on the CPU backend
]


@pytest.mark.parametrize("c_in,c_out,k,s,p,d,g,bias,hw", CONV_CASES)
def test_conv_matches_torch_values_and_gradients(path, c_in, c_out, k, s, p, d, g, bias, hw):
    torch.manual_seed(0)
    tconv = torch.nn.Conv2d(c_in, c_out, k, s, p, d, g, bias)
    conv = layers.Conv(c_out, k, s, p, d, g, bias)
    variables = {"params": variables_of(torch.nn.ModuleDict({"c": tconv}))["params"]["c"]}
    x = rand(2, *hw, c_in)
    xt = nchw(x).requires_grad_(True)
    yt = tconv(xt)
    weight = rand(*nhwc(yt).shape)
    (yt * nchw(weight)).sum().backward()
    y, (g_params, g_x) = jax.jit(lambda v, x: (conv.apply(v, x), jax.grad(
        lambda v, x: jnp.sum(conv.apply(v, x) * weight), (0, 1))(v, x)))(variables, x)
    assert_parity(f"Conv ({path})", y, nhwc(yt), TOL)
    assert_parity(f"Conv input gradient ({path})", g_x, nhwc(xt.grad), 1e-4)
    want = torch_grads_hwio(tconv)
    assert_parity(f"Conv parameter gradients ({path})", g_params["params"], want,
                  2e-5 * max(1.0, float(np.abs(want["kernel"]).max())))
    # Flax's own init builds the same tree as the ported torch weights.
    chex.assert_trees_all_equal_shapes(jax.eval_shape(conv.init, jax.random.PRNGKey(0), x), variables)


@pytest.mark.parametrize("mode,torch_mode", [("SAME", "same"), ("VALID", "valid"), ("same", "same")])
def test_conv_same_valid_match_torch_at_stride_1(mode, torch_mode):
    torch.manual_seed(0)
    tconv = torch.nn.Conv2d(3, 4, 3, padding=torch_mode)
    variables = {"params": variables_of(torch.nn.ModuleDict({"c": tconv}))["params"]["c"]}
    x = rand(1, 7, 9, 3)
    assert_parity("Conv SAME/VALID", layers.Conv(4, 3, padding=mode).apply(variables, x),
                  nhwc(tconv(nchw(x))), TOL)


def test_conv_bad_arguments_fail_clearly():
    x = jnp.zeros((1, 8, 8, 3))

    def init(conv, x=x):  # traced only: the errors come from shapes
        return jax.eval_shape(conv.init, jax.random.PRNGKey(0), x)

    with pytest.raises(UsageError, match="padding must be 'SAME', 'VALID', an int or"):
        init(layers.Conv(4, padding="FULL"))
    with pytest.raises(UsageError, match="padding must be non-negative"):
        init(layers.Conv(4, padding=-1))
    with pytest.raises(UsageError, match=r"groups=2 must divide both input channels \(3\)"):
        init(layers.Conv(4, groups=2))
    with pytest.raises(UsageError, match=r"expects an \[N, H, W, C\] array"):
        init(layers.Conv(4), jnp.zeros((8, 8, 3)))
    with pytest.raises(UsageError, match=r"stride must be an int or a pair of ints"):
        init(layers.Conv(4, stride=(1, 2, 3)))


def test_conv_has_no_cpu_layout_fields():
    """The same module, and the same parameters, on every platform: no impl or channel padding fields."""
    fields = {f.name for f in dataclasses.fields(layers.Conv)}
    assert not fields & {"impl", "pad_features", "in_features"}
    assert {"features", "kernel_size", "stride", "padding", "dilation", "groups"} <= fields


def test_conv_default_init_is_torch_bound():
    conv = layers.Conv(64, 3)
    params = jax.jit(conv.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 32)))["params"]
    bound = 1 / np.sqrt(3 * 3 * 32)
    for leaf in (params["kernel"], params["bias"]):
        assert np.abs(leaf).max() <= bound
        assert np.abs(leaf).max() > 0.9 * bound  # uniform, fills the interval


def test_dense_matches_torch_linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 5)
    variables = {"params": variables_of(torch.nn.ModuleDict({"l": lin}))["params"]["l"]}
    x = rand(3, 12)
    assert_parity("Dense", layers.Dense(5).apply(variables, x), lin(torch.from_numpy(x)).detach().numpy(), TOL)


POOL_CASES = [
    # (window, stride, padding, hw)
    (2, None, 0, (8, 8)),
    (3, 2, 1, (9, 10)),
    (3, 1, 1, (5, 5)),
    ((2, 3), (1, 2), (1, 1), (7, 8)),
    (3, 2, 0, (7, 7)),
]


@pytest.mark.parametrize("window,stride,padding,hw", POOL_CASES)
def test_max_pool_matches_torch(path, window, stride, padding, hw):
    x = rand(2, *hw, 3)
    got = jax.jit(lambda v: layers.max_pool(v, window, stride, padding))(x)
    want = nhwc(F.max_pool2d(nchw(x), window, stride, padding))
    assert_parity(f"max_pool ({path})", got, want, 0.0)


MAX_POOL_GRADIENT_CASES = [
    # (window, stride, padding, hw, ties): non-overlapping tiles first (floor mode drops the rest) ...
    (2, None, 0, (8, 8), False), (2, None, 0, (8, 8), True), (2, None, 0, (31, 31), False),
    (3, None, 0, (3, 3), True), ((2, 3), None, 0, (7, 9), True),
    # ... then overlapping windows (ResNet's stem pool: 3 / 2 / 1), padding, and a stride above the window.
    (3, 2, 1, (9, 10), True), (3, 2, 1, (16, 16), False), (3, 1, 1, (5, 5), True),
    ((2, 3), (1, 2), (1, 1), (7, 8), True), ((2, 3), (3, 2), (1, 1), (13, 12), True), (5, (2, 3), 2, (13, 12), True),
]


# Ties on the CPU backend only: which tied maximum the plain path's reduce_window gradient picks is the platform's.
MAX_POOL_GRADIENT_PARAMS = [pytest.param(path, *case, marks=needs_onednn if path == "cpu" else ())
                            for case in MAX_POOL_GRADIENT_CASES for path in ("xla", "cpu")
                            if path == "cpu" or not case[-1]]


@pytest.mark.parametrize("path,window,stride,padding,hw,ties", MAX_POOL_GRADIENT_PARAMS, indirect=["path"])
def test_max_pool_gradient_matches_torch_with_floor_mode_and_ties_on_the_cpu(path, window, stride, padding, hw,
                                                                              ties):
    """Each window's gradient goes to its maximum and the shares of overlapping windows add up; floor mode drops
    trailing rows / columns. With ties, torch picks the first maximum in row-major order: so does the CPU backend;
    the plain path's ``reduce_window`` gradient may pick another on an accelerator, so ties are tested on the CPU
    backend only."""
    x = rand(2, *hw, 3)
    if ties:  # quantised values and a block of zeros (as after ReLU) give many equal maxima
        x = np.round(x).clip(0, None)
        x[:, :4, :4] = 0.0
    xt = nchw(x).requires_grad_(True)
    yt = F.max_pool2d(xt, window, stride, padding)
    weight = rand(*nhwc(yt).shape)
    (yt * nchw(weight)).sum().backward()
    def run(v):
        y, vjp = jax.vjp(lambda v: layers.max_pool(v, window, stride, padding), v)
        return y, vjp(weight)[0]

    y, g = jax.jit(run)(x)
    assert_parity(f"max_pool ({path})", y, nhwc(yt), 0.0)
    # Exact where no two windows share an input; otherwise the shares are added in another order than torch's
    # (a gradient sent to the wrong position would be off by O(1)).
    (kh, kw), (sh, sw) = pair(window), pair(stride or window)
    tol = 0.0 if sh >= kh and sw >= kw else TOL
    assert_parity(f"max_pool gradient ({path}, floor mode{', ties' if ties else ''})", g, nhwc(xt.grad), tol)


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("window,stride,padding,hw", POOL_CASES)
def test_avg_pool_matches_torch(window, stride, padding, hw, count_include_pad):
    """avg_pool has one implementation on every platform (``lax.reduce_window``)."""
    x = rand(2, *hw, 3)
    got = jax.jit(lambda v: layers.avg_pool(v, window, stride, padding, count_include_pad))(x)
    want = nhwc(F.avg_pool2d(nchw(x), window, stride, padding, count_include_pad=count_include_pad))
    assert_parity("avg_pool (count_include_pad both ways)", got, want, TOL)


@pytest.mark.parametrize("hw,out", [((7, 7), 7), ((9, 13), (7, 7)), ((1, 1), 7), ((14, 10), (3, 4))])
def test_adaptive_avg_pool_matches_torch(hw, out):
    x = rand(2, *hw, 3)
    want = nhwc(F.adaptive_avg_pool2d(nchw(x), out))
    assert_parity("adaptive_avg_pool", layers.adaptive_avg_pool(x, out), want, TOL)


def test_global_avg_pool_matches_torch():
    x = rand(2, 5, 6, 4)
    want = F.adaptive_avg_pool2d(nchw(x), 1).flatten(1).numpy()
    assert_parity("global_avg_pool", layers.global_avg_pool(x), want, TOL)


def test_pool_padding_over_half_window_is_rejected():
    for pool in (layers.max_pool, layers.avg_pool):
        with pytest.raises(UsageError, match=r"padding \(2, 2\) must be at most half the window \(2, 2\)"):
            pool(jnp.zeros((1, 4, 4, 1)), 2, 2, 2)


def test_max_pool_with_an_empty_output_has_torchs_shape():
    chex.assert_shape(layers.max_pool(jnp.ones((1, 2, 2, 3)), 3), (1, 0, 0, 3))


class TestJitVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_pools_jit_and_no_jit_agree_with_seed_001(self):
        x = jnp.array([[1, 3, 2, 1], [4, 2, 0, 1], [0, 1, 5, 2], [1, 2, 3, 0]], jnp.float32)[None, :, :, None]
        for path in available_paths():
            with on_path(path):
                mx = self.variant(lambda v: layers.max_pool(v, 2))(x)
                av = self.variant(lambda v: layers.avg_pool(v, 2))(x)
                g = self.variant(jax.grad(lambda v: jnp.sum(layers.max_pool(v, 2) * jnp.arange(1.0, 5.0)
                                                            .reshape(1, 2, 2, 1))))(x)
            chex.assert_shape(mx, (1, 2, 2, 1))
            np.testing.assert_array_equal(mx[0, :, :, 0], [[4, 2], [2, 5]])
            np.testing.assert_allclose(av[0, :, :, 0], [[2.5, 1.0], [1.0, 2.5]])
            want_g = np.zeros((4, 4))
            want_g[1, 0], want_g[0, 2], want_g[3, 1], want_g[2, 2] = 1, 2, 3, 4  # each to its window's maximum
            np.testing.assert_array_equal(g[0, :, :, 0], want_g)

    @chex.variants(with_jit=True, without_jit=True)
    def test_conv_apply_jit_and_no_jit(self):
        conv = layers.Conv(8, 3, padding=1)
        r = np.random.RandomState(1)
        x = r.randn(2, 6, 6, 3).astype(np.float32)
        variables = {"params": {"kernel": r.randn(3, 3, 3, 8).astype(np.float32) / 5,
                                "bias": r.randn(8).astype(np.float32)}}
        ys = []
        for path in available_paths():
            with on_path(path):
                ys.append(self.variant(lambda v, x: conv.apply(v, x))(variables, x))
        for y in ys:
            chex.assert_shape(y, (2, 6, 6, 8))
            chex.assert_tree_all_finite(y)
            chex.assert_trees_all_close(y, ys[0], atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    def test_cross_replica_batchnorm_equals_full_batch(self):
        """Statistics averaged over the mapped axis (vmap, or pmap over 4 devices): the full batch's output and
        running statistics on every replica, on both paths."""
        if self.variant.type == chex.ChexVariantType.WITH_PMAP and jax.device_count() < 4:
            self.skipTest("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=4, tests/conftest.py)")
        x = np.random.RandomState(7).randn(8, 3, 3, 4).astype(np.float32) * 2 + 0.5
        bn = layers.BatchNorm(axis_name="batch")
        variables = bn.init(jax.random.PRNGKey(0), x, train=False)
        full, full_upd = layers.BatchNorm().apply(variables, x, train=True, mutable=["batch_stats"])
        shards = x.reshape(4, 2, 3, 3, 4)
        for path in available_paths():
            with on_path(path):
                def replica(s):
                    return bn.apply(variables, s, train=True, mutable=["batch_stats"])

                if self.variant.type == chex.ChexVariantType.WITH_PMAP:
                    fn = self.variant(replica, axis_name="batch", n_devices=4, broadcast_args_to_devices=False,
                                      reduce_fn="identity")
                else:
                    fn = self.variant(jax.vmap(replica, axis_name="batch"))
                per, per_upd = fn(shards)
            assert_parity(f"BatchNorm cross-replica vs full batch ({path})", per.reshape(x.shape), full, TOL)
            for key in ("mean", "var"):
                for replica_stats in per_upd["batch_stats"][key]:
                    np.testing.assert_allclose(replica_stats, full_upd["batch_stats"][key], atol=TOL)
        # Without axis_name each shard normalises with its own statistics: different output.
        local = jax.vmap(lambda s: layers.BatchNorm().apply(variables, s, train=True,
                                                            mutable=["batch_stats"])[0])(shards)
        assert np.abs(np.asarray(local).reshape(x.shape) - np.asarray(full)).max() > 1e-3


def _bn_pair(features, momentum=0.1, two_d=True):
    tbn = (torch.nn.BatchNorm2d if two_d else torch.nn.BatchNorm1d)(features, momentum=momentum)
    ref.randomize_bn_stats(tbn, torch.Generator().manual_seed(3))
    return tbn, variables_of(torch.nn.ModuleDict({"b": tbn}))


def _sub(variables, key="b"):
    return {col: tree[key] for col, tree in variables.items()}


@pytest.mark.parametrize("two_d", [True, False])
def test_batchnorm_train_and_eval_match_torch(path, two_d):
    """Eval uses the running statistics; train normalises with the biased batch variance and updates the running
    variance with the unbiased one, as torch."""
    tbn, variables = _bn_pair(6, two_d=two_d)
    variables = _sub(variables)
    x = rand(4, 5, 5, 6) * 3 + 1 if two_d else rand(7, 6) * 3 + 1
    xt = nchw(x) if two_d else torch.from_numpy(x)
    bn = layers.BatchNorm()
    tbn.eval()
    assert_parity(f"BatchNorm eval ({path})", jax.jit(lambda v, x: bn.apply(v, x, train=False))(variables, x),
                  nhwc(tbn(xt)), TOL)
    tbn.train()
    want = nhwc(tbn(xt))
    got, updated = jax.jit(lambda v, x: bn.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    assert_parity(f"BatchNorm train output ({path})", got, want, TOL)
    want_stats = _sub(variables_of(torch.nn.ModuleDict({"b": tbn})))["batch_stats"]
    assert_parity(f"BatchNorm train running stats ({path})", updated["batch_stats"], want_stats, TOL)


def test_batchnorm_momentum_is_flax_convention(path):
    """Flax momentum 0.8 == torch momentum 0.2."""
    tbn, variables = _bn_pair(3, momentum=0.2)
    x = rand(8, 4, 4, 3)
    tbn.train()
    tbn(nchw(x))
    _, updated = jax.jit(lambda v, x: layers.BatchNorm(momentum=0.8).apply(v, x, train=True, mutable=["batch_stats"]))(
        _sub(variables), x)
    want = _sub(variables_of(torch.nn.ModuleDict({"b": tbn})))["batch_stats"]
    assert_parity(f"BatchNorm momentum convention ({path})", updated["batch_stats"], want, TOL)


def test_batchnorm_in_bfloat16_keeps_float32_statistics(path):
    x = jnp.asarray(rand(4, 5, 5, 6) * 3 + 1)
    bn = layers.BatchNorm()
    variables = jax.eval_shape(lambda: bn.init(jax.random.PRNGKey(0), x, train=False))
    variables = jax.tree.map(lambda s: jnp.full(s.shape, 0.5, s.dtype), variables)  # scale, bias, mean, var
    apply = jax.jit(lambda v, x: bn.apply(v, x, train=True, mutable=["batch_stats"]))
    (y16, upd16), (y32, upd32) = apply(variables, x.astype(jnp.bfloat16)), apply(variables, x)
    assert y16.dtype == jnp.bfloat16 and upd16["batch_stats"]["var"].dtype == jnp.float32
    chex.assert_trees_all_close(y16.astype(jnp.float32), y32, atol=0.05)  # bf16 rounding of y
    chex.assert_trees_all_close(upd16, upd32, rtol=2 ** -7)  # statistics of the rounded inputs


@pytest.mark.parametrize("two_d", [True, False])
def test_batchnorm_train_gradients_match_torch(path, two_d):
    """Autodiff (plain path) and the closed-form backward (CPU backend) give torch's input, scale and bias
    gradients."""
    tbn, variables = _bn_pair(5, two_d=two_d)
    variables = _sub(variables)
    x = rand(4, 6, 7, 5) * 2 - 1 if two_d else rand(9, 5) * 2 - 1
    g = rand(*x.shape)
    tbn.train()
    xt = (nchw(x) if two_d else torch.from_numpy(x)).requires_grad_(True)
    gt = nchw(g) if two_d else torch.from_numpy(g)
    (tbn(xt) * gt).sum().backward()

    def loss(params, x):
        y, _ = layers.BatchNorm().apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(y * g)

    g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], jnp.asarray(x))
    assert_parity(f"BatchNorm input gradient ({path})", g_x, nhwc(xt.grad) if two_d else xt.grad.numpy(), TOL)
    assert_parity(f"BatchNorm scale gradient ({path})", g_params["scale"], tbn.weight.grad.numpy(), 1e-4)
    assert_parity(f"BatchNorm bias gradient ({path})", g_params["bias"], tbn.bias.grad.numpy(), 1e-4)


def test_dropout_semantics():
    drop = layers.Dropout(0.25)
    x = jnp.ones((1000, 20))
    np.testing.assert_array_equal(drop.apply({}, x, train=False), x)
    train = jax.jit(lambda key: drop.apply({}, x, train=True, rngs={"dropout": key}))
    y = train(jax.random.PRNGKey(0))
    kept = np.asarray(y) != 0
    assert abs(kept.mean() - 0.75) < 0.01
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75, rtol=1e-6)
    np.testing.assert_array_equal(y, train(jax.random.PRNGKey(0)))  # randomness only through the explicit key
    assert np.any(np.asarray(train(jax.random.PRNGKey(1))) != np.asarray(y))
    with pytest.raises(UsageError, match=r"rate must be in \[0, 1\)"):
        layers.Dropout(1.0).apply({}, x, train=True, rngs={"dropout": jax.random.PRNGKey(0)})


class TorchConvBN(torch.nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv = torch.nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn = torch.nn.BatchNorm2d(c_out)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


BLOCK_CASES = [
    ("ConvBN", lambda: TorchConvBN(4, 8, 2), lambda: layers.ConvBN(8, 3, 2, 1), 4),
    ("BasicBlock identity", lambda: ref.make_block(ref.BasicBlock, 8, 8, 1), lambda: layers.BasicBlock(8, 1), 8),
    ("BasicBlock projection", lambda: ref.make_block(ref.BasicBlock, 8, 16, 2), lambda: layers.BasicBlock(16, 2), 8),
    ("Bottleneck identity", lambda: ref.make_block(ref.Bottleneck, 32, 8, 1), lambda: layers.Bottleneck(8, 1), 32),
    ("Bottleneck projection", lambda: ref.make_block(ref.Bottleneck, 16, 8, 2), lambda: layers.Bottleneck(8, 2), 16),
]


@pytest.mark.parametrize("label,make_torch,make_jax,c_in", BLOCK_CASES, ids=[c[0] for c in BLOCK_CASES])
def test_blocks_match_torch_train_and_eval(path, label, make_torch, make_jax, c_in):
    torch.manual_seed(0)
    tblock = make_torch()
    ref.randomize_bn_stats(tblock, torch.Generator().manual_seed(2))
    variables = variables_of(tblock)
    block = make_jax()
    x = rand(4, 9, 9, c_in)
    chex.assert_trees_all_equal_shapes(jax.eval_shape(lambda x: block.init(jax.random.PRNGKey(0), x, train=False), x),
                                       variables)
    tblock.eval()
    with torch.no_grad():
        got = jax.jit(lambda v, x: block.apply(v, x, train=False))(variables, x)
        assert_parity(f"{label} eval ({path})", got, nhwc(tblock(nchw(x))), TOL)
    tblock.train()
    with torch.no_grad():
        want = nhwc(tblock(nchw(x)))
    got, updated = jax.jit(lambda v, x: block.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    assert_parity(f"{label} train ({path})", got, want, TOL)
    assert_parity(f"{label} train running stats ({path})", updated["batch_stats"],
                  variables_of(tblock)["batch_stats"], TOL)


def test_zero_init_last_bn_makes_block_start_as_relu_of_shortcut():
    x = jnp.asarray(rand(2, 6, 6, 8))
    block = layers.BasicBlock(8, zero_init_last_bn=True)
    variables = jax.jit(lambda x: block.init(jax.random.PRNGKey(0), x, train=False))(x)
    np.testing.assert_array_equal(variables["params"]["bn2"]["scale"], 0)
    np.testing.assert_allclose(jax.jit(lambda v, x: block.apply(v, x, train=False))(variables, x), jax.nn.relu(x),
                               atol=1e-6)
