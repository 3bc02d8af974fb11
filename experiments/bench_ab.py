"""Paired A/B timing of one library change, interleaved in one process so that machine noise hits both
sides alike: ``python -m experiments.bench_ab --change bn_grad --models cifar_resnet20,fast_cnn``.

Each model's train step (the bench's setup: batch 128, SGD momentum 0.9, random uint8 data, the real
``Runner``) is compiled twice, without (A) and with (B) the change; then ``--rounds`` rounds each time
``--steps`` steps of A and of B, alternating which goes first. Prints the median images/s of each side
and B / A.
"""

from __future__ import annotations

import statistics
import sys
import time

from absl import flags

from cnnjax.errors import UsageError
from experiments import cli
from experiments.benchlib import SHAPES

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["cifar_resnet20", "improved_cnn", "resnet18", "fast_cnn"], "bench rows")
flags.DEFINE_string("change", "bn_grad", "bn_grad: BatchNorm's closed-form gradient (B) vs autodiff (A)")
flags.DEFINE_integer("rounds", 7, "alternating rounds")
flags.DEFINE_integer("steps", 5, "steps per side per round")
flags.DEFINE_integer("batch", 128, "batch size")


def _without_change(change: str):
    """A context that puts back the code before ``change`` while a step is traced."""
    import contextlib

    from cnnjax import layers

    if change != "bn_grad":
        raise UsageError(f"unknown --change {change!r}; choose bn_grad")

    @contextlib.contextmanager
    def ctx():
        saved = layers.batch_norm_train
        layers.batch_norm_train = lambda x, scale, bias, eps: layers._batch_norm_train_fwd(x, scale, bias, eps)[0]
        try:
            yield
        finally:
            layers.batch_norm_train = saved

    return ctx()


def _prepared(name: str, batch: int, before: bool):
    import jax
    import numpy as np
    import optax

    from cnnjax import models
    from cnnjax.train.runner import Runner
    from cnnjax.train.state import create_train_state
    from cnnjax.train.steps import StepSpec

    shape = SHAPES[name]
    model = models.create(name.split("@")[0], num_classes=10)
    runner = Runner(StepSpec(10, (0.5,) * shape[2], (0.25,) * shape[2]), model.apply, scan=False)
    state = runner.put_state(create_train_state(model, optax.sgd(0.01, momentum=0.9), shape, jax.random.PRNGKey(0)))
    rng = np.random.RandomState(0)
    images, labels = runner.put_data(rng.randint(0, 256, (batch, *shape)).astype(np.uint8),
                                     rng.randint(0, 10, batch).astype(np.int32))
    idx = np.arange(batch).reshape(1, batch)
    import contextlib

    with _without_change(FLAGS.change) if before else contextlib.nullcontext():
        state, m = runner.train(state, images, labels, idx)  # traced and compiled here
    jax.block_until_ready(m)
    return [runner, state, images, labels, idx]


def _time(side: list, steps: int) -> float:
    import jax

    runner, state, images, labels, idx = side
    t = time.perf_counter()
    for _ in range(steps):
        state, m = runner.train(state, images, labels, idx)
    jax.block_until_ready(m)
    side[1] = state
    return steps * FLAGS.batch / (time.perf_counter() - t)


def main(argv):
    del argv
    print(f"| model | A: without {FLAGS.change} img/s | B: with img/s | B / A |\n|---|---:|---:|---:|")
    for name in FLAGS.models:
        if name not in SHAPES:
            raise UsageError(f"unknown bench row {name!r}; choose from {', '.join(SHAPES)}")
        a, b = _prepared(name, FLAGS.batch, before=True), _prepared(name, FLAGS.batch, before=False)
        _time(a, 1), _time(b, 1)
        rates = {"a": [], "b": []}
        for r in range(FLAGS.rounds):
            for key, side in (("a", a), ("b", b)) if r % 2 == 0 else (("b", b), ("a", a)):
                rates[key].append(_time(side, FLAGS.steps))
        ma, mb = statistics.median(rates["a"]), statistics.median(rates["b"])
        print(f"| {name} | {ma:.0f} | {mb:.0f} | {mb / ma:.2f} |", flush=True)


if __name__ == "__main__":
    sys.exit(cli.run(main))
