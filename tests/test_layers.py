"""Building blocks vs torch on identical weights (fp32, max |Δ| <= 1e-5), chex jit/no-jit variants."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cnnjax import layers
from cnnjax.errors import UsageError
from cnnjax.native import onednn
from experiments import benchlib
from experiments.bench import torch_twins as ref
from tests.onednn_marks import ONEDNN, needs_onednn, needs_onednn_bf16, pretend_no_bf16
from tests.parity import assert_parity, nchw, nhwc, variables_of

TOL = 1e-5
rng = np.random.RandomState(0)


def rand(*shape):
    return rng.randn(*shape).astype(np.float32)


CONV_CASES = [
    # (c_in, c_out, kernel, stride, padding, dilation, groups, bias, hw)
    (3, 8, 3, 1, 1, 1, 1, True, (32, 32)),
    (3, 8, 3, 1, 0, 1, 1, True, (9, 11)),
    (4, 6, (3, 5), (2, 1), (1, 2), 1, 1, False, (15, 16)),
    (4, 8, 3, 2, 1, 2, 1, True, (17, 17)),
    (8, 8, 3, 1, 1, 1, 8, False, (10, 10)),  # depthwise
    (6, 9, 1, 2, 0, 1, 3, True, (8, 8)),
    (3, 5, 7, 2, 3, 1, 1, False, (23, 20)),
]


@pytest.mark.parametrize("c_in,c_out,k,s,p,d,g,bias,hw", CONV_CASES)
def test_conv_matches_torch(c_in, c_out, k, s, p, d, g, bias, hw):
    torch.manual_seed(0)
    tconv = torch.nn.Conv2d(c_in, c_out, k, s, p, d, g, bias)
    conv = layers.Conv(c_out, k, s, p, d, g, bias)
    variables = {"params": variables_of(torch.nn.ModuleDict({"c": tconv}))["params"]["c"]}
    x = rand(2, *hw, c_in)
    want = nhwc(tconv(nchw(x)))
    assert_parity("Conv (padding/stride/dilation/groups/bias)", conv.apply(variables, x), want, TOL)
    # Flax's own init builds the same tree as the ported torch weights.
    built = conv.init(jax.random.PRNGKey(0), x)
    chex.assert_trees_all_equal_shapes(built, variables)


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
    with pytest.raises(ValueError, match="padding must be 'SAME', 'VALID', an int or"):
        layers.Conv(4, padding="FULL").init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="groups=2 must divide both input channels"):
        layers.Conv(4, groups=2).init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match=r"expects an \[N, H, W, C\] array"):
        layers.Conv(4).init(jax.random.PRNGKey(0), jnp.zeros((8, 8, 3)))


@pytest.mark.parametrize("c_in,pad_in,pad_out", [(1, 0, 2), (6, 2, 0), (6, 2, 3)])
def test_conv_channel_padding_keeps_torch_numbers_and_gradients(c_in, pad_in, pad_out):
    """pad_features appends exactly-zero output channels; in_features ignores zero input channels
    after the real ones; the parameters, outputs and gradients are those of the plain torch conv."""
    torch.manual_seed(0)
    tconv = torch.nn.Conv2d(c_in, 6, 5)
    variables = {"params": variables_of(torch.nn.ModuleDict({"c": tconv}))["params"]["c"]}
    x = rand(2, 12, 12, c_in)
    x_padded = np.concatenate([x, np.zeros((*x.shape[:3], pad_in), np.float32)], axis=-1)
    conv = layers.Conv(6, 5, pad_features=pad_out, in_features=c_in if pad_in else None)
    chex.assert_trees_all_equal_shapes(conv.init(jax.random.PRNGKey(0), x_padded), variables)
    y = conv.apply(variables, x_padded)
    chex.assert_shape(y, (2, 8, 8, 6 + pad_out))
    assert_parity("Conv with channel padding", y[..., :6], nhwc(tconv(nchw(x))), TOL)
    np.testing.assert_array_equal(y[..., 6:], 0.0)
    weights = jnp.arange(6.0)  # a loss that weighs the channels differently
    grads = [jax.grad(lambda v, c=c, x=x: (c.apply(v, x)[..., :6] ** 2 * weights).sum())(variables)
             for c, x in ((conv, x_padded), (layers.Conv(6, 5), x))]
    chex.assert_trees_all_close(*grads, atol=1e-4, rtol=1e-5)


def test_conv_channel_padding_bad_arguments_fail_clearly():
    x = jnp.zeros((1, 8, 8, 6))
    with pytest.raises(ValueError, match="in_features=8 must be in 1..6"):
        layers.Conv(4, in_features=8).init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="pad_features must be >= 0"):
        layers.Conv(4, pad_features=-1).init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="supports groups=1 only"):
        layers.Conv(4, groups=2, pad_features=2).init(jax.random.PRNGKey(0), x)


def test_conv_default_init_is_torch_bound():
    conv = layers.Conv(64, 3)
    params = conv.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 32)))["params"]
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


@pytest.fixture(params=["views", "onednn"])
def max_pool_path(request, monkeypatch):
    """Each max-pool test runs on both CPU paths: the strided views (``_window_max_pool``) and oneDNN's."""
    if request.param == "onednn" and not ONEDNN:
        pytest.skip("oneDNN kernels not built here")
    monkeypatch.setattr(layers, "USE_ONEDNN_POOL_ON_CPU", request.param == "onednn")
    monkeypatch.setattr(layers, "ONEDNN_POOL_NEEDS_AVX512", False)  # oneDNN's path on AVX2 CPUs too
    jax.clear_caches()  # the flag is read when a pool is traced
    yield request.param
    jax.clear_caches()


