"""Flax Linen building blocks with PyTorch semantics, NHWC layout.

Every module here is a pure function of ``(variables, inputs)``. Conventions:

* Inputs are ``[N, H, W, C]``; conv kernels are ``[kH, kW, C_in / groups, C_out]`` (HWIO),
  dense kernels ``[in, out]`` — the transposes of torch's ``[O, I, kH, kW]`` / ``[out, in]``.
* Padding is torch-style: an int ``p`` or a pair ``(ph, pw)`` pads symmetrically;
  ``'SAME'`` / ``'VALID'`` are accepted as in XLA. (``'SAME'`` with stride 2 on an even size
  pads ``(0, 1)`` while torch pads ``(1, 1)``: use explicit pads to load torch weights.)
* :class:`BatchNorm` uses the Flax momentum convention: ``momentum=0.9`` is torch's
  ``momentum=0.1``; ``eps=1e-5``; running variance is updated with the unbiased batch
  variance, as torch does.
* Default initialisers reproduce torch's defaults (``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for
  conv and linear weights and biases).
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from cnnjax.conv import conv2d, output_size
from cnnjax.errors import UsageError
from cnnjax.native import onednn

# Non-overlapping max-pools take the broadcast backward (_tiled_max_pool_bwd); the bench variants before
# "+broadcast tiled max-pool backward" switch it off.
TILED_POOL_BROADCAST_BACKWARD = True
# Max-pools run through oneDNN's kernels where onednn_pool_usable; the bench variants before "+oneDNN max-pool"
# switch it off.
USE_ONEDNN_POOL_ON_CPU = True
# ... and only where oneDNN has its AVX-512 kernels (the CPUs where it builds bfloat16 ones, onednn.bf16_available):
# on the AVX2-only AMD EPYC Zen 3 its jit:avx2 NHWC max-pool is slower than the strided views, simple_cnn@28's step
# 0.71x and fast_cnn's 0.92x (`python -m experiments.bench_ab --a "+oneDNN convolutions" --b "+oneDNN max-pool"
# --models simple_cnn@28,lenet5,fast_cnn --rounds 5 --steps 20`, medians of 5, 2026-12-07), where on the AVX-512
# Xeon it made simple_cnn@28 1.18-1.22x. The bench variants before "+oneDNN max-pool with AVX-512 only" switch it off.
ONEDNN_POOL_NEEDS_AVX512 = True

Array = jax.Array
IntPair = Union[int, tuple[int, int]]
Padding = Union[str, int, tuple[int, int]]
Initializer = Callable[..., Array]

# torch's default: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# torchvision ResNet / VGG conv init: kaiming_normal(mode='fan_out', nonlinearity='relu').
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_default_bias_init(fan_in: int) -> Initializer:
    """Bias initialiser ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, as torch's Conv2d / Linear."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _pair(value: IntPair, what: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise UsageError(f"{what} must be an int or a pair of ints (h, w), got {value!r}")


def canonical_padding(padding: Padding) -> str | tuple[tuple[int, int], tuple[int, int]]:
    """torch-style ``p`` / ``(ph, pw)`` -> ``((ph, ph), (pw, pw))``; 'SAME'/'VALID' unchanged."""
    if isinstance(padding, str):
        mode = padding.upper()
        if mode not in ("SAME", "VALID"):
            raise UsageError(f"padding must be 'SAME', 'VALID', an int or (ph, pw); got {padding!r}")
        return mode
    ph, pw = _pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise UsageError(f"padding must be non-negative, got {padding!r}")
    return ((ph, ph), (pw, pw))


def _check_nhwc(x: Array, layer: str) -> None:
    if x.ndim != 4:
        raise UsageError(f"{layer} expects an [N, H, W, C] array, got shape {tuple(x.shape)}")


