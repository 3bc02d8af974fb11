"""Where one train step spends its time, op by op, cnnjax and PyTorch eager side by side.

``python -m experiments.bench.profile --models cifar_resnet20,improved_cnn [--batch 128] [--fused] [--out FILE]``
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
in a process of its own (:func:`experiments.bench.lib.in_fresh_process`).
Convolution arithmetic (with ``--torch``): each model's conv GFLOP per step, counted on the twin's convs
(:func:`conv_gflop`), over each side's ms per kind of conv work, beside a float32 ``[2048, 2048]`` matmul
timed in each side's process; ``--fused`` gives the oneDNN convolutions' GFLOP/s in the compiled step.
"""

from __future__ import annotations

import sys

# ruff: noqa: E402  (the program's first steps below come before its imports)
if __name__ == "__main__":  # first: SIGTERM / Ctrl-C is one line and status 75 from here on (experiments.startup)
    from experiments import startup

    startup.begin(compile_cache=False)  # the signal handler, the process settings; compiles timed uncached

import collections
import json
import re
import statistics
import tempfile
import time

from absl import flags

from cnnjax.errors import UsageError
from experiments import cli
from experiments.bench.lib import PRECISIONS, SHAPES, bench_model, bench_torch_model, in_fresh_process

FLAGS = flags.FLAGS
KINDS = ("conv forward", "conv input-gradient", "conv weight-gradient", "conv input+weight gradient", "BatchNorm",
         "pooling", "dense", "layout transposes / copies", "optimizer update", "input preparation", "loss",
         "other elementwise")
_LAYOUT_PRIMS = {"transpose", "copy", "copy_p", "reshape", "squeeze", "expand_dims", "broadcast_in_dim",
                 "convert_element_type", "rev", "pad", "slice", "concatenate", "dynamic_slice", "gather"}

# --- cnnjax: jaxpr primitives -> kinds ----------------------------------------------------------


def _scope_kind(name_stack: str) -> str | None:
    parts = re.split(r"[/()]", name_stack)
    if "optimizer" in parts:
        return "optimizer update"
    if "input" in parts:
        return "input preparation"
    if "loss" in parts:
        return "loss"
    for part in reversed(parts):
        if re.fullmatch(r"bn\d*|downsample_bn|norm\d*|BatchNorm_\d+", part):
            return "BatchNorm"
        if re.fullmatch(r"fc\d*|classifier(_\d+)?|Dense_\d+|dense\d*|head", part):
            return "dense"
        if re.fullmatch(r"(max|avg)?pool\d*|MaxPool_\d+|AvgPool_\d+", part):
            return "pooling"
    return None


def _in_conv(name_stack: str) -> bool:
    return any(re.fullmatch(r"conv\d*|downsample_conv|whiten|Conv_\d+|features_\d+", p)
               for p in re.split(r"[/()]", name_stack))


def op_kind(primitive: str, name_stack: str, out_shape: tuple, batch: int) -> str:
    """The kind of work of one jaxpr equation."""
    # dot_general: the patches path; ffi_call: the CPU backend's oneDNN convolutions (cnnjax.cpu); custom_vjp_call:
    # the forward of a conv with a gradient of its own (the CPU backend's oneDNN and shifted-sum paths)
    conv = primitive == "conv_general_dilated" or (
        primitive in ("dot_general", "ffi_call", "custom_vjp_call") and _in_conv(name_stack))
    if conv:
        if "transpose(" not in name_stack:
            return "conv forward"
        batch_major = bool(out_shape) and out_shape[0] % batch == 0 and out_shape[0] >= batch
        return "conv input-gradient" if batch_major else "conv weight-gradient"
    kind = _scope_kind(name_stack)
    if kind:
        return kind
    if primitive in ("reduce_window_max", "reduce_window", "select_and_scatter_add", "reduce_window_sum"):
        return "pooling"
    if primitive in _LAYOUT_PRIMS:
        return "layout transposes / copies"
    return "other elementwise"


def time_jaxpr_ops(fn, args, batch: int, reps: int) -> dict:
    """Run ``fn(*args)``'s jaxpr one equation at a time (each jitted alone, timed to completion, median of
    ``reps``); returns ms by kind. A ``cond`` on the platform (:mod:`cnnjax.kernels`' seam) runs its branch for
    this platform, one equation at a time too."""
    import jax

    closed = jax.make_jaxpr(fn)(*args)
    ms: collections.Counter = collections.Counter()
    _run_ops(closed.jaxpr, closed.consts, jax.tree_util.tree_leaves(args), "", batch, reps, ms)
    return dict(ms)


