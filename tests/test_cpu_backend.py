"""cnnjax.cpu, the CPU backend: each of its paths computes plain XLA's numbers (values and gradients, jitted and
not); its path rules are pure functions of shapes, dtype and the CPU, varied by passing :class:`Rules` instances;
what it offers the seam (:func:`cnnjax.cpu.implementation`) and where it declines."""

from __future__ import annotations

import dataclasses
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch.nn.functional as F

from cnnjax import conv, cpu, kernels, layers
from cnnjax.cpu import onednn
from cnnjax.cpu import pool as cpu_pool
from cnnjax.cpu.conv import onednn_conv, patches_conv, shifted_sum_conv
from cnnjax.cpu.norm import batch_norm_train as closed_form_batch_norm
from cnnjax.cpu.rules import DEFAULT, Rules, output_hw
from cnnjax.errors import UsageError
from tests.onednn_marks import library, needs_onednn, pretend_no_avx512, skip_without_avx512, use_path
from tests.parity import nchw, nhwc

CASES = [
    # (hw, c_in, c_out, kernel, strides, pads, dilation)
    ((8, 8), 3, 5, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)),
    ((2, 2), 8, 6, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)),  # a 2x2 output
    ((1, 1), 8, 6, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)),
    ((9, 7), 4, 6, (3, 5), (2, 1), ((1, 1), (2, 2)), (1, 1)),
    ((11, 11), 4, 3, (3, 3), (2, 2), ((0, 1), (1, 0)), (2, 2)),  # asymmetric pads, dilation
    ((8, 8), 5, 7, (1, 1), (2, 2), ((0, 0), (0, 0)), (1, 1)),
    ((15, 15), 3, 4, (7, 7), (2, 2), ((3, 3), (3, 3)), (1, 1)),
]
GREYSCALE_CASES = [
    ((32, 32), 1, 6, (5, 5), (1, 1), ((0, 0), (0, 0)), (1, 1)),  # LeNet's first conv
    ((28, 28), 1, 16, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)),  # SimpleCNN's
    ((11, 10), 1, 3, (3, 5), (2, 1), ((0, 1), (2, 2)), (2, 1)),
]
CONV_IDS = [f"{hw[0]}x{hw[1]}x{ci}-{co}-k{k[0]}x{k[1]}-s{s[0]}{s[1]}-d{d[0]}" for hw, ci, co, k, s, _, d in
            CASES + GREYSCALE_CASES]


def draw(seed, *shapes, dtype=np.float32):
    r = np.random.RandomState(seed)
    return [jnp.asarray(r.randn(*shape).astype(np.float32)).astype(dtype) for shape in shapes]


def xla(x, w, strides, pads, dilation=(1, 1)):
    return conv.xla_conv(x, w, strides, pads, dilation)


def values_and_gradients(conv_fn):
    """``(x, w, g) -> (conv_fn(x, w), dx, dw)`` for the cotangent ``g``."""
    def run(x, w, g):
        y, vjp = jax.vjp(conv_fn, x, w)
        return (y, *vjp(g))

    return run


def assert_close_for_their_size(got, want, rel=2e-5):
    """Trees of float32 results equal up to rounding relative to each leaf's largest value: sums of many terms of
    either sign differ in the last bits of the terms, not of the (possibly much smaller) sum."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        chex.assert_shape(g, w.shape)
        np.testing.assert_allclose(g, w, atol=rel * max(1e-6, float(jnp.max(jnp.abs(w)))), rtol=1e-4)


def custom_calls(text: str, target: str = onednn.CONV_TARGET) -> list[dict[str, int]]:
    """The integer attributes of each custom call of ``target`` in lowered StableHLO text."""
    found = []
    for line in text.splitlines():
        if f"custom_call @{target}(" in line:
            attrs = re.search(r"mhlo\.backend_config = \{([^}]*)\}", line).group(1)
            found.append({k: int(v) for k, v in re.findall(r"(\w+) = (-?\d+) : i64", attrs)})
    return found


def lowered(fn, *args) -> str:
    """``fn`` lowered for this CPU from a fresh trace."""
    return jax.jit(fn).lower(*args).as_text()


# ----------------------------------------------------------------------------------------------- convolutions


# The 7x7 stem and LeNet's 5x5 conv never take patches (Rules.conv_path): left out to save their compile time.
PATCHES_CASES = [case for case in CASES + GREYSCALE_CASES if case[3] not in ((7, 7), (5, 5))]


@pytest.mark.parametrize("hw,c_in,c_out,k,s,pads,d", PATCHES_CASES, ids=str)
def test_patches_conv_matches_xla_values_and_gradients(hw, c_in, c_out, k, s, pads, d):
    """Patches times the reshaped kernel, XLA's gradients (no oneDNN involved)."""
    x, w = draw(1, (2, *hw, c_in), (*k, c_in, c_out))
    (g,) = draw(2, xla(x, w, s, pads, d).shape)
    want = values_and_gradients(lambda x, w: xla(x, w, s, pads, d))(x, w, g)
    fn = jax.jit(values_and_gradients(lambda x, w: patches_conv(x, w, s, pads, d)))
    assert_close_for_their_size(fn(x, w, g), want)


@pytest.mark.parametrize("hw,c_in,c_out,k,s,pads,d", CASES + GREYSCALE_CASES, ids=CONV_IDS)
def test_shifted_sum_conv_forward_matches_xla(hw, c_in, c_out, k, s, pads, d):
    x, w = draw(3, (2, *hw, c_in), (*k, c_in, c_out))
    want = xla(x, w, s, pads, d)
    fn = jax.jit(lambda x, w: shifted_sum_conv(x, w, s, pads, d))
    chex.assert_trees_all_close(fn(x, w), want, atol=1e-4, rtol=1e-5)


def test_shifted_sum_accumulates_bfloat16_in_float32():
    x, w = draw(4, (2, 12, 12, 1), (5, 5, 1, 8), dtype=jnp.bfloat16)
    pads = ((2, 2), (2, 2))
    got = shifted_sum_conv(x, w, (1, 1), pads, (1, 1))
    assert got.dtype == jnp.bfloat16
    exact = xla(x.astype(jnp.float32), w.astype(jnp.float32), (1, 1), pads)
    # Summed in float32 and rounded once: within one bf16 rounding (2^-8 relative) of the exact sum.
    np.testing.assert_allclose(np.asarray(got, np.float32), exact, rtol=2 ** -8, atol=1e-6)


@needs_onednn
@pytest.mark.parametrize("hw,c_in,c_out,k,s,pads,d", GREYSCALE_CASES + CASES[:1], ids=CONV_IDS[-3:] + CONV_IDS[:1])
def test_shifted_sum_conv_with_onednn_gradients_matches_xla(hw, c_in, c_out, k, s, pads, d):
    library()
    x, w = draw(5, (3, *hw, c_in), (*k, c_in, c_out))
    (g,) = draw(6, xla(x, w, s, pads, d).shape)
    want = values_and_gradients(lambda x, w: xla(x, w, s, pads, d))(x, w, g)
    fn = jax.jit(values_and_gradients(lambda x, w: shifted_sum_conv(x, w, s, pads, d)))
    assert_close_for_their_size(fn(x, w, g), want)


@needs_onednn
@pytest.mark.parametrize("hw,c_in,c_out,k,s,pads,d", CASES + GREYSCALE_CASES, ids=CONV_IDS)
def test_onednn_conv_matches_xla_values_and_gradients(hw, c_in, c_out, k, s, pads, d):
    library()
    x, w = draw(7, (3, *hw, c_in), (*k, c_in, c_out))

    def loss(f):
        return lambda x, w: jnp.sum(jnp.sin(f(x, w)) * f(x, w))

    want = jax.value_and_grad(loss(lambda x, w: xla(x, w, s, pads, d)), (0, 1))(x, w)
    fn = jax.jit(jax.value_and_grad(loss(lambda x, w: onednn_conv(x, w, s, pads, d)), (0, 1)))
    got = fn(x, w)
    assert_close_for_their_size(got, want)
    assert float(jnp.max(jnp.abs(want[1][1]))) > 0.1  # a gradient that could be wrong


