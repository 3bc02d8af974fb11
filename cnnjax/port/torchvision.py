"""Load torchvision ResNet / VGG weights (``.pth`` / ``.pt`` or ``.safetensors``) into cnnjax models.

``load_torchvision(arch, path) -> (model, variables)`` with ``model.apply(variables, x_nhwc,
train=False)`` giving the torch model's logits. The state dict is checked strictly against the
model before anything is converted: every missing, unexpected and mis-shaped key is listed in
one error.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax import models
from cnnjax.port.torch_state import state_dict_to_variables, torchvision_key

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg11", "vgg11_bn", "vgg16", "vgg16_bn")

# Official torchvision ImageNet weights (IMAGENET1K_V1). The hex part of each file name is the
# start of the file's sha256, which torchvision (and experiments.port --download) checks.
WEIGHT_FILES = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-0676ba61.pth",
    "resnet101": "resnet101-63fe2227.pth",
    "resnet152": "resnet152-394f9c45.pth",
    "vgg11": "vgg11-8a719046.pth",
    "vgg11_bn": "vgg11_bn-6002323d.pth",
    "vgg16": "vgg16-397923af.pth",
    "vgg16_bn": "vgg16_bn-6c64b313.pth",
}
WEIGHTS_BASE_URL = "https://download.pytorch.org/models/"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PortError(ValueError):
    """A state dict that does not fit the cnnjax model; the message lists every problem."""


# --- reading files ---------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Parse a ``.safetensors`` file with numpy only (8-byte header size, JSON header, raw data)."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise PortError(f"{path} is not a safetensors file (too short)")
    (header_len,) = struct.unpack("<Q", raw[:8])
    try:
        header = json.loads(raw[8:8 + header_len])
    except (ValueError, UnicodeDecodeError):
        raise PortError(f"{path} is not a safetensors file (bad header)") from None
    data = memoryview(raw)[8 + header_len:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info["dtype"]
        start, end = info["data_offsets"]
        if dtype == "BF16":
            bits = np.frombuffer(data[start:end], np.uint16).astype(np.uint32) << 16
            array = bits.view(np.float32)
        elif dtype in _SAFETENSORS_DTYPES:
            array = np.frombuffer(data[start:end], _SAFETENSORS_DTYPES[dtype])
        else:
            raise PortError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        out[name] = array.reshape(info["shape"]).copy()
    return out


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """State dict from ``.safetensors`` (numpy only) or ``.pth`` / ``.pt`` (needs torch)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path} not found")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if not path.endswith((".pth", ".pt")):
        raise PortError(f"unknown weights format {path!r}: expected .pth, .pt or .safetensors")
    try:
        import torch
    except ImportError:
        raise PortError(f"reading {path} needs torch (pip install torch), or convert it to .safetensors") from None
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise PortError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return {k: v.detach().cpu().numpy() for k, v in obj.items()}


# --- strict key check --------------------------------------------------------------------------

_FLAX_TO_TORCH_LEAF = {("params", "kernel"): "weight", ("params", "bias"): "bias", ("params", "scale"): "weight",
                       ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


def torch_module_path(flax_path: str) -> str:
    """Inverse of :func:`torchvision_key`: ``layer1_0/downsample_conv -> layer1.0.downsample.0``."""
    path = flax_path.replace("downsample_conv", "downsample/0").replace("downsample_bn", "downsample/1")
    path = re.sub(r"\b(layer\d+|features|classifier)_(\d+)\b", r"\1/\2", path)
    return path.replace("/", ".")


def expected_torch_shapes(abstract_variables: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """torch key -> torch shape that a cnnjax model's variables correspond to."""
    out = {}
    for collection, tree in abstract_variables.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            names = [p.key for p in path]
            key = f"{torch_module_path('/'.join(names[:-1]))}.{_FLAX_TO_TORCH_LEAF[(collection, names[-1])]}"
            shape = tuple(leaf.shape)
            if names[-1] == "kernel":
                shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
            out[key] = shape
    return out


def check_state_dict(state_dict: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Raise one :class:`PortError` listing every missing, unexpected and mis-shaped key."""
    given = {k: tuple(np.shape(v)) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    misshaped = sorted(k for k in set(given) & set(expected) if given[k] != expected[k])
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected)}")
        if misshaped:
            parts.append("mis-shaped keys: " + ", ".join(f"{k} (got {given[k]}, expected {expected[k]})"
                                                          for k in misshaped))
        raise PortError(f"state dict does not fit {what}: " + "; ".join(parts))


# --- public API ----------------------------------------------------------------------------------


def convert(arch: str, state_dict: Mapping[str, Any]) -> tuple[Any, dict]:
    """``(model, variables)`` for torchvision ``arch`` from an in-memory state dict (strict)."""
    if arch not in ARCHS:
        raise PortError(f"unknown arch {arch!r}; choose one of: {', '.join(ARCHS)}")
    fc_key = "fc.weight" if arch.startswith("resnet") else "classifier.6.weight"
    num_classes = int(np.shape(state_dict[fc_key])[0]) if fc_key in state_dict else 1000
    model = models.create(arch, num_classes=num_classes)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)), train=False))
    check_state_dict(state_dict, expected_torch_shapes(abstract), f"cnnjax {arch} ({num_classes} classes)")
    variables = state_dict_to_variables(state_dict, torchvision_key)
    return model, jax.tree_util.tree_map(jnp.asarray, variables)


def load_torchvision(arch: str, path: str) -> tuple[Any, dict]:
    """Read a torchvision ``arch`` weights file and return ``(model, variables)``."""
    return convert(arch, read_state_dict(path))