def _run_ops(jaxpr, consts: list, args: list, scope: str, batch: int, reps: int, ms: collections.Counter) -> list:
    """The outputs of ``jaxpr`` on ``args``, each equation timed alone into ``ms`` (see :func:`time_jaxpr_ops`);
    ``scope`` is the name stack the jaxpr runs under."""
    import jax.extend as jex

    env = dict(zip(jaxpr.invars, args, strict=True)) | dict(zip(jaxpr.constvars, consts, strict=True))
    read = lambda v: v.val if isinstance(v, jex.core.Literal) else env[v]  # noqa: E731
    platform_indices = set()
    for eqn in jaxpr.eqns:
        name_stack = "/".join(p for p in (scope, str(eqn.source_info.name_stack)) if p)
        outs = [v for v in eqn.outvars if not isinstance(v, jex.core.DropVar)]
        if eqn.primitive.name == "cond" and eqn.invars[0] in platform_indices:
            branch = eqn.params["branches"][int(read(eqn.invars[0]))]
            results = _run_ops(branch.jaxpr, branch.consts, [read(v) for v in eqn.invars[1:]], name_stack, batch,
                               reps, ms)
            env.update((v, r) for v, r in zip(eqn.outvars, results, strict=True) if v in outs)
            continue
        if eqn.primitive.name == "platform_index":
            platform_indices.update(outs)
        ins = list(dict.fromkeys(v for v in eqn.invars if isinstance(v, jex.core.Var)))
        results, seconds = _time_eqn(eqn, ins, outs, [env[v] for v in ins], reps)
        env.update(zip(outs, results, strict=True))
        shape = tuple(eqn.outvars[0].aval.shape) if eqn.outvars and hasattr(eqn.outvars[0].aval, "shape") else ()
        ms[op_kind(eqn.primitive.name, name_stack, shape, batch)] += 1000 * seconds
    return [read(v) for v in jaxpr.outvars]


def _time_eqn(eqn, ins: list, outs: list, values: list, reps: int) -> tuple[list, float]:
    """``(outputs, median seconds of reps calls)`` of one equation, jitted alone (after a compile call)."""
    import jax
    import jax.extend as jex

    info = jex.core.DebugInfo("profile", eqn.primitive.name, tuple(f"x{i}" for i in range(len(ins))),
                              tuple(f"y{i}" for i in range(len(outs))))
    one = jex.core.Jaxpr(constvars=[], invars=ins, outvars=outs, eqns=[eqn], debug_info=info)
    call = jax.jit(jex.core.jaxpr_as_fun(jex.core.ClosedJaxpr(one, [])))
    results = jax.block_until_ready(call(*values))  # compile
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(call(*values))
        times.append(time.perf_counter() - t)
    return results, statistics.median(times)


def _step_inputs(name: str, batch: int, precision: str = "fp32") -> tuple:
    """``(model, spec, state, images, labels)`` for bench row ``name``: the bench's step in ``precision``, an SGD
    momentum 0.9 state (seed 0) and a random uint8 batch ``[batch, H, W, C]`` with labels, on the device."""
    import jax
    import numpy as np
    import optax

    from cnnjax.train.state import create_train_state
    from experiments.bench.lib import bench_spec

    shape = SHAPES[name]
    model, spec = bench_model(name), bench_spec(shape, precision)
    state = create_train_state(model, optax.sgd(0.01, momentum=0.9), shape, jax.random.PRNGKey(0))
    rng = np.random.RandomState(0)
    images = jax.numpy.asarray(rng.randint(0, 256, (batch, *shape)).astype(np.uint8))
    labels = jax.numpy.asarray(rng.randint(0, spec.num_classes, batch).astype(np.int32))
    return model, spec, state, images, labels


def profile_cnnjax(name: str, batch: int, reps: int) -> dict:
    """Per-op ms by kind of cnnjax's train step for bench row ``name``, and the fused step's wall ms."""
    from cnnjax.train.steps import train_step
    from experiments.bench.lib import time_jax_training

    model, spec, state, images, labels = _step_inputs(name, batch)
    fused = time_jax_training(model, spec, SHAPES[name], batch, steps=5)
    ms = time_jaxpr_ops(lambda s, x, y: train_step(s, x, y, spec), (state, images, labels), batch, reps)
    return {"wall_ms": 1000 * batch / fused["train_img_s"], "ms": ms, "matmul_gflop_s": jax_matmul_gflop_s()}


# --- cnnjax: the fused step's XLA:CPU thunks --------------------------------------------------------

