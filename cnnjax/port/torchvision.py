"""Load torchvision weights (``.pth`` / ``.pt`` or ``.safetensors``) into the cnnjax model of the same name.

``load_torchvision(arch, path) -> (model, variables)`` with ``model.apply(variables, x_nhwc,
train=False)`` giving the torch model's logits. The state dict is checked strictly against the
model before anything is converted: every missing, unexpected and mis-shaped key is listed in
one error.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax import models
from cnnjax.errors import CnnjaxError, MissingFileError
from cnnjax.port.torch_state import layout_to_variables, torch_layout

# Every ImageNet-layout model of the zoo (default 1000 classes) is torchvision's architecture of the same name.
ARCHS = tuple(name for name in models.available() if models.default_num_classes(name) == 1000)

# Official torchvision ImageNet weights (IMAGENET1K_V1), by file name. The hex part of each name is the start of
# the file's sha256, which torchvision (and experiments.port --download) checks.
WEIGHT_FILES = models.weight_files()
WEIGHTS_BASE_URL = "https://download.pytorch.org/models/"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PortError(CnnjaxError, ValueError):
    """A weights file that cannot be read, or a state dict that does not fit the cnnjax model; the
    message lists every problem."""


# --- reading files ---------------------------------------------------------------------------


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Tensors of a ``.safetensors`` file as numpy arrays, read with the safetensors library (header and
    offsets validated, the file memory-mapped). bfloat16 / float16 tensors become float32."""
    from safetensors import SafetensorError, safe_open

    try:
        # The 'flax' backend reads bfloat16 (numpy has no such dtype); arrays are made on the CPU.
        with jax.default_device(jax.local_devices(backend="cpu")[0]), safe_open(path, framework="flax") as f:
            return {name: _host_array(f.get_tensor(name)) for name in f.keys()}
    except SafetensorError as err:
        raise PortError(f"{path} is not a valid safetensors file ({err}); re-download or re-export it") from None


def _host_array(x) -> np.ndarray:
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype.kind == "f" and x.dtype.itemsize < 4 else x


def read_pth(path: str) -> dict[str, np.ndarray]:
    """State dict of a torch ``.pth`` / ``.pt`` file (``weights_only``; needs torch) as numpy arrays;
    a checkpoint dict with a ``state_dict`` entry is unwrapped; bfloat16 / float16 become float32."""
    try:
        import torch
    except ImportError:
        raise PortError(f"reading {path} needs torch (pip install torch), or convert it to .safetensors") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged file (zip, pickle, EOF)
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise PortError(f"{path} is not a readable torch weights file ({reason}); re-download it or pass "
                        "another --weights") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PortError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    return {k: (v.detach().cpu().float() if v.is_floating_point() and v.element_size() < 4 else v.detach().cpu())
            .numpy() for k, v in obj.items()}


def check_finite(state_dict: Mapping[str, np.ndarray], path: str) -> None:
    """Raise :class:`PortError` naming the tensors that hold NaN or inf."""
    bad = [k for k, v in state_dict.items() if np.asarray(v).dtype.kind == "f" and not np.isfinite(v).all()]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise PortError(f"{path} has NaN or inf values in {len(bad)} tensor(s) ({shown}); the file is damaged or "
                        "its training diverged — use another file")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Finite numpy state dict from ``.safetensors`` (safetensors library) or ``.pth`` / ``.pt`` (torch)."""
    if not os.path.isfile(path):
        raise MissingFileError(f"weights file {path} not found" + (" (it is a directory)" if os.path.isdir(path)
                                                                    else ""))
    if path.endswith(".safetensors"):
        state_dict = read_safetensors(path)
    elif path.endswith((".pth", ".pt")):
        state_dict = read_pth(path)
    else:
        raise PortError(f"unknown weights format {path!r}: expected .pth, .pt or .safetensors")
    check_finite(state_dict, path)
    return state_dict


# --- strict key check --------------------------------------------------------------------------


def expected_torch_shapes(abstract_variables: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """torch key -> torch shape that a cnnjax model's variables correspond to."""
    return {key: entry.torch_shape for key, entry in torch_layout(abstract_variables).items()}


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


