"""Helpers to compare cnnjax modules with torch references on identical weights."""

from __future__ import annotations

import numpy as np
import torch

from cnnjax.port import state_dict_to_variables, torchvision_key

# name -> max |Δ|, filled by parity tests and printed in pytest's terminal summary.
REPORT: dict[str, float] = {}


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return t.permute(0, 2, 3, 1).numpy() if t.ndim == 4 else t.numpy()


def variables_of(module: torch.nn.Module, rename=torchvision_key) -> dict:
    return state_dict_to_variables({k: v.detach().numpy() for k, v in module.state_dict().items()}, rename)


def max_abs_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, f"shape mismatch {a.shape} vs {b.shape}"
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def assert_parity(label: str, jax_value, torch_value, tol: float) -> float:
    """Assert max |Δ| <= tol over all leaves of two matching trees / arrays; record it."""
    import jax

    leaves_j, tree_j = jax.tree_util.tree_flatten(jax_value)
    leaves_t, tree_t = jax.tree_util.tree_flatten(torch_value)
    assert tree_j == tree_t, f"{label}: structures differ\n{tree_j}\n{tree_t}"
    diff = max((max_abs_diff(a, b) for a, b in zip(leaves_j, leaves_t, strict=True)), default=0.0)
    REPORT[label] = max(REPORT.get(label, 0.0), diff)
    assert diff <= tol, f"{label}: max |Δ| = {diff:.3g} > {tol}"
    return diff
