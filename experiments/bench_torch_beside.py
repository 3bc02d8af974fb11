"""Why the benchmarks time PyTorch in a process of its own: ``python -m experiments.bench_torch_beside
--models lenet5,cifar_resnet20 [--rounds 10 --steps 10]``.

For each model, PyTorch eager's train step (the bench's twin, batch 128) is timed in two fresh processes (each
with the entry points' environment): one where only PyTorch ran, and one where cnnjax's train step of the same
model ran first (with its oneDNN kernels, on XLA's threads). Each gives the median and the fastest of ``--rounds``
rounds of ``--steps`` steps, in ms per step, after ``benchlib.WARMUP_STEPS`` untimed ones.

PyTorch's CPU wheel ships its own GNU OpenMP runtime, but under the soname ``libgomp.so.1``, so a process that
loads cnnjax's oneDNN library (linked against Debian's libgomp) runs one runtime for both, and the runtime reads
``OMP_WAIT_POLICY`` once, when it loads. Until 2026-12-04 cnnjax loaded its library with ``OMP_WAIT_POLICY=PASSIVE``
(its oneDNN teams then slept between convolutions), so PyTorch's threads slept and were woken between its many small
parallel regions too: lenet5 9.49 against 5.88 ms per step, cifar_resnet20 233.9 against 198.9 (``OMP_WAIT_POLICY=
ACTIVE`` in the environment: 5.96 against 6.02). Now cnnjax's oneDNN calls run no OpenMP team and the library is
loaded without it (but with ``CNNJAX_ONEDNN_THREADS=omp``): 6.12 against 5.88 and 205.4 against 201.1 ms.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from absl import flags

from cnnjax.errors import UsageError
from experiments import cli
from experiments.benchlib import SHAPES, WARMUP_STEPS, in_fresh_process

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["lenet5", "cifar_resnet20"], "bench rows")
flags.DEFINE_integer("rounds", 10, "timed rounds per process")
flags.DEFINE_integer("steps", 10, "steps per round")
flags.DEFINE_string("out", "", "write the results as JSON here")


def torch_step_ms(name: str, after_cnnjax: bool, rounds: int, steps: int) -> list[float]:
    """ms per PyTorch eager train step of bench row ``name`` in each of ``rounds`` rounds of ``steps`` steps, in
    this process, after one cnnjax train step of the same model when ``after_cnnjax``."""
    import jax
    import numpy as np

    from experiments.benchlib import bench_model, bench_spec, prepared_runner, torch_steps

    shape = SHAPES[name]
    if after_cnnjax:
        runner, state, images, labels = prepared_runner(bench_model(name), bench_spec(shape), shape, 128)
        idx = np.arange(128).reshape(1, 128)
        for _ in range(3):
            state, metrics = runner.train(state, images, labels, idx)
        jax.block_until_ready(metrics)
    twin = torch_steps(name, shape, 128)
    twin["model"].train(True)
    for _ in range(WARMUP_STEPS):
        twin["train_step"]()
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(steps):
            twin["train_step"]()
        out.append((time.perf_counter() - t) / steps * 1e3)
    return out


def main(argv):
    del argv
    unknown = [name for name in FLAGS.models if name not in SHAPES]
    if unknown or FLAGS.rounds < 1 or FLAGS.steps < 1:
        raise UsageError(f"--models must be bench rows ({', '.join(SHAPES)}) and --rounds, --steps >= 1; got "
                         f"{unknown or (FLAGS.rounds, FLAGS.steps)}")
    results = {}
    print("| model | PyTorch alone: ms/step (median, fastest) | after cnnjax's step | ratio of medians |")
    print("|---|---:|---:|---:|")
    for name in FLAGS.models:
        alone, beside = (in_fresh_process(torch_step_ms, name, after, FLAGS.rounds, FLAGS.steps)
                         for after in (False, True))
        results[name] = {"alone_ms": alone, "after_cnnjax_ms": beside}
        a, b = statistics.median(alone), statistics.median(beside)
        print(f"| {name} | {a:.2f}, {min(alone):.2f} | {b:.2f}, {min(beside):.2f} | {b / a:.2f} |", flush=True)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump({"rounds": FLAGS.rounds, "steps": FLAGS.steps, "models": results}, f, indent=2)


if __name__ == "__main__":
    sys.exit(cli.run(main))
