"""MobileNetV2, MobileNetV3 small / large and MNASNet 0.5 / 0.75 / 1.0 / 1.3: exact parameter counts (Flax and the
torch twins), torch parity of the models (eval and train mode, running statistics), of both inverted residual
blocks and of the MobileNetV3 activations / squeeze-and-excitation, classifier dropout, any input size."""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cnnjax import models
from cnnjax.layers import Dropout, SqueezeExcitation, hardsigmoid, hardswish
from cnnjax.layers.inverted_residual import InvertedResidual, InvertedResidualV3
from experiments.bench import torch_zoo
from experiments.bench.torch_zoo import mobilenet as tv_mobilenet
from tests.onednn_marks import use_path
from tests.parity import assert_parity, check_model_parity, nchw, nhwc, param_count, port_twin, variables_of

PARAM_COUNTS = {
    "mobilenet_v2": 3_504_872,
    "mobilenet_v3_small": 2_542_856,
    "mobilenet_v3_large": 5_483_032,
    "mnasnet0_5": 2_218_512,
    "mnasnet0_75": 3_170_208,
    "mnasnet1_0": 4_383_312,
    "mnasnet1_3": 6_282_256,
}
NO_DROPOUT = {"jax_kwargs": {"dropout_rate": 0.0}, "torch_kwargs": {"dropout": 0.0}}



def test_registered_with_weight_files():
    assert set(PARAM_COUNTS) <= set(models.available())
    files = models.weight_files()
    assert {name: files[name] for name in PARAM_COUNTS} == {  # torchvision's IMAGENET1K_V1 files
        "mobilenet_v2": "mobilenet_v2-b0353104.pth",
        "mobilenet_v3_small": "mobilenet_v3_small-047dcff4.pth",
        "mobilenet_v3_large": "mobilenet_v3_large-8738ca79.pth",
        "mnasnet0_5": "mnasnet0.5_top1_67.823-3ffadce67e.pth",
        "mnasnet0_75": "mnasnet0_75-7090bc5f.pth",
        "mnasnet1_0": "mnasnet1.0_top1_73.512-f206786ef8.pth",
        "mnasnet1_3": "mnasnet1_3-a4c69d6f.pth",
    }


@pytest.mark.parametrize("name", list(PARAM_COUNTS))
def test_parameter_count(name):
    model = models.create(name)
    shape = models.DEFAULT_INPUT_SHAPES[name]
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)), train=False))
    assert param_count(variables["params"]) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", list(PARAM_COUNTS))
def test_torch_twin_parameter_count(name):
    with torch.device("meta"):
        tm = torch_zoo.build(name)
    assert sum(p.numel() for p in tm.parameters()) == PARAM_COUNTS[name]


# Each family's smallest member (and MobileNetV2, the only V2): 224x224 on the XLA path, an odd size on both.
SMALLEST = ["mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5"]
ODD_SIZES = {"mobilenet_v2": (131, 161, 3), "mobilenet_v3_small": (97, 97, 3), "mnasnet0_5": (161, 131, 3)}


@pytest.mark.parametrize("name", SMALLEST)
def test_parity_224(name, monkeypatch):
    use_path(monkeypatch, "xla")
    check_model_parity(name, (224, 224, 3), 2, "xla", **NO_DROPOUT)


@pytest.mark.parametrize("name", SMALLEST)
def test_parity_odd_size(name, path):
    check_model_parity(name, ODD_SIZES[name], 2, path, **NO_DROPOUT)


@pytest.mark.slow
@pytest.mark.parametrize("name,shape", [("mobilenet_v3_large", (96, 96, 3)), ("mnasnet0_75", (112, 112, 3)),
                                        ("mnasnet1_0", (96, 96, 3)), ("mnasnet1_3", (128, 128, 3))])
def test_parity_other_members(name, shape, path):
    check_model_parity(name, shape, 2, path, **NO_DROPOUT)


def _block_parity(label: str, model, tm: torch.nn.Module, shape: tuple[int, int, int], batch: int = 2) -> None:
    """Eval output, train output and updated running statistics of a block against its torch twin."""
    from experiments.bench.torch_twins import randomize_bn_stats

    randomize_bn_stats(tm, torch.Generator().manual_seed(1))
    variables = port_twin(model, tm, shape)
    x = np.random.RandomState(0).randn(batch, *shape).astype(np.float32)
    tm.eval()
    with torch.no_grad():
        want = nhwc(tm(nchw(x)))
    assert_parity(f"{label} eval", model.apply(variables, x, train=False), want, 1e-5)
    tm.train()
    with torch.no_grad():
        want = nhwc(tm(nchw(x)))
    got, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert_parity(f"{label} train", got, want, 1e-5)
    assert_parity(f"{label} train running stats", updated["batch_stats"],
                  port_twin(model, tm, shape)["batch_stats"], 1e-5)


