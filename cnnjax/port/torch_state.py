"""Convert a torch ``state_dict`` (name -> array) into Flax ``{'params', 'batch_stats'}`` trees.

Layout rules: conv ``weight [O, I, kH, kW] -> kernel [kH, kW, I, O]``; linear ``weight [out, in]
-> kernel [in, out]``; BatchNorm ``weight, bias, running_mean, running_var -> scale, bias, mean,
var`` (params / batch_stats); ``num_batches_tracked`` is dropped. Module names are mapped by a
``rename`` function from torch's dotted module path to the Flax ``/``-path.

:func:`torch_layout` goes the other way, from a model's own (abstract) variables: every Flax leaf with the
torch key and shape it corresponds to. The families added after ResNet / VGG name their Flax modules by
torch's module paths (``features.1/conv.0.0``), so ``/`` -> ``.`` is the whole mapping; leaves other than
kernels, BatchNorm / LayerNorm parameters and statistics keep torch's name and shape.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

_SEQUENTIAL_PARENTS = re.compile(r"\b(layer\d+|features|classifier)\.(\d+)\b")


def torchvision_key(module_path: str) -> str:
    """torchvision module path -> cnnjax Flax path.

    ``layer1.0.downsample.0 -> layer1_0/downsample_conv``, ``features.3 -> features_3``,
    ``classifier.6 -> classifier_6``; any other dot becomes ``/``.
    """
    path = _SEQUENTIAL_PARENTS.sub(r"\1_\2", module_path)
    path = path.replace("downsample.0", "downsample_conv").replace("downsample.1", "downsample_bn")
    return path.replace(".", "/")


def _set(tree: dict, path: str, leaf: str, value: np.ndarray) -> None:
    node = tree
    for part in path.split("/"):
        node = node.setdefault(part, {})
    node[leaf] = value


def state_dict_to_variables(
    state_dict: Mapping[str, Any], rename: Callable[[str], str] = torchvision_key
) -> dict[str, dict]:
    """Return ``{'params': ..., 'batch_stats': ...}`` (numpy float32) from a torch state dict.

    ``batch_stats`` is omitted when the model has no BatchNorm, as Flax's own ``init`` does.

    Values may be numpy arrays or anything ``np.asarray`` accepts (detached CPU tensors).
    A module is a BatchNorm when it has a ``running_mean`` entry.
    """
    arrays = {k: np.asarray(v) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    bn_modules = {k.rsplit(".", 1)[0] for k in arrays if k.endswith(".running_mean")}
    params: dict = {}
    stats: dict = {}
    for key, value in arrays.items():
        module, _, leaf = key.rpartition(".")
        path = rename(module)
        value = value.astype(np.float32)
        if module in bn_modules:
            if leaf in ("running_mean", "running_var"):
                _set(stats, path, leaf.replace("running_", ""), value)
            else:
                _set(params, path, {"weight": "scale", "bias": "bias"}[leaf], value)
        elif leaf == "weight" and value.ndim == 4:
            _set(params, path, "kernel", np.transpose(value, (2, 3, 1, 0)))
        elif leaf == "weight" and value.ndim == 2:
            _set(params, path, "kernel", value.T)
        elif leaf == "bias":
            _set(params, path, "bias", value)
        else:
            raise ValueError(f"cannot map torch entry {key!r} with shape {value.shape} to a Flax parameter")
    return {"params": params, "batch_stats": stats} if stats else {"params": params}


_FLAX_TO_TORCH_LEAF = {("params", "kernel"): "weight", ("params", "bias"): "bias", ("params", "scale"): "weight",
                       ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}
_LEGACY_SEQUENTIAL = re.compile(r"\b(layer\d+|features|classifier)_(\d+)\b")


def torch_module_path(flax_path: str) -> str:
    """Flax module path -> torch module path: ``layer1_0/downsample_conv -> layer1.0.downsample.0`` (ResNet /
    VGG names), ``features.1/conv.0.0 -> features.1.conv.0.0`` (every later family)."""
    path = flax_path.replace("downsample_conv", "downsample/0").replace("downsample_bn", "downsample/1")
    path = _LEGACY_SEQUENTIAL.sub(r"\1/\2", path)
    return path.replace("/", ".")


@dataclass(frozen=True)
class TorchEntry:
    """Where one torch state-dict entry goes: ``variables[collection][path...][leaf]``, with the torch shape
    expected and the Flax shape it becomes."""

    collection: str
    path: tuple[str, ...]
    leaf: str
    torch_shape: tuple[int, ...]
    flax_shape: tuple[int, ...]

    def to_flax(self, value: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
        """torch layout -> Flax layout (as ``dtype``): conv ``[O, I, kH, kW] -> [kH, kW, I, O]``, linear ``[out,
        in] -> [in, out]``, anything else unchanged."""
        value = np.array(value, dtype)  # a copy: a torch tensor's numpy view would follow its updates
        if self.leaf == "kernel":
            return np.transpose(value, (2, 3, 1, 0)) if value.ndim == 4 else value.T
        return value


def torch_layout(abstract_variables: Mapping[str, Any]) -> dict[str, TorchEntry]:
    """torch key -> :class:`TorchEntry` for every leaf of a model's variables (arrays or ``ShapeDtypeStruct``s,
    e.g. from ``jax.eval_shape(model.init, ...)``)."""
    import jax

    out = {}
    for collection, tree in abstract_variables.items():
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            names = tuple(str(p.key) for p in key_path)
            *modules, name = names
            torch_leaf = _FLAX_TO_TORCH_LEAF.get((collection, name), name)
            shape = tuple(leaf.shape)
            if name == "kernel":
                torch_shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
            else:
                torch_shape = shape
            key = f"{torch_module_path('/'.join(modules))}.{torch_leaf}" if modules else torch_leaf
            out[key] = TorchEntry(collection, tuple(modules), name, torch_shape, shape)
    return out


def layout_to_variables(state_dict: Mapping[str, Any], layout: Mapping[str, TorchEntry],
                        dtype: Any = np.float32) -> dict[str, dict]:
    """Variables (numpy ``dtype``) of a model whose :func:`torch_layout` is ``layout`` from a state dict that has
    every key of ``layout`` (check it first with :func:`cnnjax.port.check_state_dict`)."""
    variables: dict = {}
    for key, entry in layout.items():
        node = variables.setdefault(entry.collection, {})
        for part in entry.path:
            node = node.setdefault(part, {})
        node[entry.leaf] = entry.to_flax(state_dict[key], dtype)
    return variables
