"""ShuffleNet V2 (torchvision layout): exact parameter counts, torch parity (eval + train mode), channel order."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cnnjax import models
from cnnjax.layers import channel_shuffle
from experiments.bench import torch_zoo
from experiments.bench.torch_zoo import shufflenetv2 as twin
from tests.onednn_marks import use_path
from tests.parity import check_model_parity, nchw, nhwc, param_count

# torchvision's figures (1000 classes).
PARAM_COUNTS = {
    "shufflenet_v2_x0_5": 1_366_792,
    "shufflenet_v2_x1_0": 2_278_604,
    "shufflenet_v2_x1_5": 3_503_624,
    "shufflenet_v2_x2_0": 7_393_996,
}


def _abstract(name: str, shape: tuple[int, int, int], **kwargs):
    model = models.create(name, **kwargs)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)), train=False))



@pytest.mark.parametrize("name", list(PARAM_COUNTS))
def test_parameter_count(name):
    assert models.DEFAULT_INPUT_SHAPES[name] == (224, 224, 3)
    assert param_count(_abstract(name, (224, 224, 3))["params"]) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", list(PARAM_COUNTS))
def test_torch_twin_count(name):
    assert sum(p.numel() for p in torch_zoo.build(name).parameters()) == PARAM_COUNTS[name]


def test_parity_224(monkeypatch):
    use_path(monkeypatch, "xla")
    check_model_parity("shufflenet_v2_x0_5", (224, 224, 3), 2, "xla")


def test_parity_odd_size(path):
    check_model_parity("shufflenet_v2_x0_5", (97, 97, 3), 2, path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0"])
def test_parity_wider(name, monkeypatch):
    use_path(monkeypatch, "xla")
    check_model_parity(name, (96, 96, 3), 2, "xla")


def test_channel_shuffle_matches_twin():
    x = np.random.RandomState(0).randn(2, 3, 5, 12).astype(np.float32)
    want = nhwc(twin.channel_shuffle(nchw(x), 2))
    np.testing.assert_array_equal(np.asarray(channel_shuffle(jnp.asarray(x), 2)), want)


def test_any_input_size():
    # torchvision's minimum is 1x1 (every stride-2 layer pads 1); the logits keep their shape.
    model = models.create("shufflenet_v2_x0_5", num_classes=7)
    x = jnp.zeros((2, 1, 3, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
    assert jax.eval_shape(lambda v: model.apply(v, x), variables).shape == (2, 7)
    torch_out = torch_zoo.build("shufflenet_v2_x0_5", num_classes=7).eval()(torch.zeros(2, 3, 1, 3))
    assert tuple(torch_out.shape) == (2, 7)