# (channels in, out, stride, expand ratio, input H / W): residual, stride 2, no expansion (shifted names).
@pytest.mark.parametrize("inp,oup,stride,expand,size", [(16, 16, 1, 6, 9), (16, 24, 2, 6, 11), (32, 16, 1, 1, 8)])
def test_inverted_residual_v2_block_parity(inp, oup, stride, expand, size):
    torch.manual_seed(0)
    tm = tv_mobilenet.InvertedResidual(inp, oup, stride, expand)
    model = InvertedResidual(oup, stride, expand)
    _block_parity(f"InvertedResidual {inp}->{oup} s{stride} t{expand}", model, tm, (size, size, inp))


# (in, kernel, expanded, out, SE, activation, stride, dilation, input H / W): residual with SE and ReLU,
# no expansion with SE at stride 2, hardswish at stride 2, dilated (stride 1 instead of 2, no residual).
@pytest.mark.parametrize("inp,kernel,expanded,out,se,act,stride,dilation,size", [
    (24, 5, 72, 24, True, "RE", 1, 1, 9),
    (16, 3, 16, 16, True, "RE", 2, 1, 10),
    (40, 3, 240, 80, False, "HS", 2, 1, 11),
    (48, 5, 288, 48, True, "HS", 2, 2, 9),
])
def test_inverted_residual_v3_block_parity(inp, kernel, expanded, out, se, act, stride, dilation, size):
    torch.manual_seed(0)
    cnf = tv_mobilenet.InvertedResidualConfig(inp, kernel, expanded, out, se, act, stride, dilation, 1.0)
    tm = tv_mobilenet.InvertedResidualV3(cnf, partial(torch.nn.BatchNorm2d, eps=0.001, momentum=0.01))
    model = InvertedResidualV3(expanded, out, kernel, stride, se, act == "HS", dilation)
    _block_parity(f"InvertedResidualV3 {inp}->{expanded}->{out} k{kernel} s{stride} d{dilation} {act}",
                  model, tm, (size, size, inp))


def test_activations_and_squeeze_excitation_match_torch():
    x = np.concatenate([np.linspace(-5, 5, 101), [-3.0, 3.0, 0.0]]).astype(np.float32)
    t = torch.from_numpy(x)
    assert_parity("hardswish", hardswish(x), torch.nn.functional.hardswish(t).numpy(), 1e-6)
    assert_parity("hardsigmoid", hardsigmoid(x), torch.nn.functional.hardsigmoid(t).numpy(), 1e-6)

    torch.manual_seed(0)
    tm = tv_mobilenet.SqueezeExcitation(24, 8, scale_activation=torch.nn.Hardsigmoid)
    for p in tm.parameters():  # scales spread over hardsigmoid's linear and saturated parts
        torch.nn.init.normal_(p, 0.0, 1.0)
    variables = variables_of(tm, rename=lambda path: path)
    x = (3 * np.random.RandomState(0).randn(2, 5, 7, 24)).astype(np.float32)
    with torch.no_grad():
        want = nhwc(tm(nchw(x)))
    got = SqueezeExcitation(8, scale_activation=hardsigmoid).apply(variables, x)
    assert_parity("SqueezeExcitation(hardsigmoid)", got, want, 1e-5)


@pytest.mark.parametrize("name,site", [("mobilenet_v2", "classifier.0"), ("mobilenet_v3_small", "classifier.2"),
                                       ("mobilenet_v3_large", "classifier.2"), ("mnasnet0_5", "classifier.0")])
def test_classifier_dropout(name, site):
    """The head has one Dropout, at torchvision's index, with torchvision's default rate 0.2 (the twin's), and it
    drops ~20% of its input in train mode and scales the rest by 1 / 0.8 (checked on the layer, cheap)."""
    model = models.create(name)
    x = jnp.zeros((2, 32, 32, 3))
    rates = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, Dropout):
            rates[context.module.name] = context.module.rate
        return next_fun(*args, **kwargs)

    def train_step():
        variables = model.init(jax.random.PRNGKey(0), x, train=False)
        return model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(1)})

    with nn.intercept_methods(record):
        jax.eval_shape(train_step)
    with torch.device("meta"):
        twin = dict(torch_zoo.build(name).named_modules())[site]
    assert isinstance(twin, torch.nn.Dropout) and rates == {site: twin.p} == {site: 0.2}

    inputs = jnp.asarray(np.random.RandomState(0).rand(64, 1024) + 0.5, jnp.float32)
    dropped = np.asarray(Dropout(0.2).apply({}, inputs, True, rngs={"dropout": jax.random.PRNGKey(2)}))
    kept = dropped != 0
    np.testing.assert_allclose(dropped[kept], np.asarray(inputs)[kept] / 0.8, rtol=1e-6)
    assert abs(kept.mean() - 0.8) < 0.01, kept.mean()


@pytest.mark.parametrize("name", SMALLEST)
@pytest.mark.parametrize("size", [1, 33])
def test_any_input_size(name, size):
    """torchvision's minimum input is 1x1 (stride-2 convs pad, the head pools globally)."""
    model = models.create(name, num_classes=7)
    x = jnp.zeros((3, size, size + 2, 3))
    out = jax.eval_shape(lambda: model.apply(model.init(jax.random.PRNGKey(0), x, train=False), x, train=False))
    assert out.shape == (3, 7)