# The forward as oneDNN's input gradient of the transposed conv (flipped kernel, channels swapped, pads k - 1 - p):
# every pad from 0 to kernel - 1, non-square kernels and maps, a 1x1 output.
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
def test_onednn_forward_as_the_transposed_input_gradient_matches_xla(monkeypatch, hw, c_in, c_out, k, pads):
    """The rule reads the CPU (float32 without AVX-512 only), so the test pretends there is no AVX-512."""
    pretend_no_avx512(monkeypatch)
    x, w = draw(8, (5, *hw, c_in), (*k, c_in, c_out))
    (g,) = draw(9, xla(x, w, (1, 1), pads).shape)
    want = values_and_gradients(lambda x, w: xla(x, w, (1, 1), pads))(x, w, g)
    for as_input_gradient in (False, True):
        rules = Rules(forward_as_input_gradient=as_input_gradient)
        forward = lambda x, w, r=rules: onednn_conv(x, w, (1, 1), pads, (1, 1), r)  # noqa: E731
        kinds = [c["kind"] for c in custom_calls(lowered(forward, x, w))]
        assert kinds == [onednn.INPUT_GRAD if as_input_gradient else onednn.FORWARD]
        fn = jax.jit(values_and_gradients(forward))
        assert_close_for_their_size(fn(x, w, g), want, rel=1e-5)


# Kernel gradients of stride-1 convs: oneDNN's backward-weights primitive ('native'), one forward conv with the batch
# as the channels ('forward'), or one matrix product of the input patches ('matmul').
WGRAD_CASES = [
    # (batch, hw, c_in, c_out, kernel, pads)
    (6, (3, 3), 32, 16, (3, 3), ((1, 1), (1, 1))),  # 3x3 map
    (5, (4, 2), 8, 24, (3, 3), ((0, 2), (1, 1))),  # 4x2, asymmetric padding
    (4, (6, 6), 16, 8, (3, 3), ((1, 1), (1, 1))),
    (3, (9, 7), 4, 6, (3, 2), ((0, 1), (1, 0))),  # a 3x2 kernel
    (2, (8, 8), 8, 8, (1, 1), ((0, 0), (0, 0))),  # 1x1 kernel
    (3, (12, 12), 8, 8, (3, 3), ((1, 1), (1, 1))),
    (5, (7, 7), 16, 32, (3, 3), ((1, 1), (1, 1))),  # a batch of 5: slices of 2 and 3
]


@needs_onednn
@pytest.mark.parametrize("path", [p for p in onednn.WGRAD_PATHS if p != "depthwise"])  # groups 1
@pytest.mark.parametrize("batch,hw,c_in,c_out,k,pads", WGRAD_CASES, ids=str)
def test_each_float32_kernel_gradient_path_matches_xla(path, batch, hw, c_in, c_out, k, pads):
    library()
    x, w = draw(10, (batch, *hw, c_in), (*k, c_in, c_out))
    (g,) = draw(11, xla(x, w, (1, 1), pads).shape)
    want = jax.vjp(lambda w: xla(x, w, (1, 1), pads), w)[1](g)[0]
    kernel_grad = lambda x, w, g: jax.vjp(  # noqa: E731
        lambda w: onednn_conv(x, w, (1, 1), pads, (1, 1), Rules(wgrad=path)), w)[1](g)[0]
    assert [c["wgrad"] for c in custom_calls(lowered(kernel_grad, x, w, g)) if c["kind"] == onednn.KERNEL_GRAD] == \
        [onednn.WGRAD_PATHS[path]]
    fn = jax.jit(kernel_grad)
    got = fn(x, w, g)
    chex.assert_shape(got, w.shape)
    np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.max(jnp.abs(want))), rtol=1e-5)


@needs_onednn
@pytest.mark.parametrize("batch,hw,c_in,c_out,k,pads", WGRAD_CASES[:6], ids=str)
def test_bfloat16_kernel_gradients_by_the_default_rules_are_within_one_rounding(batch, hw, c_in, c_out, k, pads):
    """bfloat16 (AVX-512): 'forward' up to 4x4 maps, 'matmul' up to 8x8, else 'native' (the rule, lowered)."""
    skip_without_avx512()
    x, w = draw(12, (batch, *hw, c_in), (*k, c_in, c_out), dtype=jnp.bfloat16)
    (g,) = draw(13, xla(x, w, (1, 1), pads).shape, dtype=jnp.bfloat16)
    kernel_grad = lambda x, w, g: jax.vjp(lambda w: onednn_conv(x, w, (1, 1), pads), w)[1](g)[0]  # noqa: E731
    picked = DEFAULT.wgrad_path("bfloat16", x.shape, w.shape, g.shape[1:3], avx512=True)
    assert [c["wgrad"] for c in custom_calls(lowered(kernel_grad, x, w, g)) if c["kind"] == onednn.KERNEL_GRAD] == \
        [onednn.WGRAD_PATHS[picked]]
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    want = jax.vjp(lambda w: xla(f32(x), w, (1, 1), pads), f32(w))[1](f32(g))[0]
    fn = jax.jit(kernel_grad)
    got = fn(x, w, g)
    assert got.dtype == jnp.bfloat16 and got.shape == w.shape
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2 ** -7 * float(jnp.max(jnp.abs(want))))


@needs_onednn
def test_onednn_bfloat16_is_within_one_rounding_of_the_float32_conv():
    skip_without_avx512()
    x, w = draw(14, (4, 10, 10, 16), (3, 3, 16, 8), dtype=jnp.bfloat16)
    (g,) = draw(15, (4, 10, 10, 8), dtype=jnp.bfloat16)
    pads = ((1, 1), (1, 1))
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    want = values_and_gradients(lambda x, w: xla(x, w, (1, 1), pads))(f32(x), f32(w), f32(g))
    fn = jax.jit(values_and_gradients(lambda x, w: onednn_conv(x, w, (1, 1), pads)))
    for got, exact in zip(fn(x, w, g), want, strict=True):
        assert got.dtype == jnp.bfloat16
        scale = float(jnp.max(jnp.abs(exact)))
        np.testing.assert_allclose(np.asarray(got, np.float32), exact, atol=2 ** -7 * scale)


@needs_onednn
@pytest.mark.parametrize("c_in,s,pads", [(1, (2, 2), ((0, 0), (0, 0))), (5, (3, 2), ((1, 0), (0, 1))),
                                         (16, (2, 2), ((1, 1), (1, 1)))])
def test_onednn_strided_1x1_kernel_gradients_match_xla(c_in, s, pads):
    """Kernel gradients of strided 1x1 convs run as unit-stride ones on the input positions the kernel reads
    (onednn_kernels.cc: oneDNN's own wrote past its scratchpad), padding included; 5 images: slices of 2 and 3."""
    library()
    x, w = draw(16, (5, 9, 8, c_in), (1, 1, c_in, 6))
    (g,) = draw(17, xla(x, w, s, pads).shape)
    want = values_and_gradients(lambda x, w: xla(x, w, s, pads))(x, w, g)
    fn = jax.jit(values_and_gradients(lambda x, w: onednn_conv(x, w, s, pads)))
    got = fn(x, w, g)
    chex.assert_trees_all_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(got[1:], want[1:], atol=1e-4, rtol=1e-5)
    assert float(jnp.abs(want[2]).max()) > 1.0  # not degenerate


