"""The CPU backend: oneDNN convolutions and max-pools, and CPU-measured custom gradients, behind :mod:`cnnjax.kernels`.

The seam asks :func:`implementation` for an op when it traces one; what is returned runs only where the program
is lowered for the CPU (``lax.platform_dependent``), so the same jitted function runs XLA's own kernels on a GPU or
TPU. Used by default where its oneDNN library builds or is built (``python -m cnnjax.cpu`` builds and checks it;
Debian ``g++`` and ``libdnnl-dev``), in one process (a custom call cannot be split across processes);
``CNNJAX_CPU_BACKEND=0`` switches it off (:mod:`cnnjax.kernels`). Path rules: :class:`cnnjax.cpu.rules.Rules`.
Process settings (XLA:CPU flags, allocator) for entry points: :mod:`cnnjax.cpu.process`. Importing this package
has no side effects; the library is built and loaded on the first :func:`implementation` call.

Ops and their arguments (arrays positional, the rest keywords):

* ``conv2d(x [N, H, W, C], kernel [kH, kW, C / groups, O]; strides, pads, dilation, groups, precision)``, grouped
  and depthwise convs included
* ``max_pool(x [N, H, W, C]; window, stride, padding)``, every output ``Ho, Wo >= 1``
* ``batch_norm_train(x [..., C], scale [C], bias [C]; epsilon, axis_name) -> (y, mean, var)``
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

OPS = ("conv2d", "max_pool", "batch_norm_train")
_DTYPES = ("float32", "bfloat16")


def implementation(op: str, arrays: tuple[Any, ...], static: dict[str, Any], rules: Any = None) -> Callable | None:
    """The CPU backend's function of ``arrays`` for ``op`` with keywords ``static``, or None where it has none
    (no oneDNN library here, several processes, or a dtype it does not take). ``rules``: a
    :class:`cnnjax.cpu.rules.Rules` (default :data:`cnnjax.cpu.rules.DEFAULT`)."""
    import jax

    from cnnjax.cpu import onednn
    from cnnjax.cpu import rules as rules_module

    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; the CPU backend has {', '.join(OPS)}")
    rules = rules or rules_module.DEFAULT
    if jax.process_count() != 1 or not onednn.load().available:
        return None
    names = {getattr(a.dtype, "name", str(a.dtype)) for a in arrays}
    if len(names) != 1 or not names <= set(_DTYPES):  # one dtype, as XLA's conv asks
        return None
    if op == "conv2d":
        from cnnjax.cpu.conv import conv2d

        return functools.partial(conv2d, **static, rules=rules)
    if op == "max_pool":
        from cnnjax.cpu.pool import max_pool

        return functools.partial(max_pool, **static, rules=rules)
    if not rules.closed_form_batch_norm:
        return None
    from cnnjax.cpu.norm import batch_norm_train

    return lambda x, scale, bias: batch_norm_train(x, scale, bias, static["epsilon"], static["axis_name"])


def describe() -> str:
    """One line for logs: the oneDNN library (or why there is none) and the float32 paths this CPU takes."""
    from cnnjax.cpu import onednn, rules

    library = onednn.load()
    if not library.available:
        return f"plain XLA ({library.what})"
    pools = "oneDNN max-pools" if rules.DEFAULT.max_pool_by_onednn(library.avx512) else "strided-view max-pools"
    return f"{library.what}; {pools}"
