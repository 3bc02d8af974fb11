"""2-D convolution as a pure function, with oneDNN, patches-times-matrix and shifted-sum paths for the CPU.

On the CPU in one process, when cnnjax's oneDNN kernels can be built (:mod:`cnnjax.native.onednn`),
``impl='auto'`` runs every groups-1 float32 / bfloat16 conv through oneDNN (:func:`onednn_conv`: forward and
both gradients, as PyTorch's CPU convolutions are), but for the greyscale and one-GEMM cases below; greyscale convs
keep the shifted-sum forward and take oneDNN's gradients (:func:`shifted_sum_onednn_conv`). The rest of
this text is how the CPU convolutions run without oneDNN (``CNNJAX_ONEDNN=0``, or no compiler / oneDNN here).

XLA:CPU (jaxlib 0.10) runs some convolution shapes through very slow paths: 3x3 convs whose
output is 2x2 or smaller (ResNet-18's last stages at 32x32 input), the input gradient of strided
convs, 1x1 convs, and convs of a one-channel (greyscale) input. For those
shapes :func:`conv2d` builds the ``kH * kW`` shifted views of the padded input, concatenates them
into patches ``[N, H', W', kH * kW * C_in]`` and multiplies by the kernel reshaped to
``[kH * kW * C_in, C_out]`` — the same numbers, summed in another order. A conv of a one-channel
input (the first conv of an MNIST model) is instead a sum of ``kH * kW`` shifted views times a kernel
row, one elementwise pass, with XLA's own (fast) gradients. Every other CPU conv is XLA's, with its input
kept for the weight gradient (:func:`kept_input_conv`); strided convs of narrow inputs take XLA's forward
and weight gradient and the patches path's input gradient (:func:`split_conv`). ``impl='auto'`` makes
these choices on the CPU only (accelerators keep XLA's convolution); ``python -m experiments.bench_conv``
re-measures every rule below.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnnjax.errors import UsageError
from cnnjax.native import onednn

Array = jax.Array
Pads = tuple[tuple[int, int], tuple[int, int]]
IMPLS = ("auto", "xla", "im2col", "shifted", "kept", "split", "onednn")
# On the CPU in one process, 'auto' runs groups-1 float32 / bfloat16 convs through oneDNN when its kernels can be
# built here (cnnjax.native.onednn), but for the greyscale and one-GEMM cases of choose_impl; the rules below are
# what runs without them.
USE_ONEDNN_ON_CPU = True
# On the CPU, 'auto' runs the convs it leaves to XLA as 'kept' (groups = 1): cifar_resnet20's train step
# 1.19x faster, paired (experiments.bench_ab, variant "+kept conv input"); the other bench models unchanged.
KEEP_CONV_INPUT_ON_CPU = True
# On the CPU in one process, 'auto' computes the gradients of its shifted-sum (greyscale) convs with oneDNN when
# its kernels are built (shifted_sum_onednn_conv): LeNet-5's 5x5 1 -> 8 weight gradient at batch 128 takes
# 0.41 ms there against 1.39 ms in XLA (medians of 30, an ad hoc script, 2026-12-04).
ONEDNN_SHIFTED_GRADIENTS_ON_CPU = True
# The oneDNN handler's kernel-gradient paths (its `wgrad` attribute; onednn_wgrad_path chooses).
WGRAD_PATHS = {"native": 0, "forward": 1, "matmul": 2}
# float32 kernel gradients on CPUs without AVX-512 (oneDNN's jit:avx2 kernels) take the path measured fastest for
# their shape there, not always oneDNN's backward-weights primitive (onednn_wgrad_path; experiments.bench_onednn_paths):
# the primitive for inputs of at most F32_WGRAD_NATIVE_MAX_IN channels (stems, greyscale) and outputs of fewer than
# F32_WGRAD_NATIVE_BELOW_OUT channels; else a matrix product where the conv at least doubles the channels to at least
# F32_WGRAD_MATMUL_MIN_OUT or the map is at most F32_WGRAD_MATMUL_MAX_HW, and its patches take at most
# F32_WGRAD_MATMUL_MAX_BYTES; a forward convolution otherwise.
ONEDNN_F32_WGRAD_BY_SHAPE = True
F32_WGRAD_NATIVE_MAX_IN, F32_WGRAD_NATIVE_BELOW_OUT, F32_WGRAD_MATMUL_MIN_OUT, F32_WGRAD_MATMUL_MAX_HW = 4, 32, 64, 4
F32_WGRAD_MATMUL_MAX_BYTES = 256 << 20
# float32 stride-1 undilated forward convolutions on CPUs without AVX-512 run as oneDNN's input gradient of the
# transposed conv (flipped kernel, in and out channels swapped), whose jit:avx2 kernel is faster than its NHWC forward
# there: fast_cnn's [128, 7, 7, 256] -> 256 58.3 against 80.8 ms, [128, 3, 3, 256] -> 256 8.7 against 12.7
# (onednn_forward_as_input_gradient; experiments.bench_onednn_paths).
ONEDNN_F32_FORWARD_AS_INPUT_GRAD = True

# Largest output (H' * W') for which a strided kxk conv uses patches on the CPU: patches win up to
# 16x16 outputs, break even near 14x14 at batch 16 and lose at 28x28 (experiments.bench_conv).
STRIDED_MAX_OUTPUT = 256
# Widest input for which such a strided conv runs as 'split' (XLA's forward and weight gradient, the patches
# path's input gradient): concatenating narrow patches is slow on XLA:CPU, above all in this machine's slow
# spells. cifar_resnet20's [128, 32, 32, 16] -> 32 stride-2 conv, forward+backward: medians 33.7 ms as patches
# against 16.2 ms split (an ad hoc script), fastest calls 10.2 against 10.7 ms (experiments.bench_conv); its
# train step 1.07-1.08x by the fastest rounds of three paired runs (experiments.bench_ab). With 32 or more
# input channels patches are as fast or faster.
SPLIT_MAX_IN_CHANNELS = 16
# Largest output for which a stride-1 kxk conv uses patches (2x2: the pathological XLA case).
TINY_MAX_OUTPUT = 4
# A conv of a one-channel (greyscale) input whose output channels are a multiple of 8 takes the
# shifted-sum path at any size: XLA:CPU's forward for these shapes is several times slower (a 5x5 1 -> 8
# conv on 32x32 plus tanh: 6.4 against 1.5 ms at batch 128, experiments.bench_conv) while its gradients are fast, so the
# shifted sum keeps XLA's gradients. With other channel counts XLA:CPU fuses the sum with the next
# activation into a loop it does not vectorise (1 -> 6 plus tanh: 7.7 ms), so those keep the earlier
# rule: patches for kernels up to 3x3 (SimpleCNN's 3x3 1 -> 16 trained 12% faster so), XLA's conv above
# (LeNet's 5x5 1 -> 6, which LeNet-5 therefore computes as 1 -> 8 on the CPU: cnnjax.models.lenet).
# Up to SHIFTED_MAX_TERMS products per output. RGB stems keep XLA's conv.
SHIFTED_MAX_IN_CHANNELS = 1
SHIFTED_OUT_CHANNEL_MULTIPLE = 8
SHIFTED_MAX_TERMS = 49
PATCHES_MAX_IN_CHANNELS = 1
PATCHES_MAX_KERNEL = 3


def output_size(size: int, kernel: int, stride: int, pads: tuple[int, int], dilation: int = 1) -> int:
    """Output length of a convolution along one axis."""
    return (size + pads[0] + pads[1] - dilation * (kernel - 1) - 1) // stride + 1


def choose_impl(in_hw: tuple[int, int], kernel_hw: tuple[int, int], strides: tuple[int, int], pads: Pads,
                dilation: tuple[int, int] = (1, 1), groups: int = 1, backend: str | None = None,
                in_channels: int | None = None, out_channels: int | None = None, onednn: bool = False) -> str:
    """'shifted', 'im2col', 'onednn', 'split' or 'xla' for a conv of these static shapes on ``backend``
    (default: jax's). ``onednn``: whether oneDNN's kernels may be used (:func:`onednn_usable`); they take every
    conv but the greyscale and the patches-as-one-GEMM cases (1x1 kernels, outputs of at most 2x2), which stay
    as fast or faster as they are (``python -m experiments.bench_conv --only torch``)."""
    if (backend or jax.default_backend()) != "cpu" or groups != 1:
        return "xla"
    if in_channels is not None and in_channels <= SHIFTED_MAX_IN_CHANNELS and out_channels is not None and \
            out_channels % SHIFTED_OUT_CHANNEL_MULTIPLE == 0 and \
            kernel_hw[0] * kernel_hw[1] * in_channels <= SHIFTED_MAX_TERMS:
        return "shifted"
    if in_channels is not None and in_channels <= PATCHES_MAX_IN_CHANNELS and max(kernel_hw) <= PATCHES_MAX_KERNEL:
        return "im2col"
    out = output_size(in_hw[0], kernel_hw[0], strides[0], pads[0], dilation[0]) * \
        output_size(in_hw[1], kernel_hw[1], strides[1], pads[1], dilation[1])
    if kernel_hw == (1, 1) or out <= TINY_MAX_OUTPUT:
        return "im2col"
    if onednn:
        return "onednn"
    if max(strides) > 1 and out <= STRIDED_MAX_OUTPUT:
        narrow = in_channels is not None and in_channels <= SPLIT_MAX_IN_CHANNELS
        return "split" if narrow else "im2col"
    return "xla"


def _output_hw(in_hw: tuple[int, int], kernel_hw: tuple[int, int], strides: tuple[int, int], pads: Pads,
               dilation: tuple[int, int]) -> tuple[int, int]:
    """``(H', W')`` of a conv; an empty output is a one-line error."""
    ho, wo = (output_size(in_hw[i], kernel_hw[i], strides[i], pads[i], dilation[i]) for i in range(2))
    if ho <= 0 or wo <= 0:
        raise UsageError(f"conv output would be empty: input {in_hw[0]}x{in_hw[1]}, kernel "
                         f"{kernel_hw[0]}x{kernel_hw[1]}, padding {pads}")
    return ho, wo


def _shifted_views(x: Array, kernel_hw: tuple[int, int], strides: tuple[int, int], pads: Pads,
                   dilation: tuple[int, int]) -> list[Array]:
    """The ``kH * kW`` views ``[N, H', W', C]`` of the padded input that kernel tap ``(i, j)`` sees, in
    row-major tap order."""
    kh, kw = kernel_hw
    n, h, w, c = x.shape
    ho, wo = _output_hw((h, w), kernel_hw, strides, pads, dilation)
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    views = []
    for i in range(kh):
        for j in range(kw):
            y0, x0 = i * dilation[0], j * dilation[1]
            views.append(lax.slice(xp, (0, y0, x0, 0),
                                   (n, y0 + strides[0] * (ho - 1) + 1, x0 + strides[1] * (wo - 1) + 1, c),
                                   (1, strides[0], strides[1], 1)))
    return views


def im2col_conv(x: Array, kernel: Array, strides: tuple[int, int], pads: Pads,
                dilation: tuple[int, int] = (1, 1), precision: Any = None) -> Array:
    """``[N, H, W, C] * [kH, kW, C, O] -> [N, H', W', O]`` as patches @ kernel (groups = 1)."""
    kh, kw, c, o = kernel.shape
    views = _shifted_views(x, (kh, kw), strides, pads, dilation)
    n, ho, wo, _ = views[0].shape
    patches = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)  # (i, j, c) order == HWI
    y = jnp.dot(patches.reshape(n * ho * wo, kh * kw * c), kernel.reshape(kh * kw * c, o), precision=precision)
    return y.reshape(n, ho, wo, o)


def _xla_conv(x: Array, kernel: Array, strides: tuple[int, int], pads: Pads, dilation: tuple[int, int],
              groups: int = 1, precision: Any = None) -> Array:
    return lax.conv_general_dilated(x, kernel, window_strides=strides, padding=pads, rhs_dilation=dilation,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
                                    precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def shifted_sum_conv(x: Array, kernel: Array, strides: tuple[int, int], pads: Pads,
                     dilation: tuple[int, int] = (1, 1), precision: Any = None) -> Array:
    """``[N, H, W, C] * [kH, kW, C, O] -> [N, H', W', O]`` as ``sum_{i, j, c} view_ij[..., c] * kernel[i, j, c]``.

    One elementwise pass over the output, meant for few input channels; it accumulates in at least
    float32 (bf16 inputs are promoted, the result has ``x``'s dtype). Its gradients are XLA's
    convolution gradients (the same numbers as ``impl='xla'``), which are fast for these shapes.
    """
    acc = jnp.promote_types(x.dtype, jnp.float32)
    views = _shifted_views(x.astype(acc), kernel.shape[:2], strides, pads, dilation)
    kernel_acc = kernel.astype(acc)
    kw, c = kernel.shape[1], kernel.shape[2]
    terms = [view[..., ch:ch + 1] * kernel_acc[k // kw, k % kw, ch] for k, view in enumerate(views) for ch in range(c)]
    return functools.reduce(operator.add, terms).astype(x.dtype)


def _shifted_sum_conv_fwd(x, kernel, strides, pads, dilation, precision):
    return shifted_sum_conv(x, kernel, strides, pads, dilation, precision), (x, kernel)


def _xla_conv_bwd(strides, pads, dilation, precision, residuals, g):
    """XLA's input and kernel gradients of a groups-1 conv, from the residuals ``(x, kernel)``."""
    x, kernel = residuals
    _, vjp = jax.vjp(lambda x, k: _xla_conv(x, k, strides, pads, dilation, 1, precision), x, kernel)
    return vjp(g)


shifted_sum_conv.defvjp(_shifted_sum_conv_fwd, _xla_conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def shifted_sum_onednn_conv(x: Array, kernel: Array, strides: tuple[int, int], pads: Pads,
                            dilation: tuple[int, int] = (1, 1), precision: Any = None) -> Array:
    """:func:`shifted_sum_conv`'s forward with oneDNN's gradients (:func:`onednn_conv`'s); needs
    :func:`cnnjax.native.onednn.available` and ``x``, ``kernel`` of one dtype, float32 or bfloat16."""
    return shifted_sum_conv(x, kernel, strides, pads, dilation, precision)


def _shifted_sum_onednn_conv_bwd(strides, pads, dilation, precision, residuals, g):
    return _onednn_conv_bwd(strides, pads, dilation, residuals, g)  # g has x's dtype, as the forward's output


shifted_sum_onednn_conv.defvjp(_shifted_sum_conv_fwd, _shifted_sum_onednn_conv_bwd)


def _kept(x: Array, kernel: Array) -> Array:
    """``x``, passed through a while loop that runs zero times. The trip count is read from the (replicated)
    ``kernel``, so XLA cannot remove the loop, and a sharded ``x`` needs no communication: the result is a
    buffer of its own, and XLA cannot fuse the ops that made ``x`` into the ops that read it. (Only a NaN
    kernel runs the body once, and the gradients are NaN then anyway.)"""
    first = kernel.reshape(-1)[0]
    _, kept = lax.while_loop(lambda c: c[0], lambda c: (jnp.zeros_like(c[0]), c[1] + 1), (first != first, x))
    return kept


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def kept_input_conv(x: Array, kernel: Array, strides: tuple[int, int], pads: Pads,
                    dilation: tuple[int, int] = (1, 1), precision: Any = None) -> Array:
    """XLA's convolution (groups = 1), whose backward reads its input from a buffer kept in the forward.

    The same numbers and gradients as ``impl='xla'``. Without it, XLA:CPU fuses a recomputation of the
    input (the BatchNorm, ReLU and residual adds that made it) into the transpose its weight gradient
    needs, where strided reads make it slow: cifar_resnet20's transposes took 124 of a 506 ms step.
    """
    return _xla_conv(x, kernel, strides, pads, dilation, 1, precision)


def _kept_input_conv_fwd(x, kernel, strides, pads, dilation, precision):
    """XLA's forward, with residuals ``(x kept in a buffer of its own, kernel)``; 'kept' and 'split' share it."""
    return _xla_conv(x, kernel, strides, pads, dilation, 1, precision), (_kept(x, kernel), kernel)


kept_input_conv.defvjp(_kept_input_conv_fwd, _xla_conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def split_conv(x: Array, kernel: Array, strides: tuple[int, int], pads: Pads,
               dilation: tuple[int, int] = (1, 1), precision: Any = None) -> Array:
    """XLA's convolution (groups = 1) whose input gradient is the patches path's: ``g @ kernel^T``, then
    the transposed patch extraction (slices of that product added into the padded input shape).

    The same numbers as ``impl='xla'``, gradients summed in another order. Meant for strided convs on the
    CPU, where XLA's forward and weight gradient are fast, but its input gradient (a conv of the dilated
    output gradient) is slow, and building the patches (a concatenation) is too. The weight gradient is
    XLA's, from the input kept as in :func:`kept_input_conv`.
    """
    return _xla_conv(x, kernel, strides, pads, dilation, 1, precision)


def _split_conv_bwd(strides, pads, dilation, precision, residuals, g):
    x, kernel = residuals
    input_grad = jax.linear_transpose(lambda v: im2col_conv(v, kernel, strides, pads, dilation, precision), x)
    kernel_grad = jax.linear_transpose(lambda k: _xla_conv(x, k, strides, pads, dilation, 1, precision), kernel)
    return input_grad(g)[0], kernel_grad(g)[0]


split_conv.defvjp(_kept_input_conv_fwd, _split_conv_bwd)


def _onednn_attrs(strides: tuple[int, int], pads: Pads, dilation: tuple[int, int]) -> dict:
    ints = dict(sh=strides[0], sw=strides[1], pt=pads[0][0], pb=pads[0][1], pl=pads[1][0], pr=pads[1][1],
                dh=dilation[0], dw=dilation[1])
    return {k: np.int64(v) for k, v in ints.items()}


def _wgrad_by_shape() -> bool:
    """Whether float32 kernel gradients take the path measured fastest for their shape (a CPU without AVX-512)."""
    return ONEDNN_F32_WGRAD_BY_SHAPE and not onednn.bf16_available()


def _forwards_as_input_gradients() -> bool:
    """Whether float32 stride-1 forwards may run as input gradients (a CPU without AVX-512)."""
    return ONEDNN_F32_FORWARD_AS_INPUT_GRAD and not onednn.bf16_available()


def onednn_wgrad_path(dtype: Any, x_shape: tuple[int, ...], kernel_shape: tuple[int, ...],
                      out_hw: tuple[int, int]) -> str:
    """How oneDNN computes a stride-1 undilated conv's kernel gradient (one of :data:`WGRAD_PATHS`): its
    backward-weights primitive ('native'), one forward convolution with the batch as the channels ('forward') or
    one matrix product of the input patches ('matmul'), for an input ``x_shape`` ``[N, H, W, I]`` of ``dtype``, a
    kernel ``kernel_shape`` ``[kH, kW, I, O]`` and an output map ``out_hw``. ``CNNJAX_ONEDNN_WGRAD`` (not 'auto')
    picks one path for all. The handler runs strided and dilated convs' kernel gradients natively whatever is
    asked (strided 1x1 ones on a gathered input)."""
    choice = onednn.wgrad_choice()
    if choice != "auto":
        return choice
    hw = max(out_hw)
    if jnp.dtype(dtype) == jnp.bfloat16:  # AVX-512 with AMX (onednn module doc)
        return "forward" if hw <= 4 else ("matmul" if hw <= 8 else "native")
    kh, kw, c_in, c_out = kernel_shape
    if not _wgrad_by_shape() or c_in <= F32_WGRAD_NATIVE_MAX_IN or c_out < F32_WGRAD_NATIVE_BELOW_OUT:
        return "native"
    patch_bytes = x_shape[0] * out_hw[0] * out_hw[1] * kh * kw * c_in * 4
    widens = c_out >= 2 * c_in and c_out >= F32_WGRAD_MATMUL_MIN_OUT
    matmul = (widens or hw <= F32_WGRAD_MATMUL_MAX_HW) and patch_bytes <= F32_WGRAD_MATMUL_MAX_BYTES
    return "matmul" if matmul else "forward"


def describe_onednn_float32_paths() -> str:
    """How oneDNN runs float32 convs here, for logs: its own primitives, or on CPUs without AVX-512 the forwards as
    input gradients and the kernel gradients by shape (``ONEDNN_F32_FORWARD_AS_INPUT_GRAD``,
    :func:`onednn_wgrad_path`)."""
    if not onednn.available():
        return "no oneDNN kernels"
    swaps = []
    if _forwards_as_input_gradients():
        swaps.append("stride-1 forwards as input gradients")
    choice = onednn.wgrad_choice()
    if choice != "auto":
        swaps.append(f"kernel gradients by {choice} ({onednn.WGRAD_CHOICE})")
    elif _wgrad_by_shape():
        swaps.append("kernel gradients by shape")
    if not swaps:
        return "oneDNN's primitives"
    return ", ".join(swaps) + ("" if onednn.bf16_available() else " (no AVX-512)")


def _onednn(kind: int, a: Array, b: Array, out_shape: tuple[int, ...], strides: tuple[int, int], pads: Pads,
            dilation: tuple[int, int], wgrad_path: str | None = None) -> Array:
    """One call of the oneDNN handler (``cnnjax/native/onednn_kernels.cc``): ``kind`` 0 forward ``(x, kernel)``,
    1 input gradient ``(g, kernel)``, 2 kernel gradient ``(x, g)`` (by ``wgrad_path``, or when None by
    :func:`onednn_wgrad_path`); the result has shape ``out_shape``."""
    wgrad = 0
    if kind == onednn.KERNEL_GRAD:
        wgrad = WGRAD_PATHS[wgrad_path or onednn_wgrad_path(a.dtype, a.shape, out_shape, b.shape[1:3])]
    call = jax.ffi.ffi_call(onednn.TARGET, jax.ShapeDtypeStruct(out_shape, a.dtype), vmap_method="sequential")
    return call(a, b, kind=np.int64(kind), wgrad=np.int64(wgrad), **_onednn_attrs(strides, pads, dilation))


def _conv_shape(x: Array, kernel: Array, strides: tuple[int, int], pads: Pads,
                dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """``[N, H', W', O]`` of the conv of ``x`` ``[N, H, W, C]`` with ``kernel`` ``[kH, kW, C, O]``."""
    return (x.shape[0], *_output_hw(x.shape[1:3], kernel.shape[:2], strides, pads, dilation), kernel.shape[-1])


def onednn_forward_as_input_gradient(dtype: Any, kernel_hw: tuple[int, int], strides: tuple[int, int], pads: Pads,
                                     dilation: tuple[int, int]) -> bool:
    """Whether :func:`onednn_conv`'s forward runs as oneDNN's input gradient of the transposed conv (see
    ``ONEDNN_F32_FORWARD_AS_INPUT_GRAD``): float32 on a CPU without AVX-512, stride 1, undilated, and every pad at
    most ``kernel - 1`` (so the transposed conv's pads ``kernel - 1 - pad`` are not negative)."""
    return _forwards_as_input_gradients() and jnp.dtype(dtype) == jnp.float32 \
        and strides == (1, 1) and dilation == (1, 1) and \
        all(0 <= p <= k - 1 for k, pair in zip(kernel_hw, pads, strict=True) for p in pair)


def _onednn_forward(x: Array, kernel: Array, strides: tuple[int, int], pads: Pads, dilation: tuple[int, int],
                    as_input_gradient: bool) -> Array:
    """oneDNN's forward conv ``[N, H, W, C] * [kH, kW, C, O] -> [N, H', W', O]``, or with ``as_input_gradient`` the
    same numbers as the input gradient of the conv ``[N, H', W', O] -> [N, H, W, C]`` by the flipped, transposed
    kernel ``[kH, kW, O, C]`` with pads ``kernel - 1 - pad`` (stride 1, undilated)."""
    out_shape = _conv_shape(x, kernel, strides, pads, dilation)
    if not as_input_gradient:
        return _onednn(onednn.FORWARD, x, kernel, out_shape, strides, pads, dilation)
    transposed = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    flipped_pads = tuple((k - 1 - a, k - 1 - b) for k, (a, b) in zip(kernel.shape[:2], pads, strict=True))
    return _onednn(onednn.INPUT_GRAD, x, transposed, out_shape, strides, flipped_pads, dilation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def onednn_conv(x: Array, kernel: Array, strides: tuple[int, int], pads: Pads,
                dilation: tuple[int, int] = (1, 1)) -> Array:
    """``[N, H, W, C] * [kH, kW, C, O] -> [N, H', W', O]`` by oneDNN on the CPU (groups 1; ``x`` and ``kernel``
    both float32 or both bfloat16, accumulated in float32), forward and both gradients.

    The same convolution as ``impl='xla'`` summed in another order (within 1e-5 relative in float32,
    ``tests/test_conv.py``; float32 convs are computed in float32, so no ``precision`` applies). Needs
    :func:`cnnjax.native.onednn.available`; reverse mode only (``jax.grad``), like the other custom-gradient
    paths here. The forward runs as :func:`onednn_forward_as_input_gradient` says."""
    as_input_gradient = onednn_forward_as_input_gradient(x.dtype, kernel.shape[:2], strides, pads, dilation)
    return _onednn_forward(x, kernel, strides, pads, dilation, as_input_gradient)


def _onednn_conv_fwd(x, kernel, strides, pads, dilation):
    return onednn_conv(x, kernel, strides, pads, dilation), (x, kernel)


def _onednn_conv_bwd(strides, pads, dilation, residuals, g):
    """Two calls, which XLA may run at once. (Both in one call, one after the other, was no faster: whole train
    steps 0.94-1.00x, paired, an ad hoc script, 2026-12-02.)"""
    x, kernel = residuals
    return (_onednn(onednn.INPUT_GRAD, g, kernel, x.shape, strides, pads, dilation),
            _onednn(onednn.KERNEL_GRAD, x, g, kernel.shape, strides, pads, dilation))


onednn_conv.defvjp(_onednn_conv_fwd, _onednn_conv_bwd)


def onednn_usable(x: Array, kernel: Array, groups: int = 1) -> bool:
    """Whether 'auto' may run this conv through oneDNN: the CPU, one process (runs over several keep XLA's
    convolutions), groups 1, float32 or bfloat16 operands of one dtype, and the kernels built for that dtype
    (:func:`cnnjax.native.onednn.runs`: bfloat16 needs AVX-512). Under a batch-sharded ``jit`` over several host
    devices XLA's partitioner cannot split the custom call and gathers the batch for it (the same numbers, unsplit
    work)."""
    if not USE_ONEDNN_ON_CPU or groups != 1 or jax.default_backend() != "cpu" or jax.process_count() != 1:
        return False
    return x.dtype == kernel.dtype and onednn.runs(x.dtype)


def conv2d(x: Array, kernel: Array, strides: tuple[int, int], padding: str | Pads,
           dilation: tuple[int, int] = (1, 1), groups: int = 1, precision: Any = None,
           impl: str = "auto") -> Array:
    """NHWC x HWIO convolution; ``padding`` is 'SAME' / 'VALID' or ``((top, bottom), (left, right))``.

    ``impl``: 'xla' (``lax.conv_general_dilated``), 'im2col' (patches @ kernel, groups 1 only),
    'shifted' (sum of shifted views times kernel rows, groups 1 only), 'kept' (:func:`kept_input_conv`,
    groups 1 only), 'split' (:func:`split_conv`, groups 1 only), 'onednn' (:func:`onednn_conv`, groups 1, CPU)
    or 'auto' (:func:`choose_impl`, with oneDNN where :func:`onednn_usable`; on the CPU in one process, its
    'xla' convs run as 'kept'; over several processes its 'split' convs run as 'im2col').
    """
    if impl not in IMPLS:
        raise UsageError(f"conv impl must be one of {', '.join(IMPLS)}; got {impl!r}")
    kh, kw = kernel.shape[:2]
    if isinstance(padding, str):
        window = (dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
        pads = tuple(tuple(p) for p in lax.padtype_to_pads(x.shape[1:3], window, strides, padding))
    else:
        pads = padding
    auto = impl == "auto"
    if auto:
        impl = choose_impl(x.shape[1:3], (kh, kw), strides, pads, dilation, groups, in_channels=x.shape[-1],
                           out_channels=kernel.shape[-1], onednn=onednn_usable(x, kernel, groups))
        # Kept inputs were measured in one process; a run over several processes keeps XLA's own backward,
        # and the patches path for split convs.
        keep = KEEP_CONV_INPUT_ON_CPU and jax.default_backend() == "cpu" and jax.process_count() == 1
        if impl == "xla" and groups == 1 and keep:
            impl = "kept"
        elif impl == "split" and not keep:
            impl = "im2col"
    if impl in ("im2col", "shifted", "kept", "split", "onednn") and groups != 1:
        raise UsageError(f"conv impl={impl!r} supports groups=1 only; use impl='xla' for grouped convs")
    if impl == "im2col":
        return im2col_conv(x, kernel, strides, pads, dilation, precision)
    if impl == "shifted":
        if auto and ONEDNN_SHIFTED_GRADIENTS_ON_CPU and onednn_usable(x, kernel, groups):
            return shifted_sum_onednn_conv(x, kernel, strides, pads, dilation, precision)
        return shifted_sum_conv(x, kernel, strides, pads, dilation, precision)
    if impl == "kept":
        return kept_input_conv(x, kernel, strides, pads, dilation, precision)
    if impl == "split":
        return split_conv(x, kernel, strides, pads, dilation, precision)
    if impl == "onednn":
        if not onednn.available():
            raise UsageError(f"conv impl='onednn' needs cnnjax's oneDNN kernels: {onednn.INSTALL_HINT}, or use "
                             "impl='auto'")
        if x.dtype != kernel.dtype or x.dtype not in (jnp.float32, jnp.bfloat16):
            raise UsageError(f"conv impl='onednn' takes float32 or bfloat16 operands of one dtype; got {x.dtype} "
                             f"and {kernel.dtype}")
        onednn.require_dtype(x.dtype, "conv impl='onednn'")
        return onednn_conv(x, kernel, strides, pads, dilation)
    return _xla_conv(x, kernel, strides, pads, dilation, groups, precision)
