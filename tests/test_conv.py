"""cnnjax.conv: the patches and shifted-sum paths equal XLA's convolution (values and gradients) and
torch; the CPU choice rules; clear errors."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cnnjax import conv, layers
from cnnjax.errors import UsageError
from cnnjax.native import onednn
from tests.onednn_marks import needs_onednn, needs_onednn_bf16, pretend_no_bf16
from tests.parity import assert_parity, nchw, nhwc

rng = np.random.RandomState(0)

CASES = [
    # (hw, c_in, c_out, kernel, strides, pads, dilation)
    ((8, 8), 3, 5, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)),
    ((2, 2), 8, 6, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)),  # output 2x2: the slow XLA case
    ((1, 1), 8, 6, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)),
    ((9, 7), 4, 6, (3, 5), (2, 1), ((1, 1), (2, 2)), (1, 1)),
    ((11, 11), 4, 3, (3, 3), (2, 2), ((0, 1), (1, 0)), (2, 2)),  # asymmetric pads, dilation
    ((8, 8), 5, 7, (1, 1), (2, 2), ((0, 0), (0, 0)), (1, 1)),
    ((15, 15), 3, 4, (7, 7), (2, 2), ((3, 3), (3, 3)), (1, 1)),
]


def xla(x, w, strides, pads, dilation):
    return conv.conv2d(x, w, strides, pads, dilation, impl="xla")


GREYSCALE_CASES = [
    ((32, 32), 1, 6, (5, 5), (1, 1), ((0, 0), (0, 0)), (1, 1)),  # LeNet's first conv
    ((28, 28), 1, 16, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)),  # SimpleCNN's
    ((11, 10), 1, 3, (3, 5), (2, 1), ((0, 1), (2, 2)), (2, 1)),
]


@pytest.mark.parametrize("impl", ["im2col", "shifted"])
@pytest.mark.parametrize("hw,c_in,c_out,k,s,pads,d", CASES + GREYSCALE_CASES)
def test_explicit_paths_match_xla_values_and_gradients(impl, hw, c_in, c_out, k, s, pads, d):
    x = jnp.asarray(rng.randn(2, *hw, c_in).astype(np.float32))
    w = jnp.asarray(rng.randn(*k, c_in, c_out).astype(np.float32))
    path = lambda x, w: conv.conv2d(x, w, s, pads, d, impl=impl)  # noqa: E731
    want = xla(x, w, s, pads, d)
    chex.assert_trees_all_close(jax.jit(path)(x, w), want, atol=1e-4, rtol=1e-5)
    loss = lambda f: lambda x, w: (f(x, w) ** 2).sum()  # noqa: E731
    grads = jax.grad(loss(path), argnums=(0, 1))(x, w)
    want_grads = jax.grad(loss(lambda x, w: xla(x, w, s, pads, d)), argnums=(0, 1))(x, w)
    chex.assert_trees_all_close(grads, want_grads, atol=1e-3, rtol=1e-4)


def test_shifted_sum_accumulates_bf16_in_float32():
    x = jnp.asarray(rng.randn(2, 12, 12, 1).astype(np.float32)).astype(jnp.bfloat16)
    w = jnp.asarray(rng.randn(5, 5, 1, 8).astype(np.float32)).astype(jnp.bfloat16)
    pads = ((2, 2), (2, 2))
    got = conv.conv2d(x, w, (1, 1), pads, impl="shifted")
    assert got.dtype == jnp.bfloat16
    exact = conv.conv2d(x.astype(jnp.float32), w.astype(jnp.float32), (1, 1), pads, impl="xla")
    # Summed in float32 and rounded once: within one bf16 rounding (2^-8 relative) of the exact sum.
    np.testing.assert_allclose(np.asarray(got, np.float32), exact, rtol=2 ** -8, atol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "im2col", "shifted", "kept", "split",
                                  pytest.param("onednn", marks=needs_onednn)])
@pytest.mark.parametrize("hw,stride,padding,c_in", [((2, 2), 1, 1, 4), ((10, 9), 2, 1, 4), ((6, 6), 1, 0, 4),
                                                    ((12, 12), 1, 1, 1)])
def test_every_path_matches_torch_including_input_gradient(impl, hw, stride, padding, c_in):
    local = np.random.RandomState(1)  # the same data for every impl
    x = local.randn(3, *hw, c_in).astype(np.float32)
    w = local.randn(3, 3, c_in, 5).astype(np.float32)
    xt = nchw(x).requires_grad_(True)
    yt = F.conv2d(xt, torch.from_numpy(w.transpose(3, 2, 0, 1).copy()), stride=stride, padding=padding)
    (yt ** 2).sum().backward()
    pads = ((padding, padding), (padding, padding))
    y, vjp = jax.vjp(lambda v: conv.conv2d(v, jnp.asarray(w), (stride, stride), pads, impl=impl), jnp.asarray(x))
    assert_parity(f"conv2d {impl} vs torch", y, nhwc(yt), 1e-4)
    assert_parity(f"conv2d {impl} input gradient vs torch", vjp(2 * y)[0], nhwc(xt.grad), 1e-4)


@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 2)])
def test_kept_input_conv_has_xlas_numbers_and_gradients_jitted_or_not(stride, dilation):
    local = np.random.RandomState(2)  # the same data whichever tests ran before
    x = jnp.asarray(local.randn(2, 9, 8, 4).astype(np.float32))
    w = jnp.asarray(local.randn(3, 3, 4, 6).astype(np.float32))

    def loss(impl):
        return lambda x, w: (conv.conv2d(jax.nn.relu(x), w, (stride, stride), ((1, 1), (1, 1)), (dilation,) * 2,
                                         impl=impl) ** 2).sum()

    want_loss, want_grads = jax.value_and_grad(loss("xla"), argnums=(0, 1))(x, w)
    for fn in (jax.value_and_grad(loss("kept"), argnums=(0, 1)),
               jax.jit(jax.value_and_grad(loss("kept"), argnums=(0, 1)))):
        got_loss, got_grads = fn(x, w)
        chex.assert_trees_all_equal(got_grads, want_grads)
        # The same conv; XLA may sum the loss in another order (seen: one float32 ulp apart).
        chex.assert_trees_all_close(got_loss, want_loss, rtol=1e-6)


@pytest.mark.parametrize("stride,dilation,padding", [(2, 1, 1), (2, 1, 0), (3, 1, 2), (1, 1, 1), (2, 2, 1)])
def test_split_conv_has_xlas_values_and_gradients_jitted_or_not(stride, dilation, padding):
    """'split': XLA's forward and weight gradient exactly; the input gradient from the patches path, equal up
    to the order of the sums (and to torch's, above)."""
    local = np.random.RandomState(3)
    x = jnp.asarray(local.randn(2, 11, 10, 4).astype(np.float32))
    w = jnp.asarray(local.randn(3, 3, 4, 6).astype(np.float32))
    pads = ((padding, padding + 1), (padding, padding))

    def loss(impl):
        return lambda x, w: (jnp.tanh(conv.conv2d(jax.nn.relu(x), w, (stride, stride), pads, (dilation,) * 2,
                                                  impl=impl)) ** 2).sum()

    want_loss, (want_dx, want_dw) = jax.value_and_grad(loss("xla"), argnums=(0, 1))(x, w)
    for fn in (jax.value_and_grad(loss("split"), argnums=(0, 1)),
               jax.jit(jax.value_and_grad(loss("split"), argnums=(0, 1)))):
        got_loss, (got_dx, got_dw) = fn(x, w)
        chex.assert_trees_all_close((got_loss, got_dx, got_dw), (want_loss, want_dx, want_dw), atol=1e-5, rtol=1e-5)
        assert float(jnp.max(jnp.abs(got_dx))) > 0.1  # a gradient that could be wrong


def test_auto_splits_narrow_strided_cpu_convs_in_one_process(monkeypatch):
    """A strided 3x3 conv of a 16-channel input runs as 'split' on the CPU: its gradient keeps the input in a
    zero-trip while loop and takes no convolution for the input gradient; over several processes, or
    without kept inputs, it is patches."""
    x, w = jnp.ones((2, 32, 32, 16)), jnp.ones((3, 3, 16, 32))
    monkeypatch.setattr(conv, "USE_ONEDNN_ON_CPU", False)  # the rules without oneDNN's kernels

    def grad_jaxpr():
        return str(jax.make_jaxpr(jax.grad(lambda x, w: conv.conv2d(x, w, (2, 2), "SAME").sum(), (0, 1)))(x, w))

    if jax.default_backend() != "cpu":
        pytest.skip("'split' is a CPU rule")
    xla_input_gradient = "lhs_dilation=(2, 2)"  # XLA's input gradient of a stride-2 conv
    assert xla_input_gradient in str(jax.make_jaxpr(jax.grad(
        lambda x, w: conv.conv2d(x, w, (2, 2), "SAME", impl="xla").sum(), (0, 1)))(x, w))
    split = grad_jaxpr()
    assert "while" in split and split.count("conv_general_dilated") == 2  # forward and weight gradient
    assert xla_input_gradient not in split
    with monkeypatch.context() as m:  # a run over several processes: patches, as before 'split'
        m.setattr(jax, "process_count", lambda: 2)
        several = grad_jaxpr()
        assert "while" not in several and "conv_general_dilated" not in several
    monkeypatch.setattr(conv, "KEEP_CONV_INPUT_ON_CPU", False)
    patches = grad_jaxpr()
    assert "while" not in patches and "conv_general_dilated" not in patches


def test_auto_keeps_the_input_of_xlas_cpu_convs(monkeypatch):
    """On the CPU, 'auto' sends the convs it leaves to XLA through kept_input_conv: its backward reads
    the input from a zero-trip while loop's output."""
    x, w = jnp.ones((2, 32, 32, 16)), jnp.ones((3, 3, 16, 16))
    monkeypatch.setattr(conv, "USE_ONEDNN_ON_CPU", False)  # the rules without oneDNN's kernels
    grad_jaxpr = str(jax.make_jaxpr(jax.grad(lambda w: conv.conv2d(x, w, (1, 1), "SAME").sum()))(w))
    assert ("while" in grad_jaxpr) == (jax.default_backend() == "cpu")
    monkeypatch.setattr(conv, "KEEP_CONV_INPUT_ON_CPU", False)
    assert "while" not in str(jax.make_jaxpr(jax.grad(lambda w: conv.conv2d(x, w, (1, 1), "SAME").sum()))(w))


def test_same_padding_string_goes_through_every_path():
    x = jnp.asarray(rng.randn(2, 7, 6, 3).astype(np.float32))
    w = jnp.asarray(rng.randn(3, 3, 3, 4).astype(np.float32))
    for padding in ("SAME", "VALID"):
        for impl in ("im2col", "shifted", "kept", "split"):
            chex.assert_trees_all_close(conv.conv2d(x, w, (2, 2), padding, impl=impl),
                                        conv.conv2d(x, w, (2, 2), padding, impl="xla"), atol=1e-4)


@pytest.mark.parametrize("in_hw,k,s,p,backend,want", [
    ((32, 32), (3, 3), (1, 1), 1, "cpu", "xla"),        # big output: XLA's conv is as fast as torch
    ((2, 2), (3, 3), (1, 1), 1, "cpu", "im2col"),       # 2x2 output
    ((1, 1), (3, 3), (1, 1), 1, "cpu", "im2col"),
    ((3, 3), (3, 3), (1, 1), 1, "cpu", "xla"),          # 3x3 output: XLA measured faster
    ((56, 56), (1, 1), (1, 1), 0, "cpu", "im2col"),     # 1x1 conv: a plain matmul
    ((32, 32), (3, 3), (2, 2), 1, "cpu", "im2col"),     # strided, 16x16 output
    ((32, 32), (7, 7), (2, 2), 3, "cpu", "im2col"),     # (without in_channels: as patches)
    ((56, 56), (3, 3), (2, 2), 1, "cpu", "xla"),        # strided, 28x28 output
    ((2, 2), (3, 3), (1, 1), 1, "gpu", "xla"),          # accelerators keep XLA's conv
])
def test_choose_impl_rules(in_hw, k, s, p, backend, want):
    assert conv.choose_impl(in_hw, k, s, ((p, p), (p, p)), backend=backend) == want


@pytest.mark.parametrize("in_hw,in_channels,k,want", [
    ((32, 32), 16, 3, "split"),    # cifar_resnet20's first downsampling conv: narrow patches concatenate slowly
    ((32, 32), 3, 7, "split"),     # ResNet-18's 7x7 / 2 stem at 32x32
    ((16, 16), 32, 3, "im2col"),   # wider inputs: patches as fast or faster
    ((56, 56), 16, 3, "xla"),      # 28x28 output
])
def test_choose_impl_strided_rules(in_hw, in_channels, k, want):
    assert conv.choose_impl(in_hw, (k, k), (2, 2), ((k // 2, k // 2),) * 2, backend="cpu", in_channels=in_channels,
                            out_channels=32) == want
    assert conv.choose_impl(in_hw, (k, k), (2, 2), ((k // 2, k // 2),) * 2, backend="gpu", in_channels=in_channels,
                            out_channels=32) == "xla"


@pytest.mark.parametrize("in_channels,out_channels,k,backend,want", [
    (1, 16, 3, "cpu", "shifted"),  # SimpleCNN's greyscale first conv: a shifted sum
    (1, 8, 5, "cpu", "shifted"),
    (1, 6, 5, "cpu", "xla"),       # LeNet's 5x5 1 -> 6: the fused sum + tanh does not vectorise
    (1, 6, 3, "cpu", "im2col"),    # other greyscale 3x3 convs: patches
    (1, 16, 9, "cpu", "xla"),      # 81 products per output: over SHIFTED_MAX_TERMS
    (3, 16, 3, "cpu", "xla"),      # RGB stems keep XLA's conv (mixed timings)
    (1, 16, 3, "gpu", "xla"),
])
def test_choose_impl_one_input_channel(in_channels, out_channels, k, backend, want):
    assert conv.choose_impl((28, 28), (k, k), (1, 1), ((k // 2, k // 2),) * 2, backend=backend,
                            in_channels=in_channels, out_channels=out_channels) == want


def test_grouped_convs_keep_xla_and_im2col_rejects_groups():
    assert conv.choose_impl((2, 2), (3, 3), (1, 1), ((1, 1), (1, 1)), groups=2, backend="cpu") == "xla"
    x, w = jnp.zeros((1, 4, 4, 4)), jnp.zeros((3, 3, 2, 4))
    for impl in ("im2col", "shifted", "kept", "split", "onednn"):
        with pytest.raises(ValueError, match="groups=1 only; use impl='xla'"):
            conv.conv2d(x, w, (1, 1), ((1, 1), (1, 1)), groups=2, impl=impl)
    with pytest.raises(ValueError, match="conv impl must be one of auto, xla, im2col, shifted, kept, split, onednn"):
        conv.conv2d(x, jnp.zeros((3, 3, 4, 4)), (1, 1), ((1, 1), (1, 1)), impl="fft")


def test_conv_module_impls_share_parameters_and_outputs():
    x = jnp.asarray(rng.randn(2, 4, 4, 6).astype(np.float32))
    a = layers.Conv(8, 3, 2, 1, impl="xla")
    variables = a.init(jax.random.PRNGKey(0), x)
    for impl in ("im2col", "shifted"):
        b = layers.Conv(8, 3, 2, 1, impl=impl)
        chex.assert_trees_all_equal_shapes(variables, b.init(jax.random.PRNGKey(0), x))
        chex.assert_trees_all_close(a.apply(variables, x), b.apply(variables, x), atol=1e-5)


def assert_close_for_their_size(got, want, rel=2e-5):
    """Trees of float32 gradients equal up to rounding relative to each leaf's largest value: sums of many terms of
    either sign differ in the last bits of the terms, not of the (possibly much smaller) sum. The loss sin(y) * y
    makes such sums: fixed tolerances (atol 1e-3, rtol 1e-4) failed 29 of 2000 random draws, while the worst of
    150 draws per case was 3e-6 of the largest value."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, atol=rel * float(jnp.max(jnp.abs(w))), rtol=1e-4)


@needs_onednn
@pytest.mark.parametrize("hw,c_in,c_out,k,s,pads,d", CASES + GREYSCALE_CASES)
def test_onednn_matches_xla_values_and_gradients_jitted_or_not(hw, c_in, c_out, k, s, pads, d):
    x = jnp.asarray(rng.randn(3, *hw, c_in).astype(np.float32))
    w = jnp.asarray(rng.randn(*k, c_in, c_out).astype(np.float32))
    path = lambda x, w: conv.conv2d(x, w, s, pads, d, impl="onednn")  # noqa: E731
    loss = lambda f: lambda x, w: (jnp.sin(f(x, w)) * f(x, w)).sum()  # noqa: E731
    want = xla(x, w, s, pads, d)
    want_grads = jax.grad(loss(lambda x, w: xla(x, w, s, pads, d)), argnums=(0, 1))(x, w)
    for f in (path, jax.jit(path)):
        chex.assert_trees_all_close(f(x, w), want, atol=1e-4, rtol=1e-5)
    for g in (jax.grad(loss(path), argnums=(0, 1)), jax.jit(jax.grad(loss(path), argnums=(0, 1)))):
        assert_close_for_their_size(g(x, w), want_grads)


@needs_onednn
@pytest.mark.parametrize("c_in,s,pads", [(1, (2, 2), ((0, 0), (0, 0))), (5, (3, 2), ((1, 0), (0, 1))),
                                         (16, (2, 2), ((1, 1), (1, 1)))])
def test_onednn_strided_1x1_kernel_gradients_match_xla(c_in, s, pads):
    """Kernel gradients of strided 1x1 convs run as unit-stride ones on the input positions the kernel reads
    (onednn_kernels.cc: oneDNN's own wrote past its scratchpad), padding included; 5 images: slices of 2 and 3."""
    draw = np.random.RandomState(1)  # its own generator: the module's draws of later tests stay as they were
    x = jnp.asarray(draw.randn(5, 9, 8, c_in).astype(np.float32))
    w = jnp.asarray(draw.randn(1, 1, c_in, 6).astype(np.float32))
    y, vjp = jax.vjp(lambda x, w: conv.conv2d(x, w, s, pads, impl="onednn"), x, w)
    want, want_vjp = jax.vjp(lambda x, w: xla(x, w, s, pads, (1, 1)), x, w)
    g = jnp.asarray(draw.randn(*want.shape).astype(np.float32))
    chex.assert_trees_all_close(y, want, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(vjp(g), want_vjp(g), atol=1e-4, rtol=1e-5)
    assert float(jnp.abs(vjp(g)[1]).max()) > 1.0  # not degenerate


@needs_onednn_bf16
def test_onednn_bf16_is_within_one_rounding_of_the_float32_conv():
    x = jnp.asarray(rng.randn(4, 10, 10, 16).astype(np.float32)).astype(jnp.bfloat16)
    w = jnp.asarray(rng.randn(3, 3, 16, 8).astype(np.float32)).astype(jnp.bfloat16)
    g = jnp.asarray(rng.randn(4, 10, 10, 8).astype(np.float32)).astype(jnp.bfloat16)
    pads = ((1, 1), (1, 1))
    y, vjp = jax.vjp(lambda x, w: conv.conv2d(x, w, (1, 1), pads, impl="onednn"), x, w)
    want, want_vjp = jax.vjp(lambda x, w: xla(x, w, (1, 1), pads, (1, 1)), x.astype(jnp.float32),
                             w.astype(jnp.float32))
    assert y.dtype == jnp.bfloat16
    for got, exact in zip((y, *vjp(g)), (want, *want_vjp(g.astype(jnp.float32))), strict=True):
        assert got.dtype == jnp.bfloat16
        scale = float(jnp.max(jnp.abs(exact)))
        np.testing.assert_allclose(np.asarray(got, np.float32), exact, atol=2 ** -7 * scale)


# bfloat16 kernel gradients of stride-1 convs run as a forward convolution (outputs up to 4x4) or as one matrix
# product of the input patches (up to 8x8) instead of oneDNN's backward-weights primitive (cnnjax/native).
BF16_WGRAD_CASES = [
    # (batch, hw, c_in, c_out, kernel, pads): output hw
    (6, (3, 3), 32, 16, (3, 3), ((1, 1), (1, 1))),  # 3x3: a forward conv (fast_cnn's block3)
    (5, (4, 2), 8, 24, (3, 3), ((0, 2), (1, 1))),  # 4x2, asymmetric padding: forward
    (4, (6, 6), 16, 8, (3, 3), ((1, 1), (1, 1))),  # 6x6: patches @ gradient (block2)
    (3, (9, 7), 4, 6, (3, 2), ((0, 1), (1, 0))),  # 7x6, a 3x2 kernel: patches
    (2, (8, 8), 8, 8, (1, 1), ((0, 0), (0, 0))),  # 1x1 kernel: patches
    (3, (12, 12), 8, 8, (3, 3), ((1, 1), (1, 1))),  # 12x12: oneDNN's backward weights
]


@needs_onednn_bf16
@pytest.mark.parametrize("batch,hw,c_in,c_out,k,pads", BF16_WGRAD_CASES, ids=str)
def test_onednn_bf16_kernel_gradient_paths_match_the_float32_conv(batch, hw, c_in, c_out, k, pads):
    r = np.random.RandomState(1)
    x = jnp.asarray(r.randn(batch, *hw, c_in).astype(np.float32)).astype(jnp.bfloat16)
    w = jnp.asarray(r.randn(*k, c_in, c_out).astype(np.float32)).astype(jnp.bfloat16)
    y, vjp = jax.vjp(lambda w: conv.conv2d(x, w, (1, 1), pads, impl="onednn"), w)
    g = jnp.asarray(r.randn(*y.shape).astype(np.float32)).astype(jnp.bfloat16)
    _, want_vjp = jax.vjp(lambda w: xla(x.astype(jnp.float32), w, (1, 1), pads, (1, 1)), w.astype(jnp.float32))
    want = want_vjp(g.astype(jnp.float32))[0]
    for got in (vjp(g)[0], jax.jit(lambda g: vjp(g)[0])(g)):
        assert got.dtype == jnp.bfloat16 and got.shape == w.shape
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2 ** -7 * scale)


# Every kernel-gradient path of the handler (conv.onednn_wgrad_path picks one by dtype, CPU and shape) gives the
# float32 gradient on any CPU: the cases above, a 7x7 map and a batch of 5 (slices of 2 and 3).
F32_WGRAD_CASES = BF16_WGRAD_CASES + [(5, (7, 7), 16, 32, (3, 3), ((1, 1), (1, 1)))]


@needs_onednn
@pytest.mark.parametrize("path", list(conv.WGRAD_PATHS))
@pytest.mark.parametrize("batch,hw,c_in,c_out,k,pads", F32_WGRAD_CASES, ids=str)
def test_onednn_float32_kernel_gradient_paths_match_xla(path, batch, hw, c_in, c_out, k, pads):
    draw = np.random.RandomState(2)
    kernel_shape = (*k, c_in, c_out)
    x = jnp.asarray(draw.randn(batch, *hw, c_in).astype(np.float32))
    _, vjp = jax.vjp(lambda w: xla(x, w, (1, 1), pads, (1, 1)), jnp.zeros(kernel_shape))
    g = jnp.asarray(draw.randn(*_.shape).astype(np.float32))
    want = vjp(g)[0]
    run = lambda x, g: conv._onednn(onednn.KERNEL_GRAD, x, g, kernel_shape, (1, 1), pads, (1, 1), path)  # noqa: E731
    assert f"wgrad = {conv.WGRAD_PATHS[path]} : i64" in jax.jit(run).lower(x, g).as_text()
    for got in (run(x, g), jax.jit(run)(x, g)):
        chex.assert_shape(got, kernel_shape)
        np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.max(jnp.abs(want))), rtol=1e-5)


# oneDNN's forward as the input gradient of the transposed conv (conv.onednn_forward_as_input_gradient): every pad
# from 0 to kernel - 1, non-square kernels and maps, a 1x1 output; values and both gradients against XLA's.
FORWARD_AS_INPUT_GRAD_CASES = [
    # (hw, c_in, c_out, kernel, pads)
    ((8, 8), 16, 24, (3, 3), ((1, 1), (1, 1))),
    ((9, 7), 3, 8, (3, 2), ((0, 2), (1, 0))),
    ((32, 32), 3, 24, (2, 2), ((0, 0), (0, 0))),  # fast_cnn's whitening conv
    ((14, 14), 6, 16, (5, 5), ((0, 0), (4, 2))),
    ((3, 3), 8, 8, (3, 3), ((0, 0), (0, 0))),  # a 1x1 output
]


@needs_onednn
@pytest.mark.parametrize("hw,c_in,c_out,k,pads", FORWARD_AS_INPUT_GRAD_CASES, ids=str)
def test_onednn_forward_as_the_transposed_input_gradient_matches_xla(hw, c_in, c_out, k, pads):
    draw = np.random.RandomState(3)
    x = jnp.asarray(draw.randn(5, *hw, c_in).astype(np.float32))
    w = jnp.asarray(draw.randn(*k, c_in, c_out).astype(np.float32))
    want = xla(x, w, (1, 1), pads, (1, 1))
    for as_input_gradient in (False, True):
        f = lambda x, w, t=as_input_gradient: conv._onednn_forward(x, w, (1, 1), pads, (1, 1), t)  # noqa: E731
        for got in (f(x, w), jax.jit(f)(x, w)):
            chex.assert_shape(got, want.shape)
            np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.max(jnp.abs(want))), rtol=1e-5)
    lowered = jax.jit(lambda x, w: conv._onednn_forward(x, w, (1, 1), pads, (1, 1), True)).lower(x, w).as_text()
    assert f"kind = {onednn.INPUT_GRAD} : i64" in lowered and f"kind = {onednn.FORWARD} : i64" not in lowered


def test_forwards_run_as_input_gradients_for_float32_stride_1_convs_on_avx2(monkeypatch):
    monkeypatch.setattr(onednn, "bf16_available", lambda: False)
    same = ((1, 1), (1, 1))
    assert conv.onednn_forward_as_input_gradient("float32", (3, 3), (1, 1), same, (1, 1))
    assert conv.onednn_forward_as_input_gradient("float32", (2, 2), (1, 1), ((0, 0), (0, 0)), (1, 1))
    assert not conv.onednn_forward_as_input_gradient("float32", (3, 3), (2, 2), same, (1, 1))  # strided
    assert not conv.onednn_forward_as_input_gradient("float32", (3, 3), (1, 1), same, (2, 2))  # dilated
    assert not conv.onednn_forward_as_input_gradient("float32", (3, 3), (1, 1), ((3, 1), (1, 1)), (1, 1))  # pad > k-1
    assert not conv.onednn_forward_as_input_gradient("bfloat16", (3, 3), (1, 1), same, (1, 1))
    monkeypatch.setattr(conv, "ONEDNN_F32_FORWARD_AS_INPUT_GRAD", False)
    assert not conv.onednn_forward_as_input_gradient("float32", (3, 3), (1, 1), same, (1, 1))
    monkeypatch.setattr(conv, "ONEDNN_F32_FORWARD_AS_INPUT_GRAD", True)
    monkeypatch.setattr(onednn, "bf16_available", lambda: True)  # AVX-512: oneDNN's own forward
    assert not conv.onednn_forward_as_input_gradient("float32", (3, 3), (1, 1), same, (1, 1))


def test_the_float32_paths_are_described_for_logs(monkeypatch):
    monkeypatch.setattr(onednn, "available", lambda: True)
    monkeypatch.setattr(onednn, "wgrad_choice", lambda: "auto")
    monkeypatch.setattr(onednn, "bf16_available", lambda: False)
    assert conv.describe_onednn_float32_paths() == \
        "stride-1 forwards as input gradients, kernel gradients by shape (no AVX-512)"
    monkeypatch.setattr(onednn, "wgrad_choice", lambda: "matmul")
    assert conv.describe_onednn_float32_paths() == \
        "stride-1 forwards as input gradients, kernel gradients by matmul (CNNJAX_ONEDNN_WGRAD) (no AVX-512)"
    monkeypatch.setattr(onednn, "wgrad_choice", lambda: "auto")
    monkeypatch.setattr(onednn, "bf16_available", lambda: True)
    assert conv.describe_onednn_float32_paths() == "oneDNN's primitives"
    monkeypatch.setattr(onednn, "available", lambda: False)
    assert conv.describe_onednn_float32_paths() == "no oneDNN kernels"


# (x, kernel, output map, path): fast_cnn@28's convs at batch 512 (fashion_mnist_30min) as
# experiments.bench_onednn_paths measured them fastest on a 2-core AVX2 EPYC (2026-12-07), a 56x56 map whose patches
# pass the cap, two narrow ones.
F32_WGRAD_PICKS = [
    ((512, 28, 28, 1), (2, 2, 1, 8), (27, 27), "native"),
    ((512, 27, 27, 8), (3, 3, 8, 64), (27, 27), "matmul"),
    ((512, 13, 13, 64), (3, 3, 64, 64), (13, 13), "forward"),
    ((512, 13, 13, 64), (3, 3, 64, 256), (13, 13), "matmul"),
    ((512, 6, 6, 256), (3, 3, 256, 256), (6, 6), "forward"),
    ((512, 3, 3, 256), (3, 3, 256, 256), (3, 3), "matmul"),
    ((128, 56, 56, 64), (3, 3, 64, 128), (56, 56), "forward"),
    ((128, 32, 32, 16), (3, 3, 16, 16), (32, 32), "native"),
    ((128, 14, 14, 16), (3, 3, 16, 32), (14, 14), "forward"),  # simple_cnn@28's second: widens, but to 32 only
]


def test_kernel_gradient_paths_by_dtype_cpu_and_shape(monkeypatch):
    monkeypatch.setattr(onednn, "wgrad_choice", lambda: "auto")
    monkeypatch.setattr(onednn, "bf16_available", lambda: False)  # AVX2: float32 by shape
    assert [conv.onednn_wgrad_path("float32", *case[:3]) for case in F32_WGRAD_PICKS] == \
        [case[3] for case in F32_WGRAD_PICKS]
    monkeypatch.setattr(conv, "ONEDNN_F32_WGRAD_BY_SHAPE", False)
    assert {conv.onednn_wgrad_path("float32", *case[:3]) for case in F32_WGRAD_PICKS} == {"native"}
    monkeypatch.setattr(conv, "ONEDNN_F32_WGRAD_BY_SHAPE", True)
    monkeypatch.setattr(onednn, "bf16_available", lambda: True)  # AVX-512: float32 natively, bfloat16 by map size
    assert {conv.onednn_wgrad_path("float32", *case[:3]) for case in F32_WGRAD_PICKS} == {"native"}
    assert [conv.onednn_wgrad_path("bfloat16", *case[:3]) for case in F32_WGRAD_PICKS[3:6]] == \
        ["native", "matmul", "forward"]
    monkeypatch.setattr(onednn, "wgrad_choice", lambda: "matmul")  # CNNJAX_ONEDNN_WGRAD: one path for all
    assert {conv.onednn_wgrad_path(dtype, *case[:3]) for case in F32_WGRAD_PICKS
            for dtype in ("float32", "bfloat16")} == {"matmul"}


@needs_onednn
def test_onednn_under_vmap_equals_a_loop():
    x = jnp.asarray(rng.randn(3, 2, 6, 6, 4).astype(np.float32))
    w = jnp.asarray(rng.randn(3, 3, 4, 5).astype(np.float32))
    f = lambda x: conv.conv2d(x, w, (1, 1), "SAME", impl="onednn")  # noqa: E731
    chex.assert_trees_all_close(jax.vmap(f)(x), jnp.stack([xla(v, w, (1, 1), ((1, 1), (1, 1)), (1, 1)) for v in x]),
                                atol=1e-4)


@needs_onednn
def test_auto_runs_onednn_in_one_cpu_process_only(monkeypatch):
    """'auto' calls the oneDNN handler for a 3x3 conv on the CPU, and for its two gradients; not over several
    processes, not with USE_ONEDNN_ON_CPU off, and never for 1x1 kernels or float16."""
    x, w = jnp.ones((2, 16, 16, 8)), jnp.ones((3, 3, 8, 8))

    def calls(x, w):
        return str(jax.make_jaxpr(jax.grad(lambda x, w: conv.conv2d(x, w, (1, 1), "SAME").sum(), (0, 1)))(x, w)) \
            .count(onednn.TARGET)

    assert calls(x, w) == 3  # forward, input gradient, kernel gradient
    assert calls(x, jnp.ones((1, 1, 8, 8))) == 0  # a 1x1 conv is one matmul
    assert calls(x.astype(jnp.float16), w.astype(jnp.float16)) == 0
    with monkeypatch.context() as m:
        m.setattr(jax, "process_count", lambda: 2)
        assert calls(x, w) == 0
    monkeypatch.setattr(conv, "USE_ONEDNN_ON_CPU", False)
    assert calls(x, w) == 0


@pytest.mark.parametrize("in_hw,k,s,in_channels,want", [
    ((32, 32), (3, 3), (1, 1), 16, "onednn"),
    ((32, 32), (3, 3), (2, 2), 16, "onednn"),   # 'split' without oneDNN
    ((16, 16), (3, 3), (2, 2), 32, "onednn"),   # 'im2col' without oneDNN
    ((32, 32), (7, 7), (2, 2), 3, "onednn"),    # an RGB stem
    ((2, 2), (3, 3), (1, 1), 256, "im2col"),    # 2x2 output: one GEMM of patches
    ((8, 8), (1, 1), (2, 2), 64, "im2col"),     # 1x1 kernel: one GEMM
    ((28, 28), (3, 3), (1, 1), 1, "shifted"),   # greyscale with 16 outputs: the shifted sum
])
def test_choose_impl_with_onednn(in_hw, k, s, in_channels, want):
    pads = ((k[0] // 2,) * 2, (k[1] // 2,) * 2)
    assert conv.choose_impl(in_hw, k, s, pads, backend="cpu", in_channels=in_channels, out_channels=16,
                            onednn=True) == want
    assert conv.choose_impl(in_hw, k, s, pads, backend="gpu", in_channels=in_channels, out_channels=16,
                            onednn=True) == "xla"


def test_onednn_refuses_mixed_dtypes_in_one_line():
    x, w = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2), jnp.bfloat16)
    with pytest.raises(ValueError, match="impl='onednn'"):
        conv.conv2d(x, w, (1, 1), "SAME", impl="onednn")


@needs_onednn
def test_bfloat16_convs_stay_xla_where_onednn_has_no_bf16(monkeypatch):
    """On a CPU without AVX-512 (oneDNN builds no bfloat16 primitives there) 'auto' keeps XLA's bf16 convs, float32
    still runs through oneDNN, and an explicit impl='onednn' in bf16 says why in one line."""
    pretend_no_bf16(monkeypatch)
    x, w = jnp.ones((2, 10, 10, 8), jnp.bfloat16), jnp.ones((3, 3, 8, 8), jnp.bfloat16)
    calls = lambda x, w: str(jax.make_jaxpr(lambda x, w: conv.conv2d(x, w, (1, 1), "SAME"))(x, w)).count(  # noqa: E731
        onednn.TARGET)
    assert calls(x, w) == 0 and calls(x.astype(jnp.float32), w.astype(jnp.float32)) == 1
    with pytest.raises(UsageError, match=r"^conv impl='onednn' cannot run bfloat16 here: .*need AVX-512.*use float32"):
        conv.conv2d(x, w, (1, 1), "SAME", impl="onednn")


@needs_onednn
@pytest.mark.skipif(jax.device_count() < 4, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=4")
def test_onednn_under_a_batch_sharded_jit_equals_xla():
    """XLA's partitioner cannot split the custom call, so it gathers the batch for it: the same numbers."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    x = jax.device_put(jnp.asarray(rng.randn(8, 10, 10, 4).astype(np.float32)), NamedSharding(mesh, P("data")))
    w = jax.device_put(jnp.asarray(rng.randn(3, 3, 4, 6).astype(np.float32)), NamedSharding(mesh, P()))
    step = lambda impl: jax.jit(jax.value_and_grad(  # noqa: E731
        lambda x, w: (jnp.tanh(conv.conv2d(x, w, (1, 1), "SAME", impl=impl)) ** 2).sum(), (0, 1)))
    chex.assert_trees_all_close(step("onednn")(x, w), step("xla")(x, w), atol=1e-4, rtol=1e-5)


@needs_onednn
def test_onednn_refuses_an_empty_output_in_one_line():
    with pytest.raises(ValueError, match="conv output would be empty: input 2x2, kernel 5x5"):
        conv.conv2d(jnp.ones((1, 2, 2, 3)), jnp.ones((5, 5, 3, 4)), (1, 1), ((0, 0), (0, 0)), impl="onednn")


@needs_onednn
@pytest.mark.parametrize("hw,c_in,c_out,k,s,pads,d", GREYSCALE_CASES)
def test_shifted_sum_with_onednn_gradients_matches_xla_jitted_or_not(hw, c_in, c_out, k, s, pads, d):
    x = jnp.asarray(rng.randn(3, *hw, c_in).astype(np.float32))
    w = jnp.asarray(rng.randn(*k, c_in, c_out).astype(np.float32))

    def loss(f):
        return lambda x, w: (f(x, w, s, pads, d) ** 2).sum()

    want = jax.grad(loss(xla), argnums=(0, 1))(x, w)
    for jit in (False, True):
        grad = jax.grad(loss(conv.shifted_sum_onednn_conv), argnums=(0, 1))
        chex.assert_trees_all_close((jax.jit(grad) if jit else grad)(x, w), want, atol=1e-3, rtol=1e-4)
    chex.assert_trees_all_close(conv.shifted_sum_onednn_conv(x, w, s, pads, d), xla(x, w, s, pads, d),
                                atol=1e-4, rtol=1e-5)


@needs_onednn
def test_auto_takes_onednn_gradients_for_greyscale_convs_in_one_cpu_process(monkeypatch):
    """LeNet's 5x5 1 -> 8 conv: 'auto' keeps the shifted-sum forward (no oneDNN forward) and calls oneDNN for
    its two gradients; with ONEDNN_SHIFTED_GRADIENTS_ON_CPU off or over several processes, XLA's gradients."""
    x, w = jnp.ones((2, 32, 32, 1)), jnp.ones((5, 5, 1, 8))

    def calls(f):
        return str(jax.make_jaxpr(f)(x, w)).count(onednn.TARGET)

    forward = lambda x, w: conv.conv2d(x, w, (1, 1), "VALID").sum()  # noqa: E731
    assert calls(forward) == 0
    assert calls(jax.grad(forward, (0, 1))) == 2
    with monkeypatch.context() as m:
        m.setattr(jax, "process_count", lambda: 2)
        assert calls(jax.grad(forward, (0, 1))) == 0
    monkeypatch.setattr(conv, "ONEDNN_SHIFTED_GRADIENTS_ON_CPU", False)
    assert calls(jax.grad(forward, (0, 1))) == 0


@needs_onednn
@pytest.mark.parametrize("batch", [1, 3, 5, 9])
def test_onednn_batch_slices_match_xla_for_any_batch(batch):
    """Each call runs its batch in up to 4 slices (uneven ones included, kernel gradients summed over them): the
    values and both gradients stay XLA's."""
    x = jnp.asarray(rng.randn(batch, 9, 8, 6).astype(np.float32))
    w = jnp.asarray(rng.randn(3, 3, 6, 5).astype(np.float32))

    def loss(impl):
        return lambda x, w: (conv.conv2d(x, w, (1, 1), "SAME", impl=impl) ** 2).sum()

    chex.assert_trees_all_close(jax.jit(jax.grad(loss("onednn"), (0, 1)))(x, w),
                                jax.grad(loss("xla"), (0, 1))(x, w), atol=1e-3, rtol=1e-4)


ONEDNN_THREADS_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from cnnjax import conv, layers
x = jnp.asarray(np.random.RandomState(0).randn(6, 10, 10, 4).astype(np.float32))
w = jnp.asarray(np.random.RandomState(1).randn(3, 3, 4, 8).astype(np.float32))
loss = lambda x, w: layers.onednn_max_pool(conv.conv2d(x, w, (1, 1), "SAME", impl="onednn"), (2, 2), (2, 2),
                                           (0, 0)).sum()
np.save({out!r}, np.concatenate([g.ravel() for g in jax.jit(jax.grad(loss, (0, 1)))(x, w)]))
"""


@needs_onednn
def test_onednn_threads_omp_gives_the_same_numbers(tmp_path):
    """CNNJAX_ONEDNN_THREADS=omp (each call whole, on oneDNN's OpenMP team) and the default (batch slices on XLA's
    threads) give the same gradients, each in a process of its own (the choice is read once per process)."""
    import os
    import subprocess
    import sys

    got = {}
    for choice in ("omp", ""):
        out = tmp_path / f"grads_{choice or 'xla'}.npy"
        env = {**os.environ, onednn.THREADS_CHOICE: choice}
        subprocess.run([sys.executable, "-c", ONEDNN_THREADS_SCRIPT.format(out=str(out))], env=env, check=True,
                       timeout=120)
        got[choice] = np.load(out)
    assert got["omp"].size == 6 * 10 * 10 * 4 + 3 * 3 * 4 * 8
    np.testing.assert_allclose(got[""], got["omp"], rtol=1e-5, atol=1e-5)
