"""cnnjax.conv: torch-style padding and ``lax.conv_general_dilated``; values and both gradients equal torch's on the
plain XLA path (what GPUs and TPUs run) and on the CPU backend; 'auto' follows ``CNNJAX_CPU_BACKEND``, read when a
function is traced. The CPU backend's own paths against plain XLA: tests/test_cpu_backend.py."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax import lax

from cnnjax import conv, kernels
from cnnjax.cpu import onednn
from cnnjax.errors import UsageError
from tests.onednn_marks import PATHS, library, needs_onednn, use_path
from tests.parity import assert_parity, nchw, nhwc

CASES = [
    # (hw, c_in, c_out, kernel, strides, pads, dilation)
    ((8, 8), 3, 5, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)),
    ((2, 2), 8, 6, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)),  # a 2x2 output
    ((1, 1), 8, 6, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)),  # a 1x1 input
    ((9, 7), 4, 6, (3, 5), (2, 1), ((1, 1), (2, 2)), (1, 1)),  # non-square kernel, strides
    ((11, 11), 4, 3, (3, 3), (2, 2), ((0, 1), (1, 0)), (2, 2)),  # asymmetric pads, dilation
    ((8, 8), 5, 7, (1, 1), (2, 2), ((0, 0), (0, 0)), (1, 1)),  # strided 1x1
    ((15, 15), 3, 4, (7, 7), (2, 2), ((3, 3), (3, 3)), (1, 1)),  # an RGB stem
    ((12, 12), 16, 24, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)),  # wider: oneDNN on the CPU backend
    ((32, 32), 1, 6, (5, 5), (1, 1), ((0, 0), (0, 0)), (1, 1)),  # LeNet's first conv
    ((28, 28), 1, 16, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)),  # SimpleCNN's: the shifted sum on the CPU
    ((11, 10), 1, 3, (3, 5), (2, 1), ((0, 1), (2, 2)), (2, 1)),  # greyscale, strided and dilated
]


def torch_conv(x, w, strides, pads, dilation, g):
    """torch's conv of NHWC ``x`` by HWIO ``w`` (asymmetric pads by F.pad) and its gradients for ``sum(y * g)``."""
    xt = nchw(x).requires_grad_(True)
    wt = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1))).requires_grad_(True)
    (pt, pb), (pl, pr) = pads
    yt = F.conv2d(F.pad(xt, (pl, pr, pt, pb)), wt, stride=strides, dilation=dilation)
    (yt * nchw(g)).sum().backward()
    return nhwc(yt), nhwc(xt.grad), wt.grad.numpy().transpose(2, 3, 1, 0)


def assert_close_for_their_size(label, got, want, rel=2e-5):
    """float32 sums of many terms of either sign differ in the last bits of the terms, not of the (possibly much
    smaller) sum: equal up to ``rel`` of the largest value (at least 1)."""
    assert_parity(label, got, want, rel * max(1.0, float(np.max(np.abs(want)))))


def draw(seed, *shapes):
    r = np.random.RandomState(seed)
    return [r.randn(*shape).astype(np.float32) for shape in shapes]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("hw,c_in,c_out,k,s,pads,d", CASES, ids=str)
