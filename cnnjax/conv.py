"""2-D convolution as a pure function: torch-style padding and ``lax.conv_general_dilated``, NHWC x HWIO.

:func:`conv2d` is plain XLA on every platform; where a program is lowered for the CPU and the CPU backend is on,
:mod:`cnnjax.kernels` swaps in its kernels (the same numbers summed in another order).
"""

from __future__ import annotations

from typing import Any

import jax
from jax import lax

from cnnjax import kernels
from cnnjax.errors import UsageError

Array = jax.Array
Pads = tuple[tuple[int, int], tuple[int, int]]
IMPLS = ("auto", "xla", "cpu")


def output_size(size: int, kernel: int, stride: int, pads: tuple[int, int], dilation: int = 1) -> int:
    """Output length of a convolution along one axis (floor mode)."""
    return (size + pads[0] + pads[1] - dilation * (kernel - 1) - 1) // stride + 1


def explicit_pads(in_hw: tuple[int, int], kernel_hw: tuple[int, int], strides: tuple[int, int], padding: str | Pads,
                  dilation: tuple[int, int] = (1, 1)) -> Pads:
    """``((top, bottom), (left, right))`` for ``padding`` 'SAME' / 'VALID' (as XLA pads them) or explicit pads;
    a conv whose output would be empty is a one-line error."""
    if isinstance(padding, str):
        window = tuple(dilation[a] * (kernel_hw[a] - 1) + 1 for a in (0, 1))
        padding = tuple(tuple(p) for p in lax.padtype_to_pads(in_hw, window, strides, padding))
    out = [output_size(in_hw[a], kernel_hw[a], strides[a], padding[a], dilation[a]) for a in (0, 1)]
    if min(out) <= 0:
        raise UsageError(f"conv output would be empty: input {in_hw[0]}x{in_hw[1]}, kernel "
                         f"{kernel_hw[0]}x{kernel_hw[1]}, padding {padding}")
    return padding


def xla_conv(x: Array, kernel: Array, strides: tuple[int, int], pads: Pads, dilation: tuple[int, int] = (1, 1),
             groups: int = 1, precision: Any = None) -> Array:
    """``[N, H, W, C] * [kH, kW, C / groups, O] -> [N, H', W', O]`` by ``lax.conv_general_dilated``."""
    return lax.conv_general_dilated(x, kernel, window_strides=strides, padding=pads, rhs_dilation=dilation,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
                                    precision=precision)


def conv2d(x: Array, kernel: Array, strides: tuple[int, int], padding: str | Pads,
           dilation: tuple[int, int] = (1, 1), groups: int = 1, precision: Any = None,
           impl: str = "auto") -> Array:
    """NHWC x HWIO convolution ``[N, H, W, C] * [kH, kW, C / groups, O] -> [N, H', W', O]``; ``padding`` is
    'SAME' / 'VALID' or ``((top, bottom), (left, right))``.

    ``impl``: 'auto' (plain XLA, and the CPU backend's kernels where the program is lowered for a CPU:
    :mod:`cnnjax.kernels`), 'xla' (plain XLA only) or 'cpu' (the CPU backend's kernels, or a one-line error where
    it has none for this conv; for tests and benches).
    """
    if impl not in IMPLS:
        raise UsageError(f"conv impl must be one of {', '.join(IMPLS)}; got {impl!r}")
    pads = explicit_pads(x.shape[1:3], kernel.shape[:2], strides, padding, dilation)
    static = dict(strides=tuple(strides), pads=pads, dilation=tuple(dilation), groups=groups, precision=precision)
    if impl == "xla":
        return xla_conv(x, kernel, **static)
    if impl == "cpu":
        from cnnjax import cpu

        fn = cpu.implementation("conv2d", (x, kernel), static)
        if fn is None:
            raise UsageError(f"the CPU backend has no kernel for this conv ({x.dtype}, groups {groups}): "
                             f"{cpu.describe()}; use impl='auto' or 'xla'")
        return fn(x, kernel)
    return kernels.dispatch("conv2d", xla_conv, x, kernel, **static)
