"""Where one train step spends its time, cnnjax and PyTorch side by side, grouped by kind of work.

``python -m experiments.profile_step --models cifar_resnet20,improved_cnn [--batch 128] [--steps 5]
[--out FILE]`` prints one markdown table per model: ms per step and share for conv forward, conv
input-gradient, conv weight-gradient, BatchNorm, pooling, dense, layout transposes / copies, the
optimizer update, input preparation, loss and other elementwise work.

cnnjax: the real :class:`cnnjax.train.runner.Runner` step (the bench's setup: SGD momentum 0.9,
random uint8 data), traced with ``jax.profiler``; each XLA:CPU thunk of the trace is matched by
name to its instruction in the compiled HLO and classified by the Flax module path and named scope
in its metadata (``layer1_0/conv1``, ``optimizer``) and by its opcodes (convolution, dot,
reduce-window, transpose / copy). Backward work is what sits under ``transpose(jvp(...))``; a conv's
weight gradient is the one whose output is not batch-major.
PyTorch: the torch twin (tests/torch_models.py) in eager mode, ``torch.profiler`` self CPU time of
each aten op, classified by op name; ops inside ``Optimizer.step`` count as the optimizer. PyTorch's
CPU conv backward computes both gradients in one op, so its row is "conv input+weight gradient".

Thunks may run in parallel on the CPU's cores, so the summed ms can exceed the step's wall time;
the table gives both.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

from absl import flags

from experiments import cli
from experiments.benchlib import SHAPES

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["cifar_resnet20", "improved_cnn"], "rows of experiments.bench to profile")
flags.DEFINE_integer("batch", 128, "batch size")
flags.DEFINE_integer("steps", 5, "profiled steps (after warm-up)")
flags.DEFINE_bool("torch", True, "also profile the PyTorch twin")
flags.DEFINE_string("out", "", "write the tables as JSON here")

KINDS = ("conv forward", "conv input-gradient", "conv weight-gradient", "conv input+weight gradient", "BatchNorm",
         "pooling", "dense", "layout transposes / copies", "optimizer update", "input preparation", "loss",
         "other elementwise")

# --- cnnjax: HLO instructions -> kinds ----------------------------------------------------------

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def parse_hlo(text: str) -> tuple[dict, dict]:
    """``(instructions, computations)`` of an HLO module's text: instruction name -> ``{'op', 'shape',
    'op_name', 'calls'}``; computation name -> its instruction names."""
    instrs, comps, current = {}, collections.defaultdict(list), None
    for line in text.splitlines():
        head = _COMP.match(line)
        if head and "=" not in line.split("{")[0]:
            current = head.group(1)
            continue
        m = _INSTR.match(line)
        if not m or current is None:
            continue
        name, shape, op, rest = m.groups()
        op_name = re.search(r'op_name="([^"]*)"', rest)
        calls = re.search(r"calls=%?([\w.\-]+)", rest)
        instrs[name] = {"op": op, "shape": shape, "op_name": op_name.group(1) if op_name else "",
                        "calls": calls.group(1) if calls else None}
        comps[current].append(name)
    return instrs, comps


def _module_kind(op_name: str) -> str | None:
    parts = op_name.split("/")
    if "optimizer" in parts:
        return "optimizer update"
    if "input" in parts:
        return "input preparation"
    if "loss" in parts:
        return "loss"
    for part in reversed(parts):
        if re.match(r"(bn\d*|downsample_bn|norm\d*|BatchNorm_\d+)$", part):
            return "BatchNorm"
        if re.match(r"(fc\d*|classifier(_\d+)?|Dense_\d+|dense\d*|head)$", part):
            return "dense"
        if re.match(r"(max|avg)?pool\d*$", part):
            return "pooling"
    return None


def classify(name: str, instrs: dict, comps: dict, batch: int) -> str:
    """The kind of work of HLO instruction ``name`` (a fusion is classified by what it contains)."""
    info = instrs.get(name)
    if info is None:
        return "other elementwise"
    members = [info] + ([instrs[n] for n in comps.get(info["calls"], [])] if info["calls"] else [])
    ops = {m["op"] for m in members}
    op_names = [m["op_name"] for m in members if m["op_name"]]
    backward = any("transpose(" in n for n in op_names)
    convs = [m for m in members if m["op"] == "convolution" or (m["op"] == "dot" and _in_conv(m["op_name"]))]
    if convs:
        if not backward:
            return "conv forward"
        lead = re.search(r"\[(\d+)", convs[0]["shape"])
        batch_major = lead is not None and int(lead.group(1)) % batch == 0 and int(lead.group(1)) >= batch
        return "conv input-gradient" if batch_major else "conv weight-gradient"
    kinds = [k for k in (_module_kind(n) for n in op_names) if k]
    if ops & {"reduce-window", "select-and-scatter"}:
        return "pooling"
    if kinds:
        return collections.Counter(kinds).most_common(1)[0][0]
    if ops <= {"transpose", "copy", "bitcast", "parameter", "tuple", "get-tuple-element", "reshape"}:
        return "layout transposes / copies"
    return "other elementwise"


def _in_conv(op_name: str) -> bool:
    return any(re.match(r"(conv\d*|downsample_conv|whiten|Conv_\d+|features_\d+)$", p) for p in op_name.split("/"))


def _trace_events(trace_dir: str) -> list[dict]:
    path = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def profile_cnnjax(name: str, batch: int, steps: int) -> dict:
    """ms per step by kind for cnnjax's train step of bench row ``name``."""
    import jax
    import numpy as np
    import optax

    from cnnjax import models
    from cnnjax.train.runner import Runner
    from cnnjax.train.state import create_train_state
    from cnnjax.train.steps import StepSpec

    shape = SHAPES[name]
    model = models.create(name.split("@")[0], num_classes=10)
    spec = StepSpec(10, (0.5,) * shape[2], (0.25,) * shape[2])
    runner = Runner(spec, model.apply, scan=False)
    state = runner.put_state(create_train_state(model, optax.sgd(0.01, momentum=0.9), shape, jax.random.PRNGKey(0)))
    rng = np.random.RandomState(0)
    images, labels = runner.put_data(rng.randint(0, 256, (batch, *shape)).astype(np.uint8),
                                     rng.randint(0, 10, batch).astype(np.int32))
    idx = np.arange(batch).reshape(1, batch)
    for _ in range(2):  # compile, warm up
        state, m = runner.train(state, images, labels, idx)
        jax.block_until_ready(m)
    acc = runner._place({k: np.zeros((), np.float32) for k in ("loss_sum", "correct", "count", "pos")})
    hlo = runner._train.lower(state, acc, images, labels, runner.put_indices(idx)).compile().as_text()
    instrs, comps = parse_hlo(hlo)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            t = time.perf_counter()
            for _ in range(steps):
                state, m = runner.train(state, images, labels, idx)
            jax.block_until_ready(m)
            wall = (time.perf_counter() - t) / steps
        events = _trace_events(trace_dir)
    ms = collections.Counter()
    for e in events:
        if e["name"] in instrs:
            ms[classify(e["name"], instrs, comps, batch)] += e["dur"] / 1000 / steps
    return {"wall_ms": wall * 1000, "ms": dict(ms)}