# Grouped convs: (hw, c_in, c_out, groups, kernel, strides, pads, dilation); depthwise ones have groups == c_in.
GROUPED_CASES = [
    ((9, 9), 4, 6, 2, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)),  # groups 2
    ((8, 8), 64, 64, 32, (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1)),  # ResNeXt-like: 32 groups of 2
    ((7, 7), 104, 104, 13, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)),  # RegNet-like: 13 groups of 8
    ((9, 7), 8, 8, 8, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)),  # depthwise 3x3
    ((11, 11), 16, 16, 16, (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1)),  # depthwise 3x3, stride 2
    ((13, 13), 12, 12, 12, (5, 5), (2, 2), ((2, 2), (2, 2)), (1, 1)),  # depthwise 5x5, stride 2
    ((9, 11), 12, 12, 12, (5, 5), (1, 1), ((2, 2), (2, 2)), (1, 1)),  # depthwise 5x5
    ((9, 9), 24, 24, 24, (7, 7), (1, 1), ((3, 3), (3, 3)), (1, 1)),  # ConvNeXt's depthwise 7x7
    ((15, 15), 8, 8, 8, (7, 7), (2, 2), ((3, 3), (3, 3)), (1, 1)),  # depthwise 7x7, stride 2
    ((10, 9), 6, 12, 6, (3, 3), (2, 2), ((0, 1), (1, 0)), (1, 1)),  # depthwise, 2 outputs per channel, asymmetric
    ((11, 11), 8, 8, 8, (3, 3), (1, 1), ((2, 2), (2, 2)), (2, 2)),  # depthwise, dilated
    ((9, 8), 8, 12, 4, (1, 1), (2, 2), ((0, 0), (1, 0)), (1, 1)),  # strided 1x1: the gathered kernel gradient
]
GROUPED_IDS = [f"{hw[0]}x{hw[1]}x{ci}-{co}-g{g}-k{k[0]}x{k[1]}-s{s[0]}{s[1]}-d{d[0]}"
               for hw, ci, co, g, k, s, _, d in GROUPED_CASES]


