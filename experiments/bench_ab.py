"""Paired A/B training throughput of two CPU variants in one process, interleaved so that this machine's
slow spells hit both sides alike: ``python -m experiments.bench_ab --a "+tiled max-pool"
--b "+strided-view max-pool" --models lenet5,improved_cnn [--rounds 9 --steps 5]``.

Each model's train step (``experiments.bench_cpu``'s setup: batch 128, SGD momentum 0.9, random uint8
data, the real ``Runner``) is traced and compiled once with the library code of variant A and once with
that of B (see ``experiments.benchlib.CPU_VARIANTS``; both must have the entry points' XLA flag, which a
process cannot change). Then ``--rounds`` rounds each time ``--steps`` steps of A and of B, alternating
which goes first. Prints the median images/s of each side, the median of the per-round ratios B / A, and
the ratio of each side's fastest round: slow spells on this machine only ever slow a side down, so its
fastest round is the best estimate of its undisturbed speed.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from absl import flags

from cnnjax.errors import UsageError
from experiments import cli
from experiments.benchlib import (
    CPU_VARIANTS,
    PROCESS_VARIANTS,
    SHAPES,
    WARMUP_STEPS,
    bench_model,
    bench_spec,
    paired_ratios,
    prepared_runner,
    with_variant,
)

FLAGS = flags.FLAGS
flags.DEFINE_string("a", "+tiled max-pool", "variant A (experiments.benchlib.CPU_VARIANTS)")
flags.DEFINE_string("b", [v for v in CPU_VARIANTS if v not in PROCESS_VARIANTS][-1], "variant B")
flags.DEFINE_list("models", ["lenet5", "improved_cnn", "cifar_resnet20", "resnet18", "fast_cnn"], "bench rows")
flags.DEFINE_integer("rounds", 9, "alternating rounds")
flags.DEFINE_integer("steps", 5, "steps per side per round")
flags.DEFINE_integer("warmup", WARMUP_STEPS, "untimed steps per side before the rounds")
flags.DEFINE_integer("batch", 128, "batch size")
flags.DEFINE_string("out", "", "write the results as JSON here")


def _compiled(name: str, variant: str, batch: int) -> list:
    """``[runner, state, images, labels, idx]`` with the train step traced under ``variant``'s code."""
    import jax
    import numpy as np

    shape = SHAPES[name]
    runner, state, images, labels = prepared_runner(bench_model(name), bench_spec(shape), shape, batch, scan=False)
    idx = np.arange(batch).reshape(1, batch)
    with with_variant(variant):
        state, m = runner.train(state, images, labels, idx)  # traced and compiled here
    jax.block_until_ready(m)
    return [runner, state, images, labels, idx]


def _images_per_s(side: list, steps: int) -> float:
    import jax

    runner, state, images, labels, idx = side
    t = time.perf_counter()
    for _ in range(steps):
        state, m = runner.train(state, images, labels, idx)
    jax.block_until_ready(m)
    side[1] = state
    return steps * idx.shape[1] / (time.perf_counter() - t)


def main(argv):
    del argv
    for v in (FLAGS.a, FLAGS.b):
        if v in PROCESS_VARIANTS:
            before = CPU_VARIANTS[CPU_VARIANTS.index(v) - 1]
            raise UsageError(f"{v!r} is a setting of the whole process, which one process cannot pair; compare it "
                             f"with python -m experiments.bench_cpu --variants=\"{before},{v}\" --repeats 5")
        if v not in CPU_VARIANTS[1:]:
            raise UsageError(f"--a / --b must be one of {CPU_VARIANTS[1:]} (the baseline lacks the XLA flag); "
                             f"got {v!r}")
    unknown = [name for name in FLAGS.models if name not in SHAPES]
    if unknown:
        raise UsageError(f"unknown bench row(s) {unknown}; choose from {', '.join(SHAPES)}")
    results = {}
    print(f"| model | A: {FLAGS.a} img/s | B: {FLAGS.b} img/s | B / A (median of {FLAGS.rounds} rounds) "
          "| B / A (fastest rounds) |")
    print("|---|---:|---:|---:|---:|")
    for name in FLAGS.models:
        sides = [_compiled(name, FLAGS.a, FLAGS.batch), _compiled(name, FLAGS.b, FLAGS.batch)]
        for side in sides:
            _images_per_s(side, max(1, FLAGS.warmup))  # untimed
        a_runs, b_runs = [], []
        for r in range(FLAGS.rounds):
            order = (0, 1) if r % 2 == 0 else (1, 0)
            got = {i: _images_per_s(sides[i], FLAGS.steps) for i in order}
            a_runs.append(got[0])
            b_runs.append(got[1])
        ratio, fastest = paired_ratios(a_runs, b_runs)
        results[name] = {"a": statistics.median(a_runs), "b": statistics.median(b_runs), "b_over_a": ratio,
                         "fastest_b_over_a": fastest, "a_runs": a_runs, "b_runs": b_runs}
        print(f"| {name} | {results[name]['a']:.0f} | {results[name]['b']:.0f} | {ratio:.2f} | {fastest:.2f} |",
              flush=True)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump({"a": FLAGS.a, "b": FLAGS.b, "rounds": FLAGS.rounds, "steps": FLAGS.steps,
                       "models": results}, f, indent=2)


if __name__ == "__main__":
    sys.exit(cli.run(main))
