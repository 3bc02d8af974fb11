"""Skip markers for tests of cnnjax's oneDNN kernels, and a stand-in for a CPU without their bfloat16 ones."""

from __future__ import annotations

import jax
import pytest

from cnnjax.native import onednn

ONEDNN = jax.default_backend() == "cpu" and onednn.available()
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="oneDNN kernels not built here (python -m cnnjax.native.onednn)")
needs_onednn_bf16 = pytest.mark.skipif(not (ONEDNN and onednn.bf16_available()),
                                       reason="no oneDNN bfloat16 kernels on this CPU (they need AVX-512)")


def pretend_no_bf16(monkeypatch) -> None:
    """Make ``onednn`` report float32 kernels only, as on an AVX2-only CPU."""
    monkeypatch.setattr(onednn, "_load", lambda: onednn.Library(True, "oneDNN (float32 only)", False))