class Conv(nn.Module):
    """2-D convolution ``[N, H, W, C_in] -> [N, H', W', features]`` with torch semantics.

    ``H' = floor((H + 2 p - dilation (k - 1) - 1) / stride) + 1`` for explicit padding ``p``.
    Params: ``kernel [kH, kW, C_in / groups, features]`` and (if ``use_bias``) ``bias [features]``.

    Channel padding (a CPU layout aid, groups 1 only; the parameters keep the shapes above):
    ``pad_features`` appends that many output channels that are exactly zero (zero kernel columns
    and bias), so the output is ``[N, H', W', features + pad_features]``; ``in_features`` is the
    channel count the kernel has when the input carries extra zero channels after it (a previous
    layer's ``pad_features``), which meet zero kernel rows.
    """

    features: int
    kernel_size: IntPair = 3
    stride: IntPair = 1
    padding: Padding = 0
    dilation: IntPair = 1
    groups: int = 1
    use_bias: bool = True
    kernel_init: Initializer = torch_default_kernel_init
    bias_init: Initializer | None = None
    dtype: Any | None = None
    precision: Any = None
    impl: str = "auto"  # 'auto' | 'xla' | 'im2col' | 'shifted' | 'kept' | 'split' | 'onednn': see cnnjax.conv
    pad_features: int = 0
    in_features: int | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        _check_nhwc(x, "Conv")
        kh, kw = _pair(self.kernel_size, "kernel_size")
        in_features, extra_in = self._in_channels(x.shape[-1])
        if in_features % self.groups or self.features % self.groups:
            raise UsageError(
                f"Conv groups={self.groups} must divide both input channels ({in_features}) "
                f"and output channels ({self.features})"
            )
        kernel_shape = (kh, kw, in_features // self.groups, self.features)
        kernel = self.param("kernel", self.kernel_init, kernel_shape, jnp.float32)
        dtype = self.dtype or x.dtype
        # Zero kernel rows for the input's padding channels, zero columns for the output's.
        if extra_in or self.pad_features:
            kernel = jnp.pad(kernel, ((0, 0), (0, 0), (0, extra_in), (0, self.pad_features)))
        y = conv2d(x.astype(dtype), kernel.astype(dtype), _pair(self.stride, "stride"),
                   canonical_padding(self.padding), _pair(self.dilation, "dilation"), self.groups,
                   self.precision, self.impl)
        if self.use_bias:
            fan_in = kh * kw * in_features // self.groups
            init = self.bias_init or torch_default_bias_init(fan_in)
            bias = self.param("bias", init, (self.features,), jnp.float32)
            y = y + (jnp.pad(bias, (0, self.pad_features)) if self.pad_features else bias).astype(dtype)
        return y

    def _in_channels(self, channels: int) -> tuple[int, int]:
        """``(channels the kernel has, zero padding channels after them)`` for an input of ``channels``."""
        if self.pad_features < 0:
            raise UsageError(f"Conv pad_features must be >= 0, got {self.pad_features}")
        if (self.pad_features or self.in_features is not None) and self.groups != 1:
            raise UsageError("Conv channel padding (pad_features / in_features) supports groups=1 only")
        if self.in_features is None:
            return channels, 0
        if not 0 < self.in_features <= channels:
            raise UsageError(f"Conv in_features={self.in_features} must be in 1..{channels}, the input's channels; "
                             "feed the previous layer's (padded) output or leave in_features unset")
        return self.in_features, channels - self.in_features


class Dense(nn.Module):
    """Fully connected layer ``[..., in] -> [..., features]`` (torch ``nn.Linear``).

    Params: ``kernel [in, features]`` (torch weight transposed) and ``bias [features]``.
    """

    features: int
    use_bias: bool = True
    kernel_init: Initializer = torch_default_kernel_init
    bias_init: Initializer | None = None
    dtype: Any | None = None
    precision: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_features = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (in_features, self.features), jnp.float32)
        dtype = self.dtype or x.dtype
        y = jnp.dot(x.astype(dtype), kernel.astype(dtype), precision=self.precision)
        if self.use_bias:
            init = self.bias_init or torch_default_bias_init(in_features)
            y = y + self.param("bias", init, (self.features,), jnp.float32).astype(dtype)
        return y


