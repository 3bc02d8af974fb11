"""Where one train step spends its time, op by op, cnnjax and PyTorch eager side by side.

``python -m experiments.profile_step --models cifar_resnet20,improved_cnn [--batch 128] [--out FILE]``
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
PyTorch: the torch twin (tests/torch_models.py) in eager mode, ``torch.profiler`` self CPU time of
each aten op, classified by op name; ops inside ``Optimizer.step`` count as the optimizer. PyTorch's
CPU conv backward computes both gradients in one op, so its row is "conv input+weight gradient".
"""

from __future__ import annotations

import collections
import json
import re
import statistics
import sys
import time

from absl import flags

from cnnjax.errors import UsageError
from experiments import cli
from experiments.benchlib import SHAPES

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["cifar_resnet20", "improved_cnn"], "rows of experiments.bench to profile")
flags.DEFINE_integer("batch", 128, "batch size")
flags.DEFINE_integer("reps", 3, "timed runs of each op (median) / profiled torch steps")
flags.DEFINE_bool("torch", True, "also profile the PyTorch twin")
flags.DEFINE_string("out", "", "write the tables as JSON here")

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
    conv = primitive == "conv_general_dilated" or (primitive == "dot_general" and _in_conv(name_stack))
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
    ``reps``); returns ms by kind."""
    import jax
    import jax.extend as jex

    closed = jax.make_jaxpr(fn)(*args)
    env = dict(zip(closed.jaxpr.invars, jax.tree_util.tree_leaves(args), strict=True))
    env.update(zip(closed.jaxpr.constvars, closed.consts, strict=True))
    ms = collections.Counter()
    for eqn in closed.jaxpr.eqns:
        ins = list(dict.fromkeys(v for v in eqn.invars if isinstance(v, jex.core.Var)))
        outs = [v for v in eqn.outvars if not isinstance(v, jex.core.DropVar)]
        info = jex.core.DebugInfo("profile_step", eqn.primitive.name, tuple(f"x{i}" for i in range(len(ins))),
                                  tuple(f"y{i}" for i in range(len(outs))))
        one = jex.core.Jaxpr(constvars=[], invars=ins, outvars=outs, eqns=[eqn], debug_info=info)
        call = jax.jit(jex.core.jaxpr_as_fun(jex.core.ClosedJaxpr(one, [])))
        values = [env[v] for v in ins]
        results = jax.block_until_ready(call(*values))  # compile
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            jax.block_until_ready(call(*values))
            times.append(time.perf_counter() - t)
        env.update(zip(outs, results, strict=True))
        shape = tuple(eqn.outvars[0].aval.shape) if eqn.outvars and hasattr(eqn.outvars[0].aval, "shape") else ()
        ms[op_kind(eqn.primitive.name, str(eqn.source_info.name_stack), shape, batch)] += \
            1000 * statistics.median(times)
    return dict(ms)


def profile_cnnjax(name: str, batch: int, reps: int) -> dict:
    """Per-op ms by kind of cnnjax's train step for bench row ``name``, and the fused step's wall ms."""
    import jax
    import numpy as np
    import optax

    from cnnjax import models
    from cnnjax.train.state import create_train_state
    from cnnjax.train.steps import StepSpec, train_step
    from experiments.benchlib import time_jax_training

    shape = SHAPES[name]
    model = models.create(name.split("@")[0], num_classes=10)
    spec = StepSpec(10, (0.5,) * shape[2], (0.25,) * shape[2])
    fused = time_jax_training(model, spec, shape, batch, steps=5)
    state = create_train_state(model, optax.sgd(0.01, momentum=0.9), shape, jax.random.PRNGKey(0))
    rng = np.random.RandomState(0)
    images = jax.numpy.asarray(rng.randint(0, 256, (batch, *shape)).astype(np.uint8))
    labels = jax.numpy.asarray(rng.randint(0, 10, batch).astype(np.int32))
    ms = time_jaxpr_ops(lambda s, x, y: train_step(s, x, y, spec), (state, images, labels), batch, reps)
    return {"wall_ms": 1000 * batch / fused["train_img_s"], "ms": ms}


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


def main(argv):
    del argv
    results = {}
    for name in FLAGS.models:
        if name not in SHAPES:
            raise UsageError(f"unknown bench row {name!r}; choose from {', '.join(SHAPES)}")
        ours = profile_cnnjax(name, FLAGS.batch, FLAGS.reps)
        theirs = profile_torch(name, FLAGS.batch, FLAGS.reps) if FLAGS.torch else None
        results[name] = {"cnnjax": ours, "torch": theirs}
        print(table(name, ours, theirs) + "\n", flush=True)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "batch": FLAGS.batch, "reps": FLAGS.reps, "models": results},
                      f, indent=2)


if __name__ == "__main__":
    sys.exit(cli.run(main))
