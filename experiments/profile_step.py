"""Where one train step spends its time, op by op, cnnjax and PyTorch eager side by side.

``python -m experiments.profile_step --models cifar_resnet20,improved_cnn [--batch 128] [--fused] [--out FILE]``
prints one markdown table per model: ms per step and share for conv forward, conv input-gradient,
conv weight-gradient, BatchNorm, pooling, dense, layout transposes / copies, the optimizer update,
input preparation, loss and other elementwise work.

cnnjax: the train step (:func:`cnnjax.train.steps.train_step`, the bench's setup: SGD momentum 0.9,
random uint8 data) is traced to a jaxpr and run one primitive at a time, each compiled on its own and
timed to completion (median of ``--reps``): per-op times as PyTorch eager has them, without XLA's
fusion. (XLA:CPU's profiler trace cannot be used for this: it times the launch of its asynchronous
conv thunks, not their work.) An op's kind comes from the Flax module path and named scope in its name
stack (``layer1_0/bn1``, ``optimizer``); backward ops sit under ``transpose(jvp(...))``; a conv's (or
im2col matmul's) weight gradient is the one whose output is not batch-major. The fused step's wall
time is given beside it: the gap between the two is what fusion saves (or, for XLA's layout choices,
costs).
``--fused``: the compiled step as it really runs instead. A ``jax.profiler`` trace times each XLA:CPU
thunk (a fusion, a YNN dot, a copy), which is named by its HLO instruction and grouped by kind from that
instruction and its module path; the largest thunks are listed with their path. XLA:CPU runs
convolutions asynchronously, alongside the other thunks, so their rows hold the launch only and their
work shows only where it leaves the wall time uncovered (the last row: wall minus the timed thunks).
This is where XLA's fusion decisions show, such as a transpose that recomputes the activations it
moves instead of reading them. ``--precision bf16`` profiles the bfloat16 step of ``mixed_precision``
(fused only): ``--fused --precision bf16 --batch 512 --models fast_cnn@28,fast_cnn@28+residual`` is the
net and precision of ``fashion_mnist_30min`` and ``fashion_mnist_30min_residual`` (with the bench's SGD momentum, not
their optimizer, and random data).
PyTorch: the torch twin (experiments/bench/torch_twins.py) in eager mode, ``torch.profiler`` self CPU time of
each aten op, classified by op name; ops inside ``Optimizer.step`` count as the optimizer. PyTorch's
CPU conv backward computes both gradients in one op, so its row is "conv input+weight gradient". It runs
in a process of its own, where cnnjax's oneDNN kernels have not run (``experiments.benchlib.in_fresh_process``).
Convolution arithmetic (with ``--torch``): each model's conv GFLOP per step, counted on the twin's convs
(``profilelib.conv_gflop``), over each side's ms per kind of conv work, beside a float32 ``[2048, 2048]`` matmul
timed in each side's process; ``--fused`` gives the oneDNN convolutions' GFLOP/s in the compiled step.
"""

from __future__ import annotations

import json
import sys
import tempfile

from absl import flags

from cnnjax.errors import UsageError
from experiments import cli
from experiments.benchlib import PRECISIONS, SHAPES, in_fresh_process
from experiments.profilelib import (
    FUSED_KINDS,
    KINDS,
    arithmetic_table,
    conv_gflop,
    fused_conv_rate,
    profile_cnnjax,
    profile_fused,
    profile_torch,
)

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["cifar_resnet20", "improved_cnn"], "rows of experiments.bench to profile")
flags.DEFINE_integer("batch", 128, "batch size")
flags.DEFINE_integer("reps", 3, "timed runs of each op (median) / profiled torch steps")
flags.DEFINE_bool("torch", True, "also profile the PyTorch twin and count conv GFLOP on it")
flags.DEFINE_bool("fused", False, "profile the compiled step's XLA thunks (jax.profiler) instead of op by op")
flags.DEFINE_integer("steps", 10, "--fused: traced steps")
flags.DEFINE_integer("top", 10, "--fused: largest thunks listed")
flags.DEFINE_string("out", "", "write the tables as JSON here")
flags.DEFINE_enum("precision", "fp32", list(PRECISIONS), "--fused: the step's compute precision (bf16: "
                  "mixed_precision, as fashion_mnist_30min)")


