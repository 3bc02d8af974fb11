"""The CPU backend's max-pool: oneDNN's kernels, or an elementwise max of strided views with a scatter-free backward.

Both compute torch's ``MaxPool2d`` of ``[N, H, W, C]`` (floor mode, ``padding`` rows / columns of ``-inf`` on both
sides; output ``[N, Ho, Wo, C]``, ``Ho, Wo >= 1``) and send each output's gradient to the first maximum of its
window in row-major order, as torch does. XLA:CPU's ``reduce_window`` gradient (select-and-scatter) is the slow
part they replace (``python -m experiments.bench.convs --only pool``). Reverse-mode differentiation only.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
from jax import lax

from cnnjax.cpu import onednn
from cnnjax.cpu.rules import DEFAULT, Rules, output_hw
from cnnjax.errors import UsageError

Array = jax.Array
Pair = tuple[int, int]


def max_pool(x: Array, *, window: Pair, stride: Pair, padding: Pair, rules: Rules = DEFAULT) -> Array:
    """The max-pool by oneDNN where ``rules``, the dtype and the window allow it, else by strided views."""
    fits = window[0] * window[1] <= onednn.MAX_POOL_WINDOW
    if fits and rules.max_pool_by_onednn(onednn.load().avx512) and onednn.runs(x.dtype):
        return onednn_max_pool(x, window, stride, padding)
    return strided_view_max_pool(x, window, stride, padding)


def _out_hw(shape: tuple[int, ...], window: Pair, stride: Pair, padding: Pair) -> Pair:
    return output_hw(shape[1:3], window, stride, tuple((p, p) for p in padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def strided_view_max_pool(x: Array, window: Pair, stride: Pair, padding: Pair) -> Array:
    """An elementwise max of the windows' ``kh * kw`` strided views; the forward keeps the first maximum's window
    position (int8) for the backward, which adds each position's share into place by stride phase."""
    return _strided_fwd(x, window, stride, padding)[0]


def _strided_fwd(x, window, stride, padding):
    (kh, kw), (sh, sw), (ph, pw) = window, stride, padding
    ho, wo = _out_hw(x.shape, window, stride, padding)
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)), constant_values=-jnp.inf)
    n, _, _, c = x.shape
    views = [lax.slice(x, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c), (1, sh, sw, 1))
             for i in range(kh) for j in range(kw)]
    top = functools.reduce(jnp.maximum, views)
    first = jnp.full(top.shape, len(views) - 1, jnp.int8 if len(views) <= 127 else jnp.int32)
    for k in range(len(views) - 2, -1, -1):  # the lowest position holding the maximum wins
        first = jnp.where(views[k] == top, jnp.asarray(k, first.dtype), first)
    return top, (first, x.shape)


def _strided_bwd(window, stride, padding, residuals, g):
    """``dx[y, x]``: the shares ``g * (first == k)`` of the windows covering ``(y, x)``, summed per stride phase
    ``(y % sh, x % sw)`` from shifted (not strided) shares; the phases interleave by a stack and a reshape."""
    first, (n, hp, wp, c) = residuals
    (kh, kw), (sh, sw), (ph, pw) = window, stride, padding
    if (kh, kw) == (sh, sw) and (ph, pw) == (0, 0):
        return _tiled_bwd(window, residuals, g)
    _, ho, wo, _ = g.shape
    mh, mw = -(-hp // sh), -(-wp // sw)  # rows / columns per phase
    zero = jnp.zeros((), g.dtype)
    rows = []
    for pi in range(sh):
        cols = []
        for pj in range(sw):
            # Window offset (i, j) = (pi + sh t, pj + sw u) lands on phase (pi, pj), shifted by (t, u).
            shares = [lax.pad(jnp.where(first == i * kw + j, g, zero), zero,
                              ((0, 0, 0), (i // sh, mh - ho - i // sh, 0), (j // sw, mw - wo - j // sw, 0), (0, 0, 0)))
                      for i in range(pi, kh, sh) for j in range(pj, kw, sw)]
            cols.append(functools.reduce(operator.add, shares) if shares else jnp.zeros((n, mh, mw, c), g.dtype))
        rows.append(jnp.stack(cols, axis=3))  # [N, mh, mw, sw, C]
    dx = jnp.stack(rows, axis=2).reshape(n, mh * sh, mw * sw, c)
    return (dx[:, ph:hp - ph, pw:wp - pw, :],)


def _tiled_bwd(window, residuals, g):
    """Non-overlapping windows: one select of ``g`` broadcast over each tile ``[N, Ho, kh, Wo, kw, C]``, reshaped
    to the input; rows / columns past the last tile get zeros."""
    first, (n, h, w, c) = residuals
    kh, kw = window
    _, ho, wo, _ = g.shape
    position = jnp.arange(kh, dtype=first.dtype)[:, None] * kw + jnp.arange(kw, dtype=first.dtype)[None, :]
    dx = jnp.where(first[:, :, None, :, None, :] == position.reshape(kh, 1, kw, 1),
                   g[:, :, None, :, None, :], jnp.zeros((), g.dtype)).reshape(n, ho * kh, wo * kw, c)
    return (jnp.pad(dx, ((0, 0), (0, h - ho * kh), (0, w - wo * kw), (0, 0))),)


strided_view_max_pool.defvjp(_strided_fwd, _strided_bwd)


def _onednn_pads(shape: tuple[int, ...], window: Pair, stride: Pair, padding: Pair) -> tuple[Pair, Pair]:
    """``padding`` before; after, only what the last window needs (floor mode leaves the rest out)."""
    out_hw = _out_hw(shape, window, stride, padding)
    return tuple((padding[a], max(0, (out_hw[a] - 1) * stride[a] + window[a] - padding[a] - shape[1 + a]))
                 for a in (0, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def onednn_max_pool(x: Array, window: Pair, stride: Pair, padding: Pair) -> Array:
    """The max-pool by oneDNN's kernels (float32, or bfloat16 with AVX-512; windows of at most
    :data:`cnnjax.cpu.onednn.MAX_POOL_WINDOW` positions); the forward keeps oneDNN's workspace (each window's
    maximum position, one byte) for the backward."""
    if window[0] * window[1] > onednn.MAX_POOL_WINDOW:
        raise UsageError(f"onednn_max_pool takes windows of at most {onednn.MAX_POOL_WINDOW} positions, got "
                         f"{window[0]}x{window[1]}; use max_pool, which takes the strided views for them")
    return _onednn_fwd(x, window, stride, padding)[0]


def _onednn_fwd(x, window, stride, padding):
    out_shape = (x.shape[0], *_out_hw(x.shape, window, stride, padding), x.shape[3])
    pads = _onednn_pads(x.shape, window, stride, padding)
    y, workspace = onednn.max_pool_forward_call(x, out_shape, window, stride, pads)
    return y, (workspace, x.shape)


def _onednn_bwd(window, stride, padding, residuals, g):
    workspace, shape = residuals
    pads = _onednn_pads(shape, window, stride, padding)
    return (onednn.max_pool_backward_call(g, workspace, shape, window, stride, pads),)


onednn_max_pool.defvjp(_onednn_fwd, _onednn_bwd)
