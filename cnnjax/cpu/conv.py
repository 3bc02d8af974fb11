"""The CPU backend's convolutions: oneDNN's kernels, patches times a matrix, and a shifted sum for greyscale inputs.

Each computes the convolution of :func:`cnnjax.conv.xla_conv` (NHWC input ``[N, H, W, C]``, HWIO kernel
``[kH, kW, C / groups, O]``, explicit pads) summed in another order: within 1e-5 relative in float32
(``tests/test_conv.py``, ``tests/test_cpu_backend.py``). Grouped convs (``groups`` > 1, depthwise ones included)
run by oneDNN or XLA; the shifted sum and patches take groups 1 only. The oneDNN paths define their gradients by
custom VJPs, so they support reverse-mode differentiation only. :class:`cnnjax.cpu.rules.Rules` picks the path per
shape.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from cnnjax.cpu import onednn
from cnnjax.cpu.rules import DEFAULT, Pads, Rules, output_hw

Array = jax.Array


def conv2d(x: Array, kernel: Array, *, strides: tuple[int, int], pads: Pads, dilation: tuple[int, int],
           groups: int = 1, precision: Any = None, rules: Rules = DEFAULT) -> Array:
    """``[N, H, W, C] * [kH, kW, C / groups, O] -> [N, H', W', O]`` by the path ``rules`` picks for this shape,
    grouping and dtype (:meth:`Rules.conv_path`); 'xla' is :func:`lax.conv_general_dilated`. ``groups`` divides
    ``C`` and ``O``, and the kernel's ``I`` is ``C / groups``."""
    if groups < 1 or x.shape[-1] != groups * kernel.shape[2] or kernel.shape[3] % groups:
        raise ValueError(f"conv2d: input {x.shape} and kernel {kernel.shape} do not fit groups {groups}: the "
                         "kernel must be [kH, kW, C / groups, O] with groups dividing O")
    runs = x.dtype == kernel.dtype and onednn.runs(x.dtype)
    path = rules.conv_path(x.shape, kernel.shape, strides, pads, dilation, runs, groups)
    if path == "shifted":
        return shifted_sum_conv(x, kernel, strides, pads, dilation, rules)
    if path == "patches":
        return patches_conv(x, kernel, strides, pads, dilation, precision)
    if path == "onednn":
        return onednn_conv(x, kernel, strides, pads, dilation, rules)
    return lax.conv_general_dilated(x, kernel, strides, pads, rhs_dilation=dilation, precision=precision,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


def _shifted_views(x: Array, kernel_hw: tuple[int, int], strides: tuple[int, int], pads: Pads,
                   dilation: tuple[int, int]) -> list[Array]:
    """The ``kH * kW`` views ``[N, H', W', C]`` of the padded input that kernel tap ``(i, j)`` sees, row-major."""
    n, h, w, c = x.shape
    ho, wo = output_hw((h, w), kernel_hw, strides, pads, dilation)
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    views = []
    for i in range(kernel_hw[0]):
        for j in range(kernel_hw[1]):
            y0, x0 = i * dilation[0], j * dilation[1]
            views.append(lax.slice(xp, (0, y0, x0, 0),
                                   (n, y0 + strides[0] * (ho - 1) + 1, x0 + strides[1] * (wo - 1) + 1, c),
                                   (1, strides[0], strides[1], 1)))
    return views


def patches_conv(x: Array, kernel: Array, strides: tuple[int, int], pads: Pads, dilation: tuple[int, int] = (1, 1),
                 precision: Any = None) -> Array:
    """The conv as patches ``[N H' W', kH kW C]`` times the kernel reshaped to ``[kH kW C, O]``; XLA's gradients."""
    kh, kw, c, o = kernel.shape
    views = _shifted_views(x, (kh, kw), strides, pads, dilation)
    n, ho, wo, _ = views[0].shape
    patches = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)  # (i, j, c) order == HWI
    y = jnp.dot(patches.reshape(n * ho * wo, kh * kw * c), kernel.reshape(kh * kw * c, o), precision=precision)
    return y.reshape(n, ho, wo, o)