class BatchNorm(nn.Module):
    """Batch normalisation over all axes but the last (``BatchNorm2d`` on NHWC, ``1d`` on [N, F]).

    ``train=True``: normalise with the batch statistics (biased variance) and update
    ``batch_stats`` ``mean`` / ``var`` as ``r <- momentum * r + (1 - momentum) * stat``, where the
    variance statistic is unbiased (``n / (n - 1)``), exactly as torch. ``momentum=0.9`` here is
    torch's ``momentum=0.1``. With ``axis_name`` the statistics are averaged across that mapped
    axis (cross-replica / SyncBatchNorm). ``train=False``: use the running statistics.
    Statistics are computed in at least float32 (bf16 inputs are promoted) and stored in float32.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    axis_name: str | None = None
    scale_init: Initializer = nn.initializers.ones
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        features = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # bf16 -> f32; f64 stays f64
        scale = (self.param("scale", self.scale_init, (features,), jnp.float32) if self.use_scale
                 else jnp.ones((features,), jnp.float32)).astype(xf.dtype)
        bias = (self.param("bias", self.bias_init, (features,), jnp.float32) if self.use_bias
                else jnp.zeros((features,), jnp.float32)).astype(xf.dtype)
        if not train:
            y = (xf - ra_mean.value) * lax.rsqrt(ra_var.value + self.epsilon) * scale + bias
            return y.astype(x.dtype)
        y, mean, var = _batch_norm_train(xf, scale, bias, self.epsilon, self.axis_name)
        if not self.is_initializing():
            count = math.prod(x.shape[:-1]) * (1 if self.axis_name is None else lax.psum(1, self.axis_name))
            unbiased = var * (count / max(count - 1, 1))
            ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * unbiased
        return y.astype(x.dtype)


def _across_replicas(total: Array, count: int, axis_name: str | None) -> tuple[Array, int]:
    """``total`` and its row ``count`` summed over the mapped axis ``axis_name`` (unchanged without one)."""
    if axis_name is None:
        return total, count
    return lax.psum(total, axis_name), count * lax.psum(1, axis_name)


def _channel_sums(rows: Array, axis_name: str | None) -> tuple[Array, int]:
    """Sum of ``[M, C]`` over its rows (and over the mapped axis ``axis_name``), and the row count."""
    return _across_replicas(jnp.sum(rows, axis=0), rows.shape[0], axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm_train(x: Array, scale: Array, bias: Array, epsilon: float,
                      axis_name: str | None) -> tuple[Array, Array, Array]:
    """Training-mode BatchNorm of ``[..., C]``: ``(y, batch mean [C], biased batch variance [C])``.

    ``y = (x - mean) / sqrt(var + epsilon) * scale + bias``, statistics over every axis but the last
    (and across ``axis_name``). The backward is the closed form, two channel sums and one elementwise
    pass, instead of autodiff's chain through the mean and variance: 1.5-2.7x faster per layer on the
    CPU (``python -m experiments.bench_ab`` measures the whole step). Parameter gradients are this
    replica's own, as autodiff gives them; the train step averages them across replicas.
    """
    return _batch_norm_forward(x, scale, bias, epsilon, axis_name)[0]


def _batch_norm_forward(x, scale, bias, epsilon, axis_name):
    """``((y, mean, var), residuals)`` of :func:`_batch_norm_train`."""
    rows = x.reshape(-1, x.shape[-1])
    total, count = _channel_sums(rows, axis_name)
    mean = total / count
    centred = rows - mean
    sq_total, _ = _channel_sums(centred * centred, axis_name)
    var = sq_total / count
    inv_std = lax.rsqrt(var + epsilon)
    y = (centred * (inv_std * scale) + bias).reshape(x.shape)
    return (y, mean, var), (x, mean, inv_std, scale)


def _batch_norm_train_fwd(x, scale, bias, epsilon, axis_name):
    return _batch_norm_forward(x.value, scale.value, bias.value, epsilon, axis_name)  # symbolic_zeros: wrapped


def _batch_norm_train_bwd(epsilon, axis_name, residuals, cotangents):
    del epsilon
    x, mean, inv_std, scale = residuals
    g_y, g_mean, g_var = cotangents
    # Zero cotangents come in symbolic (the statistics' are, when they only feed the running averages):
    # their terms are left out of the elementwise pass instead of computed as zeros.
    if isinstance(g_y, SymbolicZero):
        g_y = jnp.zeros_like(x)
    stats = {name: g for name, g in (("mean", g_mean), ("var", g_var)) if not isinstance(g, SymbolicZero)}
    rows, g_rows = x.reshape(-1, x.shape[-1]), g_y.reshape(-1, x.shape[-1])
    # sum(g * x_hat) as inv_std * (sum(g * x) - mean * sum(g)): both sums read only g and x, so XLA:CPU's
    # reduce fusions take them straight from the inputs instead of from a written-out x_hat (BatchNorm + ReLU
    # forward and backward of [128, 32, 32, 16] 2.70 against 3.04 ms; cifar_resnet20's step 1.05x, bench variant
    # '+BatchNorm backward without x_hat'). The subtraction costs digits as |mean| / std grows: up to 1.7e-4 of the
    # largest gradient at 100 standard deviations in float32, 2.9e-6 at mean zero (worst of 300 draws,
    # tests/test_layers.py).
    g_bias, g_x_sum = jnp.sum(g_rows, axis=0), jnp.sum(g_rows * rows, axis=0)
    # dx needs the sums over the whole (cross-replica) batch, and the statistics' cotangents summed
    # over replicas as pmean's transpose does; one psum carries them all.
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


_batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd, symbolic_zeros=True)


def _pool_geometry(x: Array, window: IntPair, stride: IntPair | None, padding: IntPair, name: str):
    _check_nhwc(x, name)
    kh, kw = _pair(window, "window")
    sh, sw = _pair(stride if stride is not None else (kh, kw), "stride")
    ph, pw = _pair(padding, "padding")
    if 2 * ph > kh or 2 * pw > kw:
        raise UsageError(f"{name}: padding {(ph, pw)} must be at most half the window {(kh, kw)} (torch rule)")
    dims = (1, kh, kw, 1)
    strides = (1, sh, sw, 1)
    pads = ((0, 0), (ph, ph), (pw, pw), (0, 0))
    return dims, strides, pads


def max_pool(x: Array, window: IntPair, stride: IntPair | None = None, padding: IntPair = 0) -> Array:
    """torch ``MaxPool2d`` on ``[N, H, W, C]``: padding counts as ``-inf``; stride defaults to window."""
    dims, strides, pads = _pool_geometry(x, window, stride, padding, "max_pool")
    (kh, kw), (sh, sw), (ph, pw) = dims[1:3], strides[1:3], (pads[1][0], pads[2][0])
    ho, wo = _pool_output_hw(x.shape, (kh, kw), (sh, sw), (ph, pw))
    if ho <= 0 or wo <= 0:  # an empty output, as torch's shape rule gives
        return lax.reduce_window(x, -jnp.inf, lax.max, dims, strides, pads)
    if onednn_pool_usable(x):
        return onednn_max_pool(x, (kh, kw), (sh, sw), (ph, pw))
    if (sh, sw, ph, pw) == (kh, kw, 0, 0):
        # Non-overlapping windows: torch's floor mode drops the trailing rows / columns.
        return _tiled_max_pool(x[:, : ho * kh, : wo * kw, :], kh, kw)
    return _overlapping_max_pool(x, (kh, kw), (sh, sw), (ph, pw))


def _pool_output_hw(shape: tuple[int, ...], window: tuple[int, int], stride: tuple[int, int],
                    padding: tuple[int, int]) -> tuple[int, int]:
    """``(Ho, Wo)`` of a floor-mode pool of an input of ``shape`` ``[N, H, W, C]`` with symmetric ``padding``."""
    return tuple(output_size(shape[1 + a], window[a], stride[a], (padding[a], padding[a])) for a in (0, 1))


def _tiled_max_pool(x: Array, kh: int, kw: int) -> Array:
    """Max over the non-overlapping ``kh x kw`` tiles of ``[N, kh Ho, kw Wo, C]``."""
    return _window_max_pool(x, (kh, kw), (kh, kw), (0, 0))


def _overlapping_max_pool(x: Array, window: tuple[int, int], stride: tuple[int, int],
                          padding: tuple[int, int]) -> Array:
    """Max over ``window``s of ``[N, H, W, C]`` taken every ``stride``, ``padding`` rows / columns of ``-inf``."""
    return _window_max_pool(x, window, stride, padding)


def _window_views(x: Array, window: tuple[int, int], stride: tuple[int, int], out_hw: tuple[int, int]) -> list[Array]:
    """The ``kh * kw`` strided views ``[N, Ho, Wo, C]`` of (padded) ``x``, window position ``i * kw + j``
    (row-major) at index ``i * kw + j``."""
    (kh, kw), (sh, sw), (ho, wo) = window, stride, out_hw
    n, _, _, c = x.shape
    return [lax.slice(x, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c), (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _window_max_pool(x: Array, window: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]) -> Array:
    """Max pool of ``[N, H, W, C]`` (output ``[N, Ho, Wo, C]``, floor mode) as an elementwise max of the
    windows' ``kh * kw`` strided views.

    Its gradient goes to the first maximum of each window in row-major order, as torch's; the forward
    keeps that position (int8) for the backward, which adds each position's share into its place by
    stride phase: no scatter. XLA's ``reduce_window`` gradient (select-and-scatter, or a variadic
    arg-max window) is 10-20x slower on the CPU (``python -m experiments.bench_conv``).
    """
    return _window_max_pool_fwd(x, window, stride, padding)[0]


def _window_max_pool_fwd(x, window, stride, padding):
    ph, pw = padding
    out_hw = _pool_output_hw(x.shape, window, stride, padding)
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)), constant_values=-jnp.inf)
    views = _window_views(x, window, stride, out_hw)
    top = functools.reduce(jnp.maximum, views)
    first = jnp.full(top.shape, len(views) - 1, jnp.int8 if len(views) <= 127 else jnp.int32)
    for k in range(len(views) - 2, -1, -1):  # the lowest position holding the maximum wins
        first = jnp.where(views[k] == top, jnp.asarray(k, first.dtype), first)
    return top, (first, x.shape)


def _window_max_pool_bwd(window, stride, padding, residuals, g):
    """``dx[y, x] = sum`` of the shares ``g * (first == k)`` of the windows covering ``(y, x)``, built per stride
    phase ``(y % sh, x % sw)``: each phase is a sum of shifted (not strided) shares, and the phases interleave by
    a stack and a reshape. Non-overlapping unpadded windows take :func:`_tiled_max_pool_bwd` instead."""
    first, (n, hp, wp, c) = residuals
    (kh, kw), (sh, sw), (ph, pw) = window, stride, padding
    if TILED_POOL_BROADCAST_BACKWARD and (kh, kw) == (sh, sw) and (ph, pw) == (0, 0):
        return _tiled_max_pool_bwd(window, residuals, g)
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


def _tiled_max_pool_bwd(window, residuals, g):
    """The backward of non-overlapping ``kh x kw`` windows as one select of ``g`` broadcast over each tile,
    ``[N, Ho, kh, Wo, kw, C]`` reshaped to the input (rows / columns past the last tile get zeros). XLA:CPU
    fuses the broadcasts into one pass; the stacks of the general backward are concatenations, which it runs
    slowly: a 2x2 pool's forward+backward on ``[128, 15, 15, 256]`` 4.10 -> 2.22 ms (``python -m
    experiments.bench_conv --only pool``), a 3x3 pool's on ``[128, 7, 7, 256]`` 11.37 -> 1.04 ms (ad hoc)."""
    first, (n, h, w, c) = residuals
    kh, kw = window
    _, ho, wo, _ = g.shape
    position = (jnp.arange(kh, dtype=first.dtype)[:, None] * kw + jnp.arange(kw, dtype=first.dtype)[None, :])
    dx = jnp.where(first[:, :, None, :, None, :] == position.reshape(kh, 1, kw, 1),
                   g[:, :, None, :, None, :], jnp.zeros((), g.dtype)).reshape(n, ho * kh, wo * kw, c)
    return (jnp.pad(dx, ((0, 0), (0, h - ho * kh), (0, w - wo * kw), (0, 0))),)


