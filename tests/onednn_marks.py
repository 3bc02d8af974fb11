"""Skip markers and helpers for tests of the CPU backend (:mod:`cnnjax.cpu`).

Nothing here compiles, loads a library or starts a JAX backend at collection: the marker asks only whether the
oneDNN library is built (``python -m cnnjax.cpu`` builds it); the library is loaded by the first test that needs it.
"""

from __future__ import annotations

import pytest

from cnnjax.cpu import onednn

BUILT = onednn.built() is not None
needs_onednn = pytest.mark.skipif(not BUILT, reason="oneDNN kernels not built here (python -m cnnjax.cpu)")

# The two paths every parity test runs on: the plain XLA path (what GPUs and TPUs get) and the CPU backend.
PATHS = ["xla", pytest.param("cpu", marks=needs_onednn)]


def library() -> onednn.Library:
    """The loaded library (loaded on first use); skips the test where it is built but does not load."""
    lib = onednn.load()
    if not lib.available:
        pytest.skip(lib.what)
    return lib


def skip_without_avx512() -> None:
    """Skips the test where oneDNN has no AVX-512 kernels here (then it has no bfloat16 primitives)."""
    if not library().avx512:
        pytest.skip("no oneDNN bfloat16 kernels on this CPU (they need AVX-512)")


def pretend_no_avx512(monkeypatch) -> None:
    """Make the loaded library report no AVX-512, as on an AVX2-only CPU (float32 kernels only).

    Used only where a rule reads the CPU itself (``onednn_conv``'s forward as an input gradient); rules are
    otherwise varied by passing ``avx512=`` or a :class:`cnnjax.cpu.rules.Rules` instance."""
    real = library()
    monkeypatch.setattr(onednn, "load", lambda: real._replace(avx512=False, what=real.what + " (as if no AVX-512)"))


def use_path(monkeypatch, path: str) -> None:
    """Switch the CPU backend on ('cpu') or off ('xla') for functions traced from now on
    (``CNNJAX_CPU_BACKEND`` is read at trace time: jit a fresh function after this)."""
    monkeypatch.setenv("CNNJAX_CPU_BACKEND", "1" if path == "cpu" else "0")