@pytest.mark.parametrize("window,stride,padding,hw", POOL_CASES)
def test_max_pool_matches_torch(max_pool_path, window, stride, padding, hw):
    x = rand(2, *hw, 3)
    got = jax.jit(lambda v: layers.max_pool(v, window, stride, padding))(x)
    want = nhwc(F.max_pool2d(nchw(x), window, stride, padding))
    assert_parity("max_pool", got, want, 0.0)


MAX_POOL_GRADIENT_CASES = [
    # (window, stride, padding, hw, ties): non-overlapping tiles first (floor mode drops the rest) ...
    (2, None, 0, (8, 8), False), (2, None, 0, (8, 8), True), (2, None, 0, (31, 31), False),
    (3, None, 0, (3, 3), True), ((2, 3), None, 0, (7, 9), True),
    # ... then overlapping windows (ResNet's stem pool: 3 / 2 / 1), padding, and a stride above the window.
    (3, 2, 1, (9, 10), True), (3, 2, 1, (16, 16), False), (3, 1, 1, (5, 5), True),
    ((2, 3), (1, 2), (1, 1), (7, 8), True), ((2, 3), (3, 2), (1, 1), (13, 12), True), (5, (2, 3), 2, (13, 12), True),
]


@pytest.mark.parametrize("window,stride,padding,hw,ties", MAX_POOL_GRADIENT_CASES)
def test_max_pool_gradient_matches_torch_with_ties_and_floor_mode(max_pool_path, window, stride, padding, hw, ties):
    """Both paths send each window's gradient to its first maximum (torch's choice) and add the shares of
    overlapping windows; floor mode drops trailing rows / columns."""
    x = rand(2, *hw, 3)
    if ties:  # quantised values and a block of zeros (as after ReLU) give many equal maxima
        x = np.round(x).clip(0, None)
        x[:, :4, :4] = 0.0
    xt = nchw(x).requires_grad_(True)
    yt = F.max_pool2d(xt, window, stride, padding)
    weight = rand(*nhwc(yt).shape)
    (yt * nchw(weight)).sum().backward()
    y, vjp = jax.vjp(lambda v: layers.max_pool(v, window, stride, padding), jnp.asarray(x))
    assert_parity("max_pool", y, nhwc(yt), 0.0)
    # Exact where no two windows share an input; otherwise the shares are added in another order than torch's
    # (a gradient sent to the wrong position would be off by O(1)).
    (kh, kw), (sh, sw) = layers._pair(window, ""), layers._pair(stride or window, "")
    tol = 0.0 if sh >= kh and sw >= kw else TOL
    assert_parity("max_pool gradient (ties, floor mode)", vjp(jnp.asarray(weight))[0], nhwc(xt.grad), tol)


