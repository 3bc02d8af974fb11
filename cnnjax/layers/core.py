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

import math
from collections.abc import Callable, Sequence
from typing import Any, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cnnjax import kernels
from cnnjax.conv import conv2d, output_size
from cnnjax.errors import UsageError

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


def int_pair(value: IntPair, what: str) -> tuple[int, int]:
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
    ph, pw = int_pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise UsageError(f"padding must be non-negative, got {padding!r}")
    return ((ph, ph), (pw, pw))


def check_nhwc(x: Array, layer: str) -> None:
    if x.ndim != 4:
        raise UsageError(f"{layer} expects an [N, H, W, C] array, got shape {tuple(x.shape)}")


class Conv(nn.Module):
    """2-D convolution ``[N, H, W, C_in] -> [N, H', W', features]`` with torch semantics.

    ``H' = floor((H + 2 p - dilation (k - 1) - 1) / stride) + 1`` for explicit padding ``p``.
    Params: ``kernel [kH, kW, C_in / groups, features]`` and (if ``use_bias``) ``bias [features]``.
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

    @nn.compact
    def __call__(self, x: Array) -> Array:
        check_nhwc(x, "Conv")
        kh, kw = int_pair(self.kernel_size, "kernel_size")
        in_features = x.shape[-1]
        if in_features % self.groups or self.features % self.groups:
            raise UsageError(
                f"Conv groups={self.groups} must divide both input channels ({in_features}) "
                f"and output channels ({self.features})"
            )
        kernel_shape = (kh, kw, in_features // self.groups, self.features)
        kernel = self.param("kernel", self.kernel_init, kernel_shape, jnp.float32)
        dtype = self.dtype or x.dtype
        y = conv2d(x.astype(dtype), kernel.astype(dtype), int_pair(self.stride, "stride"),
                   canonical_padding(self.padding), int_pair(self.dilation, "dilation"), self.groups,
                   self.precision)
        if self.use_bias:
            fan_in = kh * kw * in_features // self.groups
            init = self.bias_init or torch_default_bias_init(fan_in)
            bias = self.param("bias", init, (self.features,), jnp.float32)
            y = y + bias.astype(dtype)
        return y


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
        y, mean, var = batch_norm_train(xf, scale, bias, self.epsilon, self.axis_name)
        if not self.is_initializing():
            count = math.prod(x.shape[:-1]) * (1 if self.axis_name is None else lax.psum(1, self.axis_name))
            unbiased = var * (count / max(count - 1, 1))
            ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * unbiased
        return y.astype(x.dtype)


def _batch_norm_plain(x: Array, scale: Array, bias: Array, *, epsilon: float,
                      axis_name: str | None) -> tuple[Array, Array, Array]:
    rows = x.reshape(-1, x.shape[-1])
    mean = jnp.mean(rows, axis=0)
    if axis_name is not None:
        mean = lax.pmean(mean, axis_name)
    centred = rows - mean
    var = jnp.mean(centred * centred, axis=0)
    if axis_name is not None:
        var = lax.pmean(var, axis_name)
    y = centred * (lax.rsqrt(var + epsilon) * scale) + bias
    return y.reshape(x.shape), mean, var


def batch_norm_train(x: Array, scale: Array, bias: Array, epsilon: float,
                     axis_name: str | None = None) -> tuple[Array, Array, Array]:
    """Training-mode BatchNorm of ``x [..., C]``: ``(y, batch mean [C], biased batch variance [C])``, statistics
    over every axis but the last (and averaged across the mapped axis ``axis_name``, equal shards assumed).

    ``y = (x - mean) / sqrt(var + epsilon) * scale + bias``, differentiated by autodiff (parameter gradients are
    this replica's own; the train step averages them). Where the program is lowered for the CPU, the CPU backend
    runs the same forward with a closed-form backward (:mod:`cnnjax.kernels`).
    """
    return kernels.dispatch("batch_norm_train", _batch_norm_plain, x, scale, bias, epsilon=epsilon,
                            axis_name=axis_name)


def _pool_geometry(x: Array, window: IntPair, stride: IntPair | None, padding: IntPair, name: str):
    check_nhwc(x, name)
    kh, kw = int_pair(window, "window")
    sh, sw = int_pair(stride if stride is not None else (kh, kw), "stride")
    ph, pw = int_pair(padding, "padding")
    if 2 * ph > kh or 2 * pw > kw:
        raise UsageError(f"{name}: padding {(ph, pw)} must be at most half the window {(kh, kw)} (torch rule)")
    dims = (1, kh, kw, 1)
    strides = (1, sh, sw, 1)
    pads = ((0, 0), (ph, ph), (pw, pw), (0, 0))
    return dims, strides, pads


def max_pool(x: Array, window: IntPair, stride: IntPair | None = None, padding: IntPair = 0,
             ceil_mode: bool = False) -> Array:
    """torch ``MaxPool2d`` on ``[N, H, W, C]``: padding counts as ``-inf``; stride defaults to window.

    ``ceil_mode`` as torch: ``H' = ceil((H + 2 p - k) / s) + 1``, less one where that last window would start in
    the right padding; the extra bottom / right rows are ``-inf``.

    Plain XLA (``lax.reduce_window``, whose gradient goes to a window's maximum) on every platform; where the
    program is lowered for the CPU, the CPU backend's kernels (:mod:`cnnjax.kernels`), whose gradient goes to the
    first maximum of a window in row-major order, as torch's.
    """
    dims, strides, pads = _pool_geometry(x, window, stride, padding, "max_pool")
    (kh, kw), (sh, sw), (ph, pw) = dims[1:3], strides[1:3], (pads[1][0], pads[2][0])
    if ceil_mode:
        extra = [_ceil_mode_extra(x.shape[1 + a], dims[1 + a], strides[1 + a], pads[1 + a][0]) for a in (0, 1)]
        if any(extra):
            x = jnp.pad(x, ((0, 0), (0, extra[0]), (0, extra[1]), (0, 0)), constant_values=-jnp.inf)
    ho, wo = (output_size(x.shape[1 + a], dims[1 + a], strides[1 + a], pads[1 + a]) for a in (0, 1))
    if ho <= 0 or wo <= 0:  # an empty output, as torch's shape rule gives
        return lax.reduce_window(x, -jnp.inf, lax.max, dims, strides, pads)
    return kernels.dispatch("max_pool", reduce_window_max_pool, x, window=(kh, kw), stride=(sh, sw),
                            padding=(ph, pw))


def _ceil_mode_extra(length: int, window: int, stride: int, pad: int) -> int:
    """Rows (or columns) of ``-inf`` to add after the right padding so floor mode gives torch's ceil-mode size
    (also where the window is wider than the padded input: torch then still has one output)."""
    out = (length + 2 * pad - window + stride - 1) // stride + 1
    if out > 1 and (out - 1) * stride >= length + pad:  # the last window must start inside the input or left pad
        out -= 1
    return max(0, (out - 1) * stride + window - (length + 2 * pad)) if out > 0 else 0


def reduce_window_max_pool(x: Array, window: tuple[int, int], stride: tuple[int, int],
                           padding: tuple[int, int]) -> Array:
    """The plain max-pool: ``lax.reduce_window`` of ``max`` with ``padding`` rows / columns of ``-inf``."""
    pads = ((0, 0), (padding[0], padding[0]), (padding[1], padding[1]), (0, 0))
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *stride, 1), pads)


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
    check_nhwc(x, "global_avg_pool")
    return jnp.mean(x, axis=(1, 2))


def adaptive_avg_pool(x: Array, output_size: IntPair) -> Array:
    """torch ``AdaptiveAvgPool2d``: ``[N, H, W, C] -> [N, oh, ow, C]``.

    Bin ``i`` along an axis of length ``L`` covers ``[floor(i L / o), ceil((i + 1) L / o))``.
    """
    check_nhwc(x, "adaptive_avg_pool")
    oh, ow = int_pair(output_size, "output_size")
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
    ceil_mode: bool = False

    def __call__(self, x: Array) -> Array:
        return max_pool(x, self.window, self.stride, self.padding, self.ceil_mode)


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

    Output channels ``4 * features``; projection shortcut when stride or channels change. The inner width is
    ``int(features * base_width / 64) * groups`` and the 3x3 conv has ``groups`` groups: ResNeXt's
    ``32x4d`` is ``groups=32, base_width=4``, Wide ResNet-50-2 is ``base_width=128``.
    """

    features: int
    stride: int = 1
    zero_init_last_bn: bool = False
    axis_name: str | None = None
    groups: int = 1
    base_width: int = 64
    expansion = 4

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        out_features = self.features * self.expansion
        width = int(self.features * (self.base_width / 64.0)) * self.groups
        y = Conv(width, 1, use_bias=False, kernel_init=kaiming_normal_fan_out, name="conv1")(x)
        y = nn.relu(BatchNorm(axis_name=self.axis_name, name="bn1")(y, train))
        y = Conv(width, 3, self.stride, 1, groups=self.groups, use_bias=False, kernel_init=kaiming_normal_fan_out,
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