FUSED_KINDS = ("convolutions (asynchronous: launch only)", "oneDNN convolutions", "layout transposes / copies",
               "conv as dots / patches", "BatchNorm", "pooling", "dense", "optimizer update", "input preparation",
               "loss", "other elementwise")


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
    """``{instruction name: (opcode, metadata op_name or '')}`` of the entry computation of compiled HLO text."""
    entry = hlo_text.split("\nENTRY ", 1)[-1]
    out = {}
    for line in entry.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*? ([a-z][\w\-]*)\(", line)
        if m:
            op_name = re.search(r'op_name="([^"]*)"', line)
            out[m.group(1)] = (m.group(2), op_name.group(1) if op_name else "")
    return out


def thunk_kind(name: str, opcode: str, op_name: str) -> str:
    """The kind of work of one thunk of the fused step (an HLO instruction of the entry computation)."""
    if opcode == "convolution":
        return FUSED_KINDS[0]
    if opcode == "custom-call" and _in_conv(op_name):
        return "oneDNN convolutions"
    if re.match(r"(transpose|copy|bitcast_copy)", name) or opcode in ("copy", "transpose"):
        return "layout transposes / copies"
    if _in_conv(op_name):
        return "conv as dots / patches"
    return _scope_kind(op_name) or ("pooling" if "reduce-window" in opcode else "other elementwise")


def profile_fused(name: str, batch: int, steps: int, trace_dir: str, precision: str = "fp32") -> dict:
    """ms per step of each XLA:CPU thunk of cnnjax's jitted train step for bench row ``name`` in ``precision``
    (fp32 | bf16), from a ``jax.profiler`` trace of ``steps`` steps written under ``trace_dir``, with the step's
    wall ms.

    Thunks that run on the calling thread are timed in full; XLA:CPU's convolutions run asynchronously,
    so for them the trace holds the launch only; their work overlaps the other thunks and shows only where it
    leaves ``wall_ms`` uncovered."""
    import glob
    import gzip
    import json

    import jax

    from cnnjax.train.steps import train_step

    _, spec, state, images, labels = _step_inputs(name, batch, precision)
    step = jax.jit(lambda s, x, y: train_step(s, x, y, spec)[0], donate_argnums=0)
    step = step.lower(state, images, labels).compile()
    instructions = hlo_instructions(step.as_text())
    for _ in range(2):  # warm-up
        state = step(state, images, labels)
    jax.block_until_ready(state)
    t = time.perf_counter()
    for _ in range(steps):
        state = step(state, images, labels)
    jax.block_until_ready(state)
    wall_ms = 1000 * (time.perf_counter() - t) / steps
    jax.profiler.start_trace(trace_dir)
    try:
        for _ in range(steps):
            state = step(state, images, labels)
        jax.block_until_ready(state)
    finally:
        jax.profiler.stop_trace()
    traces = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))
    if not traces:
        raise RuntimeError(f"jax.profiler wrote no trace under {trace_dir}")
    with gzip.open(traces[-1]) as f:
        events = json.load(f)["traceEvents"]
    ms = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in instructions:
            ms[e["name"]] += e["dur"] / 1000 / steps
    return {"wall_ms": wall_ms, "ms": dict(ms),
            "kinds": {n: thunk_kind(n, *instructions[n]) for n in ms},
            "op_names": {n: instructions[n][1] for n in ms}, "matmul_gflop_s": jax_matmul_gflop_s()}


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


    shape = SHAPES[name]
    torch.manual_seed(0)
    model = bench_torch_model(name).train()
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
    return {"wall_ms": wall * 1000, "ms": dict(ms), "matmul_gflop_s": torch_matmul_gflop_s()}


# --- convolution arithmetic and the CPU's matmul rate --------------------------------------------

CONV_WORK = ("conv forward", "conv input-gradient", "conv weight-gradient")