def test_conv2d_matches_torch_values_and_gradients(path, hw, c_in, c_out, k, s, pads, d):
    """Jitted (eager calls of the CPU paths: tests/test_cpu_backend.py; of both paths: TestConvVariants)."""
    x, w = draw(1, (3, *hw, c_in), (*k, c_in, c_out))
    ho, wo = (conv.output_size(hw[a], k[a], s[a], pads[a], d[a]) for a in (0, 1))
    (g,) = draw(2, (3, ho, wo, c_out))
    want = torch_conv(x, w, s, pads, d, g)

    def run(x, w, g):
        y, vjp = jax.vjp(lambda x, w: conv.conv2d(x, w, s, pads, d, impl=path), x, w)
        return (y, *vjp(g))

    got = jax.jit(run)(x, w, g)
    chex.assert_shape(got, (want[0].shape, x.shape, w.shape))
    for name, a, b in zip(("values", "input gradient", "kernel gradient"), got, want, strict=True):
        assert_close_for_their_size(f"conv2d {path} {name} vs torch", a, b)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_padding_strings_are_xlas(path, padding):
    """'SAME' / 'VALID' pad as XLA does (stride 2 on an even size: (0, 1)), on both paths."""
    x, w = draw(3, (2, 8, 7, 3), (3, 3, 3, 4))
    want = lax.conv_general_dilated(x, w, (2, 2), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    got = conv.conv2d(jnp.asarray(x), jnp.asarray(w), (2, 2), padding, impl=path)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("in_hw,kernel,strides,padding,dilation,want", [
    ((8, 8), (3, 3), (2, 2), "SAME", (1, 1), ((0, 1), (0, 1))),  # torch would pad (1, 1)
    ((7, 8), (3, 3), (2, 2), "SAME", (1, 1), ((1, 1), (0, 1))),
    ((8, 8), (3, 3), (1, 1), "SAME", (2, 2), ((2, 2), (2, 2))),  # dilation widens the window
    ((8, 8), (5, 3), (1, 1), "VALID", (1, 1), ((0, 0), (0, 0))),
    ((8, 8), (3, 3), (1, 1), ((2, 0), (0, 1)), (1, 1), ((2, 0), (0, 1))),  # explicit pads pass through
])
def test_explicit_pads(in_hw, kernel, strides, padding, dilation, want):
    assert conv.explicit_pads(in_hw, kernel, strides, padding, dilation) == want


def test_output_size_is_torchs_floor_rule():
    assert conv.output_size(32, 5, 1, (0, 0)) == 28
    assert conv.output_size(9, 3, 2, (1, 1)) == 5
    assert conv.output_size(11, 3, 2, (0, 1), dilation=2) == 4
    assert conv.output_size(10, 3, 3, (1, 1)) == 4  # floor((10 + 2 - 3) / 3) + 1


@pytest.mark.parametrize("impl", ["xla", "auto", pytest.param("cpu", marks=needs_onednn)])
def test_an_empty_output_is_a_one_line_error(impl):
    with pytest.raises(UsageError, match=r"^conv output would be empty: input 2x2, kernel 5x5") as e:
        conv.conv2d(jnp.ones((1, 2, 2, 3)), jnp.ones((5, 5, 3, 4)), (1, 1), ((0, 0), (0, 0)), impl=impl)
    assert "\n" not in str(e.value)


def test_an_unknown_impl_names_the_impls():
    with pytest.raises(UsageError, match=r"^conv impl must be one of auto, xla, cpu; got 'onednn'$"):
        conv.conv2d(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2)), (1, 1), "SAME", impl="onednn")


@pytest.mark.parametrize("path", PATHS)
def test_grouped_and_depthwise_convs_match_torch_under_auto(monkeypatch, path):
    """The CPU backend has no grouped kernels: 'auto' runs XLA's grouped conv with the backend on or off."""
    use_path(monkeypatch, path)
    for groups, c_in, c_out in ((2, 4, 6), (8, 8, 8)):
        x, w = draw(4, (2, 7, 6, c_in), (3, 3, c_in // groups, c_out))
        got = jax.jit(lambda x, w, groups=groups: conv.conv2d(x, w, (1, 2), ((1, 1), (1, 1)), groups=groups))(x, w)
        wt = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))
        want = nhwc(F.conv2d(nchw(x), wt, stride=(1, 2), padding=1, groups=groups))
        assert_close_for_their_size(f"grouped conv2d auto ({path}) vs torch", got, want)


def _onednn_calls(fn, *args) -> int:
    """oneDNN conv custom calls in ``fn`` lowered for this CPU (a fresh trace: ``fn`` is jitted here)."""
    return jax.jit(fn).lower(*args).as_text().count(f"custom_call @{onednn.CONV_TARGET}")


@needs_onednn
def test_auto_runs_the_cpu_backend_unless_switched_off_at_trace_time(monkeypatch):
    """'auto' lowered for this CPU calls oneDNN for a conv's forward and both gradients with the backend on, and
    never with ``CNNJAX_CPU_BACKEND=0``; the numbers agree either way."""
    library()
    x, w = draw(5, (2, 10, 10, 16), (3, 3, 16, 16))

    def step():  # a fresh function per setting: the switch is read when it is traced
        return jax.value_and_grad(lambda x, w: jnp.sum(jnp.tanh(conv.conv2d(x, w, (1, 1), "SAME"))), (0, 1))

    got = {}
    for path in ("cpu", "xla"):
        use_path(monkeypatch, path)
        assert kernels.enabled("cpu") == (path == "cpu")
        assert _onednn_calls(step(), x, w) == (3 if path == "cpu" else 0)
        got[path] = jax.jit(step())(x, w)
    assert "cpu backend: off (CNNJAX_CPU_BACKEND=0)" in kernels.describe()
    chex.assert_trees_all_close(got["cpu"], got["xla"], atol=1e-4, rtol=1e-5)


class TestConvVariants(chex.TestCase):
    """The same conv through ``jax.jit`` and without, on both paths (each traced afresh)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_both_paths_jitted_or_not_agree(self):
        x, w = (jnp.asarray(a) for a in draw(6, (2, 9, 9, 8), (3, 3, 8, 8)))
        impls = ["xla"] + (["cpu"] if onednn.built() is not None and onednn.load().available else [])
        ys = [self.variant(lambda x, w, impl=impl: conv.conv2d(x, w, (2, 2), ((1, 1), (1, 1)), impl=impl))(x, w)
              for impl in impls]
        for y in ys:
            chex.assert_shape(y, (2, 5, 5, 8))
            chex.assert_trees_all_close(y, ys[0], atol=1e-4, rtol=1e-5)
        chex.assert_tree_all_finite(ys)
