"""Time a speed-run config end to end, cnnjax and its PyTorch twin side by side.

``python -m experiments.bench.speedrun --config experiments/configs/fashion_mnist_fast.py
--data_dir /usr/share/datasets/fashion-mnist [--runs 3] [--torch] [--out FILE] [-- --config.key=value ...]``

Each run is a fresh process under ``/usr/bin/time`` (wall seconds from process start to exit: imports,
data loading from the IDX files with no decoded-array cache, compilation, training, evaluation and
checkpointing): ``python -m experiments.train`` into a new temporary workdir, then, with ``--torch``,
``python -m experiments.bench.speedrun_torch`` on the same config. Each starts from this command's environment and
applies the process settings itself (:func:`cnnjax.cpu.process.configure`, its restart included), as a user's run
does. Runs alternate between the two so a slow spell of the machine hits both. Prints every run and the medians as
a markdown table.
"""

from __future__ import annotations

import sys

# ruff: noqa: E402  (the program's first step below comes before its imports)
if __name__ == "__main__":  # first: SIGTERM / Ctrl-C is one line and status 75 from here on (experiments.startup)
    from experiments import startup

    startup.install()  # no process settings here: each timed run applies its own, as a user's run does

import json
import os
import tempfile

from absl import flags

from cnnjax.errors import UsageError
from experiments import cli
from experiments.bench.speedrun_lib import TIME, final_accuracies, markdown, summary, timed

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined when it runs, not on import)."""
    flags.DEFINE_string("config", None, "experiment config file (experiments/configs/NAME.py)")
    flags.DEFINE_string("data_dir", None, "directory with the dataset's four IDX files")
    flags.DEFINE_integer("runs", 3, "runs of each side (the table gives the median)")
    flags.DEFINE_bool("torch", True, "also run the PyTorch twin (experiments.bench.speedrun_torch)")
    flags.DEFINE_string("out", "", "write every run and the medians as JSON here")


def run_cnnjax(overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="speedrun_") as tmp:
        workdir = os.path.join(tmp, "run")
        wall, _ = timed([sys.executable, "-m", "experiments.train", f"--config={FLAGS.config}", f"--workdir={workdir}",
                         f"--config.data.dir={FLAGS.data_dir}", "--config.data.cache_dir=", "--noprogress",
                         *overrides])
        return {"wall_s": wall, **final_accuracies(workdir)}


def run_torch(overrides: list[str]) -> dict:
    wall, out = timed([sys.executable, "-m", "experiments.bench.speedrun_torch", f"--config={FLAGS.config}",
                       f"--config.data.dir={FLAGS.data_dir}", "--config.data.cache_dir=", *overrides])
    result = json.loads(out.strip().splitlines()[-1])
    return {"wall_s": wall, "val_accuracy": result["val_accuracy"], "test_accuracy": result["test_accuracy"],
            "framework": result["framework"]}


def main(argv):
    overrides = argv[1:]
    if not FLAGS.config or not FLAGS.data_dir:
        raise UsageError("pass --config=experiments/configs/NAME.py and --data_dir=<dir with the four IDX files>")
    if FLAGS.runs < 1:
        raise UsageError(f"--runs must be >= 1, got {FLAGS.runs}")
    if not os.access(TIME, os.X_OK):
        raise UsageError(f"{TIME} is missing: install it (Debian: apt-get install time)")
    sides = [("cnnjax", run_cnnjax)] + ([("torch eager", run_torch)] if FLAGS.torch else [])
    runs: dict[str, list[dict]] = {}
    for i in range(FLAGS.runs):
        for side, fn in sides:
            runs.setdefault(side, []).append(fn(overrides))
            r = runs[side][-1]
            print(f"# run {i + 1} {side}: {r['wall_s']:.1f} s, test {100 * r['test_accuracy']:.2f}%", flush=True)
    medians = summary(runs)
    print(markdown(runs, medians))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump({"config": FLAGS.config, "overrides": overrides, "runs": runs, "medians": medians}, f, indent=2)


if __name__ == "__main__":
    define_flags()
    sys.exit(cli.run(main))
