"""XLA:CPU's YNN fusion settings, measured on one jax line; imports nothing, so entry points can read it before
jax is imported (XLA reads ``XLA_FLAGS`` once).

XLA:CPU (jax 0.10) hands work to its YNN library by fusion type; its default list is INDIVIDUAL_CONVOLUTION,
REDUCE and INDIVIDUAL_DOT (read by comparing compiled HLO, experiments/PERFORMANCE.md).
"""

from __future__ import annotations

YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
# Set by every entry point (experiments/cli.py): ImprovedCNN's train step 276 -> 487 img/s on jaxlib 0.10.2
# (`python -m experiments.bench_cpu`, columns baseline -> +ynn flag).
ENTRY_POINT_FLAG = f"--{YNN_FUSION_OPTION}=-individual_convolution"
# Eval programs drop REDUCE too (cnnjax.train.runner): a forward-only program fused LeNet-5's shifted-sum first
# conv, its tanh and its average pool into one YNN fusion, 7.7-8.0 ms a batch of 128 against 2.2-2.3 without;
# the other bench models' evals were the same either way within noise. Training keeps REDUCE (dropping it cost
# improved_cnn 25% and cifar_resnet20 10%). Compile options take full enum names and overwrite the list.
EVAL_YNN_FUSION_TYPES = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"


def on_measured_line(version: str) -> bool:
    """Whether a jax / jaxlib ``version`` is of the line (0.10) these values were measured and read on; other
    lines may not know them, and an unknown flag or option value stops the process or the compile."""
    return version.split(".")[:2] == ["0", "10"]


def sets_own_ynn_types(xla_flags: str) -> bool:
    """Whether ``xla_flags`` sets YNN fusion types other than :data:`ENTRY_POINT_FLAG` (the user's own)."""
    return any(YNN_FUSION_OPTION in f and f != ENTRY_POINT_FLAG for f in xla_flags.split())
