"""Cost of upsampling CIFAR-size images to 224 on the device for a ResNet-18 (transfer-learning choice).

``python -m experiments.bench_resize`` prints train img/s at 32x32 and with ``resize_to=224``.
"""

from __future__ import annotations

import time

from experiments import cli  # noqa: F401  (sets the CPU XLA flag, as the other entry points)


def measure(resize_to: int, batch: int = 16, steps: int = 5) -> float:
    """Steady-state train images/s of ResNet-18 on 32x32 uint8 inputs, optionally resized on the device."""
    import jax
    import numpy as np
    import optax

    from cnnjax import models
    from cnnjax.train.state import create_train_state
    from cnnjax.train.steps import Runner, StepSpec

    model = models.create("resnet18", num_classes=10)
    runner = Runner(StepSpec(10, (0.5,) * 3, (0.25,) * 3, resize_to=resize_to), model.apply)
    shape = (resize_to, resize_to, 3) if resize_to else (32, 32, 3)
    state = runner.put_state(create_train_state(model, optax.sgd(0.01, momentum=0.9), shape, jax.random.PRNGKey(0)))
    rng = np.random.RandomState(0)
    images, labels = runner.put_data(rng.randint(0, 256, (batch, 32, 32, 3)).astype(np.uint8),
                                     np.zeros(batch, np.int32))
    idx = np.arange(batch)[None]
    state, metrics = runner.train(state, images, labels, idx)  # compile
    jax.block_until_ready(metrics)
    t = time.perf_counter()
    for _ in range(steps):
        state, metrics = runner.train(state, images, labels, idx)
    jax.block_until_ready(metrics)
    return steps * batch / (time.perf_counter() - t)


if __name__ == "__main__":
    for size in (0, 224):
        print(f"resnet18 train, 32x32 input, resize_to={size or 'off'}: {measure(size):.1f} img/s (batch 16)")