@needs_onednn
@pytest.mark.parametrize("hw,c_in,c_out,groups,k,s,pads,d", GROUPED_CASES, ids=GROUPED_IDS)
def test_onednn_grouped_conv_matches_xla_values_and_gradients(hw, c_in, c_out, groups, k, s, pads, d):
    """oneDNN's grouped primitives (the kernel [kH, kW, C / groups, O] as oneDNN's hwigo), forward and both
    gradients, directly and through conv2d(impl='cpu'); 3 images: slices of 1 and 2."""
    library()
    x, w = draw(24, (3, *hw, c_in), (*k, c_in // groups, c_out))
    want_fn = lambda x, w: conv.xla_conv(x, w, s, pads, d, groups)  # noqa: E731
    (g,) = draw(25, want_fn(x, w).shape)
    want = values_and_gradients(want_fn)(x, w, g)
    for fn in (lambda x, w: onednn_conv(x, w, s, pads, d),
               lambda x, w: conv.conv2d(x, w, s, pads, d, groups, impl="cpu")):
        got = jax.jit(values_and_gradients(fn))(x, w, g)
        assert_close_for_their_size(got, want)
    assert len(custom_calls(lowered(values_and_gradients(want_fn), x, w, g))) == 0
    calls = custom_calls(lowered(values_and_gradients(lambda x, w: conv.conv2d(x, w, s, pads, d, groups,
                                                                              impl="cpu")), x, w, g))
    wgrad = onednn.WGRAD_PATHS[DEFAULT.grouped_wgrad_path(w.shape, groups, d)]
    assert [c["groups"] for c in calls] == [groups] * 3 and [c["wgrad"] for c in calls] == [0, 0, wgrad]
    assert float(jnp.max(jnp.abs(want[2]))) > 0.1  # a kernel gradient that could be wrong


DEPTHWISE_CASES = [case for case in GROUPED_CASES if case[3] == case[1]]


@needs_onednn
@pytest.mark.parametrize("path", ["native", "depthwise"])
@pytest.mark.parametrize("hw,c_in,c_out,groups,k,s,pads,d", DEPTHWISE_CASES,
                         ids=[i for i, case in zip(GROUPED_IDS, GROUPED_CASES, strict=True) if case[3] == case[1]])
def test_each_depthwise_kernel_gradient_path_matches_xla(path, hw, c_in, c_out, groups, k, s, pads, d):
    """oneDNN's primitive and cnnjax's loop (onednn_kernels.cc: DepthwiseWgrad), asked for directly: kernels 3 to 7
    wide, strides, dilation, asymmetric pads, two outputs per channel, channels not a whole vector; 5 images: slices
    of 2 and 3. (Rules.grouped_wgrad_path picks one of them by shape.)"""
    library()
    x, w = draw(28, (5, *hw, c_in), (*k, 1, c_out))
    want_fn = lambda x, w: conv.xla_conv(x, w, s, pads, d, groups)  # noqa: E731
    (g,) = draw(29, want_fn(x, w).shape)
    want = values_and_gradients(want_fn)(x, w, g)[2]
    fn = jax.jit(lambda x, g: onednn.conv_call(onednn.KERNEL_GRAD, x, g, w.shape, s, pads, d, path, groups))
    assert_close_for_their_size(fn(x, g), want)
    (call,) = custom_calls(lowered(fn, x, g))
    assert call["wgrad"] == onednn.WGRAD_PATHS[path]


@needs_onednn
@pytest.mark.parametrize("c_in,c_out,groups,k", [(16, 16, 16, 3), (16, 16, 16, 7), (8, 16, 8, 5), (16, 24, 2, 3)],
                         ids=str)
def test_onednn_grouped_bfloat16_is_within_one_rounding_of_the_float32_conv(c_in, c_out, groups, k):
    """Depthwise 3x3 and 7x7 (oneDNN's and cnnjax's depthwise kernel gradients), two outputs per channel, groups 2."""
    skip_without_avx512()
    pads = ((k // 2, k // 2),) * 2
    x, w = draw(26, (4, 10, 9, c_in), (k, k, c_in // groups, c_out), dtype=jnp.bfloat16)
    (g,) = draw(27, (4, 5, 5, c_out), dtype=jnp.bfloat16)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    want = values_and_gradients(lambda x, w: conv.xla_conv(x, w, (2, 2), pads, groups=groups))(f32(x), f32(w), f32(g))
    fn = jax.jit(values_and_gradients(lambda x, w: conv.conv2d(x, w, (2, 2), pads, groups=groups, impl="cpu")))
    for got, exact in zip(fn(x, w, g), want, strict=True):
        assert got.dtype == jnp.bfloat16
        scale = float(jnp.max(jnp.abs(exact)))
        np.testing.assert_allclose(np.asarray(got, np.float32), exact, atol=2 ** -7 * scale)


@needs_onednn
def test_grouped_convs_refuse_kernels_that_fit_no_grouping():
    library()
    x = jnp.ones((1, 6, 6, 6))
    static = dict(strides=(1, 1), pads=((1, 1), (1, 1)), dilation=(1, 1), precision=None)
    with pytest.raises(ValueError, match="do not fit groups 2"):
        cpu.implementation("conv2d", (x, jnp.ones((3, 3, 2, 4))), {**static, "groups": 2})(x, jnp.ones((3, 3, 2, 4)))
    with pytest.raises(ValueError, match="do not fit groups 3"):  # 3 groups do not divide 4 outputs
        cpu.implementation("conv2d", (x, jnp.ones((3, 3, 2, 4))), {**static, "groups": 3})(x, jnp.ones((3, 3, 2, 4)))
    with pytest.raises(ValueError, match="no grouping fits"):
        onednn_conv(x, jnp.ones((3, 3, 4, 4)), (1, 1), static["pads"])


@needs_onednn
@pytest.mark.parametrize("batch", [1, 3, 5, 9])
def test_onednn_batch_slices_match_xla_for_any_batch(batch):
    """Each call runs its batch in slices (uneven ones included, kernel gradients summed over them): the values and
    both gradients stay XLA's."""
    library()
    x, w = draw(18, (batch, 9, 8, 6), (3, 3, 6, 5))
    (g,) = draw(19, (batch, 9, 8, 5))
    pads = ((1, 1), (1, 1))
    want = values_and_gradients(lambda x, w: xla(x, w, (1, 1), pads))(x, w, g)
    got = jax.jit(values_and_gradients(lambda x, w: onednn_conv(x, w, (1, 1), pads)))(x, w, g)
    assert_close_for_their_size(got, want)


@needs_onednn
def test_onednn_under_vmap_equals_a_loop():
    library()
    x, w = draw(20, (3, 2, 6, 6, 4), (3, 3, 4, 5))
    f = lambda x: onednn_conv(x, w, (1, 1), ((1, 1), (1, 1)))  # noqa: E731
    chex.assert_trees_all_close(jax.vmap(f)(x), jnp.stack([xla(v, w, (1, 1), ((1, 1), (1, 1))) for v in x]),
                                atol=1e-4)
    chex.assert_trees_all_close(jax.vmap(f)(x), jnp.stack([f(v) for v in x]), atol=1e-6)


@needs_onednn
@pytest.mark.skipif(jax.device_count() < 4, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=4")
def test_onednn_under_a_batch_sharded_jit_equals_xla():
    """XLA's partitioner cannot split the custom call, so it gathers the batch for it: the same numbers."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    library()
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    x, w = draw(21, (8, 10, 10, 4), (3, 3, 4, 6))
    x, w = jax.device_put(x, NamedSharding(mesh, P("data"))), jax.device_put(w, NamedSharding(mesh, P()))

    def step(conv_fn):
        return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.tanh(conv_fn(x, w)) ** 2), (0, 1)))

    pads = ((1, 1), (1, 1))
    chex.assert_trees_all_close(step(lambda x, w: onednn_conv(x, w, (1, 1), pads))(x, w),
                                step(lambda x, w: xla(x, w, (1, 1), pads))(x, w), atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------------------------------- through the seam


def _seam_conv_calls(x, w, padding="SAME", with_value=True) -> int:
    """oneDNN conv calls in 'auto' convs (forward and both gradients) lowered for this CPU."""
    f = lambda x, w: jnp.sum(jnp.tanh(conv.conv2d(x, w, (1, 1), padding)))  # noqa: E731
    return len(custom_calls(lowered(jax.value_and_grad(f, (0, 1)) if with_value else jax.grad(f, (0, 1)), x, w)))


@needs_onednn
def test_the_seam_runs_onednn_in_one_cpu_process_only(monkeypatch):
    """'auto' calls the oneDNN conv for a 3x3 conv's forward and both gradients; never for 1x1 kernels (one
    matmul) or float16, nor over several processes (a custom call cannot be split across them); LeNet's greyscale
    5x5 1 -> 8 conv keeps the shifted-sum forward with oneDNN's two gradients."""
    library()
    use_path(monkeypatch, "cpu")
    x, w = jnp.ones((2, 16, 16, 8)), jnp.ones((3, 3, 8, 8))
    assert _seam_conv_calls(x, w) == 3  # forward, input gradient, kernel gradient
    assert _seam_conv_calls(x, jnp.ones((1, 1, 8, 8))) == 0
    assert _seam_conv_calls(x.astype(jnp.float16), w.astype(jnp.float16)) == 0
    grey, grey_w = jnp.ones((2, 32, 32, 1)), jnp.ones((5, 5, 1, 8))
    assert _seam_conv_calls(grey, grey_w, "VALID") == 2
    with monkeypatch.context() as m:
        m.setattr(jax, "process_count", lambda: 2)
        assert _seam_conv_calls(x, w) == 0
        assert cpu.implementation("max_pool", (x,), dict(window=(2, 2), stride=(2, 2), padding=(0, 0))) is None


@needs_onednn
def test_without_avx512_bfloat16_stays_plain_and_float32_runs_onednn(monkeypatch):
    """On a CPU without AVX-512 (oneDNN builds no bfloat16 primitives there) bfloat16 convs and max-pools keep
    XLA's / the strided views, float32 still runs through oneDNN."""
    pretend_no_avx512(monkeypatch)
    x, w = jnp.ones((2, 10, 10, 8)), jnp.ones((3, 3, 8, 8))
    conv_calls = lambda x, w: len(custom_calls(lowered(  # noqa: E731
        lambda x, w: conv.conv2d(x, w, (1, 1), "SAME", impl="cpu"), x, w)))
    assert conv_calls(x, w) == 1 and conv_calls(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)) == 0
    always = Rules(onednn_max_pool="always")
    pool_calls = lambda x: len(custom_calls(lowered(  # noqa: E731
        lambda x: cpu_pool.max_pool(x, window=(3, 3), stride=(2, 2), padding=(1, 1), rules=always), x),
        onednn.POOL_FORWARD_TARGET))
    assert pool_calls(x) == 1 and pool_calls(x.astype(jnp.bfloat16)) == 0


@needs_onednn
def test_implementation_offers_kernels_and_declines_what_it_has_not():
    library()
    x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
    static = dict(strides=(1, 1), pads=((1, 1), (1, 1)), dilation=(1, 1), groups=1, precision=None)
    assert callable(cpu.implementation("conv2d", (x, w), static))
    assert callable(cpu.implementation("conv2d", (x, jnp.ones((3, 3, 2, 4))), {**static, "groups": 2}))
    assert callable(cpu.implementation("conv2d", (x, jnp.ones((3, 3, 1, 8))), {**static, "groups": 4}))
    assert cpu.implementation("conv2d", (x.astype(jnp.float16), w.astype(jnp.float16)), static) is None
    assert cpu.implementation("conv2d", (np.ones(x.shape), np.ones(w.shape)), static) is None  # float64
    pool = dict(window=(2, 2), stride=(2, 2), padding=(0, 0))
    assert callable(cpu.implementation("max_pool", (x,), pool))
    assert cpu.implementation("max_pool", (np.ones(x.shape),), pool) is None
    bn_args, bn = (x, jnp.ones(4), jnp.zeros(4)), dict(epsilon=1e-5, axis_name=None)
    assert callable(cpu.implementation("batch_norm_train", bn_args, bn))
    assert cpu.implementation("batch_norm_train", bn_args, bn, rules=Rules(closed_form_batch_norm=False)) is None
    with pytest.raises(ValueError, match=r"^unknown op 'conv3d'; the CPU backend has conv2d, max_pool, "
                                         r"batch_norm_train$"):
        cpu.implementation("conv3d", (x, w), static)


@needs_onednn
def test_implementation_runs_by_the_rules_it_is_given():
    """A :class:`Rules` instance reaches the kernels: a 2x2-output conv is patches by default and oneDNN's where
    ``patches_max_output`` is 0; max-pools follow ``onednn_max_pool``; the numbers stay XLA's."""
    library()
    x, w = draw(22, (2, 2, 2, 8), (3, 3, 8, 6))
    static = dict(strides=(1, 1), pads=((1, 1), (1, 1)), dilation=(1, 1), groups=1, precision=None)
    want = xla(x, w, (1, 1), static["pads"])
    for rules, calls in ((DEFAULT, 0), (Rules(patches_max_output=0), 1)):
        fn = cpu.implementation("conv2d", (x, w), static, rules=rules)
        assert len(custom_calls(lowered(fn, x, w))) == calls
        chex.assert_trees_all_close(fn(x, w), want, atol=1e-5, rtol=1e-5)
    (p,) = draw(23, (2, 9, 9, 4))
    pool = dict(window=(3, 3), stride=(2, 2), padding=(1, 1))
    for setting, calls in (("never", 0), ("always", 1)):
        fn = cpu.implementation("max_pool", (p,), pool, rules=Rules(onednn_max_pool=setting))
        assert len(custom_calls(lowered(fn, p), onednn.POOL_FORWARD_TARGET)) == calls
        chex.assert_trees_all_equal(fn(p), layers.reduce_window_max_pool(p, (3, 3), (2, 2), (1, 1)))


@pytest.mark.parametrize("x_dtype,groups,what", [(jnp.float16, 2, "float16, groups 2"),
                                                 (jnp.float16, 1, "float16, groups 1")])
def test_conv2d_impl_cpu_without_a_kernel_is_a_one_line_error(x_dtype, groups, what):
    x, w = jnp.ones((1, 6, 6, 4), x_dtype), jnp.ones((3, 3, 4 // groups, 4), x_dtype)
    with pytest.raises(UsageError, match=rf"^the CPU backend has no kernel for this conv \({what}\): .*"
                                         r"use impl='auto' or 'xla'$") as e:
        conv.conv2d(x, w, (1, 1), "SAME", groups=groups, impl="cpu")
    assert "\n" not in str(e.value)


@needs_onednn
@pytest.mark.parametrize("kernel_hw", [(3, 3), (1, 1)])
def test_the_backend_declines_mixed_dtypes_and_xla_refuses_them(kernel_hw):
    library()
    x, w = jnp.ones((1, 4, 4, 2)), jnp.ones((*kernel_hw, 2, 2), jnp.bfloat16)
    for impl in ("xla", "auto"):  # the backend declines two dtypes: 'auto' is XLA's conv, which refuses them
        with pytest.raises(TypeError, match="same dtypes"):
            jax.jit(lambda a, b, impl=impl: conv.conv2d(a, b, (1, 1), "SAME", impl=impl))(x, w)
    assert cpu.implementation("conv2d", (x, w), dict(strides=(1, 1), pads=((0, 0),) * 2, dilation=(1, 1), groups=1,
                                                     precision=None)) is None
    with pytest.raises(UsageError, match="the CPU backend has no kernel for this conv"):
        conv.conv2d(x, w, (1, 1), "SAME", impl="cpu")


@needs_onednn
def test_describe_names_the_library_and_the_max_pools(monkeypatch):
    lib = library()
    use_path(monkeypatch, "cpu")
    line = cpu.describe()
    assert str(onednn.built()) in line and "\n" not in line
    assert line.endswith("oneDNN max-pools" if lib.avx512 else "strided-view max-pools")
    assert kernels.describe() == f"cpu backend: {line}"


# ----------------------------------------------------------------------------------------------------- rules

# (x, kernel, strides, pads, onednn_runs, path)
CONV_PATH_TABLE = [
    ((2, 28, 28, 1), (3, 3, 1, 16), (1, 1), ((1, 1), (1, 1)), True, "shifted"),  # SimpleCNN's greyscale conv
    ((2, 28, 28, 1), (3, 3, 1, 16), (1, 1), ((1, 1), (1, 1)), False, "patches"),  # no oneDNN for its gradients
    ((2, 32, 32, 1), (5, 5, 1, 8), (1, 1), ((0, 0), (0, 0)), True, "shifted"),
    ((2, 32, 32, 1), (5, 5, 1, 6), (1, 1), ((0, 0), (0, 0)), True, "onednn"),  # 6 outputs: not a multiple of 8
    ((2, 28, 28, 1), (9, 9, 1, 16), (1, 1), ((4, 4), (4, 4)), True, "onednn"),  # 81 taps: over shifted_max_terms
    ((2, 28, 28, 1), (3, 3, 1, 6), (1, 1), ((1, 1), (1, 1)), True, "patches"),  # other greyscale 3x3: patches
    ((2, 32, 32, 3), (3, 3, 3, 16), (1, 1), ((1, 1), (1, 1)), True, "onednn"),  # an RGB stem
    ((2, 32, 32, 3), (3, 3, 3, 16), (1, 1), ((1, 1), (1, 1)), False, "xla"),
    ((2, 56, 56, 64), (1, 1, 64, 64), (1, 1), ((0, 0), (0, 0)), True, "patches"),  # 1x1: one matmul
    ((2, 8, 8, 64), (1, 1, 64, 32), (2, 2), ((0, 0), (0, 0)), False, "patches"),
    ((2, 2, 2, 256), (3, 3, 256, 256), (1, 1), ((1, 1), (1, 1)), True, "patches"),  # a 2x2 output
    ((2, 3, 3, 256), (3, 3, 256, 256), (1, 1), ((1, 1), (1, 1)), True, "onednn"),  # 3x3
    ((2, 32, 32, 16), (3, 3, 16, 32), (2, 2), ((1, 1), (1, 1)), True, "onednn"),  # strided
]


@pytest.mark.parametrize("x_shape,k_shape,strides,pads,runs,want", CONV_PATH_TABLE, ids=str)
def test_conv_path_rule(x_shape, k_shape, strides, pads, runs, want):
    assert DEFAULT.conv_path(x_shape, k_shape, strides, pads, (1, 1), runs) == want


@pytest.mark.parametrize("x_shape,k_shape,groups", [((2, 56, 56, 144), (3, 3, 1, 144), 144),  # depthwise
                                                   ((2, 28, 28, 16), (3, 3, 1, 32), 16),  # 2 outputs per channel
                                                   ((2, 56, 56, 128), (3, 3, 4, 128), 32),  # ResNeXt's
                                                   ((2, 8, 8, 64), (1, 1, 32, 64), 2)], ids=str)
def test_grouped_convs_take_onednn_wherever_it_runs(x_shape, k_shape, groups):
    """No shifted sum or patches for groups > 1 (not even 1x1 kernels or one input channel per group)."""
    for runs, want in ((True, "onednn"), (False, "xla")):
        assert DEFAULT.conv_path(x_shape, k_shape, (1, 1), ((1, 1), (1, 1)), (1, 1), runs, groups) == want


def test_grouped_kernel_gradient_rule():
    """Depthwise kernels at least depthwise_wgrad_loop_min_width wide, or dilated, take the loop; others oneDNN's."""
    native, loop = "native", "depthwise"
    assert DEFAULT.grouped_wgrad_path((3, 3, 1, 144), 144, (1, 1)) == native
    assert DEFAULT.grouped_wgrad_path((3, 3, 1, 144), 144, (2, 2)) == loop
    assert DEFAULT.grouped_wgrad_path((5, 5, 1, 144), 144, (1, 1)) == loop
    assert DEFAULT.grouped_wgrad_path((7, 7, 1, 192), 96, (1, 1)) == loop  # two outputs per channel
    assert DEFAULT.grouped_wgrad_path((7, 7, 2, 192), 96, (1, 1)) == native  # two input channels per group
    assert Rules(depthwise_wgrad_loop_min_width=0).grouped_wgrad_path((3, 3, 1, 8), 8, (1, 1)) == loop
    assert Rules(depthwise_wgrad_loop_min_width=8).grouped_wgrad_path((7, 7, 1, 8), 8, (1, 1)) == native


def test_conv_path_rule_follows_its_fields():
    grey = ((2, 28, 28, 1), (3, 3, 1, 16), (1, 1), ((1, 1), (1, 1)), (1, 1), True)
    assert Rules(shifted_max_in=0).conv_path(*grey) == "onednn"  # not shifted, not 'greyscale' patches
    assert Rules(shifted_out_multiple=32).conv_path(*grey) == "patches"
    assert Rules(shifted_max_terms=8).conv_path(*grey) == "patches"
    small = ((2, 2, 2, 256), (3, 3, 256, 256), (1, 1), ((1, 1), (1, 1)), (1, 1), True)
    assert Rules(patches_max_output=0).conv_path(*small) == "onednn"
    assert Rules(patches_max_output=9).conv_path((2, 3, 3, 256), *small[1:]) == "patches"


# (x, kernel, output map, path) for float32 without AVX-512: fast_cnn@28's convs at batch 512, a 56x56 map whose
# patches pass the cap, two narrow ones (python -m experiments.bench.convs times them).
F32_WGRAD_PICKS = [
    ((512, 28, 28, 1), (2, 2, 1, 8), (27, 27), "native"),
    ((512, 27, 27, 8), (3, 3, 8, 64), (27, 27), "matmul"),
    ((512, 13, 13, 64), (3, 3, 64, 64), (13, 13), "forward"),
    ((512, 13, 13, 64), (3, 3, 64, 256), (13, 13), "matmul"),
    ((512, 6, 6, 256), (3, 3, 256, 256), (6, 6), "forward"),
    ((512, 3, 3, 256), (3, 3, 256, 256), (3, 3), "matmul"),
    ((128, 56, 56, 64), (3, 3, 64, 128), (56, 56), "forward"),  # widens, but its patches pass the cap
    ((128, 32, 32, 16), (3, 3, 16, 16), (32, 32), "native"),
    ((128, 14, 14, 16), (3, 3, 16, 32), (14, 14), "forward"),  # simple_cnn@28's second: widens, but to 32 only
]


def test_kernel_gradient_paths_by_dtype_cpu_and_shape():
    picks = lambda rules, dtype, avx512: [rules.wgrad_path(dtype, *case[:3], avx512=avx512)  # noqa: E731
                                          for case in F32_WGRAD_PICKS]
    assert picks(DEFAULT, "float32", False) == [case[3] for case in F32_WGRAD_PICKS]  # AVX2: float32 by shape
    assert set(picks(DEFAULT, "float32", True)) == {"native"}  # AVX-512: oneDNN's own
    assert set(picks(Rules(wgrad_by_shape=False), "float32", False)) == {"native"}
    # bfloat16 (AVX-512 only) by map size: forward up to 4x4, matmul up to 8x8, else native
    assert [DEFAULT.wgrad_path("bfloat16", *case[:3], avx512=True) for case in F32_WGRAD_PICKS[3:6]] == \
        ["native", "matmul", "forward"]
    for path in ("native", "forward", "matmul"):  # one path for all
        assert set(picks(Rules(wgrad=path), "float32", False) + picks(Rules(wgrad=path), "bfloat16", True)) == {path}
    # matmul only while the patches fit: 128 x 56 x 56 x 576 floats are 925 MB
    assert Rules(wgrad_matmul_max_bytes=1 << 30).wgrad_path("float32", *F32_WGRAD_PICKS[6][:3], avx512=False) == \
        "matmul"
    assert Rules(wgrad_matmul_max_bytes=0).wgrad_path("float32", *F32_WGRAD_PICKS[1][:3], avx512=False) == \
        "forward"


SAME = ((1, 1), (1, 1))


@pytest.mark.parametrize("rules,dtype,kernel,strides,pads,dilation,avx512,want", [
    (DEFAULT, "float32", (3, 3), (1, 1), SAME, (1, 1), False, True),
    (DEFAULT, "float32", (2, 2), (1, 1), ((0, 0), (0, 0)), (1, 1), False, True),
    (DEFAULT, "float32", (5, 5), (1, 1), ((0, 0), (4, 2)), (1, 1), False, True),  # every pad up to k - 1
    (DEFAULT, "float32", (3, 3), (2, 2), SAME, (1, 1), False, False),  # strided
    (DEFAULT, "float32", (3, 3), (1, 1), SAME, (2, 2), False, False),  # dilated
    (DEFAULT, "float32", (3, 3), (1, 1), ((3, 1), (1, 1)), (1, 1), False, False),  # a pad over k - 1
    (DEFAULT, "bfloat16", (3, 3), (1, 1), SAME, (1, 1), False, False),
    (DEFAULT, "float32", (3, 3), (1, 1), SAME, (1, 1), True, False),  # AVX-512: oneDNN's own forward
    (Rules(forward_as_input_gradient=False), "float32", (3, 3), (1, 1), SAME, (1, 1), False, False),
], ids=str)
def test_forward_by_input_gradient_rule(rules, dtype, kernel, strides, pads, dilation, avx512, want):
    assert rules.forward_by_input_gradient(dtype, kernel, strides, pads, dilation, avx512=avx512) is want


@pytest.mark.parametrize("setting,without,with_", [("avx512", False, True), ("always", True, True),
                                                   ("never", False, False)])
def test_max_pool_by_onednn_rule(setting, without, with_):
    rules = Rules(onednn_max_pool=setting)
    assert rules.max_pool_by_onednn(avx512=False) is without and rules.max_pool_by_onednn(avx512=True) is with_


def test_rules_reject_unknown_values_and_are_frozen_and_hashable():
    with pytest.raises(ValueError, match=r"^Rules\.wgrad must be one of auto, native, forward, matmul; got 'fast'$"):
        Rules(wgrad="fast")
    with pytest.raises(ValueError, match=r"^Rules\.onednn_max_pool must be 'avx512', 'always' or 'never'"):
        Rules(onednn_max_pool="sometimes")
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT.wgrad = "matmul"
    assert DEFAULT == Rules() and hash(DEFAULT) == hash(Rules())  # a static argument of the custom VJPs
    assert dataclasses.replace(DEFAULT, wgrad="matmul") != DEFAULT


def test_output_hw():
    assert output_hw((28, 28), (5, 5), (1, 1), ((0, 0), (0, 0))) == (24, 24)
    assert output_hw((11, 10), (3, 5), (2, 1), ((0, 1), (2, 2)), (2, 1)) == (4, 10)


# -------------------------------------------------------------------------------------------------- max-pools

POOL_CASES = [
    # (window, stride, padding, hw): tiles (with floor-mode leftovers), ResNet's stem pool, overlapping windows
    # needing padding after the input, asymmetric windows and strides, a stride above the window.
    ((2, 2), (2, 2), (0, 0), (8, 8)), ((2, 2), (2, 2), (0, 0), (15, 15)), ((3, 3), (3, 3), (0, 0), (7, 7)),
    ((2, 3), (2, 3), (0, 0), (7, 9)), ((3, 3), (2, 2), (1, 1), (16, 16)), ((3, 3), (2, 2), (1, 1), (9, 11)),
    ((3, 3), (1, 1), (1, 1), (7, 7)), ((3, 2), (2, 1), (1, 0), (10, 9)), ((2, 3), (3, 2), (1, 1), (13, 12)),
    ((5, 5), (2, 3), (2, 2), (13, 12)),
]
POOLS = ["strided_view", pytest.param("onednn", marks=needs_onednn)]


def _pool(name):
    if name == "onednn":
        library()
        return cpu_pool.onednn_max_pool
    return cpu_pool.strided_view_max_pool


def pool_vjp(pool):
    """``(x, g) -> (pool(x), the gradient of sum(pool(x) * g))``."""
    def run(x, g):
        y, vjp = jax.vjp(pool, x)
        return y, vjp(g)[0]

    return run


def _with_ties(x):
    """Quantised values and a block of zeros (as after ReLU): many equal maxima."""
    x = np.round(x * 2).clip(0, None)
    x[:, :4, :4] = 0.0
    return jnp.asarray(x)


@pytest.mark.parametrize("name", POOLS)
@pytest.mark.parametrize("window,stride,padding,hw", POOL_CASES, ids=str)
def test_cpu_max_pools_equal_reduce_window_and_send_ties_to_the_first_maximum_like_torch(name, window, stride,
                                                                                         padding, hw):
    """Values exactly ``reduce_window_max_pool``'s; gradients its autodiff's (exactly for tiles, within float
    rounding where windows overlap and shares add up in another order); with ties, torch's (each window's
    gradient to its first maximum in row-major order); rows and columns floor mode drops get zero."""
    pool = functools.partial(_pool(name), window=window, stride=stride, padding=padding)
    plain = functools.partial(layers.reduce_window_max_pool, window=window, stride=stride, padding=padding)
    (x,) = draw(24, (2, *hw, 8))
    ties = _with_ties(np.asarray(x))
    (weight,) = draw(25, plain(x).shape)
    tiles = stride[0] >= window[0] and stride[1] >= window[1]
    want = pool_vjp(plain)(x, weight)
    xt = nchw(np.asarray(ties)).requires_grad_(True)
    yt = F.max_pool2d(xt, window, stride, padding)
    (yt * nchw(np.asarray(weight))).sum().backward()
    ho, wo = weight.shape[1:3]
    reach_h, reach_w = (ho - 1) * stride[0] + window[0] - padding[0], (wo - 1) * stride[1] + window[1] - padding[1]
    fn = jax.jit(pool_vjp(pool))
    y, g = fn(x, weight)
    chex.assert_trees_all_equal(y, want[0])
    # overlapping windows add up to kh * kw shares per input in another order: a few float32 ulps
    np.testing.assert_allclose(g, want[1], atol=0.0 if tiles else 1e-6, rtol=0.0 if tiles else 1e-6)
    y, g = fn(ties, weight)
    np.testing.assert_array_equal(y, plain(ties))
    np.testing.assert_array_equal(y, nhwc(yt))
    np.testing.assert_allclose(g, nhwc(xt.grad), atol=0.0 if tiles else 1e-5, rtol=0.0)
    assert float(jnp.abs(g[:, reach_h:]).sum() + jnp.abs(g[:, :, reach_w:]).sum()) == 0.0


def test_tiles_take_the_broadcast_backward_and_overlaps_the_phases():
    """Non-overlapping windows send gradients by one select broadcast over each tile (no stack of phases);
    overlapping ones add shifted shares per stride phase; both are tested against torch above."""
    x = jnp.ones((2, 8, 8, 4))

    def grad_jaxpr(window, stride, padding):
        return str(jax.make_jaxpr(jax.grad(lambda v: jnp.sum(cpu_pool.strided_view_max_pool(
            v, window, stride, padding))))(x))

    assert "stack[" not in grad_jaxpr((2, 2), (2, 2), (0, 0))
    assert "stack[" in grad_jaxpr((3, 3), (2, 2), (1, 1))


@pytest.mark.parametrize("name", ["strided_view", pytest.param("backend", marks=needs_onednn)])
def test_max_pools_of_windows_of_256_positions_or_more(name):
    """A 16x16 window (a global max-pool of a 16x16 map, and overlapping ones): positions no longer fit oneDNN's
    byte, so the backend takes the strided views even where its rules ask for oneDNN's max-pools."""
    window, stride = (16, 16), (1, 1)
    if name == "backend":
        library()
        pool = functools.partial(cpu_pool.max_pool, window=window, stride=stride, padding=(0, 0),
                                 rules=Rules(onednn_max_pool="always"))
    else:
        pool = functools.partial(_pool(name), window=window, stride=stride, padding=(0, 0))
    x = _with_ties(np.asarray(draw(44, (2, 17, 16, 3))[0]))
    (g,) = draw(45, (2, 2, 1, 3))
    xt = nchw(np.asarray(x)).requires_grad_(True)
    yt = F.max_pool2d(xt, window, stride)
    (yt * nchw(np.asarray(g))).sum().backward()
    y, dx = jax.jit(pool_vjp(pool))(x, g)
    np.testing.assert_array_equal(y, layers.reduce_window_max_pool(x, window, stride, (0, 0)))
    np.testing.assert_allclose(dx, nhwc(xt.grad), atol=1e-6)


@needs_onednn
def test_onednn_max_pool_refuses_windows_past_a_byte_in_one_line():
    library()
    with pytest.raises(UsageError, match=r"windows of at most 255 positions, got 16x16; use max_pool") as e:
        cpu_pool.onednn_max_pool(jnp.ones((1, 16, 16, 2)), (16, 16), (1, 1), (0, 0))
    assert "\n" not in str(e.value)


@needs_onednn
def test_onednn_max_pool_in_bfloat16_and_under_vmap():
    """bfloat16 values equal the views' exactly (a max rounds nothing), gradients within one bf16 rounding of their
    float32 sums; under ``vmap`` it equals a loop."""
    skip_without_avx512()
    (x,) = draw(26, (2, 16, 16, 8))
    pooled = lambda v: cpu_pool.onednn_max_pool(v, (3, 3), (2, 2), (1, 1))  # noqa: E731
    views = lambda v: cpu_pool.strided_view_max_pool(v, (3, 3), (2, 2), (1, 1))  # noqa: E731
    xb = x.astype(jnp.bfloat16)
    chex.assert_trees_all_equal(pooled(xb), views(xb))
    gb = jax.grad(lambda v: jnp.sum(pooled(v).astype(jnp.float32) ** 2))(xb)
    g32 = jax.grad(lambda v: jnp.sum(views(v) ** 2))(xb.astype(jnp.float32))
    assert gb.dtype == jnp.bfloat16
    chex.assert_trees_all_close(gb.astype(jnp.float32), g32, rtol=2 ** -7, atol=1e-6)
    (batch,) = draw(27, (3, 2, 9, 9, 4))
    chex.assert_trees_all_equal(jax.vmap(pooled)(batch), jnp.stack([pooled(v) for v in batch]))


@needs_onednn
def test_the_seam_runs_the_onednn_max_pool_where_the_rules_say(monkeypatch):
    """``layers.max_pool`` lowered for this CPU: oneDNN's forward and backward where the default rules pick it
    (AVX-512) for float32 and bfloat16, never for float16, nor over several processes, nor switched off."""
    lib = library()

    def calls(v):
        text = lowered(jax.grad(lambda v: jnp.sum(layers.max_pool(v, 3, 2, 1).astype(jnp.float32))), v)
        return tuple(len(custom_calls(text, t)) for t in (onednn.POOL_FORWARD_TARGET, onednn.POOL_BACKWARD_TARGET))

    use_path(monkeypatch, "cpu")
    x = jnp.ones((2, 9, 9, 4))
    want = (1, 1) if lib.avx512 else (0, 0)  # elsewhere the strided views
    assert calls(x) == want and calls(x.astype(jnp.bfloat16)) == want
    assert calls(x.astype(jnp.float16)) == (0, 0)
    with monkeypatch.context() as m:
        m.setattr(jax, "process_count", lambda: 2)
        assert calls(x) == (0, 0)
    use_path(monkeypatch, "xla")
    assert calls(x) == (0, 0)


# -------------------------------------------------------------------------------------------------- BatchNorm


def _plain_batch_norm(monkeypatch):
    """``layers.batch_norm_train`` by autodiff (the backend off for what is traced next)."""
    use_path(monkeypatch, "xla")
    return layers.batch_norm_train


@pytest.mark.parametrize("stats", [("mean", "var"), ("var",), ()])
@pytest.mark.parametrize("mapped", [None, "vmap", "pmap"])
def test_closed_form_batch_norm_backward_equals_autodiff(monkeypatch, mapped, stats):
    """Loss terms on the returned mean and variance are differentiated too, across replicas (vmap, or pmap over 4
    devices) as well; without them (their cotangents are symbolic zeros) the gradient is autodiff's."""
    if mapped == "pmap" and jax.device_count() < 4:
        pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=4, tests/conftest.py)")
    axis_name = None if mapped is None else "batch"
    (x, g) = draw(28, (8, 3, 4, 6), (8, 3, 4, 6))
    x = x * 1.5 + 0.3
    scale, bias = jnp.linspace(0.5, 2.0, 6), jnp.linspace(-1.0, 1.0, 6)

    def loss(fn, x, g, scale, bias):
        y, mean, var = fn(x, scale, bias, 1e-5, axis_name)
        out = jnp.sum(jnp.maximum(y, 0.0) * g)
        out = out + jnp.sum(3.0 * mean) if "mean" in stats else out
        return out + jnp.sum(var * var) if "var" in stats else out

    def grads(fn):
        grad = jax.grad(functools.partial(loss, fn), argnums=(0, 2, 3))
        if mapped is None:
            return jax.jit(lambda x, g: grad(x, g, scale, bias))(x, g)
        in_axes = (0, 0, None, None)
        run = jax.pmap(grad, "batch", in_axes=in_axes) if mapped == "pmap" else \
            jax.jit(jax.vmap(grad, in_axes, axis_name="batch"))
        g_x, g_scale, g_bias = run(x.reshape(4, 2, 3, 4, 6), g.reshape(4, 2, 3, 4, 6), scale, bias)
        return g_x.reshape(x.shape), g_scale, g_bias

    want = grads(_plain_batch_norm(monkeypatch))
    got = grads(closed_form_batch_norm)
    for name, a, b in zip(("input", "scale", "bias"), got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, err_msg=f"{name} gradient")
    assert float(jnp.max(jnp.abs(want[0]))) > 0.1  # the case is not degenerate


def test_closed_form_batch_norm_forward_is_the_plain_forward(monkeypatch):
    (x,) = draw(29, (4, 5, 5, 6))
    scale, bias = jnp.linspace(0.5, 2.0, 6), jnp.linspace(-1.0, 1.0, 6)
    want = jax.jit(lambda x: _plain_batch_norm(monkeypatch)(x, scale, bias, 1e-5))(x)
    fn = jax.jit(lambda x: closed_form_batch_norm(x, scale, bias, 1e-5, None))
    chex.assert_trees_all_close(fn(x), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("offset", [0.0, 30.0])
def test_closed_form_batch_norm_backward_is_float32_accurate_with_a_mean_far_from_zero(offset):
    """The backward sums g * x and g (not g * x_hat), then subtracts mean * sum(g), which loses digits as the mean
    moves away from zero: against the float64 closed form both gradients are within 3.1e-4 of their largest value
    for activations whose mean is about 100 standard deviations from zero, 1e-5 at mean zero (the worst of 300
    random draws: 1.7e-4 and 2.9e-6)."""
    r = np.random.RandomState(30)
    x = (r.randn(16, 5, 5, 4) + offset).astype(np.float32)
    g, scale = (r.randn(*x.shape) * 2 - 1).astype(np.float32), np.linspace(0.5, 2.0, 4).astype(np.float32)
    got = jax.grad(lambda x, s: jnp.sum(closed_form_batch_norm(x, s, jnp.zeros(4), 1e-5, None)[0] * g),
                   argnums=(0, 1))(jnp.asarray(x), jnp.asarray(scale))
    rows, g_rows = x.reshape(-1, 4).astype(np.float64), g.reshape(-1, 4).astype(np.float64)
    x_hat = (rows - rows.mean(0)) / np.sqrt(rows.var(0) + 1e-5)
    g_scale = (g_rows * x_hat).sum(0)
    g_x = scale / np.sqrt(rows.var(0) + 1e-5) * (g_rows - g_rows.mean(0) - x_hat * g_scale / len(rows))
    tol = 1e-5 + 1e-5 * offset
    np.testing.assert_allclose(got[0], g_x.reshape(x.shape), atol=tol * np.abs(g_x).max())
    np.testing.assert_allclose(got[1], g_scale, atol=tol * np.abs(g_scale).max())
    assert np.abs(g_scale).max() > 0.5  # not degenerate


# ------------------------------------------------------------------------------------------- without jax.jit

# Each path once without jax.jit (custom VJPs and FFI calls run op by op); the tests above jit (eager runs compile
# every op on its own: seconds per case).
EAGER_CONV_PATHS = {
    "patches": (4, lambda x, w, pads: patches_conv(x, w, (1, 1), pads)),
    "shifted": (1, lambda x, w, pads: shifted_sum_conv(x, w, (1, 1), pads, (1, 1))),
    "onednn": (4, lambda x, w, pads: onednn_conv(x, w, (1, 1), pads)),
    "onednn, kernel gradient by a forward conv": (4, lambda x, w, pads: onednn_conv(x, w, (1, 1), pads, (1, 1),
                                                                                   Rules(wgrad="forward"))),
    "onednn, kernel gradient by a matmul": (4, lambda x, w, pads: onednn_conv(x, w, (1, 1), pads, (1, 1),
                                                                             Rules(wgrad="matmul"))),
    "onednn, forward as an input gradient": (4, lambda x, w, pads: onednn_conv(x, w, (1, 1), pads)),
}


@pytest.mark.parametrize("name", [n if n == "patches" else pytest.param(n, marks=needs_onednn)
                                  for n in EAGER_CONV_PATHS])
def test_each_conv_path_matches_xla_without_jit(monkeypatch, name):
    if name != "patches":
        library()
    if name.endswith("input gradient"):
        pretend_no_avx512(monkeypatch)
    c_in, path = EAGER_CONV_PATHS[name]
    pads = ((1, 0), (1, 1))
    x, w, g = draw(40, (3, 9, 7, c_in), (3, 3, c_in, 8), (3, 8, 7, 8))
    want = jax.jit(values_and_gradients(lambda x, w: xla(x, w, (1, 1), pads)))(x, w, g)
    got = values_and_gradients(lambda x, w: path(x, w, pads))(x, w, g)
    assert_close_for_their_size(got, want)


@pytest.mark.parametrize("name", POOLS)
@pytest.mark.parametrize("window,stride,padding", [((2, 2), (2, 2), (0, 0)), ((3, 3), (2, 2), (1, 1))])
def test_each_max_pool_path_matches_reduce_window_without_jit(name, window, stride, padding):
    pool = functools.partial(_pool(name), window=window, stride=stride, padding=padding)
    plain = functools.partial(layers.reduce_window_max_pool, window=window, stride=stride, padding=padding)
    (x,) = draw(41, (2, 9, 7, 4))
    (g,) = draw(42, plain(x).shape)
    want = jax.jit(pool_vjp(plain))(x, g)
    got = pool_vjp(pool)(x, g)
    chex.assert_trees_all_equal(got[0], want[0])
    chex.assert_trees_all_close(got[1], want[1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("axis_name", [None, "batch"])
def test_closed_form_batch_norm_matches_autodiff_without_jit(monkeypatch, axis_name):
    x, g = draw(43, (8, 3, 3, 4), (8, 3, 3, 4))
    scale, bias = jnp.linspace(0.5, 2.0, 4), jnp.linspace(-1.0, 1.0, 4)

    def grads(fn):
        grad = jax.grad(lambda x, g: jnp.sum(fn(x, scale, bias, 1e-5, axis_name)[0] * g), (0,))
        return grad(x, g) if axis_name is None else jax.vmap(grad, axis_name="batch")(
            x.reshape(4, 2, 3, 3, 4), g.reshape(4, 2, 3, 3, 4))

    want = jax.jit(lambda: grads(_plain_batch_norm(monkeypatch)))()
    got = grads(closed_form_batch_norm)
    chex.assert_trees_all_close(got, want, atol=2e-5)
    assert float(jnp.max(jnp.abs(want[0]))) > 0.1
