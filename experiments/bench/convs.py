"""Each convolution and max-pool of the bench models alone: the CPU backend against plain XLA and PyTorch eager.

``python -m experiments.bench.convs [--models M,...] [--only conv|pool] [--grouped] [--batch 128] [--steps 10]``

For each bench model, every distinct conv of its train-mode forward (read from the model itself, in call order,
with its calls per forward): forward and forward+backward milliseconds through the CPU backend
(``cnnjax.conv.conv2d(..., impl='cpu')``, the path :class:`cnnjax.cpu.rules.Rules` picks for it), plain XLA
(``impl='xla'``) and PyTorch eager (``nn.Conv2d``, NCHW, in a process of its own); the first conv of a model
computes no input gradient, as in a train step. The last row sums each column over one train step (times the calls
per step). ``--grouped`` times only the grouped convs (groups > 1, depthwise ones included) and adds, for depthwise
convs, a pure-JAX sum over the kernel taps of shifted input views times per-channel weights
(:func:`depthwise_shifted_sum`, JAX's gradients), the alternative to oneDNN's grouped primitives that
:class:`cnnjax.cpu.rules.Rules` was measured against, and the CPU backend's fwd+bwd with the other of its two
depthwise kernel gradients (oneDNN's primitive or cnnjax's loop); the grouped convs of the zoo at ImageNet's size:
``python -m experiments.bench.convs --models mobilenet_v2@224,efficientnet_b0@224,convnext_tiny@224,regnet_y_400mf@224
--grouped --only conv --batch 32 --steps 3``. ``--only pool`` times the models' max-pools (after a ReLU, so with
ties) the same way: plain XLA's ``reduce_window``, the CPU backend's pick, its strided views and oneDNN's kernels,
and PyTorch's ``MaxPool2d``.
Random float32 data, no bias; each number is the fastest of ``--steps`` calls after a compile call. The rules'
docstrings name this command: it is how a path rule is measured.
"""

from __future__ import annotations

import sys

# ruff: noqa: E402  (the program's first steps below come before its imports)
if __name__ == "__main__":  # first: SIGTERM / Ctrl-C is one line and status 75 from here on (experiments.startup)
    from experiments import startup

    startup.begin(compile_cache=False)  # the signal handler, the process settings; compiles timed uncached

from absl import flags

from experiments import cli
from experiments.bench.lib import SHAPES, bench_model, fastest_ms, in_fresh_process

FLAGS = flags.FLAGS
MODELS = ("simple_cnn@28", "lenet5", "improved_cnn", "cifar_resnet20", "resnet18", "fast_cnn")


def define_flags() -> None:
    """The command's flags (defined when it runs, not on import)."""
    flags.DEFINE_list("models", list(MODELS), "bench rows whose convs and pools to time")
    flags.DEFINE_enum("only", "all", ["all", "conv", "pool"], "which tables to time")
    flags.DEFINE_bool("grouped", False, "time only the grouped convs, with a depthwise shifted-sum column")
    flags.DEFINE_integer("batch", 128, "batch size")
    flags.DEFINE_integer("steps", 10, "timed calls per number (the fastest counts)")


