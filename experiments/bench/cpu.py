"""The CPU table: train-step images/s of the bench models, cnnjax with its CPU backend, cnnjax on plain XLA and
PyTorch eager, side by side in one run.

``python -m experiments.bench.cpu [--models M,...] [--rounds 3] [--steps 20] [--batch 128] [--out FILE]``

Sides (``--sides``, default ``backend,xla,torch``):

* ``backend``: cnnjax as the entry points run it, the CPU backend on (:mod:`cnnjax.cpu`);
* ``xla``: the same with ``CNNJAX_CPU_BACKEND=0``, plain XLA (what the backend buys is ``backend`` against it);
* ``torch``: the model's PyTorch twin (experiments/bench/torch_twins.py), eager;
* ``glibc`` (not by default): ``backend`` with ``CNNJAX_MALLOC=glibc``, without the allocator settings of
  :func:`cnnjax.cpu.process.configure` (what they buy is ``backend`` against it).

Each side of each round runs in a fresh process of its own (:func:`experiments.bench.lib.in_fresh_process`),
which times every model: random uint8 data, SGD momentum 0.9, cross-entropy, ``--warmup`` untimed steps, then
``--steps`` timed ones through the real ``Runner`` (cnnjax) or the twin's eager step. The sides alternate within
each round, so that a slow spell of the machine hits them alike; a cell is the side's median over the rounds. This
command runs with the process settings of the entry points (the XLA:CPU flag, tcmalloc, huge pages), and every
process it starts inherits them, PyTorch's too: the table shows what a user of the entry points gets, with the
same allocator on both frameworks.

Prints one markdown table (images/s per side, each cnnjax side's ratio to PyTorch eager, and the geometric mean of
each ratio row) and, with ``--out``, writes JSON, rewritten after every side (``"complete": false`` until the last);
``--render FILE`` prints a saved run's table again.
"""

from __future__ import annotations

import os
import sys

# ruff: noqa: E402  (the program's first steps below come before its imports)
if __name__ == "__main__":  # first: SIGTERM / Ctrl-C is one line and status 75 from here on (experiments.startup)
    from experiments import startup

    startup.begin(compile_cache=False)  # the signal handler, the process settings; compiles timed uncached

import statistics
import time

from absl import flags

from cnnjax.errors import UsageError
from experiments import cli, startup
from experiments.bench.lib import (
    SHAPES,
    WARMUP_STEPS,
    ZOO_ROWS,
    bench_model,
    bench_spec,
    bench_torch,
    in_fresh_process,
    machine,
    read_saved_result,
    time_jax_training,
)

FLAGS = flags.FLAGS
MODELS = ("simple_cnn@28", "lenet5", "improved_cnn", "cifar_resnet20", "resnet18", "fast_cnn")
SIDES = {"backend": "cnnjax, CPU backend", "xla": "cnnjax, plain XLA", "torch": "PyTorch eager",
         "glibc": "cnnjax, CPU backend, CNNJAX_MALLOC=glibc"}
BACKEND_SWITCH = "CNNJAX_CPU_BACKEND"


def define_flags() -> None:
    """The command's flags (defined when it runs, not on import)."""
    flags.DEFINE_list("models", list(MODELS), "bench rows (NAME or NAME@SIZE); 'zoo' adds the later families' rows at "
                      "224 (run them with --batch 32)")
    flags.DEFINE_list("sides", ["backend", "xla", "torch"], f"sides to time, of {', '.join(SIDES)}")
    flags.DEFINE_integer("rounds", 3, "rounds over the sides; each cell is the median over them")
    flags.DEFINE_integer("steps", 20, "timed train steps per model")
    flags.DEFINE_integer("warmup", WARMUP_STEPS, "untimed train steps per model before the timed ones")
    flags.DEFINE_integer("batch", 128, "batch size")
    flags.DEFINE_string("out", "", "write the results as JSON here")
    flags.DEFINE_string("render", "", "print the table of this saved --out file and time nothing")


def side_env(side: str, environ: dict) -> dict:
    """The environment of ``side``'s process: ``environ`` with the CPU backend on (off for 'xla') and, for
    'glibc', without the allocator settings."""
    from cnnjax.cpu import process

    env = {k: v for k, v in environ.items() if k != BACKEND_SWITCH}
    if side == "xla":
        env[BACKEND_SWITCH] = "0"
    return process.without_allocator(env) if side == "glibc" else env


def cnnjax_img_s(names: list[str], batch: int, steps: int, warmup: int) -> dict:
    """Train images/s of cnnjax's step for each bench row of ``names`` in this process, and what ran them."""
    import jax

    from cnnjax import kernels

    img_s = {name: time_jax_training(bench_model(name), bench_spec(SHAPES[name]), SHAPES[name], batch, steps,
                                     warmup=warmup)["train_img_s"] for name in names}
    return {"img_s": img_s, "about": f"jax {jax.__version__}; {kernels.describe()}"}


