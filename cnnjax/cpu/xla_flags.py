"""XLA:CPU's YNN fusion settings that cnnjax runs with, and the one jax line they are known on.

Imports nothing, so an entry point can read it before jax initialises its backend (XLA reads ``XLA_FLAGS`` once,
then). XLA:CPU hands work to its YNN library by fusion type; its default list is INDIVIDUAL_CONVOLUTION, REDUCE
and INDIVIDUAL_DOT. ``python -m experiments.bench.cpu`` times the train steps the entry points run, with these
settings.
"""

from __future__ import annotations

YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
# Every entry point's process (cnnjax.cpu.process.configure): convolutions stay with XLA's own (or the CPU
# backend's) kernels, not YNN's.
ENTRY_POINT_FLAG = f"--{YNN_FUSION_OPTION}=-individual_convolution"
# The eval programs (cnnjax.train.runner) keep only INDIVIDUAL_DOT: a forward-only program can fuse a conv, its
# activation and its pool into one slow YNN fusion. Training keeps REDUCE (dropping it slows the train step).
# Compile options take full enum names and overwrite the list.
EVAL_YNN_FUSION_TYPES = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"


def on_measured_line(version: str) -> bool:
    """Whether a jax / jaxlib ``version`` is of the line (0.10) these values were measured and read on; other
    lines may not know them, and an unknown flag or option value stops the process or the compile."""
    return version.split(".")[:2] == ["0", "10"]


def sets_own_ynn_types(xla_flags: str) -> bool:
    """Whether ``xla_flags`` sets YNN fusion types other than :data:`ENTRY_POINT_FLAG` (the user's own)."""
    return any(YNN_FUSION_OPTION in f and f != ENTRY_POINT_FLAG for f in xla_flags.split())


def with_entry_point_flag(xla_flags: str, jaxlib_version: str | None) -> str | None:
    """``xla_flags`` with :data:`ENTRY_POINT_FLAG` added, or None to leave it as it is: a jaxlib of another line
    (or none), or YNN fusion types the user set already."""
    if jaxlib_version is None or not on_measured_line(jaxlib_version) or YNN_FUSION_OPTION in xla_flags:
        return None
    return f"{xla_flags} {ENTRY_POINT_FLAG}".strip()