_window_max_pool.defvjp(_window_max_pool_fwd, _window_max_pool_bwd)


def onednn_pool_usable(x: Array) -> bool:
    """Whether :func:`max_pool` runs through oneDNN: the CPU, one process, float32 or bfloat16, and cnnjax's
    oneDNN kernels built for that dtype (:func:`cnnjax.native.onednn.runs`), as for the convolutions, on a CPU with
    AVX-512 (``ONEDNN_POOL_NEEDS_AVX512``)."""
    if jax.default_backend() != "cpu" or jax.process_count() != 1 or _why_no_onednn_pool() is not None:
        return False
    return onednn.runs(x.dtype)


def _why_no_onednn_pool() -> str | None:
    """Why max-pools on the CPU in one process keep the strided views whatever their dtype, or None."""
    if not USE_ONEDNN_POOL_ON_CPU:
        return "USE_ONEDNN_POOL_ON_CPU is off"
    if not onednn.available():
        return f"no oneDNN kernels: {onednn.describe()}"
    if ONEDNN_POOL_NEEDS_AVX512 and not onednn.bf16_available():
        return "oneDNN's max-pools only on CPUs with AVX-512; its AVX2 pool is slower"
    return None


def describe_max_pools() -> str:
    """Which max-pools run on the CPU in one process, for logs: ``oneDNN`` or ``strided views (why)``."""
    why = _why_no_onednn_pool()
    return "oneDNN" if why is None else f"strided views ({why})"