def table(name: str, ours: dict, theirs: dict | None) -> str:
    def cells(result, kind):
        if result is None:
            return ["", ""]
        total = sum(result["ms"].values())
        v = result["ms"].get(kind, 0.0)
        return [f"{v:.1f}", f"{100 * v / total:.0f}%"] if v else ["-", ""]

    lines = [f"**{name}**, batch {FLAGS.batch}: step wall time cnnjax {ours['wall_ms']:.1f} ms (fused by XLA)"
             + (f", PyTorch eager {theirs['wall_ms']:.1f} ms" if theirs else ""), "",
             "| kind | cnnjax ms/step (op by op) | share | PyTorch eager ms/step | share |",
             "|---|---:|---:|---:|---:|"]
    for kind in KINDS:
        row = cells(ours, kind) + cells(theirs, kind)
        if any(c not in ("", "-") for c in row):
            lines.append(f"| {kind} | " + " | ".join(row) + " |")
    sums = [f"{sum(r['ms'].values()):.1f}" if r else "" for r in (ours, theirs)]
    lines.append(f"| **sum of op times** | {sums[0]} | | {sums[1]} | |")
    return "\n".join(lines)


def fused_table(name: str, result: dict, top: int) -> str:
    ms, kinds, wall = result["ms"], result["kinds"], result["wall_ms"]
    timed = sum(ms.values())
    by_kind = {k: sum(v for n, v in ms.items() if kinds[n] == k) for k in FUSED_KINDS}
    counts = {k: sum(kinds[n] == k for n in ms) for k in FUSED_KINDS}
    lines = [f"**{name}**, batch {FLAGS.batch}, the fused step: wall {wall:.1f} ms; the thunks timed in full sum to "
             f"{timed:.1f} ms; the asynchronous convolutions run alongside them", "",
             "| kind | ms/step | share of wall | thunks |", "|---|---:|---:|---:|"]
    for kind in FUSED_KINDS:
        if counts[kind]:
            lines.append(f"| {kind} | {by_kind[kind]:.1f} | {100 * by_kind[kind] / wall:.0f}% | {counts[kind]} |")
    lines.append(f"| wall time the timed thunks leave uncovered (convolutions, waits) | {wall - timed:.1f} | "
                 f"{100 * (wall - timed) / wall:.0f}% | |")
    lines += ["", f"Largest {top} thunks:", "", "| thunk | kind | ms/step | module path |", "|---|---|---:|---|"]
    for n, v in sorted(ms.items(), key=lambda kv: -kv[1])[:top]:
        path = result["op_names"][n].removeprefix("jit(<lambda>)/") or "(none: XLA-made)"
        lines.append(f"| `{n}` | {kinds[n]} | {v:.1f} | `{path}` |")
    return "\n".join(lines)


def main(argv):
    del argv
    if FLAGS.precision != "fp32" and not FLAGS.fused:
        raise UsageError(f"--precision={FLAGS.precision} profiles the fused step only: add --fused")
    results = {}
    for name in FLAGS.models:
        if name not in SHAPES:
            raise UsageError(f"unknown bench row {name!r}; choose from {', '.join(SHAPES)}")
        gflop = in_fresh_process(conv_gflop, name, FLAGS.batch) if FLAGS.torch else None
        if FLAGS.fused:
            with tempfile.TemporaryDirectory(prefix="profile_step_") as trace_dir:
                results[name] = profile_fused(name, FLAGS.batch, FLAGS.steps, trace_dir, FLAGS.precision)
            results[name]["conv_gflop"] = gflop
            rate = "\n\n" + fused_conv_rate(results[name], gflop) if gflop else ""
            print(fused_table(name, results[name], FLAGS.top) + rate + "\n", flush=True)
            continue
        ours = profile_cnnjax(name, FLAGS.batch, FLAGS.reps)
        theirs = in_fresh_process(profile_torch, name, FLAGS.batch, FLAGS.reps) if FLAGS.torch else None
        results[name] = {"cnnjax": ours, "torch": theirs, "conv_gflop": gflop}
        rate = "\n\n" + arithmetic_table(gflop, ours, theirs) if gflop else ""
        print(table(name, ours, theirs) + rate + "\n", flush=True)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "batch": FLAGS.batch, "precision": FLAGS.precision,
                       "reps": FLAGS.reps, "models": results}, f, indent=2)


if __name__ == "__main__":
    sys.exit(cli.run(main))
