"""Why the CPU runner loops steps from the host: train img/s with ``lax.scan`` vs a host loop.

``python -m experiments.bench_scan [MODEL ...]`` (default: gap_cnn improved_cnn), batch 128, 4 steps
per ``Runner.train`` call (one scan of 4 steps, or 4 host-dispatched steps).
"""

from __future__ import annotations

import sys

from experiments import cli  # noqa: F401  (sets the CPU XLA flag, as the other entry points)


def measure(name: str, scan: bool, batch: int = 128, steps: int = 4) -> float:
    """Steady-state train images/s of ``name`` through ``Runner(scan=scan)``."""
    from cnnjax import models
    from cnnjax.train.steps import StepSpec
    from experiments.benchlib import time_jax_training

    spec = StepSpec(10, (0.5,) * 3, (0.25,) * 3)
    return time_jax_training(models.create(name), spec, (32, 32, 3), batch, steps, scan=scan,
                             chunk=steps)["train_img_s"]


if __name__ == "__main__":
    for name in sys.argv[1:] or ["gap_cnn", "improved_cnn"]:
        print(f"{name}: lax.scan {measure(name, True):.0f} img/s, host loop {measure(name, False):.0f} img/s")