def torch_img_s(names: list[str], batch: int, steps: int, warmup: int) -> dict:
    """Train images/s of PyTorch eager's twin step for each bench row of ``names`` in this process."""
    import torch

    img_s = {name: bench_torch(name, SHAPES[name], batch, steps, compiled=False, warmup=warmup,
                               modes=("train",))["train_img_s"] for name in names}
    return {"img_s": img_s, "about": f"torch {torch.__version__}, {torch.get_num_threads()} threads"}


def run_side(side: str, names: list[str], batch: int, steps: int, warmup: int) -> dict:
    """``side``'s figures from a fresh process of its own (see the module doc)."""
    function = torch_img_s if side == "torch" else cnnjax_img_s
    try:
        return in_fresh_process(function, names, batch, steps, warmup, env=side_env(side, dict(os.environ)))
    except RuntimeError as err:
        raise RuntimeError(f"side {side!r}: {err}") from None


def medians(rows: list[dict]) -> dict[str, dict[str, float]]:
    """``{side: {model: median images/s over the rounds}}`` of saved rows (one per side and round)."""
    by_side: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        for name, value in row["img_s"].items():
            by_side.setdefault(row["side"], {}).setdefault(name, []).append(value)
    return {side: {name: statistics.median(v) for name, v in models.items()} for side, models in by_side.items()}


def markdown(rows: list[dict], meta: dict) -> str:
    """The table of ``rows``: images/s per side, each cnnjax side's ratio to PyTorch eager (and the backend's to
    ``glibc``, where run), each ratio row with its geometric mean."""
    med, names = medians(rows), meta["models"]
    sides = [s for s in meta["sides"] if s in med]
    rounds = max((r["round"] for r in rows), default=0)
    lines = [f"Train step images/s at batch {meta['batch']}, median of {rounds} round(s) of {meta['steps']} steps; "
             f"{meta['machine']}; " + "; ".join(f"{s}: {meta['about'][s]}" for s in sides if s in meta["about"]), "",
             "| | " + " | ".join(names) + " | geometric mean |", "|---|" + "---:|" * (len(names) + 1)]
    lines += [f"| {SIDES[s]} | " + " | ".join(f"{med[s][n]:.0f}" for n in names) + " | |" for s in sides]
    ratios = [(f"{SIDES[s].removeprefix('cnnjax, ')} / PyTorch eager", s, "torch")
              for s in sides if s != "torch" and "torch" in sides]
    if "backend" in sides and "glibc" in sides:
        ratios.append(("allocator settings: CPU backend / CNNJAX_MALLOC=glibc", "backend", "glibc"))
    for label, a, b in ratios:
        values = [med[a][n] / med[b][n] for n in names]
        lines.append(f"| {label} | " + " | ".join(f"{v:.2f}x" for v in values)
                     + f" | **{statistics.geometric_mean(values):.2f}x** |")
    return "\n".join(lines)


def main(argv):
    del argv
    from cnnjax.io import write_json_atomic

    if FLAGS.render:
        saved = read_saved_result(FLAGS.render, "experiments.bench.cpu")
        print(markdown(saved["rows"], saved["meta"]))
        return
    models = [row for name in FLAGS.models for row in (ZOO_ROWS if name == "zoo" else (name,))]
    unknown = [n for n in models if n not in SHAPES] + [s for s in FLAGS.sides if s not in SIDES]
    if unknown or not FLAGS.models or not FLAGS.sides or FLAGS.rounds < 1 or FLAGS.steps < 1:
        raise UsageError(f"--models must name bench rows ({', '.join(SHAPES)}), --sides some of {', '.join(SIDES)}, "
                         f"--rounds and --steps be >= 1; got {unknown or 'an empty list or a count below 1'}")
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "command": " ".join(sys.argv),
            "models": models, "sides": list(FLAGS.sides), "batch": FLAGS.batch, "steps": FLAGS.steps,
            "warmup": FLAGS.warmup, "about": {}}
    rows: list[dict] = []
    for round_ in range(1, FLAGS.rounds + 1):
        for side in FLAGS.sides:  # alternated within the round: a slow spell hits every side
            result = run_side(side, models, FLAGS.batch, FLAGS.steps, FLAGS.warmup)
            rows.append({"round": round_, "side": side, "img_s": result["img_s"]})
            meta["about"][side] = result["about"]
            print(f"# round {round_}, {side}: " + ", ".join(f"{n} {v:.0f}" for n, v in result["img_s"].items()),
                  flush=True)
            if FLAGS.out:
                done = round_ == FLAGS.rounds and side == FLAGS.sides[-1]
                write_json_atomic(FLAGS.out, {"meta": meta, "rows": rows, "median": medians(rows), "complete": done})
                startup.install_rows_saved(FLAGS.out)
    print(markdown(rows, meta))


if __name__ == "__main__":
    define_flags()
    sys.exit(cli.run(main))
