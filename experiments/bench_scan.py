"""Why the CPU runner loops steps from the host: train img/s with ``lax.scan`` vs a host loop.

``python -m experiments.bench_scan [MODEL ...]`` (default: gap_cnn improved_cnn), batch 128, 4 steps.
"""

from __future__ import annotations

import sys
import time

from experiments import cli  # noqa: F401  (sets the CPU XLA flag, as the other entry points)


def measure(name: str, scan: bool, batch: int = 128, steps: int = 4) -> float:
    """Steady-state train images/s of ``name`` through ``Runner(scan=scan)``."""
    import jax
    import numpy as np
    import optax

    from cnnjax import models
    from cnnjax.train.state import create_train_state
    from cnnjax.train.steps import Runner, StepSpec

    model = models.create(name)
    runner = Runner(StepSpec(10, (0.5,) * 3, (0.25,) * 3), model.apply, scan=scan)
    state = runner.put_state(create_train_state(model, optax.sgd(0.01, momentum=0.9), (32, 32, 3),
                                                jax.random.PRNGKey(0)))
    rng = np.random.RandomState(0)
    images, labels = runner.put_data(rng.randint(0, 256, (batch * steps, 32, 32, 3)).astype(np.uint8),
                                     rng.randint(0, 10, batch * steps).astype(np.int32))
    idx = np.arange(batch * steps).reshape(steps, batch)
    state, metrics = runner.train(state, images, labels, idx)  # compile
    jax.block_until_ready(metrics)
    t = time.perf_counter()
    state, metrics = runner.train(state, images, labels, idx)
    jax.block_until_ready(metrics)
    return steps * batch / (time.perf_counter() - t)


if __name__ == "__main__":
    for name in sys.argv[1:] or ["gap_cnn", "improved_cnn"]:
        print(f"{name}: lax.scan {measure(name, True):.0f} img/s, host loop {measure(name, False):.0f} img/s")
