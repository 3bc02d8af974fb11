"""The PyTorch twin of a cnnjax speed-run config: the same recipe, eager PyTorch, timed the same way.

``python -m experiments.bench.speedrun_torch --config experiments/configs/fashion_mnist_fast.py
--config.data.dir=/usr/share/datasets/fashion-mnist [--out FILE]``

Same data (cnnjax's IDX reader and stratified validation hold-out, numpy only: no JAX in this
process), same zero-padding, normalisation, random horizontal flip, batch size, epochs, label
smoothing, Adam / SGD with optax's one-cycle or cosine schedule, mirror TTA and final weights; the
model is the zoo model's torch twin (``experiments/bench/torch_twins.py``). Prints one JSON line with the
validation and test accuracy and the training time. Only the recipe fields a speed run uses are
supported; any other setting is refused in one line.
"""

from __future__ import annotations

import sys

# ruff: noqa: E402  (the program's first steps below come before its imports)
if __name__ == "__main__":  # first: SIGTERM / Ctrl-C is one line and status 75 from here on (experiments.startup)
    from experiments import startup

    startup.begin()  # the signal handler, then the process settings (cnnjax.cpu.process)

import json

from absl import flags
from ml_collections import config_flags

from experiments import cli
from experiments.bench.speedrun_lib import train_twin

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined when it runs, not on import)."""
    config_flags.DEFINE_config_file("config", None, "cnnjax experiment config file (experiments/configs/NAME.py)",
                                    lock_config=True)
    flags.DEFINE_string("out", "", "also write the result JSON here")
    flags.DEFINE_integer("threads", 0, "torch intra-op threads (0: torch's default, one per core)")


def main(argv):
    del argv
    result = train_twin(FLAGS.config, FLAGS.threads)
    print(json.dumps(result), flush=True)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["config"])
    sys.exit(cli.run(main))