def _onednn_pool_attrs(x_shape: tuple[int, ...], window: tuple[int, int], stride: tuple[int, int],
                       padding: tuple[int, int]) -> tuple[tuple[int, int, int, int], dict]:
    """The output shape ``[N, Ho, Wo, C]`` of the floor-mode pool of ``x_shape`` and the kernels' attributes. The
    padding after the input is only what the last window needs (oneDNN, like torch, ignores the rows and
    columns that floor mode leaves out)."""
    out_hw = _pool_output_hw(x_shape, window, stride, padding)
    after = [max(0, (out_hw[a] - 1) * stride[a] + window[a] - padding[a] - x_shape[1 + a]) for a in (0, 1)]
    ints = dict(kh=window[0], kw=window[1], sh=stride[0], sw=stride[1], pt=padding[0], pb=after[0], pl=padding[1],
                pr=after[1])
    return (x_shape[0], *out_hw, x_shape[3]), {k: np.int64(v) for k, v in ints.items()}


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def onednn_max_pool(x: Array, window: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]) -> Array:
    """torch's max-pool of ``[N, H, W, C]`` (floor mode, ``padding`` rows / columns of ``-inf`` on both sides) by
    oneDNN's kernels on the CPU (``cnnjax/native/onednn_kernels.cc``), forward and backward.

    The forward keeps oneDNN's workspace (each window's maximum position, one byte an output) for the backward,
    which sends each output's gradient to the first maximum of its window in row-major order, as torch and
    :func:`_window_max_pool` do. Needs :func:`cnnjax.native.onednn.available`; reverse mode only."""
    return _onednn_max_pool_fwd(x, window, stride, padding)[0]


