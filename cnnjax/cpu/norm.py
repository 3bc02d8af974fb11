"""The CPU backend's training BatchNorm: the forward of :func:`cnnjax.layers.batch_norm_train`, the backward in
closed form (two channel sums and one elementwise pass) instead of autodiff's chain through the mean and variance
(``python -m experiments.bench.cpu`` times whole steps with and without the backend)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

Array = jax.Array


def _across_replicas(total: Array, count: int, axis_name: str | None) -> tuple[Array, int]:
    if axis_name is None:
        return total, count
    return lax.psum(total, axis_name), count * lax.psum(1, axis_name)


def _forward(x, scale, bias, epsilon, axis_name):
    """``((y, mean, var), residuals)``; statistics over every axis but the last, and across ``axis_name``."""
    rows = x.reshape(-1, x.shape[-1])
    total, count = _across_replicas(jnp.sum(rows, axis=0), rows.shape[0], axis_name)
    mean = total / count
    centred = rows - mean
    sq_total, _ = _across_replicas(jnp.sum(centred * centred, axis=0), rows.shape[0], axis_name)
    var = sq_total / count
    inv_std = lax.rsqrt(var + epsilon)
    y = (centred * (inv_std * scale) + bias).reshape(x.shape)
    return (y, mean, var), (x, mean, inv_std, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x: Array, scale: Array, bias: Array, epsilon: float,
                     axis_name: str | None) -> tuple[Array, Array, Array]:
    """``(y, mean [C], biased variance [C])`` of ``x [..., C]``, as :func:`cnnjax.layers.batch_norm_train`.
    Parameter gradients are this replica's own, as autodiff gives them."""
    return _forward(x, scale, bias, epsilon, axis_name)[0]


def _fwd(x, scale, bias, epsilon, axis_name):
    return _forward(x.value, scale.value, bias.value, epsilon, axis_name)  # symbolic_zeros: wrapped


def _bwd(epsilon, axis_name, residuals, cotangents):
    del epsilon
    x, mean, inv_std, scale = residuals
    g_y, g_mean, g_var = cotangents
    # Symbolic zero cotangents (the statistics', when they only feed the running averages) are left out.
    if isinstance(g_y, SymbolicZero):
        g_y = jnp.zeros_like(x)
    stats = {name: g for name, g in (("mean", g_mean), ("var", g_var)) if not isinstance(g, SymbolicZero)}
    rows, g_rows = x.reshape(-1, x.shape[-1]), g_y.reshape(-1, x.shape[-1])
    # sum(g * x_hat) as inv_std * (sum(g * x) - mean * sum(g)): both sums read only g and x, so XLA fuses them
    # into the inputs' reads. The subtraction costs digits as |mean| / std grows (tests/test_cpu_backend.py bounds
    # it at 100 standard deviations).
    g_bias, g_x_sum = jnp.sum(g_rows, axis=0), jnp.sum(g_rows * rows, axis=0)
    totals, count = _across_replicas(jnp.stack([g_bias, g_x_sum, *stats.values()]), rows.shape[0], axis_name)
    total = dict(zip(["bias", "x", *stats], totals, strict=True))
    g_scale = inv_std * (g_x_sum - mean * g_bias)  # this replica's own
    total_scale = inv_std * (total["x"] - mean * total["bias"])
    # dx = a g + k x_hat + c per channel, in one elementwise pass over g and x.
    a = scale * inv_std
    k = -a * total_scale / count
    c = -a * total["bias"] / count
    if "mean" in total:
        c = c + total["mean"] / count
    if "var" in total:
        k = k + 2.0 * total["var"] / (count * inv_std)
    g_x = a * g_rows + (rows - mean) * (k * inv_std) + c
    return g_x.reshape(x.shape), g_scale, g_bias


batch_norm_train.defvjp(_fwd, _bwd, symbolic_zeros=True)
