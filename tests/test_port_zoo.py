"""The port for every torchvision family: a state dict saved by the twin loads strictly into the cnnjax model of
the same name and gives the twin's logits; the CLI writes a checkpoint that predict ranks ImageNet classes with."""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cnnjax import checkpoint, models, port
from experiments.bench import torch_zoo
from tests.parity import assert_parity, nchw

ROOT = __file__.rsplit("/tests/", 1)[0]
# One member per family (its smallest) and an input it takes. Every family's parity test already ports its twin through
# the same strict layout (tests.parity.port_twin); here the files' path runs for three in the default suite.
FAMILY_MEMBERS = {
    "vgg13_bn": 64, "resnext50_32x4d": 64, "wide_resnet50_2": 64, "alexnet": 64, "squeezenet1_1": 64,
    "googlenet": 64, "inception_v3": 96, "densenet121": 64, "shufflenet_v2_x0_5": 64, "mobilenet_v2": 64,
    "mobilenet_v3_small": 64, "mnasnet0_5": 64, "efficientnet_b0": 64, "efficientnet_v2_s": 64,
    "regnet_x_400mf": 64, "regnet_y_400mf": 64, "convnext_tiny": 64,
}


# torchvision's Inception v3 init (N(0, 0.1^2) weights) with random BatchNorm statistics gives logits near 1e10, where
# an absolute tolerance means nothing: its twin keeps torch's default init.
TWIN_KWARGS = {"inception_v3": {"init_weights": False}}


def _twin(arch: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    tm = torch_zoo.build(arch, **{**TWIN_KWARGS.get(arch, {}), **kwargs})
    torch_zoo.randomize_bn_stats(tm, torch.Generator().manual_seed(seed + 1))
    return tm.eval()


def _logits(model, variables, x):
    return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)


def _save(tm: torch.nn.Module, path) -> str:
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, str(path))
    return str(path)


def test_every_imagenet_model_is_portable():
    assert set(port.ARCHS) == {n for n in models.available() if models.default_num_classes(n) == 1000}
    assert set(FAMILY_MEMBERS) <= set(port.ARCHS)


DEFAULT_PORTS = ("mobilenet_v3_small", "convnext_tiny", "squeezenet1_1")


@pytest.mark.parametrize("arch,size", [(a, s) if a in DEFAULT_PORTS else pytest.param(a, s, marks=pytest.mark.slow)
                                       for a, s in FAMILY_MEMBERS.items()])
def test_ported_model_equals_the_twin(arch, size, tmp_path):
    tm = _twin(arch)
    model, variables = port.load_torchvision(arch, _save(tm, tmp_path / "w.safetensors"))
    assert sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(variables["params"])) == \
        sum(p.numel() for p in tm.parameters())
    x = np.random.RandomState(0).randn(2, size, size, 3).astype(np.float32)
    with torch.no_grad():
        want = tm(nchw(x)).numpy()
    assert_parity(f"port {arch} {size}x{size} logits", _logits(model, variables, x), want, 1e-4)


def test_other_head_sizes_port_for_the_later_families(tmp_path):
    tm = _twin("mobilenet_v3_small", num_classes=7)
    model, variables = port.load_torchvision("mobilenet_v3_small", _save(tm, tmp_path / "w.safetensors"))
    assert model.num_classes == 7
    x = np.random.RandomState(1).randn(1, 64, 64, 3).astype(np.float32)
    with torch.no_grad():
        want = tm(nchw(x)).numpy()
    assert_parity("port mobilenet_v3_small 7 classes", _logits(model, variables, x), want, 1e-4)


def test_one_error_names_every_bad_key_of_a_later_family(tmp_path):
    sd = {k: v.clone() for k, v in _twin("efficientnet_b0").state_dict().items()}
    del sd["features.1.0.block.0.0.weight"]
    sd["features.9.0.weight"] = torch.zeros(3)
    sd["classifier.1.bias"] = torch.zeros(5)
    with pytest.raises(port.PortError) as info:
        port.convert("efficientnet_b0", sd)
    message = str(info.value)
    assert message.count("\n") == 0
    assert "missing keys: features.1.0.block.0.0.weight" in message
    assert "unexpected keys: features.9.0.weight" in message
    assert "classifier.1.bias (got (5,), expected (1000,))" in message


@pytest.mark.parametrize("arch", ["googlenet", pytest.param("inception_v3", marks=pytest.mark.slow)])
def test_files_with_auxiliary_heads_port_with_them(arch, tmp_path):
    """torchvision's GoogLeNet / Inception v3 files keep their auxiliary heads and expect ``transform_input``."""
    tm = _twin(arch, aux_logits=True, transform_input=True)
    path = _save(tm, tmp_path / "w.safetensors")
    model, variables = port.load_torchvision(arch, path)
    assert model.aux_logits and model.transform_input
    x = np.random.RandomState(2).randn(2, 96, 96, 3).astype(np.float32)
    with torch.no_grad():
        want = tm(nchw(x)).numpy()
    assert_parity(f"port {arch} with auxiliary heads", _logits(model, variables, x), want, 1e-4)


def test_port_cli_and_predict_for_a_later_family(tmp_path):
    from PIL import Image

    from cnnjax.port.imagenet import CLASS_NAMES, preprocess_image

    tm = _twin("mobilenet_v3_small")
    weights = str(tmp_path / "w.pth")
    torch.save(tm.state_dict(), weights)
    cli = lambda *args: subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,  # noqa: E731
                                       cwd=ROOT, timeout=600)
    out = cli("experiments.port", "--arch", "mobilenet_v3_small", "--weights", weights, "--out", str(tmp_path / "ck"))
    assert out.returncode == 0, out.stderr
    variables, _ = checkpoint.restore_variables(str(tmp_path / "ck"), "best")
    assert set(variables["params"]) >= {"features.0", "classifier.3"}
    image = tmp_path / "img.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (300, 260, 3)).astype(np.uint8)).save(image)
    pred = cli("experiments.predict", "--checkpoint", str(tmp_path / "ck"), str(image))
    assert pred.returncode == 0, pred.stderr
    lines = [line.strip() for line in pred.stdout.splitlines() if line.strip()[:2] in ("1.", "2.", "3.", "4.", "5.")]
    assert len(lines) == 5
    with torch.no_grad():
        top = int(tm(nchw(preprocess_image(Image.open(image))[None])).argmax())
    assert lines[0].startswith(f"1. {CLASS_NAMES[top]} ")


def test_densenet_files_with_torchvisions_legacy_key_names_port(tmp_path):
    """torchvision's DenseNet files name dense-layer parts ``norm.1`` / ``conv.2``; its loader (and the port) rename
    them ``norm1`` / ``conv2``."""
    import re

    tm = _twin("densenet121")
    legacy = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))(\d)\.", r"\1.\2.", k): v for k, v in tm.state_dict().items()}
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    model, variables = port.convert("densenet121", {k: v.numpy() for k, v in legacy.items()})
    x = np.random.RandomState(3).randn(1, 64, 64, 3).astype(np.float32)
    with torch.no_grad():
        want = tm(nchw(x)).numpy()
    assert_parity("port densenet121 legacy keys", _logits(model, variables, x), want, 1e-4)