def _onednn_max_pool_fwd(x, window, stride, padding):
    if not onednn.available():
        raise UsageError(f"onednn_max_pool needs cnnjax's oneDNN kernels: {onednn.INSTALL_HINT}; or use max_pool, "
                         "which takes them only where they run")
    if x.dtype not in (jnp.float32, jnp.bfloat16):
        raise UsageError(f"onednn_max_pool takes float32 or bfloat16; got {x.dtype} (max_pool takes any dtype)")
    onednn.require_dtype(x.dtype, "onednn_max_pool")
    out, attrs = _onednn_pool_attrs(x.shape, window, stride, padding)
    workspace = jnp.uint8 if window[0] * window[1] < 256 else jnp.int32  # oneDNN's rule for max-pool workspaces
    call = jax.ffi.ffi_call(onednn.POOL_FORWARD_TARGET, (jax.ShapeDtypeStruct(out, x.dtype),
                                                         jax.ShapeDtypeStruct(out, workspace)),
                            vmap_method="sequential")
    y, ws = call(x, **attrs)
    return y, (ws, x.shape)


def _onednn_max_pool_bwd(window, stride, padding, residuals, g):
    ws, shape = residuals
    call = jax.ffi.ffi_call(onednn.POOL_BACKWARD_TARGET, jax.ShapeDtypeStruct(shape, g.dtype), vmap_method="sequential")
    return (call(g, ws, **_onednn_pool_attrs(shape, window, stride, padding)[1]),)


