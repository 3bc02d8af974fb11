"""Inverted residual blocks of MobileNetV2 and MobileNetV3, NHWC with PyTorch semantics.

Child module names are torchvision's, so a state dict maps 1:1 through :mod:`cnnjax.port`:
:class:`InvertedResidual` is ``torchvision.models.mobilenetv2.InvertedResidual`` (children ``conv.0`` ...),
:class:`InvertedResidualV3` is ``torchvision.models.mobilenetv3.InvertedResidual`` (children ``block.0`` ...).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from cnnjax.errors import UsageError
from cnnjax.layers.core import BatchNorm, Conv, check_nhwc, kaiming_normal_fan_out
from cnnjax.layers.mobile import ConvNormAct, SqueezeExcitation, hardsigmoid, hardswish, make_divisible, relu6

Array = jax.Array


class InvertedResidual(nn.Module):
    """MobileNetV2's inverted residual: ``[N, H, W, C] -> [N, H / stride, W / stride, features]``.

    ``hidden = round(C * expand_ratio)``; expand 1x1 ``ConvNormAct`` (ReLU6, skipped when ``expand_ratio == 1``),
    depthwise 3x3 ``ConvNormAct`` (ReLU6, carries the stride), linear 1x1 projection conv and BatchNorm; the
    input is added when ``stride == 1`` and ``C == features``. Children as torchvision's ``self.conv``
    Sequential: with expansion ``conv.0`` (expand: ``conv.0.0`` conv, ``conv.0.1`` BN), ``conv.1`` (depthwise),
    ``conv.2`` (projection conv), ``conv.3`` (BN); without it the same shifted down by one (``conv.0``
    depthwise, ``conv.1`` conv, ``conv.2`` BN). ``bn_momentum`` is Flax's convention (0.9 == torch's 0.1).
    """

    features: int
    stride: int = 1
    expand_ratio: float = 6
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        check_nhwc(x, "InvertedResidual")
        if self.stride not in (1, 2):
            raise UsageError(f"InvertedResidual: stride must be 1 or 2, got {self.stride}")
        channels = x.shape[-1]
        hidden = int(round(channels * self.expand_ratio))
        norm = {"bn_momentum": self.bn_momentum, "bn_epsilon": self.bn_epsilon, "axis_name": self.axis_name}
        y, index = x, 0
        if self.expand_ratio != 1:
            y = ConvNormAct(hidden, 1, activation=relu6, **norm, name="conv.0")(y, train)
            index = 1
        y = ConvNormAct(hidden, 3, self.stride, groups=hidden, activation=relu6, **norm,
                        name=f"conv.{index}")(y, train)
        y = Conv(self.features, 1, use_bias=False, kernel_init=kaiming_normal_fan_out, name=f"conv.{index + 1}")(y)
        y = BatchNorm(momentum=self.bn_momentum, epsilon=self.bn_epsilon, axis_name=self.axis_name,
                      name=f"conv.{index + 2}")(y, train)
        if self.stride == 1 and channels == self.features:
            return x + y
        return y


class InvertedResidualV3(nn.Module):
    """MobileNetV3's inverted residual (torchvision ``mobilenetv3.InvertedResidual``):
    ``[N, H, W, C] -> [N, H', W', features]`` with ``H' = H / stride`` (``H`` when ``dilation > 1``).

    Children as torchvision's ``self.block`` Sequential, numbered in order of presence: expand 1x1
    ``ConvNormAct`` (only when ``expanded != C``), depthwise ``kernel_size`` ``ConvNormAct`` (stride, or
    ``dilation`` with stride 1 when ``dilation > 1``; padding ``(k - 1) // 2 * dilation``),
    :class:`~cnnjax.layers.mobile.SqueezeExcitation` when ``use_se`` (``make_divisible(expanded // 4, 8)``
    squeeze channels, ReLU, hardsigmoid scale; children ``fc1`` / ``fc2``), linear 1x1 projection
    ``ConvNormAct``. The activation is hardswish when ``use_hardswish`` else ReLU. The input is added when
    ``stride == 1`` and ``C == features``. MobileNetV3 uses BN ``eps=1e-3`` and torch momentum 0.01 (Flax
    ``bn_momentum=0.99``), the defaults here.
    """

    expanded: int
    features: int
    kernel_size: int = 3
    stride: int = 1
    use_se: bool = False
    use_hardswish: bool = False
    dilation: int = 1
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        check_nhwc(x, "InvertedResidualV3")
        if self.stride not in (1, 2):
            raise UsageError(f"InvertedResidualV3: stride must be 1 or 2, got {self.stride}")
        channels = x.shape[-1]
        activation = hardswish if self.use_hardswish else nn.relu
        norm = {"bn_momentum": self.bn_momentum, "bn_epsilon": self.bn_epsilon, "axis_name": self.axis_name}
        y, index = x, 0
        if self.expanded != channels:
            y = ConvNormAct(self.expanded, 1, activation=activation, **norm, name="block.0")(y, train)
            index += 1
        stride = 1 if self.dilation > 1 else self.stride
        y = ConvNormAct(self.expanded, self.kernel_size, stride, groups=self.expanded, dilation=self.dilation,
                        activation=activation, **norm, name=f"block.{index}")(y, train)
        index += 1
        if self.use_se:
            y = SqueezeExcitation(make_divisible(self.expanded // 4, 8), scale_activation=hardsigmoid,
                                  name=f"block.{index}")(y)
            index += 1
        y = ConvNormAct(self.features, 1, activation=None, **norm, name=f"block.{index}")(y, train)
        if self.stride == 1 and channels == self.features:
            return x + y
        return y