def model_layers(name: str) -> dict[str, list[dict]]:
    """The convs and max-pools of bench row ``name``'s train-mode forward, in call order, identical ones merged:
    ``{"conv": [...], "pool": [...]}``, each entry JSON-able.

    A conv is ``{"input": [H, W, C], "features", "kernel": [kH, kW], "strides", "pads": [[t, b], [l, r]],
    "dilation", "groups", "count": calls per forward, "first": whether it reads the model's input}``; a pool
    ``{"input", "window", "stride", "padding", "count"}``. Read by tracing the model's init with Flax's method
    interceptor, so it follows the zoo as it is."""
    import flax.linen as nn
    import jax

    from cnnjax.conv import explicit_pads
    from cnnjax.layers import Conv, MaxPool, canonical_padding

    found: dict[str, dict] = {"conv": {}, "pool": {}}

    def record(next_fun, args, kwargs, context):
        m, shape = context.module, list(args[0].shape[1:]) if args else None
        if context.method_name == "__call__" and isinstance(m, Conv):
            kernel, strides, dilation = (_two(v) for v in (m.kernel_size, m.stride, m.dilation))
            pads = explicit_pads(tuple(shape[:2]), tuple(kernel), tuple(strides), canonical_padding(m.padding),
                                 tuple(dilation))
            entry = {"input": shape, "features": m.features, "kernel": kernel, "strides": strides,
                     "pads": [list(p) for p in pads], "dilation": dilation, "groups": m.groups}
            _count(found["conv"], entry, first=not found["conv"])
        elif context.method_name == "__call__" and isinstance(m, MaxPool):
            entry = {"input": shape, "window": _two(m.window),
                     "stride": _two(m.stride if m.stride is not None else m.window), "padding": _two(m.padding)}
            _count(found["pool"], entry)
        return next_fun(*args, **kwargs)

    model = bench_model(name)
    x = jax.ShapeDtypeStruct((1, *SHAPES[name]), jax.numpy.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda x: model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)},
                                            x, train=True), x)
    return {kind: list(entries.values()) for kind, entries in found.items()}


def _two(value) -> list[int]:
    """An int or a pair as ``[a, b]``."""
    return [value, value] if isinstance(value, int) else list(value)


def _count(entries: dict, entry: dict, **extra) -> None:
    key = repr(sorted(entry.items()))
    entries.setdefault(key, {**entry, **extra, "count": 0})["count"] += 1


def conv_label(conv: dict, batch: int) -> str:
    """``[N,H,W,C] -> O, kKxK sS pP`` of a conv entry of :func:`model_layers`."""
    h, w, c = conv["input"]
    pads = conv["pads"]
    pad = pads[0][0] if all(p == pads[0][0] for pair in pads for p in pair) else pads
    more = (f" d{conv['dilation'][0]}" if conv["dilation"] != [1, 1] else "") + \
        (f" g{conv['groups']}" if conv["groups"] != 1 else "") + (" (first)" if conv["first"] else "")
    return (f"[{batch},{h},{w},{c}] -> {conv['features']}, k{conv['kernel'][0]}x{conv['kernel'][1]} "
            f"s{conv['strides'][0]} p{pad}{more}")