onednn_max_pool.defvjp(_onednn_max_pool_fwd, _onednn_max_pool_bwd)


def avg_pool(
    x: Array,
    window: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    count_include_pad: bool = True,
) -> Array:
    """torch ``AvgPool2d`` on ``[N, H, W, C]``; ``count_include_pad`` as in torch (default True)."""
    dims, strides, pads = _pool_geometry(x, window, stride, padding, "avg_pool")
    sums = lax.reduce_window(x, 0.0, lax.add, dims, strides, pads)
    if count_include_pad:
        return sums / (dims[1] * dims[2])
    ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
    counts = lax.reduce_window(ones, 0.0, lax.add, dims, strides, pads)
    return sums / counts


def global_avg_pool(x: Array) -> Array:
    """``[N, H, W, C] -> [N, C]``: mean over the spatial axes (torch ``AdaptiveAvgPool2d(1)`` + flatten)."""
    _check_nhwc(x, "global_avg_pool")
    return jnp.mean(x, axis=(1, 2))


def adaptive_avg_pool(x: Array, output_size: IntPair) -> Array:
    """torch ``AdaptiveAvgPool2d``: ``[N, H, W, C] -> [N, oh, ow, C]``.

    Bin ``i`` along an axis of length ``L`` covers ``[floor(i L / o), ceil((i + 1) L / o))``.
    """
    _check_nhwc(x, "adaptive_avg_pool")
    oh, ow = _pair(output_size, "output_size")
    h, w = x.shape[1:3]
    if h % oh == 0 and w % ow == 0:
        return avg_pool(x, (h // oh, w // ow))
    rows = []
    for i in range(oh):
        r0, r1 = (i * h) // oh, -((-(i + 1) * h) // oh)
        cols = []
        for j in range(ow):
            c0, c1 = (j * w) // ow, -((-(j + 1) * w) // ow)
            cols.append(jnp.mean(x[:, r0:r1, c0:c1, :], axis=(1, 2)))
        rows.append(jnp.stack(cols, axis=1))
    return jnp.stack(rows, axis=1)


class MaxPool(nn.Module):
    """Parameter-free module wrapper of :func:`max_pool` (so summaries and analysis see it)."""

    window: IntPair
    stride: IntPair | None = None
    padding: IntPair = 0

    def __call__(self, x: Array) -> Array:
        return max_pool(x, self.window, self.stride, self.padding)


class AvgPool(nn.Module):
    """Parameter-free module wrapper of :func:`avg_pool`."""

    window: IntPair
    stride: IntPair | None = None
    padding: IntPair = 0
    count_include_pad: bool = True

    def __call__(self, x: Array) -> Array:
        return avg_pool(x, self.window, self.stride, self.padding, self.count_include_pad)


class Dropout(nn.Module):
    """Inverted dropout (torch semantics): zero with probability ``rate``, scale by ``1/(1-rate)``.

    Identity when ``train=False`` or ``rate == 0``. Draws from the ``'dropout'`` rng stream, so
    ``apply(..., rngs={'dropout': key})`` is required in training.
    """

    rate: float

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if not 0.0 <= self.rate < 1.0:
            raise UsageError(f"Dropout rate must be in [0, 1), got {self.rate}")
        if not train or self.rate == 0.0:
            return x
        keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.rate, x.shape)
        return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros_like(x))


def without_channel_padding(model: nn.Module) -> nn.Module:
    """``model`` with its CPU channel padding off (``pad_channels=False``) if it has that field, else
    ``model``: summaries and feature maps then show each layer's true channels. The parameters and
    outputs are the same either way."""
    return model.clone(pad_channels=False) if hasattr(model, "pad_channels") else model


def flatten_nchw(x: Array) -> Array:
    """``[N, H, W, C] -> [N, C*H*W]`` in torch's NCHW order, so Dense weights port 1:1."""
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