def conv_gflop(name: str, batch: int) -> dict[str, float]:
    """GFLOP per train step of bench row ``name``'s convolutions at ``batch``, by kind of :data:`CONV_WORK`.

    Counted on the torch twin's ``nn.Conv2d`` modules in one forward pass: ``2 * N * Ho * Wo * O * I/groups * KH *
    KW`` per forward, and as much again for each gradient the step computes (an input gradient where the conv's
    input needs one, a kernel gradient where the kernel trains). cnnjax's step computes the same gradients (the
    twins are parity-tested); bias additions are not counted."""
    import torch

    model = bench_torch_model(name).train()
    shape = SHAPES[name]
    gflop = dict.fromkeys(CONV_WORK, 0.0)

    def count(conv, inputs, output):
        n, o, ho, wo = output.shape
        kh, kw = conv.kernel_size
        forward = 2 * n * ho * wo * o * (conv.in_channels // conv.groups) * kh * kw / 1e9
        gflop["conv forward"] += forward
        gflop["conv input-gradient"] += forward if inputs[0].requires_grad else 0.0
        gflop["conv weight-gradient"] += forward if conv.weight.requires_grad else 0.0

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        model(torch.zeros(batch, shape[2], shape[0], shape[1]))
    finally:
        for h in hooks:
            h.remove()
    return gflop


def _median_gflop_s(run, flop: float, reps: int) -> float:
    run()  # warm-up (and compilation)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return flop / statistics.median(times) / 1e9


def jax_matmul_gflop_s(n: int = 2048, reps: int = 5) -> float:
    """float32 GFLOP/s of XLA's ``[n, n] @ [n, n]`` on the default device, median of ``reps``."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    return _median_gflop_s(lambda: dot(a, a).block_until_ready(), 2.0 * n**3, reps)


def torch_matmul_gflop_s(n: int = 2048, reps: int = 5) -> float:
    """float32 GFLOP/s of torch's CPU ``[n, n] @ [n, n]`` (MKL's sgemm in the CPU wheel), median of ``reps``."""
    import torch

    a = torch.randn(n, n)
    return _median_gflop_s(lambda: a @ a, 2.0 * n**3, reps)


def arithmetic_table(gflop: dict, ours: dict, theirs: dict | None) -> str:
    """GFLOP/s of each kind of conv work: the twin's counted GFLOP over each side's ms for that kind."""
    both = gflop["conv input-gradient"] + gflop["conv weight-gradient"]
    rows = [("conv forward", gflop["conv forward"], ("conv forward",), ("conv forward",)),
            ("conv input-gradient", gflop["conv input-gradient"], ("conv input-gradient",), ()),
            ("conv weight-gradient", gflop["conv weight-gradient"], ("conv weight-gradient",), ()),
            ("conv input+weight gradient", both, ("conv input-gradient", "conv weight-gradient"),
             ("conv input+weight gradient",))]

    def rate(result, kinds, g):
        ms = sum(result["ms"].get(k, 0.0) for k in kinds) if result and kinds else 0.0
        return f"{g / ms * 1000:.0f}" if ms > 0 and g > 0 else "-"

    lines = ["Convolution arithmetic: GFLOP per step counted on the twin's convolutions, over each side's ms above", "",
             "| conv work | GFLOP/step | cnnjax GFLOP/s | PyTorch eager GFLOP/s |", "|---|---:|---:|---:|"]
    lines += [f"| {label} | {g:.2f} | {rate(ours, mine, g)} | {rate(theirs, twin, g)} |"
              for label, g, mine, twin in rows]
    mm = [f"XLA {ours['matmul_gflop_s']:.0f} GFLOP/s"] + (
        [f"torch (MKL) {theirs['matmul_gflop_s']:.0f} GFLOP/s"] if theirs else [])
    lines += ["", "float32 [2048, 2048] matmul, each in its side's process: " + ", ".join(mm)]
    return "\n".join(lines)


def fused_conv_rate(result: dict, gflop: dict) -> str:
    """One line: the fused step's oneDNN convolutions' GFLOP/s against XLA's float32 matmul in the same process."""
    kinds, ms = result["kinds"], result["ms"]
    if FUSED_KINDS[0] in kinds.values():
        return "Convolution arithmetic: XLA's convolutions run asynchronously, their time is not in the trace"
    conv_ms = sum(v for n, v in ms.items() if kinds[n] == "oneDNN convolutions")
    total = sum(gflop.values())
    if conv_ms <= 0:
        return "Convolution arithmetic: no oneDNN convolutions in this step"
    return (f"Convolution arithmetic: {total:.2f} GFLOP per step (forward {gflop['conv forward']:.2f}, input gradients "
            f"{gflop['conv input-gradient']:.2f}, kernel gradients {gflop['conv weight-gradient']:.2f}; counted on "
            f"the torch twin) in {conv_ms:.1f} ms of oneDNN convolutions: {total / conv_ms * 1000:.0f} GFLOP/s; "
            f"XLA's float32 [2048, 2048] matmul in this process: {result['matmul_gflop_s']:.0f} GFLOP/s")


# --- the command ------------------------------------------------------------------------------------


def define_flags() -> None:
    """The command's flags (defined when it runs, not on import)."""
    flags.DEFINE_list("models", ["cifar_resnet20", "improved_cnn"], "bench rows (NAME or NAME@SIZE) to profile")
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
            with tempfile.TemporaryDirectory(prefix="profile_") as trace_dir:
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
    define_flags()
    sys.exit(cli.run(main))
