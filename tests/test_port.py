"""Porting torchvision-layout weights: .pth and .safetensors, logits and per-stage parity, strict errors."""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cnnjax import checkpoint, port
from experiments.bench import torch_twins as ref
from tests.parity import assert_parity, nchw, nhwc

ROOT = __file__.rsplit("/tests/", 1)[0]


def _torch_model(arch, seed=0):
    torch.manual_seed(seed)
    tm = ref.build(arch)
    ref.randomize_bn_stats(tm, torch.Generator().manual_seed(seed + 1))
    return tm.eval()


def _save(tm, tmp_path, fmt):
    path = tmp_path / f"w.{fmt}"
    sd = {k: v.contiguous() for k, v in tm.state_dict().items()}
    if fmt == "pth":
        torch.save(sd, path)
    else:
        save_file(sd, str(path))
    return str(path)


def _stage_outputs(model, variables, x):
    """Stem (after max-pool) and layer1..4 outputs of a cnnjax ResNet, via captured intermediates."""
    stages = [f"layer{i}_{n - 1}" for i, n in enumerate(model.stage_sizes, start=1)]
    names = {"maxpool", *stages}
    _, state = model.apply(variables, x, train=False, mutable=["intermediates"],
                           capture_intermediates=lambda m, _: len(m.path) == 1 and m.path[0] in names)
    inter = state["intermediates"]
    return [inter["maxpool"]["__call__"][0]] + [inter[s]["__call__"][0] for s in stages]


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_port_resnet_logits_and_stages_match_torch(arch, fmt, tmp_path):
    tm = _torch_model(arch)
    model, variables = port.load_torchvision(arch, _save(tm, tmp_path, fmt))
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(variables["params"]))
    assert n_params == sum(p.numel() for p in tm.parameters())
    for hw in (224, 64):
        x = np.random.RandomState(hw).randn(2, hw, hw, 3).astype(np.float32)
        with torch.no_grad():
            want = tm(nchw(x)).numpy()
            want_stages = [nhwc(t) for t in tm.stages(nchw(x))]
        assert_parity(f"port {arch} .{fmt} {hw}x{hw} logits", model.apply(variables, x, train=False), want, 1e-4)
        for i, (got, exp) in enumerate(zip(_stage_outputs(model, variables, x), want_stages, strict=True)):
            assert_parity(f"port {arch} .{fmt} {hw}x{hw} stage {i} features", got, exp, 1e-4)


def test_port_vgg11_bn_matches_torch(tmp_path):
    tm = _torch_model("vgg11_bn")
    model, variables = port.load_torchvision("vgg11_bn", _save(tm, tmp_path, "safetensors"))
    x = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
    with torch.no_grad():
        want = tm(nchw(x)).numpy()
    assert_parity("port vgg11_bn .safetensors 64x64 logits", model.apply(variables, x, train=False), want, 1e-4)


