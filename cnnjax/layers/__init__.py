"""Flax Linen building blocks with PyTorch semantics, NHWC layout.

:mod:`cnnjax.layers.core` has the conv, dense, BatchNorm, pools, dropout and ResNet blocks and states the
conventions (layouts, padding, momentum, initialisers); :mod:`cnnjax.layers.mobile` the blocks of the
post-2015 families (activations, channel rounding, squeeze-and-excitation, stochastic depth, channel
LayerNorm, channel shuffle, ``Conv2dNormActivation``); :mod:`cnnjax.layers.inverted_residual` MobileNet's
inverted residuals (V2 and V3); :mod:`cnnjax.layers.dense_block` DenseNet's dense blocks. Everything is re-exported
here.
"""

from cnnjax.layers.core import (
    Array,
    AvgPool,
    BasicBlock,
    BatchNorm,
    Bottleneck,
    Conv,
    ConvBN,
    Dense,
    Dropout,
    Initializer,
    IntPair,
    MaxPool,
    Padding,
    adaptive_avg_pool,
    avg_pool,
    batch_norm_train,
    canonical_padding,
    check_head_input,
    flatten_nchw,
    global_avg_pool,
    kaiming_normal_fan_out,
    max_pool,
    reduce_window_max_pool,
    torch_default_bias_init,
    torch_default_kernel_init,
)
from cnnjax.layers.inverted_residual import InvertedResidual, InvertedResidualV3
from cnnjax.layers.mobile import (
    ChannelLayerNorm,
    ConvNormAct,
    SqueezeExcitation,
    StochasticDepth,
    channel_shuffle,
    hardsigmoid,
    hardswish,
    make_divisible,
    relu6,
    silu,
)

__all__ = [
    "Array", "AvgPool", "BasicBlock", "BatchNorm", "Bottleneck", "ChannelLayerNorm", "Conv", "ConvBN", "ConvNormAct",
    "Dense", "Dropout", "Initializer", "IntPair", "InvertedResidual", "InvertedResidualV3", "MaxPool", "Padding",
    "SqueezeExcitation", "StochasticDepth", "adaptive_avg_pool", "avg_pool", "batch_norm_train", "canonical_padding",
    "channel_shuffle", "check_head_input", "flatten_nchw", "global_avg_pool", "hardsigmoid", "hardswish",
    "kaiming_normal_fan_out", "make_divisible", "max_pool", "reduce_window_max_pool", "relu6", "silu",
    "torch_default_bias_init", "torch_default_kernel_init",
]
