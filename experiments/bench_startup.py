"""Start-up costs of a training run on this backend: model init compile, and train-step compiles.

``python -m experiments.bench_startup [--model simple_cnn --shape 28,28,1 --kwargs image_size=28] [--runs 3]``

* ``init``: seconds of ``create_train_state`` (compile + run of the model's initialisers) in a fresh
  process, with cnnjax's CPU init compiler options and with XLA's default optimisation (the code before
  them), alternating, median of ``--runs``.
* ``chunks``: a ``Runner`` trains chunks of 100 and 21 steps (an epoch of 121 steps with
  ``log_every=100``); prints how many times the train step was compiled and the seconds of each chunk.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

from absl import flags

from experiments import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "simple_cnn", "zoo model")
flags.DEFINE_list("shape", ["28", "28", "1"], "input H,W,C")
flags.DEFINE_list("kwargs", ["image_size=28"], "model keyword arguments KEY=INT")
flags.DEFINE_integer("runs", 3, "fresh processes per init variant")
flags.DEFINE_integer("batch", 128, "batch size of the chunks")

_INIT = """
import json, time
from experiments import cli  # noqa: F401  (the entry points' XLA flag)
import jax, jax.numpy as jnp, optax
from cnnjax import models
from cnnjax.train import state as st
jax.jit(lambda x: x + 1)(jnp.ones(3)).block_until_ready()  # backend start-up is not the init's cost
if not {optimised}:
    st.INIT_COMPILER_OPTIONS = None
model = models.create({model!r}, num_classes=10, **{kwargs!r})
t = time.perf_counter()
jax.block_until_ready(st.create_train_state(model, optax.adam(1e-3), {shape!r}, jax.random.PRNGKey(0)).params)
print(json.dumps(time.perf_counter() - t))
"""


def init_seconds(optimised: bool, model: str, shape: tuple, kwargs: dict) -> float:
    code = _INIT.format(optimised=optimised, model=model, kwargs=kwargs, shape=shape)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def chunk_compiles(model_name: str, shape: tuple, kwargs: dict, batch: int) -> dict:
    """Train-step compilations and seconds of a 100-step then a 21-step chunk through the Runner."""
    import time

    import jax
    import numpy as np

    from cnnjax import models
    from experiments.benchlib import bench_spec, prepared_runner

    model = models.create(model_name, num_classes=10, **kwargs)
    runner, state, images, labels = prepared_runner(model, bench_spec(shape), shape, batch * 121, scan=False)
    idx = np.arange(batch * 121).reshape(121, batch)
    seconds = []
    for chunk in (idx[:100], idx[100:]):
        t = time.perf_counter()
        state, metrics = runner.train(state, images, labels, chunk)
        jax.block_until_ready(metrics)
        seconds.append(time.perf_counter() - t)
    return {"compiles": runner._train._cache_size(), "chunk_100_s": seconds[0], "chunk_21_s": seconds[1]}


def main(argv):
    del argv
    shape = tuple(int(v) for v in FLAGS.shape)
    kwargs = {k: int(v) for k, v in (item.split("=") for item in FLAGS.kwargs)}
    times: dict[str, list[float]] = {"optimised (XLA default)": [], "cnnjax CPU init options": []}
    for _ in range(FLAGS.runs):
        times["optimised (XLA default)"].append(init_seconds(False, FLAGS.model, shape, kwargs))
        times["cnnjax CPU init options"].append(init_seconds(True, FLAGS.model, shape, kwargs))
    result = {"init_s": {k: statistics.median(v) for k, v in times.items()}, "init_runs": times,
              **chunk_compiles(FLAGS.model, shape, kwargs, FLAGS.batch)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(cli.run(main))
