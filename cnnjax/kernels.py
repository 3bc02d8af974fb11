"""The one seam between the plain-JAX core and faster platform kernels.

The core computes each op in plain JAX on every platform (:mod:`cnnjax.conv`, :mod:`cnnjax.layers`). A platform
backend may offer faster kernels for an op; :data:`BACKENDS` names the module of each (today only the CPU's,
:mod:`cnnjax.cpu`). :func:`dispatch` stages both with ``lax.platform_dependent``: the program keeps the backend's
code only where it is *lowered* for that platform and the plain code everywhere else, so one jitted function runs
oneDNN on a CPU and XLA's own kernels on a GPU or TPU, and ``jax.export(..., platforms=["cuda", "tpu"])`` holds no
custom call of cnnjax (``tests/test_kernels.py``).

``CNNJAX_CPU_BACKEND=0`` switches the CPU backend off: plain XLA everywhere. The variable is read when a function
is traced (a function jitted before the change keeps what it traced).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

from jax import lax

BACKENDS = {"cpu": "cnnjax.cpu"}
SWITCHES = {"cpu": "CNNJAX_CPU_BACKEND"}


def enabled(platform: str) -> bool:
    """Whether the backend of ``platform`` is switched on (its variable is not ``0``)."""
    return os.environ.get(SWITCHES[platform], "1") != "0"


def backend_implementations(op: str, arrays: tuple[Any, ...], static: dict[str, Any]) -> dict[str, Callable]:
    """``{platform: function of arrays}`` from every switched-on backend that has ``op`` for these arrays."""
    found = {}
    for platform, module in BACKENDS.items():
        if enabled(platform):
            fn = importlib.import_module(module).implementation(op, arrays, static)
            if fn is not None:
                found[platform] = fn
    return found


def dispatch(op: str, plain: Callable, *arrays: Any, **static: Any) -> Any:
    """``plain(*arrays, **static)`` on every platform but those whose backend has ``op``, which run theirs."""
    found = backend_implementations(op, arrays, static)
    default = lambda *a: plain(*a, **static)
    if not found:
        return default(*arrays)
    return lax.platform_dependent(*arrays, default=default, **found)


def describe() -> str:
    """One line for logs: which backends are on and what they run here."""
    parts = []
    for platform, module in BACKENDS.items():
        state = importlib.import_module(module).describe() if enabled(platform) else f"off ({SWITCHES[platform]}=0)"
        parts.append(f"{platform} backend: {state}")
    return "; ".join(parts)