def _shape(x: Array, kernel: Array, strides: tuple[int, int], pads: Pads,
           dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    return (x.shape[0], *output_hw(x.shape[1:3], kernel.shape[:2], strides, pads, dilation), kernel.shape[-1])


def _groups(x: Array, kernel: Array) -> int:
    """The grouping of a conv of ``x [N, H, W, C]`` by ``kernel [kH, kW, C / groups, O]`` (it divides ``O``)."""
    groups = x.shape[-1] // kernel.shape[2]
    if x.shape[-1] % kernel.shape[2] or kernel.shape[3] % groups:
        raise ValueError(f"no grouping fits input {x.shape} and kernel {kernel.shape}: the kernel's I must divide C "
                         "and C / I divide O")
    return groups


def _onednn_gradients(strides, pads, dilation, rules, residuals, g):
    """oneDNN's input and kernel gradients, two calls XLA may run at once."""
    x, kernel = residuals
    groups, wgrad = _groups(x, kernel), "native"
    if groups != 1:
        wgrad = rules.grouped_wgrad_path(kernel.shape, groups, dilation)
    elif strides == (1, 1) and dilation == (1, 1):
        avx512 = onednn.load().avx512
        wgrad = rules.wgrad_path(x.dtype.name, x.shape, kernel.shape, g.shape[1:3], avx512)
    return (onednn.conv_call(onednn.INPUT_GRAD, g, kernel, x.shape, strides, pads, dilation, groups=groups),
            onednn.conv_call(onednn.KERNEL_GRAD, x, g, kernel.shape, strides, pads, dilation, wgrad, groups))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def shifted_sum_conv(x: Array, kernel: Array, strides: tuple[int, int], pads: Pads, dilation: tuple[int, int],
                     rules: Rules = DEFAULT) -> Array:
    """``sum_{i, j, c} view_ij[..., c] * kernel[i, j, c]``: one elementwise pass for few input channels,
    accumulated in float32 (the result has ``x``'s dtype); oneDNN's gradients."""
    acc = jnp.promote_types(x.dtype, jnp.float32)
    views = _shifted_views(x.astype(acc), kernel.shape[:2], strides, pads, dilation)
    kernel_acc = kernel.astype(acc)
    kw, c = kernel.shape[1], kernel.shape[2]
    terms = [view[..., ch:ch + 1] * kernel_acc[k // kw, k % kw, ch] for k, view in enumerate(views) for ch in range(c)]
    return functools.reduce(operator.add, terms).astype(x.dtype)


def _shifted_sum_fwd(x, kernel, strides, pads, dilation, rules):
    return shifted_sum_conv(x, kernel, strides, pads, dilation, rules), (x, kernel)


shifted_sum_conv.defvjp(_shifted_sum_fwd, _onednn_gradients)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def onednn_conv(x: Array, kernel: Array, strides: tuple[int, int], pads: Pads, dilation: tuple[int, int] = (1, 1),
                rules: Rules = DEFAULT) -> Array:
    """The conv ``[N, H, W, C] * [kH, kW, C / groups, O] -> [N, H', W', O]`` by oneDNN, forward and both gradients
    (``x``, ``kernel`` of one dtype, float32 or, with AVX-512, bfloat16; accumulated in float32). ``groups`` is
    ``C`` over the kernel's ``I`` (it must divide ``O``): grouped and depthwise convs run oneDNN's grouped
    primitives. A groups-1 forward runs as the input gradient of the transposed conv (flipped kernel, channels
    swapped, pads ``k - 1 - p``) where :meth:`Rules.forward_by_input_gradient` says."""
    out_shape = _shape(x, kernel, strides, pads, dilation)
    avx512 = onednn.load().avx512
    groups = _groups(x, kernel)
    if groups != 1 or not rules.forward_by_input_gradient(x.dtype.name, kernel.shape[:2], strides, pads, dilation,
                                                          avx512):
        return onednn.conv_call(onednn.FORWARD, x, kernel, out_shape, strides, pads, dilation, groups=groups)
    transposed = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    flipped = tuple((k - 1 - a, k - 1 - b) for k, (a, b) in zip(kernel.shape[:2], pads, strict=True))
    return onednn.conv_call(onednn.INPUT_GRAD, x, transposed, out_shape, strides, flipped, dilation)


def _onednn_fwd(x, kernel, strides, pads, dilation, rules):
    return onednn_conv(x, kernel, strides, pads, dilation, rules), (x, kernel)


onednn_conv.defvjp(_onednn_fwd, _onednn_gradients)