# --- PyTorch: aten ops -> kinds -------------------------------------------------------------------

_TORCH_RULES = (
    (r"convolution_backward|conv.*backward", "conv input+weight gradient"),
    (r"mkldnn_convolution|_convolution|conv2d|slow_conv|convolution", "conv forward"),
    (r"batch_norm", "BatchNorm"),
    (r"pool", "pooling"),
    (r"addmm|\bmm\b|linear|matmul", "dense"),
    (r"copy_|contiguous|clone|::to$|_to_copy|permute|transpose|empty_like|as_strided", "layout transposes / copies"),
    (r"cross_entropy|log_softmax|nll_loss", "loss"),
)


def torch_kind(op: str) -> str:
    for pattern, kind in _TORCH_RULES:
        if re.search(pattern, op):
            return kind
    return "other elementwise"


def profile_torch(name: str, batch: int, steps: int) -> dict:
    """ms per step by kind (self CPU time) for the torch twin's eager train step."""
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from tests import torch_models

    shape = SHAPES[name]
    torch.manual_seed(0)
    model = torch_models.build(name.split("@")[0], num_classes=10).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.RandomState(0)
    images = torch.from_numpy(rng.randint(0, 256, (batch, shape[2], shape[0], shape[1])).astype(np.uint8))
    labels = torch.from_numpy(rng.randint(0, 10, batch).astype(np.int64))

    def step():
        with torch.profiler.record_function("input preparation"):
            x = (images.float() / 255.0 - 0.5) / 0.25
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - t) / steps
    events = list(prof.events())
    windows = [(e.time_range.start, e.time_range.end, "optimizer update" if e.name.startswith("Optimizer.step")
                else "input preparation") for e in events
               if e.name.startswith("Optimizer.step") or e.name == "input preparation"]
    ms = collections.Counter()
    for e in events:
        if not e.name.startswith("aten::") or e.self_cpu_time_total <= 0:
            continue
        kind = next((k for lo, hi, k in windows if lo <= e.time_range.start and e.time_range.end <= hi), None)
        ms[kind or torch_kind(e.name)] += e.self_cpu_time_total / 1000 / steps
    return {"wall_ms": wall * 1000, "ms": dict(ms)}


# --- tables -------------------------------------------------------------------------------------


def table(name: str, ours: dict, theirs: dict | None) -> str:
    def cells(result, kind):
        if result is None:
            return ["", ""]
        total = sum(result["ms"].values())
        v = result["ms"].get(kind, 0.0)
        return [f"{v:.1f}", f"{100 * v / total:.0f}%"] if v else ["-", ""]

    lines = [f"**{name}**, batch {FLAGS.batch}: step wall time cnnjax {ours['wall_ms']:.1f} ms"
             + (f", PyTorch eager {theirs['wall_ms']:.1f} ms" if theirs else ""), "",
             "| kind | cnnjax ms/step | share | PyTorch ms/step | share |", "|---|---:|---:|---:|---:|"]
    for kind in KINDS:
        row = cells(ours, kind) + cells(theirs, kind)
        if any(c not in ("", "-") for c in row):
            lines.append(f"| {kind} | " + " | ".join(row) + " |")
    sums = [f"{sum(r['ms'].values()):.1f}" if r else "" for r in (ours, theirs)]
    lines.append(f"| **sum of op times** | {sums[0]} | | {sums[1]} | |")
    return "\n".join(lines)


def main(argv):
    del argv
    results = {}
    for name in FLAGS.models:
        if name not in SHAPES:
            raise cli.errors.UsageError(f"unknown bench row {name!r}; choose from {', '.join(SHAPES)}")
        ours = profile_cnnjax(name, FLAGS.batch, FLAGS.steps)
        theirs = profile_torch(name, FLAGS.batch, FLAGS.steps) if FLAGS.torch else None
        results[name] = {"cnnjax": ours, "torch": theirs}
        print(table(name, ours, theirs) + "\n", flush=True)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "batch": FLAGS.batch, "steps": FLAGS.steps, "models": results},
                      f, indent=2)


if __name__ == "__main__":
    sys.exit(cli.run(main))
