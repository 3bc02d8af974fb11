"""Convert a torch ``state_dict`` (name -> array) into Flax ``{'params', 'batch_stats'}`` trees.

Layout rules: conv ``weight [O, I, kH, kW] -> kernel [kH, kW, I, O]``; linear ``weight [out, in]
-> kernel [in, out]``; BatchNorm ``weight, bias, running_mean, running_var -> scale, bias, mean,
var`` (params / batch_stats); ``num_batches_tracked`` is dropped. Module names are mapped by a
``rename`` function from torch's dotted module path to the Flax ``/``-path.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
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