# torchvision builds these with the input transform of the official weights (RGB re-normalised as the original
# TensorFlow nets expect) and keeps the auxiliary heads' weights in the files.
_TRANSFORM_INPUT = ("googlenet", "inception_v3")


def _abstract(arch: str, num_classes: int, **kwargs: Any) -> dict:
    model = models.create(arch, num_classes=num_classes, **kwargs)
    shape = (1, *models.DEFAULT_INPUT_SHAPES[arch])
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape), train=False))


def head_keys(arch: str, **kwargs: Any) -> list[str]:
    """The torch keys whose shapes follow the number of classes (the classifier's weights), sorted. (Finer than
    :func:`cnnjax.transfer.stage_layout`'s head, which is whole top-level modules: GoogLeNet's ``aux1`` holds
    class-independent convs too.)"""
    a, b = torch_layout(_abstract(arch, 1000, **kwargs)), torch_layout(_abstract(arch, 1001, **kwargs))
    return sorted(k for k in a if a[k].torch_shape != b[k].torch_shape)


def ported_kwargs(arch: str, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The model options a torchvision state dict implies: ``transform_input`` for GoogLeNet / Inception v3, as
    torchvision sets it with their weights, and ``aux_logits`` when the file holds auxiliary heads."""
    kwargs: dict[str, Any] = {"transform_input": True} if arch in _TRANSFORM_INPUT else {}
    if "aux_logits" in {f.name for f in dataclasses.fields(models.create(arch))}:
        plain = torch_layout(_abstract(arch, 1000, **kwargs))
        if any(k not in plain and not k.endswith("num_batches_tracked") for k in state_dict):
            kwargs["aux_logits"] = True
    return kwargs


# torchvision's DenseNet files keep the dense layers' old key names (``denselayer1.norm.1.weight``), which its
# loader renames (``denselayer1.norm1.weight``) before loading; so does the port.
_DENSENET_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|"
                               r"running_var))$")


def renamed_legacy_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` with torchvision's legacy DenseNet key names brought to the current ones."""
    return {_DENSENET_OLD_KEY.sub(r"\1\2", k): v
            for k, v in state_dict.items()}


def convert(arch: str, state_dict: Mapping[str, Any], kwargs: dict[str, Any] | None = None) -> tuple[Any, dict]:
    """``(model, variables)`` for torchvision ``arch`` from an in-memory state dict (strict: one
    :class:`PortError` lists every missing, unexpected and mis-shaped key before anything is converted).
    The number of classes is read from the classifier's weight; the model options are ``kwargs``, by default
    :func:`ported_kwargs`."""
    if arch not in ARCHS:
        raise PortError(f"unknown arch {arch!r}; choose one of: {', '.join(ARCHS)}")
    state_dict = renamed_legacy_keys(state_dict)
    kwargs = ported_kwargs(arch, state_dict) if kwargs is None else kwargs
    heads = [k for k in head_keys(arch, **kwargs) if k.endswith(".weight") and k in state_dict]
    num_classes = int(np.shape(state_dict[heads[0]])[0]) if heads else 1000
    model = models.create(arch, num_classes=num_classes, **kwargs)
    layout = torch_layout(_abstract(arch, num_classes, **kwargs))
    check_state_dict(state_dict, {k: e.torch_shape for k, e in layout.items()}, f"cnnjax {arch} ({num_classes} "
                     "classes)")
    return model, jax.tree_util.tree_map(jnp.asarray, layout_to_variables(state_dict, layout))


def load_torchvision(arch: str, path: str) -> tuple[Any, dict]:
    """Read a torchvision ``arch`` weights file and return ``(model, variables)``."""
    return convert(arch, read_state_dict(path))