def depthwise_shifted_sum(x, kernel, strides: tuple[int, int], pads, dilation: tuple[int, int]):
    """A depthwise conv ``[N, H, W, C] * [kH, kW, 1, O] -> [N, H', W', O]`` (``O`` a multiple ``m`` of ``C``;
    output channel ``o`` reads input channel ``o // m``) as the sum over the ``kH * kW`` taps of the strided view of
    the padded input that tap reads, each channel repeated ``m`` times, times the tap's weights."""
    import jax.numpy as jnp
    from jax import lax

    from cnnjax.conv import output_size

    n, h, w, c = x.shape
    kh, kw, _, o = kernel.shape
    ho, wo = (output_size(*args) for args in zip((h, w), (kh, kw), strides, pads, dilation, strict=True))
    xp = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
    total = None
    for i in range(kh):
        for j in range(kw):
            y0, x0 = i * dilation[0], j * dilation[1]
            view = lax.slice(xp, (0, y0, x0, 0), (n, y0 + strides[0] * (ho - 1) + 1, x0 + strides[1] * (wo - 1) + 1,
                                                  c), (1, strides[0], strides[1], 1))
            term = (view if o == c else jnp.repeat(view, o // c, axis=-1)) * kernel[i, j, 0]
            total = term if total is None else total + term
    return total


def cnnjax_conv_ms(conv: dict, batch: int, steps: int, impl: str) -> list[float] | None:
    """``[forward ms, forward+backward ms]`` of ``conv`` through ``cnnjax.conv.conv2d(..., impl=impl)``, or None
    where that impl has no kernel for it. Two more impls for depthwise convs only: 'shifted'
    (:func:`depthwise_shifted_sum`) and 'cpu-other-wgrad' (the CPU backend with the other of its two depthwise kernel
    gradients: :meth:`cnnjax.cpu.rules.Rules.grouped_wgrad_path` flipped)."""
    import dataclasses

    import jax
    import numpy as np

    from cnnjax import cpu
    from cnnjax.conv import conv2d
    from cnnjax.cpu.rules import DEFAULT
    from cnnjax.errors import UsageError

    rng = np.random.RandomState(0)
    (h, w, c), (kh, kw) = conv["input"], conv["kernel"]
    if impl in ("shifted", "cpu-other-wgrad") and (conv["groups"] != c or c == 1):
        return None
    geometry = tuple(conv["strides"]), tuple(map(tuple, conv["pads"])), tuple(conv["dilation"])
    if impl == "cpu-other-wgrad":
        picked = DEFAULT.grouped_wgrad_path((kh, kw, 1, conv["features"]), conv["groups"], geometry[2])
        other = dataclasses.replace(DEFAULT, depthwise_wgrad_loop_min_width=1 << 30 if picked == "depthwise" else 0)
        static = dict(zip(("strides", "pads", "dilation"), geometry, strict=True), groups=conv["groups"],
                      precision=None)
    x = jax.numpy.asarray(rng.randn(batch, h, w, c).astype(np.float32))
    k = jax.numpy.asarray(rng.randn(kh, kw, c // conv["groups"], conv["features"]).astype(np.float32) * 0.05)

    def f(x, k):
        if impl == "shifted":
            return depthwise_shifted_sum(x, k, *geometry)
        if impl == "cpu-other-wgrad":
            fn = cpu.implementation("conv2d", (x, k), static, rules=other)
            if fn is None:
                raise UsageError("the CPU backend has no kernel for this conv")
            return fn(x, k)
        return conv2d(x, k, *geometry, conv["groups"], impl=impl)

    try:
        y = jax.eval_shape(f, x, k)
    except UsageError:
        return None
    g = jax.numpy.asarray(rng.randn(*y.shape).astype(np.float32))

    def fwd_bwd(x, k, g):
        y, vjp = jax.vjp(lambda k: f(x, k), k) if conv["first"] else jax.vjp(f, x, k)
        return y, vjp(g)

    return [fastest_ms(jax.jit(f), x, k, steps=steps), fastest_ms(jax.jit(fwd_bwd), x, k, g, steps=steps)]


def torch_conv_ms(convs: list[dict], batch: int, steps: int) -> list[list[float]]:
    """``[forward ms, forward+backward ms]`` of PyTorch eager's ``Conv2d`` for each conv entry, NCHW (asymmetric
    pads as an ``F.pad`` first)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    rng = np.random.RandomState(0)
    out = []
    for conv in convs:
        (h, w, c), pads = conv["input"], conv["pads"]
        symmetric = pads[0][0] == pads[0][1] and pads[1][0] == pads[1][1]
        layer = torch.nn.Conv2d(c, conv["features"], conv["kernel"], conv["strides"],
                                (pads[0][0], pads[1][0]) if symmetric else 0, conv["dilation"], conv["groups"],
                                bias=False)
        pad = (lambda t: t) if symmetric else (lambda t, p=pads: F.pad(t, (*p[1], *p[0])))
        xt = torch.from_numpy(rng.randn(batch, c, h, w).astype(np.float32)).requires_grad_(not conv["first"])
        gt = torch.from_numpy(rng.randn(*layer(pad(xt)).shape).astype(np.float32))

        def fwd_bwd(layer=layer, xt=xt, gt=gt, pad=pad):
            layer.zero_grad(set_to_none=True)
            xt.grad = None
            layer(pad(xt)).backward(gt)

        with torch.no_grad():
            forward = fastest_ms(lambda layer=layer, xt=xt, pad=pad: layer(pad(xt)), steps=steps)
        out.append([forward, fastest_ms(fwd_bwd, steps=steps)])
    return out


def conv_rows(name: str, batch: int, steps: int, grouped: bool = False) -> list[str]:
    """Markdown rows of bench row ``name``'s convs (see the module doc) and their per-step sums; ``grouped``: its
    grouped convs only, with the depthwise shifted sum's two columns after PyTorch's and the CPU backend's fwd+bwd with
    its other depthwise kernel gradient."""
    import numpy as np

    from cnnjax.cpu import onednn
    from cnnjax.cpu.rules import DEFAULT

    convs = [conv for conv in model_layers(name)["conv"] if conv["groups"] != 1 or not grouped]
    theirs_all = in_fresh_process(torch_conv_ms, convs, batch, steps) if convs else []
    impls = ("cpu", "xla", "shifted", "cpu-other-wgrad") if grouped else ("cpu", "xla")
    widths = (2, 2, 2, 2, 1) if grouped else (2, 2, 2)  # the other kernel gradient: its fwd+bwd only
    rows, totals = [], np.zeros(sum(widths))
    for conv, theirs in zip(convs, theirs_all, strict=True):
        cells = [cnnjax_conv_ms(conv, batch, steps, impl) for impl in impls]
        cells.insert(2, theirs)
        if grouped and cells[-1] is not None:
            cells[-1] = cells[-1][1:]
        (h, w, c), (kh, kw) = conv["input"], conv["kernel"]
        path = "-" if cells[0] is None else DEFAULT.conv_path(
            (batch, h, w, c), (kh, kw, c // conv["groups"], conv["features"]), tuple(conv["strides"]),
            tuple(map(tuple, conv["pads"])), tuple(conv["dilation"]), onednn.runs(np.dtype("float32")),
            conv["groups"])
        flat = [v for cell, width in zip(cells, widths, strict=True) for v in (cell or [float("nan")] * width)]
        totals += conv["count"] * np.nan_to_num(np.array(flat))
        rows.append(f"| {conv_label(conv, batch)} | {conv['count']} | {path} | "
                    + " | ".join("-" if np.isnan(v) else f"{v:.2f}" for v in flat) + f" | {flat[5] / flat[1]:.2f} |")
    rows.append(f"| **{'grouped convs ' if grouped else ''}per train step** | | | "
                + " | ".join(f"**{v:.1f}**" for v in totals) + f" | **{totals[5] / totals[1]:.2f}** |")
    return rows


POOL_SIDES = ("plain XLA", "CPU backend", "strided views", "oneDNN")


def cnnjax_pool_ms(pool: dict, batch: int, steps: int) -> list[float]:
    """Forward+backward ms of ``pool`` (after a ReLU) by each of :data:`POOL_SIDES` (NaN where one cannot run)."""
    import jax
    import numpy as np

    from cnnjax import cpu, layers
    from cnnjax.cpu import onednn
    from cnnjax.cpu.pool import onednn_max_pool, strided_view_max_pool

    rng = np.random.RandomState(0)
    x = jax.nn.relu(jax.numpy.asarray(rng.randn(batch, *pool["input"]).astype(np.float32)))  # ties at 0
    geometry = tuple(pool["window"]), tuple(pool["stride"]), tuple(pool["padding"])
    static = dict(zip(("window", "stride", "padding"), geometry, strict=True))
    backend = cpu.implementation("max_pool", (x,), static)
    fns = [lambda v: layers.reduce_window_max_pool(v, *geometry), backend,
           lambda v: strided_view_max_pool(v, *geometry),
           (lambda v: onednn_max_pool(v, *geometry)) if onednn.runs(x.dtype) else None]
    weight = jax.numpy.asarray(rng.randn(*jax.eval_shape(fns[0], x).shape).astype(np.float32))
    return [float("nan") if fn is None else
            fastest_ms(jax.jit(jax.grad(lambda v, w, fn=fn: (fn(v) * w).sum())), x, weight, steps=steps)
            for fn in fns]


def torch_pool_ms(pools: list[dict], batch: int, steps: int) -> list[float]:
    """Forward+backward ms of PyTorch eager's ``MaxPool2d`` for each pool entry (NCHW, after a ReLU)."""
    import numpy as np
    import torch

    rng = np.random.RandomState(0)
    out = []
    for pool in pools:
        h, w, c = pool["input"]
        layer = torch.nn.MaxPool2d(pool["window"], pool["stride"], pool["padding"])
        x = torch.relu(torch.from_numpy(rng.randn(batch, c, h, w).astype(np.float32))).requires_grad_(True)
        weight = torch.from_numpy(rng.randn(*layer(x).shape).astype(np.float32))

        def fwd_bwd(layer=layer, x=x, weight=weight):
            x.grad = None
            (layer(x) * weight).sum().backward()

        out.append(fastest_ms(fwd_bwd, steps=steps))
    return out


def pool_rows(name: str, batch: int, steps: int) -> list[str]:
    """Markdown rows of bench row ``name``'s max-pools: forward+backward ms by each side."""
    pools = model_layers(name)["pool"]
    theirs = in_fresh_process(torch_pool_ms, pools, batch, steps) if pools else []
    rows = []
    for pool, torch_ms in zip(pools, theirs, strict=True):
        cells = [*cnnjax_pool_ms(pool, batch, steps), torch_ms]
        h, w, c = pool["input"]
        rows.append(f"| [{batch},{h},{w},{c}], {pool['window'][0]}x{pool['window'][1]} s{pool['stride'][0]} "
                    f"p{pool['padding'][0]} | {pool['count']} | " + " | ".join(f"{v:.2f}" for v in cells) + " |")
    return rows


def main(argv):
    del argv
    from cnnjax import kernels
    from cnnjax.errors import UsageError

    unknown = [n for n in FLAGS.models if n not in SHAPES]
    if unknown:
        raise UsageError(f"unknown bench row(s) {unknown}; choose from {', '.join(SHAPES)}")
    print(f"{kernels.describe()}; batch {FLAGS.batch}, milliseconds per call, the fastest of {FLAGS.steps}\n")
    for name in FLAGS.models:
        if FLAGS.only in ("all", "conv"):
            print(f"**{name}**: each {'grouped ' if FLAGS.grouped else ''}conv as its train step runs it\n")
            more = "| shifted sum fwd | shifted sum fwd+bwd | backend fwd+bwd, other kernel gradient " \
                if FLAGS.grouped else ""
            print("| conv | calls per step | CPU backend path | backend fwd | backend fwd+bwd | XLA fwd | XLA fwd+bwd "
                  f"| PyTorch fwd | PyTorch fwd+bwd {more}| PyTorch / backend, fwd+bwd |")
            print("|---|---:|---|" + "---:|" * (10 if FLAGS.grouped else 7))
            for row in conv_rows(name, FLAGS.batch, FLAGS.steps, FLAGS.grouped):
                print(row, flush=True)
            print()
        if FLAGS.only in ("all", "pool") and model_layers(name)["pool"]:
            print(f"**{name}**: each max-pool after a ReLU, forward+backward\n")
            print("| max-pool | calls per step | " + " | ".join(POOL_SIDES) + " | PyTorch |")
            print("|---|---:|" + "---:|" * (len(POOL_SIDES) + 1))
            for row in pool_rows(name, FLAGS.batch, FLAGS.steps):
                print(row, flush=True)
            print()


if __name__ == "__main__":
    define_flags()
    sys.exit(cli.run(main))