def check_head_input(model: str, x: Array, expected_hwc: tuple[int, int, int], hint: str) -> None:
    """Raise a clear error when the feature map feeding a Dense head has the wrong shape."""
    got = tuple(x.shape[1:])
    if got != tuple(expected_hwc):
        raise UsageError(
            f"{model}: the Dense head expects a feature map of {expected_hwc} (H, W, C) but got "
            f"{got}; {hint}"
        )


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm -> activation: ``[N, H, W, C] -> [N, H', W', features]``."""

    features: int
    kernel_size: IntPair = 3
    stride: IntPair = 1
    padding: Padding = 1
    act: Callable[[Array], Array] | None = nn.relu
    bn_momentum: float = 0.9
    axis_name: str | None = None
    scale_init: Initializer = nn.initializers.ones
    kernel_init: Initializer = kaiming_normal_fan_out

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        x = Conv(self.features, self.kernel_size, self.stride, self.padding, use_bias=False,
                 kernel_init=self.kernel_init, name="conv")(x)
        x = BatchNorm(momentum=self.bn_momentum, axis_name=self.axis_name,
                      scale_init=self.scale_init, name="bn")(x, train)
        return self.act(x) if self.act is not None else x


class BasicBlock(nn.Module):
    """torchvision ``BasicBlock`` (expansion 1): two 3x3 conv-BN, identity or projection shortcut.

    Submodule names follow torchvision (``conv1, bn1, conv2, bn2, downsample_conv,
    downsample_bn``) so a state dict maps 1:1. ``zero_init_last_bn`` zeroes ``bn2.scale``.
    """

    features: int
    stride: int = 1
    zero_init_last_bn: bool = False
    axis_name: str | None = None
    expansion = 1

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        residual = x
        y = Conv(self.features, 3, self.stride, 1, use_bias=False, kernel_init=kaiming_normal_fan_out,
                 name="conv1")(x)
        y = nn.relu(BatchNorm(axis_name=self.axis_name, name="bn1")(y, train))
        y = Conv(self.features, 3, 1, 1, use_bias=False, kernel_init=kaiming_normal_fan_out, name="conv2")(y)
        last_scale = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
        y = BatchNorm(axis_name=self.axis_name, scale_init=last_scale, name="bn2")(y, train)
        residual = _projection_shortcut(residual, self.features, self.stride, self.axis_name, train)
        return nn.relu(y + residual)


class Bottleneck(nn.Module):
    """torchvision ``Bottleneck`` v1.5 (expansion 4): 1x1 -> 3x3 (carries the stride) -> 1x1.

    Output channels ``4 * features``; projection shortcut when stride or channels change.
    """

    features: int
    stride: int = 1
    zero_init_last_bn: bool = False
    axis_name: str | None = None
    expansion = 4

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        out_features = self.features * self.expansion
        y = Conv(self.features, 1, use_bias=False, kernel_init=kaiming_normal_fan_out, name="conv1")(x)
        y = nn.relu(BatchNorm(axis_name=self.axis_name, name="bn1")(y, train))
        y = Conv(self.features, 3, self.stride, 1, use_bias=False, kernel_init=kaiming_normal_fan_out,
                 name="conv2")(y)
        y = nn.relu(BatchNorm(axis_name=self.axis_name, name="bn2")(y, train))
        y = Conv(out_features, 1, use_bias=False, kernel_init=kaiming_normal_fan_out, name="conv3")(y)
        last_scale = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
        y = BatchNorm(axis_name=self.axis_name, scale_init=last_scale, name="bn3")(y, train)
        residual = _projection_shortcut(x, out_features, self.stride, self.axis_name, train)
        return nn.relu(y + residual)


def _projection_shortcut(x: Array, features: int, stride: int, axis_name: str | None, train: bool) -> Array:
    """Identity, or 1x1 conv (stride) + BN when the shape changes. Call inside a compact method."""
    if stride == 1 and x.shape[-1] == features:
        return x
    x = Conv(features, 1, stride, 0, use_bias=False, kernel_init=kaiming_normal_fan_out,
             name="downsample_conv")(x)
    return BatchNorm(axis_name=axis_name, name="downsample_bn")(x, train)
