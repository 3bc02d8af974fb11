"""Shared timing helper for the benchmark scripts (bench, bench_scan, bench_resize)."""

from __future__ import annotations

import time
from typing import Any


def time_jax_training(model: Any, spec: Any, data_shape: tuple[int, int, int], batch: int, steps: int,
                      model_input_shape: tuple[int, int, int] | None = None, scan: bool | None = None,
                      chunk: int = 1) -> dict:
    """Steady-state training throughput through the real ``Runner``.

    Random uint8 data ``[batch * chunk, *data_shape]`` is put on the device once; each
    ``runner.train`` call runs ``chunk`` steps (so ``chunk > 1`` exercises ``lax.scan`` when
    ``scan=True``). Returns ``train_img_s``, ``compile_s`` (first call) and what the caller needs to
    go on (``runner``, ``state``, ``images``, ``labels``). Timing waits for the last step to finish.
    """
    import jax
    import numpy as np
    import optax

    from cnnjax.train.state import create_train_state
    from cnnjax.train.steps import Runner

    runner = Runner(spec, model.apply, scan=scan)
    state = runner.put_state(create_train_state(model, optax.sgd(0.01, momentum=0.9),
                                                model_input_shape or data_shape, jax.random.PRNGKey(0)))
    rng = np.random.RandomState(0)
    n = batch * chunk
    images, labels = runner.put_data(rng.randint(0, 256, (n, *data_shape)).astype(np.uint8),
                                     rng.randint(0, spec.num_classes, n).astype(np.int32))
    idx = np.arange(n).reshape(chunk, batch)
    t = time.perf_counter()
    state, metrics = runner.train(state, images, labels, idx)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t
    state, metrics = runner.train(state, images, labels, idx)  # warm-up
    jax.block_until_ready(metrics)
    calls = max(1, steps // chunk)
    t = time.perf_counter()
    for _ in range(calls):
        state, metrics = runner.train(state, images, labels, idx)
    jax.block_until_ready(metrics)  # dispatch is asynchronous
    return {"train_img_s": calls * n / (time.perf_counter() - t), "compile_s": compile_s, "runner": runner,
            "state": state, "images": images, "labels": labels}