@pytest.mark.parametrize("max_pool_path", ["views"], indirect=True)
@pytest.mark.parametrize("window,hw", [(2, (8, 8)), (2, (31, 30)), (3, (7, 7)), ((2, 3), (7, 9))])
def test_tiled_max_pool_broadcast_backward_equals_the_stacked_phases(monkeypatch, max_pool_path, window, hw):
    """Non-overlapping windows: the broadcast backward (no stack in its jaxpr) gives exactly the
    general backward's gradient, ties and trailing rows / columns included, jitted or not."""
    x = np.round(rand(2, *hw, 4)).clip(0, None)  # ties, as after ReLU
    weight = jnp.asarray(rand(2, hw[0] // layers._pair(window, "")[0], hw[1] // layers._pair(window, "")[1], 4))
    grad = jax.grad(lambda v: (layers.max_pool(v, window) * weight).sum())
    broadcast = [grad(jnp.asarray(x)), jax.jit(grad)(jnp.asarray(x))]
    def stacks() -> bool:  # jnp.stack is a `stack` primitive here, a concatenation in XLA
        text = str(jax.make_jaxpr(grad)(jnp.asarray(x)))
        return "stack[" in text or "concatenate[" in text

    assert not stacks()
    monkeypatch.setattr(layers, "TILED_POOL_BROADCAST_BACKWARD", False)
    jax.clear_caches()  # the flag is read when the backward is traced
    assert stacks()
    stacked = grad(jnp.asarray(x))
    assert float(jnp.abs(stacked).sum()) > 0
    for got in broadcast:
        chex.assert_trees_all_equal(got, stacked)


@pytest.mark.parametrize("window,stride,padding,hw", [(2, 2, 0, (10, 10)), (3, 2, 1, (10, 9)),
                                                     ((3, 2), (1, 3), (1, 0), (8, 11))])
@pytest.mark.parametrize("max_pool_path", ["views"], indirect=True)
def test_strided_view_max_pool_equals_reduce_window_path(max_pool_path, window, stride, padding, hw):
    """Values and gradients (ties included) equal XLA's ``reduce_window`` and its autodiff, jitted or not."""
    x = jnp.asarray(np.round(rand(2, *hw, 4)))  # ties
    (kh, kw), (sh, sw), (ph, pw) = (layers._pair(v, "") for v in (window, stride, padding))

    def window_loss(v):
        y = jax.lax.reduce_window(v, -jnp.inf, jax.lax.max, (1, kh, kw, 1), (1, sh, sw, 1),
                                  ((0, 0), (ph, ph), (pw, pw), (0, 0)))
        return (y ** 2).sum()

    views = jax.value_and_grad(lambda v: (layers.max_pool(v, window, stride, padding) ** 2).sum())
    want = jax.value_and_grad(window_loss)(x)
    chex.assert_trees_all_equal(jax.jit(views)(x), want)
    chex.assert_trees_all_equal(views(x), want)


ONEDNN_POOL_CASES = [
    # (window, stride, padding, hw): ResNet's stem pool at 32x32 input, tiles with floor-mode leftovers (fast_cnn's
    # 15 -> 7), overlapping windows needing padding after the input, asymmetric windows and strides.
    (3, 2, 1, (16, 16)), (2, 2, 0, (15, 15)), (3, 2, 1, (9, 11)), (3, 1, 1, (7, 7)), ((3, 2), (2, 1), (1, 0), (10, 9)),
    (5, (2, 3), 2, (13, 12)),
]


@needs_onednn
@pytest.mark.parametrize("window,stride,padding,hw", ONEDNN_POOL_CASES)
def test_onednn_max_pool_equals_the_strided_views(window, stride, padding, hw):
    """oneDNN's pool gives the strided views' values exactly and their gradient (ties included) exactly for
    tiles and within float rounding where windows overlap; rows and columns floor mode drops get exactly zero,
    jitted or not (the strided views match torch, above)."""
    x = np.round(rand(4, *hw, 24) * 2).clip(0, None)  # ties, as after ReLU
    (kh, kw), (sh, sw), (ph, pw) = (layers._pair(v, "") for v in (window, stride or window, padding))
    weight = jnp.asarray(rand(*layers.max_pool(jnp.asarray(x), window, stride, padding).shape))

    def loss(v, fn):
        return (fn(v) * weight).sum()

    views = jax.value_and_grad(loss)(jnp.asarray(x), lambda v: layers._window_max_pool(v, (kh, kw), (sh, sw), (ph, pw)))
    pool = lambda v: layers.onednn_max_pool(v, (kh, kw), (sh, sw), (ph, pw))  # noqa: E731
    chex.assert_trees_all_equal(pool(jnp.asarray(x)), jax.jit(pool)(jnp.asarray(x)),
                                layers._window_max_pool(jnp.asarray(x), (kh, kw), (sh, sw), (ph, pw)))
    for got in (jax.value_and_grad(loss)(jnp.asarray(x), pool),
                jax.jit(jax.value_and_grad(lambda v: loss(v, pool)))(jnp.asarray(x))):
        # the loss sums terms of both signs, in another order where XLA fuses the pool into the sum
        chex.assert_trees_all_close(got[0], views[0], rtol=1e-6, atol=1e-4)
        # overlapping windows add up to kh * kw terms per input in another order: a few float32 ulps (1.4e-6 at
        # 5.76 once, under an AddressSanitizer build), so relative as well as absolute
        tol = 0.0 if sh >= kh and sw >= kw else 1e-6
        chex.assert_trees_all_close(got[1], views[1], atol=tol, rtol=tol)
        ho, wo = weight.shape[1:3]
        reach_h, reach_w = (ho - 1) * sh + kh - ph, (wo - 1) * sw + kw - pw
        assert float(jnp.abs(got[1][:, reach_h:]).sum() + jnp.abs(got[1][:, :, reach_w:]).sum()) == 0.0


@needs_onednn_bf16
def test_onednn_max_pool_in_bfloat16_vmap_and_where_it_runs(monkeypatch):
    """bfloat16 values equal the views' exactly (a max rounds nothing), gradients within one bf16 rounding of
    their float32 sums; under ``vmap`` it equals a loop; ``max_pool`` calls the kernels (one forward, one backward)
    on the CPU in one process for float32 / bfloat16 only, not with the switch off."""
    x = jnp.asarray(rand(2, 16, 16, 8))
    pooled = lambda v: layers.onednn_max_pool(v, (3, 3), (2, 2), (1, 1))  # noqa: E731
    views = lambda v: layers._window_max_pool(v, (3, 3), (2, 2), (1, 1))  # noqa: E731
    xb = x.astype(jnp.bfloat16)
    chex.assert_trees_all_equal(pooled(xb), views(xb))
    gb = jax.grad(lambda v: (pooled(v).astype(jnp.float32) ** 2).sum())(xb)
    g32 = jax.grad(lambda v: (views(v) ** 2).sum())(xb.astype(jnp.float32))
    chex.assert_trees_all_close(gb.astype(jnp.float32), g32, rtol=2 ** -7, atol=1e-6)
    batch = jnp.asarray(rand(3, 2, 9, 9, 4))
    chex.assert_trees_all_equal(jax.vmap(pooled)(batch), jnp.stack([pooled(v) for v in batch]))

    def calls(v):
        text = str(jax.make_jaxpr(jax.grad(lambda v: layers.max_pool(v, 3, 2, 1).astype(jnp.float32).sum()))(v))
        return (text.count(onednn.POOL_FORWARD_TARGET), text.count(onednn.POOL_BACKWARD_TARGET))

    assert calls(x) == (1, 1) and calls(xb) == (1, 1)
    assert calls(x.astype(jnp.float16)) == (0, 0)
    with pytest.raises(UsageError, match="^onednn_max_pool takes float32 or bfloat16; got float16"):
        pooled(x.astype(jnp.float16))
    with monkeypatch.context() as m:
        m.setattr(jax, "process_count", lambda: 2)
        assert calls(x) == (0, 0)
    monkeypatch.setattr(layers, "USE_ONEDNN_POOL_ON_CPU", False)
    assert calls(x) == (0, 0)


@needs_onednn
def test_bfloat16_max_pools_stay_views_where_onednn_has_no_bf16(monkeypatch):
    """Without AVX-512 (no oneDNN bfloat16 primitives) max_pool keeps the strided views, which beat oneDNN's AVX2
    pool there; with that rule off, still the views for bf16 but oneDNN for float32; onednn_max_pool in bf16 says
    why in one line."""
    pretend_no_bf16(monkeypatch)
    x = jnp.asarray(rand(2, 9, 9, 4))
    calls = lambda v: str(jax.make_jaxpr(lambda v: layers.max_pool(v, 3, 2, 1))(v)).count(  # noqa: E731
        onednn.POOL_FORWARD_TARGET)
    assert calls(x) == 0 and calls(x.astype(jnp.bfloat16)) == 0
    monkeypatch.setattr(layers, "ONEDNN_POOL_NEEDS_AVX512", False)
    assert calls(x) == 1 and calls(x.astype(jnp.bfloat16)) == 0
    with pytest.raises(UsageError, match=r"^onednn_max_pool cannot run bfloat16 here: .*AVX-512"):
        layers.onednn_max_pool(x.astype(jnp.bfloat16), (3, 3), (2, 2), (1, 1))


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("window,stride,padding,hw", POOL_CASES)
def test_avg_pool_matches_torch(window, stride, padding, hw, count_include_pad):
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
    with pytest.raises(ValueError, match="at most half the window"):
        layers.max_pool(jnp.zeros((1, 4, 4, 1)), 2, 2, 2)


class TestJitVariants(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_pools_jit_and_no_jit_agree_with_seed_001(self):
        x = jnp.array([[1, 3, 2, 1], [4, 2, 0, 1], [0, 1, 5, 2], [1, 2, 3, 0]], jnp.float32)[None, :, :, None]
        mx = self.variant(lambda v: layers.max_pool(v, 2))(x)
        av = self.variant(lambda v: layers.avg_pool(v, 2))(x)
        chex.assert_shape(mx, (1, 2, 2, 1))
        np.testing.assert_array_equal(mx[0, :, :, 0], [[4, 2], [2, 5]])
        np.testing.assert_allclose(av[0, :, :, 0], [[2.5, 1.0], [1.0, 2.5]])

    @chex.variants(with_jit=True, without_jit=True)
    def test_conv_apply_jit_and_no_jit(self):
        conv = layers.Conv(8, 3, padding=1)
        x = jnp.ones((2, 6, 6, 3))
        variables = conv.init(jax.random.PRNGKey(0), x)
        y = self.variant(conv.apply)(variables, x)
        chex.assert_shape(y, (2, 6, 6, 8))
        chex.assert_tree_all_finite(y)


def _bn_pair(features, momentum=0.1, two_d=True):
    tbn = (torch.nn.BatchNorm2d if two_d else torch.nn.BatchNorm1d)(features, momentum=momentum)
    ref.randomize_bn_stats(tbn, torch.Generator().manual_seed(3))
    return tbn, variables_of(torch.nn.ModuleDict({"b": tbn}))


def _sub(variables, key="b"):
    return {col: tree[key] for col, tree in variables.items()}


@pytest.mark.parametrize("two_d", [True, False])
def test_batchnorm_train_and_eval_match_torch(two_d):
    tbn, variables = _bn_pair(6, two_d=two_d)
    variables = _sub(variables)
    x = rand(4, 5, 5, 6) * 3 + 1 if two_d else rand(7, 6) * 3 + 1
    xt = nchw(x) if two_d else torch.from_numpy(x)
    bn = layers.BatchNorm()
    tbn.eval()
    assert_parity("BatchNorm eval", bn.apply(variables, x, train=False), nhwc(tbn(xt)), TOL)
    tbn.train()
    want = nhwc(tbn(xt))
    got, updated = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    assert_parity("BatchNorm train output", got, want, TOL)
    want_stats = _sub(variables_of(torch.nn.ModuleDict({"b": tbn})))["batch_stats"]
    assert_parity("BatchNorm train running stats", updated["batch_stats"], want_stats, TOL)


def test_batchnorm_momentum_is_flax_convention():
    """Flax momentum 0.8 == torch momentum 0.2."""
    tbn, variables = _bn_pair(3, momentum=0.2)
    x = rand(8, 4, 4, 3)
    tbn.train()
    tbn(nchw(x))
    _, updated = layers.BatchNorm(momentum=0.8).apply(_sub(variables), x, train=True, mutable=["batch_stats"])
    want = _sub(variables_of(torch.nn.ModuleDict({"b": tbn})))["batch_stats"]
    assert_parity("BatchNorm momentum convention", updated["batch_stats"], want, TOL)


def test_cross_replica_batchnorm_equals_full_batch():
    bn = layers.BatchNorm(axis_name="batch")
    x = rand(8, 3, 3, 4) * 2 + 0.5
    variables = bn.init(jax.random.PRNGKey(0), x, train=False)
    full, full_upd = layers.BatchNorm().apply(variables, x, train=True, mutable=["batch_stats"])
    shards = x.reshape(4, 2, 3, 3, 4)
    per, per_upd = jax.vmap(lambda s: bn.apply(variables, s, train=True, mutable=["batch_stats"]),
                            axis_name="batch")(shards)
    assert_parity("BatchNorm cross-replica vs full batch", per.reshape(x.shape), full, TOL)
    for key in ("mean", "var"):
        np.testing.assert_allclose(per_upd["batch_stats"][key][0], full_upd["batch_stats"][key], atol=TOL)
    # Without axis_name each shard normalises with its own statistics: different output.
    local = jax.vmap(lambda s: layers.BatchNorm().apply(variables, s, train=True, mutable=["batch_stats"])[0])(shards)
    assert np.abs(np.asarray(local).reshape(x.shape) - np.asarray(full)).max() > 1e-3


@pytest.mark.parametrize("two_d", [True, False])
def test_batchnorm_train_gradients_match_torch(two_d):
    """The closed-form backward gives torch's input, scale and bias gradients."""
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

    g_params, g_x = jax.grad(loss, argnums=(0, 1))(variables["params"], jnp.asarray(x))
    assert_parity("BatchNorm input gradient", g_x, nhwc(xt.grad) if two_d else xt.grad.numpy(), TOL)
    assert_parity("BatchNorm scale gradient", g_params["scale"], tbn.weight.grad.numpy(), 1e-4)
    assert_parity("BatchNorm bias gradient", g_params["bias"], tbn.bias.grad.numpy(), 1e-4)


@pytest.mark.parametrize("stats", [("mean", "var"), ("var",), ()])
@pytest.mark.parametrize("axis_name", [None, "batch"])
def test_batch_norm_backward_equals_autodiff_including_statistics_cotangents(axis_name, stats):
    """Loss terms on the returned mean and variance are differentiated too, across replicas as well;
    without them (their cotangents are symbolic zeros) the gradient is the same as autodiff's."""
    x = jnp.asarray(rand(8, 3, 4, 6) * 1.5 + 0.3)
    scale, bias, g = jnp.linspace(0.5, 2.0, 6), jnp.linspace(-1.0, 1.0, 6), jnp.asarray(rand(8, 3, 4, 6))

    def loss(fn, x, scale, bias):
        y, mean, var = fn(x, scale, bias, 1e-5, axis_name)
        out = jnp.sum(jnp.maximum(y, 0.0) * g[: x.shape[0]])
        out = out + jnp.sum(3.0 * mean) if "mean" in stats else out
        return out + jnp.sum(var * var) if "var" in stats else out

    def grads(fn):
        grad = jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2))
        if axis_name is None:
            return grad(x, scale, bias)
        g_x, g_scale, g_bias = jax.vmap(grad, in_axes=(0, None, None), axis_name=axis_name)(
            x.reshape(4, 2, 3, 4, 6), scale, bias)
        return g_x.reshape(x.shape), g_scale, g_bias

    got, want = grads(layers._batch_norm_train), grads(benchlib.autodiff_batch_norm_train)
    for name, a, b in zip(("input", "scale", "bias"), got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, err_msg=f"{name} gradient")
    assert float(jnp.max(jnp.abs(got[0]))) > 0.1  # the case is not degenerate


@pytest.mark.parametrize("offset", [0.0, 30.0])
def test_batch_norm_backward_is_float32_accurate_with_a_mean_far_from_zero(offset):
    """The backward sums g * x and g (not g * x_hat), then subtracts mean * sum(g), which loses digits as the mean
    moves away from zero: against the float64 closed form both gradients are within 3.1e-4 of their largest value
    for activations whose mean is about 100 standard deviations from zero, 1e-5 at mean zero (the worst of 300
    random draws: 1.7e-4 and 2.9e-6; the draw is whatever the module's generator gives next)."""
    x = rand(16, 5, 5, 4) + offset
    g, scale = rand(*x.shape) * 2 - 1, np.linspace(0.5, 2.0, 4)
    got = jax.grad(lambda x, s: jnp.sum(layers._batch_norm_train(x, s, jnp.zeros(4), 1e-5, None)[0] * g),
                   argnums=(0, 1))(jnp.asarray(x, jnp.float32), jnp.asarray(scale, jnp.float32))
    rows, g_rows = x.reshape(-1, 4).astype(np.float64), g.reshape(-1, 4).astype(np.float64)
    x_hat = (rows - rows.mean(0)) / np.sqrt(rows.var(0) + 1e-5)
    g_scale = (g_rows * x_hat).sum(0)
    g_x = scale / np.sqrt(rows.var(0) + 1e-5) * (g_rows - g_rows.mean(0) - x_hat * g_scale / len(rows))
    tol = 1e-5 + 1e-5 * offset
    np.testing.assert_allclose(got[0], g_x.reshape(x.shape), atol=tol * np.abs(g_x).max())
    np.testing.assert_allclose(got[1], g_scale, atol=tol * np.abs(g_scale).max())
    assert np.abs(g_scale).max() > 0.5  # not degenerate


def test_dropout_semantics():
    drop = layers.Dropout(0.25)
    x = jnp.ones((1000, 20))
    np.testing.assert_array_equal(drop.apply({}, x, train=False), x)
    y = drop.apply({}, x, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
    kept = np.asarray(y) != 0
    assert abs(kept.mean() - 0.75) < 0.01
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75, rtol=1e-6)
    y2 = drop.apply({}, x, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
    np.testing.assert_array_equal(y, y2)  # randomness only through the explicit key
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\)"):
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
def test_blocks_match_torch_train_and_eval(label, make_torch, make_jax, c_in):
    torch.manual_seed(0)
    tblock = make_torch()
    ref.randomize_bn_stats(tblock, torch.Generator().manual_seed(2))
    variables = variables_of(tblock)
    block = make_jax()
    x = rand(4, 9, 9, c_in)
    chex.assert_trees_all_equal_shapes(block.init(jax.random.PRNGKey(0), x, train=False), variables)
    tblock.eval()
    with torch.no_grad():
        assert_parity(f"{label} eval", block.apply(variables, x, train=False), nhwc(tblock(nchw(x))), TOL)
    tblock.train()
    with torch.no_grad():
        want = nhwc(tblock(nchw(x)))
    got, updated = block.apply(variables, x, train=True, mutable=["batch_stats"])
    assert_parity(f"{label} train", got, want, TOL)
    assert_parity(f"{label} train running stats", updated["batch_stats"], variables_of(tblock)["batch_stats"], TOL)


def test_zero_init_last_bn_makes_block_start_as_relu_of_shortcut():
    x = jnp.asarray(rand(2, 6, 6, 8))
    block = layers.BasicBlock(8, zero_init_last_bn=True)
    variables = block.init(jax.random.PRNGKey(0), x, train=False)
    np.testing.assert_array_equal(variables["params"]["bn2"]["scale"], 0)
    np.testing.assert_allclose(block.apply(variables, x, train=False), jax.nn.relu(x), atol=1e-6)


def test_the_max_pool_path_is_described_for_logs(monkeypatch):
    monkeypatch.setattr(onednn, "available", lambda: True)
    monkeypatch.setattr(onednn, "bf16_available", lambda: False)
    assert layers.describe_max_pools().startswith("strided views (oneDNN's max-pools only on CPUs with AVX-512")
    monkeypatch.setattr(onednn, "bf16_available", lambda: True)
    assert layers.describe_max_pools() == "oneDNN"
    monkeypatch.setattr(layers, "USE_ONEDNN_POOL_ON_CPU", False)
    assert layers.describe_max_pools() == "strided views (USE_ONEDNN_POOL_ON_CPU is off)"