def test_one_error_names_missing_extra_and_misshaped_keys(tmp_path):
    sd = {k: v.clone() for k, v in _torch_model("resnet18").state_dict().items()}
    del sd["layer2.0.bn1.running_var"]
    sd["layer9.0.conv1.weight"] = torch.zeros(3)
    sd["layer3.1.conv2.weight"] = torch.zeros(256, 256, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(port.PortError) as info:
        port.load_torchvision("resnet18", str(path))
    msg = str(info.value)
    assert "missing keys: layer2.0.bn1.running_var" in msg
    assert "unexpected keys: layer9.0.conv1.weight" in msg
    assert "layer3.1.conv2.weight (got (256, 256, 1, 1), expected (256, 256, 3, 3))" in msg
    assert "\n" not in msg


def test_other_head_sizes_port(tmp_path):
    torch.manual_seed(0)
    tm = ref.build("resnet18", num_classes=7).eval()
    model, variables = port.load_torchvision("resnet18", _save(tm, tmp_path, "safetensors"))
    x = np.random.RandomState(0).randn(1, 64, 64, 3).astype(np.float32)
    with torch.no_grad():
        want = tm(nchw(x)).numpy()
    assert want.shape == (1, 7)
    assert_parity("port resnet18 7-class head", model.apply(variables, x, train=False), want, 1e-4)


def test_bad_files_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        port.read_state_dict(str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="it is a directory"):
        port.read_state_dict(str(tmp_path))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(port.PortError, match="expected .pth, .pt or .safetensors"):
        port.read_state_dict(str(tmp_path / "w.bin"))
    with pytest.raises(port.PortError, match="unknown arch 'resnet19'"):
        port.convert("resnet19", {})


def _safetensors_with_header(path, header: bytes, data: bytes = b"") -> str:
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return str(path)


@pytest.mark.parametrize("header", [b"{oops", b"[1, 2]", b'{"w": {"shape": [2], "data_offsets": [0, 8]}}',
                                    b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}'],
                         ids=["not-json", "not-a-dict", "no-dtype", "offsets-past-the-end"])
def test_malformed_safetensors_is_one_port_error(header, tmp_path):
    path = _safetensors_with_header(tmp_path / "w.safetensors", header, b"\0" * 8)
    with pytest.raises(port.PortError, match="is not a valid safetensors file") as info:
        port.read_state_dict(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_pth_is_one_port_error(damage, tmp_path):
    good = _save(_torch_model("resnet18"), tmp_path, "pth")
    raw = open(good, "rb").read()
    bad = tmp_path / "bad.pth"
    bad.write_bytes({"truncated": raw[: len(raw) // 2], "garbage": np.random.RandomState(0).bytes(4096),
                     "empty": b""}[damage])
    with pytest.raises(port.PortError, match="is not a readable torch weights file") as info:
        port.read_state_dict(str(bad))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_bfloat16_and_float16_weights_port(fmt, tmp_path):
    tm = _torch_model("resnet18")
    sd = {k: (v.to(torch.bfloat16) if i % 2 else v.half()) if v.is_floating_point() else v
          for i, (k, v) in enumerate(tm.state_dict().items())}
    path = tmp_path / f"w.{fmt}"
    torch.save(sd, path) if fmt == "pth" else save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    model, variables = port.load_torchvision("resnet18", str(path))
    assert all(leaf.dtype == np.float32 for leaf in jax.tree_util.tree_leaves(variables))
    tm.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    x = np.random.RandomState(0).randn(1, 64, 64, 3).astype(np.float32)
    with torch.no_grad():
        want = tm(nchw(x)).numpy()
    assert_parity(f"port resnet18 low-precision .{fmt}", model.apply(variables, x, train=False), want, 1e-4)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(value, tmp_path):
    sd = {k: v.clone() for k, v in _torch_model("resnet18").state_dict().items()}
    sd["layer2.0.conv1.weight"][0, 0, 0, 0] = value
    sd["fc.bias"][3] = value
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))
    with pytest.raises(port.PortError, match=r"NaN or inf values in 2 tensor\(s\)") as info:
        port.load_torchvision("resnet18", str(path))
    assert "layer2.0.conv1.weight" in str(info.value) and "fc.bias" in str(info.value)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_port_cli_writes_a_checkpoint_that_predict_restores(tmp_path):
    from PIL import Image

    tm = _torch_model("resnet18")
    weights = _save(tm, tmp_path, "pth")
    out = _cli("experiments.port", "--arch", "resnet18", "--weights", weights, "--out", str(tmp_path / "ck"))
    assert out.returncode == 0, out.stderr
    variables, _ = checkpoint.restore_variables(str(tmp_path / "ck"), "best")
    _, expected = port.load_torchvision("resnet18", weights)
    same = jax.tree_util.tree_map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), variables, expected)
    assert all(jax.tree_util.tree_leaves(same))

    rng = np.random.RandomState(0)
    img_path = tmp_path / "img.png"
    Image.fromarray(rng.randint(0, 255, (300, 400, 3)).astype(np.uint8)).save(img_path)
    pred = _cli("experiments.predict", "--checkpoint", str(tmp_path / "ck"), str(img_path))
    assert pred.returncode == 0, pred.stderr
    lines = [line for line in pred.stdout.splitlines() if line.strip().startswith(("1.", "2.", "3.", "4.", "5."))]
    assert len(lines) == 5
    # Same top-1 as torch on the same preprocessing.
    from cnnjax.port.imagenet import preprocess_image

    x = preprocess_image(Image.open(img_path))
    with torch.no_grad():
        top = int(tm(nchw(x[None])).argmax())
    from cnnjax.port.imagenet import CLASS_NAMES

    assert CLASS_NAMES[top] in lines[0]


def test_port_cli_damaged_weights_is_one_line_and_writes_nothing(tmp_path):
    bad = tmp_path / "w.pth"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    out = _cli("experiments.port", "--arch", "resnet18", "--weights", str(bad), "--out", str(tmp_path / "ck"))
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0 and "not a readable torch weights file" in out.stderr
    assert not (tmp_path / "ck").exists()


def test_port_cli_download_offline_says_so(tmp_path):
    out = _cli("experiments.port", "--arch", "resnet18", "--download", "--out", str(tmp_path / "ck"),
               "--cache_dir", str(tmp_path / "cache"))
    assert out.returncode == 2
    assert "offline" in out.stderr or "could not download" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "ck").exists()


def test_imagenet_class_names_are_torchvisions_unique_names():
    from cnnjax.port.imagenet import CLASS_NAMES

    assert len(CLASS_NAMES) == len(set(CLASS_NAMES)) == 1000
    assert (CLASS_NAMES[134], CLASS_NAMES[517]) == ("crane bird", "crane")
    assert (CLASS_NAMES[638], CLASS_NAMES[639]) == ("maillot", "maillot tank suit")
    assert (CLASS_NAMES[0], CLASS_NAMES[999]) == ("tench", "toilet tissue")
