"""Shared timing helpers for the benchmark scripts (bench, bench_cpu, bench_ab, bench_conv, bench_recipe, ...)."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from cnnjax.errors import UsageError


def time_jax_training(model: Any, spec: Any, data_shape: tuple[int, int, int], batch: int, steps: int,
                      model_input_shape: tuple[int, int, int] | None = None, scan: bool | None = None,
                      chunk: int = 1, warmup: int = 1) -> dict:
    """Steady-state training throughput through the real ``Runner``.

    Random uint8 data ``[batch * chunk, *data_shape]`` is put on the device once; each
    ``runner.train`` call runs ``chunk`` steps (so ``chunk > 1`` exercises ``lax.scan`` when
    ``scan=True``). Returns ``train_img_s``, ``compile_s`` (first call) and what the caller needs to
    go on (``runner``, ``state``, ``images``, ``labels``). Timing waits for the last step to finish.
    """
    import jax
    import numpy as np

    n = batch * chunk
    runner, state, images, labels = prepared_runner(model, spec, data_shape, n, model_input_shape, scan)
    idx = np.arange(n).reshape(chunk, batch)
    t = time.perf_counter()
    state, metrics = runner.train(state, images, labels, idx)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t
    for _ in range(max(1, warmup // chunk)):  # untimed warm-up calls
        state, metrics = runner.train(state, images, labels, idx)
    jax.block_until_ready(metrics)
    calls = max(1, steps // chunk)
    t = time.perf_counter()
    for _ in range(calls):
        state, metrics = runner.train(state, images, labels, idx)
    jax.block_until_ready(metrics)  # dispatch is asynchronous
    return {"train_img_s": calls * n / (time.perf_counter() - t), "compile_s": compile_s, "runner": runner,
            "state": state, "images": images, "labels": labels}


def prepared_runner(model: Any, spec: Any, data_shape: tuple[int, int, int], n: int,
                    model_input_shape: tuple[int, int, int] | None = None, scan: bool | None = None) -> tuple:
    """``(runner, state, images, labels)``: a ``Runner`` for ``model`` with its state (SGD momentum 0.9,
    seed 0) and ``n`` random uint8 images ``[n, *data_shape]`` with labels, placed."""
    import jax
    import numpy as np
    import optax

    from cnnjax.train.runner import Runner
    from cnnjax.train.state import create_train_state

    runner = Runner(spec, model.apply, scan=scan)
    state = runner.put_state(create_train_state(model, optax.sgd(0.01, momentum=0.9),
                                                model_input_shape or data_shape, jax.random.PRNGKey(0)))
    rng = np.random.RandomState(0)
    images, labels = runner.put_data(rng.randint(0, 256, (n, *data_shape)).astype(np.uint8),
                                     rng.randint(0, spec.num_classes, n).astype(np.int32))
    return runner, state, images, labels


PRECISIONS = ("fp32", "bf16")


def bench_spec(shape: tuple[int, int, int], precision: str = "fp32") -> Any:
    """The benchmarks' step: 10 classes, mean 0.5 / std 0.25 per channel, no augmentation; ``precision``
    'bf16' computes in bfloat16 (float32 parameters and BatchNorm statistics, as ``mixed_precision``)."""
    import jax.numpy as jnp

    from cnnjax.train.steps import StepSpec

    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    return StepSpec(10, (0.5,) * shape[2], (0.25,) * shape[2], compute_dtype=dtype)


# Benchmark rows: NAME or NAME@SIZE -> input shape [H, W, C].
SHAPES = {"lenet5": (32, 32, 1), "improved_cnn": (32, 32, 3), "cifar_resnet20": (32, 32, 3), "resnet18": (32, 32, 3),
          "resnet18@224": (224, 224, 3), "fast_cnn": (32, 32, 3), "simple_cnn@28": (28, 28, 1),
          "fast_cnn@28": (28, 28, 1), "fast_cnn@28+residual": (28, 28, 1)}
# Rows whose model needs arguments: (cnnjax kwargs, torch twin kwargs). fast_cnn@28 is the net of the
# Fashion-MNIST recipes (fashion_mnist_30min, unpadded greyscale); +residual airbench96's groups.
ROW_KWARGS = {"simple_cnn@28": ({"image_size": 28}, {"c_in": 1, "image_size": 28}),
              "fast_cnn@28": ({}, {"c_in": 1}),
              "fast_cnn@28+residual": ({"residual": True}, {"c_in": 1, "residual": True})}


def bench_model(name: str):
    """The cnnjax model of bench row ``name`` (10 classes)."""
    from cnnjax import models

    return models.create(name.split("@")[0], num_classes=10, **ROW_KWARGS.get(name, ({}, {}))[0])


def model_convs(name: str) -> list[dict]:
    """The convolutions of bench row ``name``'s forward (train mode), in call order, identical ones merged.

    Each is ``{"module": the cnnjax Conv, "input": (H, W, C) it reads, "count": calls per forward,
    "first": True for the conv of the model's input (whose input gradient a train step does not need)}``.
    Read by tracing the model's init with Flax's method interceptor, so it follows the zoo as it is."""
    import flax.linen as nn
    import jax

    from cnnjax.layers import Conv

    convs: dict = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, Conv) and context.method_name == "__call__":
            key = (tuple(args[0].shape[1:]), module.features, module.kernel_size, module.stride, module.padding,
                   module.dilation, module.groups, module.use_bias, module.in_features, module.pad_features,
                   module.impl)
            entry = convs.setdefault(key, {"module": module.clone(parent=None, name=None), "input": key[0],
                                           "count": 0, "first": not convs})
            entry["count"] += 1
        return next_fun(*args, **kwargs)

    model = bench_model(name)
    x = jax.ShapeDtypeStruct((1, *SHAPES[name]), jax.numpy.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda x: model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)},
                                            x, train=True), x)
    return list(convs.values())


def _torch_conv_twin(name: str, module: Any, c: int):
    """PyTorch's ``Conv2d`` with ``module``'s geometry (``c`` input channels in cnnjax's layout), a conv of bench
    row ``name``."""
    import torch

    from cnnjax.layers import canonical_padding

    pads = canonical_padding(module.padding)
    if isinstance(pads, str) or pads[0][0] != pads[0][1] or pads[1][0] != pads[1][1]:
        raise ValueError(f"{name}: a conv with asymmetric padding {module.padding} has no torch Conv2d twin")
    return torch.nn.Conv2d(module.in_features or c, module.features, module.kernel_size, module.stride,
                           (pads[0][0], pads[1][0]), module.dilation, module.groups, module.use_bias)


def torch_conv_ms(name: str, batch: int, steps: int) -> list[list[float]]:
    """``[forward ms, forward+backward ms]`` of PyTorch eager's twin of each conv of bench row ``name``
    (:func:`model_convs`' order) at ``batch``, NCHW, the fastest of ``steps`` calls each."""
    import numpy as np
    import torch

    rng = np.random.RandomState(0)
    out = []
    for conv in model_convs(name):
        (h, w, c), first = conv["input"], conv["first"]
        twin = _torch_conv_twin(name, conv["module"], c)
        xt = torch.from_numpy(rng.randn(batch, twin.in_channels, h, w).astype(np.float32)).requires_grad_(not first)
        gt = torch.from_numpy(rng.randn(*twin(xt).shape).astype(np.float32))

        def fwd_bwd(twin=twin, xt=xt, gt=gt):
            twin.zero_grad(set_to_none=True)
            xt.grad = None
            twin(xt).backward(gt)

        with torch.no_grad():
            forward = fastest_ms(twin, xt, steps=steps)
        out.append([forward, fastest_ms(fwd_bwd, steps=steps)])
    return out


def conv_vs_torch_rows(name: str, batch: int, steps: int) -> list[str]:
    """Markdown rows for bench row ``name``: each of its convs, cnnjax and PyTorch eager, forward and
    forward+backward ms at ``batch``, then their sums over one train step (times the calls per step).
    PyTorch's are timed first, in a process of their own (:func:`in_fresh_process`)."""
    import jax
    import numpy as np

    for conv in model_convs(name):
        _torch_conv_twin(name, conv["module"], conv["input"][2])  # an untimeable conv stops before any timing
    theirs_all = in_fresh_process(torch_conv_ms, name, batch, steps)
    rng = np.random.RandomState(0)
    rows, totals = [], np.zeros(4)
    for conv, theirs in zip(model_convs(name), theirs_all, strict=True):
        module, (h, w, c), first = conv["module"], conv["input"], conv["first"]
        x = jax.numpy.asarray(rng.randn(batch, h, w, c).astype(np.float32))
        params = jax.jit(module.init)(jax.random.PRNGKey(0), x)
        y = jax.eval_shape(module.apply, params, x)
        g = jax.numpy.asarray(rng.randn(*y.shape).astype(np.float32))

        def fwd_bwd(params, x, g, apply=module.apply, first=first):
            if first:
                y, vjp = jax.vjp(lambda variables: apply(variables, x), params)
            else:
                y, vjp = jax.vjp(apply, params, x)
            return y, vjp(g)

        ours = [fastest_ms(jax.jit(module.apply), params, x, steps=steps),
                fastest_ms(jax.jit(fwd_bwd), params, x, g, steps=steps)]
        cells = ours + theirs
        totals += conv["count"] * np.array(cells)
        rows.append(f"| [{batch},{h},{w},{c}] -> {module.features}, k{module.kernel_size} s{module.stride} "
                    f"p{module.padding}{' (first)' if first else ''} "
                    f"| {conv['count']} | " + " | ".join(f"{v:.2f}" for v in cells) + f" | {cells[3] / cells[1]:.2f} |")
    rows.append("| **per train step** | | " + " | ".join(f"**{v:.1f}**" for v in totals)
                + f" | **{totals[3] / totals[1]:.2f}** |")
    return rows


# Untimed steps before the timed ones in the benchmarks (both sides): cnnjax's step with oneDNN's kernels reaches
# its steady time only after about 8 steps (lenet5 on the Xeon: 10.6, 9.2, 8.9 ... 6.4 ms, then 5.5-6.3; PyTorch
# eager's from its second step; experiments/PERFORMANCE.md, "Steady steps").
WARMUP_STEPS = 10
# Marks the child's result line in in_fresh_process's output.
_RESULT_MARK = "cnnjax-result: "


def in_fresh_process(function: Callable, *args: Any, env: dict | None = None) -> Any:
    """``function(*args)`` run in a new Python process (``env``, default this one's environment) and its result,
    both passed as JSON; a failure raises ``RuntimeError`` with the child's last line of stderr.

    The benchmarks time PyTorch this way beside cnnjax, so that nothing cnnjax set up in a process can touch
    PyTorch's figures: until 2026-12-04 cnnjax's oneDNN library loaded the process's GNU OpenMP runtime, which
    PyTorch shares, with ``OMP_WAIT_POLICY=PASSIVE``, and PyTorch's eager lenet5 step took 9.5 against 5.9 ms
    beside it (Xeon, 2 cores; ``experiments.bench_torch_beside``, experiments/PERFORMANCE.md)."""
    code = ("import ctypes, importlib, json, os, sys\n"
            # SIGTERM to the child when the parent ends (PR_SET_PDEATHSIG = 1): a benchmark stopped by a signal
            # to its own process id, which ends it at once (experiments.startup), leaves no child timing PyTorch
            # on the machine. Armed here rather than in a preexec_fn, which would fork a multithreaded JAX process.
            "if sys.platform == 'linux':\n"
            "    ctypes.CDLL(None).prctl(1, 15)\n"
            "    if os.getppid() != int(sys.argv[4]): sys.exit(1)  # the parent ended before the line above\n"
            "f = importlib.import_module(sys.argv[1])\n"
            "for part in sys.argv[2].split('.'): f = getattr(f, part)\n"
            "print('\\n" + _RESULT_MARK + "' + json.dumps(f(*json.loads(sys.argv[3]))))")
    module = function.__module__
    if module == "__main__":  # a script run with python -m: the child imports it by its module name
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        if spec is None:
            raise UsageError(f"{function.__qualname__} must live in an importable module to run in its own process")
        module = spec.name
    cmd = [sys.executable, "-c", code, module, function.__qualname__, json.dumps(args), str(os.getpid())]
    done = subprocess.run(cmd, env=os.environ if env is None else env, capture_output=True, text=True, check=False)
    results = [line for line in done.stdout.splitlines() if line.startswith(_RESULT_MARK)]
    if done.returncode or not results:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{function.__qualname__} failed in its own process (exit {done.returncode}): {last}")
    return json.loads(results[-1][len(_RESULT_MARK):])


def read_saved_result(path: str, writer: str) -> dict:
    """A result file written by ``python -m {writer} --out`` (finished or cut short): a dict with 'meta' and
    'rows'; anything else is a one-line :class:`UsageError` naming the file."""
    from cnnjax.io import read_json

    fix = f"pass files written by python -m {writer} --out"
    if not os.path.isfile(path):
        raise UsageError(f"--render: {path} is not a file; {fix}")
    saved = read_json(path, fix)
    if not (isinstance(saved, dict) and saved.get("rows") is not None and "meta" in saved):
        raise UsageError(f"{path} is not a {writer.rsplit('.', 1)[-1]} result (no 'meta' and 'rows'); {fix}")
    return saved


def bench_torch_model(name: str):
    """The torch twin of bench row ``name`` (10 classes)."""
    from experiments.bench import torch_twins as torch_models

    return torch_models.build(name.split("@")[0], num_classes=10, **ROW_KWARGS.get(name, ({}, {}))[1])


CPU_VARIANTS = ("baseline", "+ynn flag", "+im2col", "+tiled max-pool", "+greyscale im2col", "+strided-view max-pool",
                "+closed-form BatchNorm backward", "+shifted-sum greyscale conv", "+8-channel LeNet",
                "+overlapping strided-view max-pool", "+huge pages", "+kept conv input", "+split strided conv",
                "+broadcast tiled max-pool backward", "+oneDNN convolutions", "+oneDNN max-pool", "+tcmalloc",
                "+oneDNN greyscale gradients", "+oneDNN on XLA's threads", "+BatchNorm backward without x_hat",
                "+two oneDNN slices", "+oneDNN max-pool with AVX-512 only", "+float32 kernel-gradient paths by shape",
                "+float32 forwards as input gradients")
# Variants that are a setting of the whole process (glibc's huge-page tunable, the preloaded allocator: read at
# start-up), not library code: only experiments.bench_cpu, which gives every variant its own process, can compare
# them.
PROCESS_VARIANTS = ("+huge pages", "+tcmalloc", "+oneDNN on XLA's threads", "+two oneDNN slices")


def variant_env(variant: str, environ: dict, tcmalloc: str | None = None) -> dict:
    """``environ`` as ``variant``'s process needs it: the entry points' XLA flag from ``+ynn flag`` on, glibc's
    huge-page tunable on (``=1``) from ``+huge pages`` on, off (``=0``) before it, and ``tcmalloc`` (a library
    path, ``experiments.cli.find_tcmalloc()``) preloaded from ``+tcmalloc`` on, glibc's malloc before it, and
    oneDNN's calls split over XLA's threads from ``+oneDNN on XLA's threads`` on, on oneDNN's OpenMP team before it,
    and into two batch slices from ``+two oneDNN slices`` on, four before it."""
    from cnnjax.native import onednn
    from experiments import cli

    env = dict(environ)
    level = CPU_VARIANTS.index(variant)
    flags_ = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "ynn_fusion_type" not in f)
    if level >= 1:
        flags_ = f"{flags_} {cli.CPU_XLA_FLAG}".strip()
    env["XLA_FLAGS"] = flags_
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and not t.startswith(cli.HUGE_PAGES_TUNABLE)]
    huge = level >= CPU_VARIANTS.index("+huge pages")
    env["GLIBC_TUNABLES"] = ":".join([*tunables, f"{cli.HUGE_PAGES_TUNABLE}={int(huge)}"])
    preloads = [p for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p and cli.TCMALLOC not in p]
    if level >= CPU_VARIANTS.index("+tcmalloc"):
        if tcmalloc is None:
            raise UsageError(f"variant {variant!r} needs {cli.TCMALLOC}: install Debian's libtcmalloc-minimal4")
        preloads.append(tcmalloc)
        env.pop(cli.MALLOC_CHOICE, None)
    else:
        env[cli.MALLOC_CHOICE] = "glibc"
    env["LD_PRELOAD"] = ":".join(preloads)
    if level >= CPU_VARIANTS.index("+oneDNN on XLA's threads"):
        env.pop(onednn.THREADS_CHOICE, None)
    else:
        env[onednn.THREADS_CHOICE] = "omp"  # each oneDNN call whole, on oneDNN's OpenMP team
    env[onednn.SLICES_CHOICE] = "2" if level >= CPU_VARIANTS.index("+two oneDNN slices") else "4"
    return env


def library_switches() -> list[tuple[Any, str]]:
    """``(module, attribute)`` of every piece of library code :func:`_undo_changes` may swap."""
    from cnnjax import conv, layers
    from cnnjax.models import lenet

    return [(conv, "choose_impl"), (layers, "_tiled_max_pool"), (layers, "_overlapping_max_pool"),
            (layers, "_batch_norm_train"), (lenet, "CPU_CHANNEL_PAD"), (conv, "KEEP_CONV_INPUT_ON_CPU"),
            (layers, "TILED_POOL_BROADCAST_BACKWARD"), (conv, "USE_ONEDNN_ON_CPU"), (layers, "USE_ONEDNN_POOL_ON_CPU"),
            (conv, "ONEDNN_SHIFTED_GRADIENTS_ON_CPU"), (layers, "ONEDNN_POOL_NEEDS_AVX512"),
            (conv, "ONEDNN_F32_WGRAD_BY_SHAPE"), (conv, "ONEDNN_F32_FORWARD_AS_INPUT_GRAD")]


@contextlib.contextmanager
def with_variant(variant: str):
    """Within the block, the library code is that of ``variant`` (put back as it was on exit)."""
    saved = [(module, name, getattr(module, name)) for module, name in library_switches()]
    try:
        _undo_changes(variant)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _undo_changes(variant: str) -> None:
    """Put back the library code that ``variant`` does not have yet (this process only)."""
    import jax
    from jax import lax

    from cnnjax import conv, layers
    from cnnjax.models import lenet

    level = CPU_VARIANTS.index(variant)
    if level < 2:
        conv.choose_impl = lambda *args, **kwargs: "xla"
    elif level < 7:
        # Without out_channels the rules never pick the shifted sum (before +shifted-sum greyscale conv);
        # without in_channels either, no greyscale rule at all (before +greyscale im2col).
        rules, drop = conv.choose_impl, ("in_channels", "out_channels") if level < 4 else ("out_channels",)
        conv.choose_impl = lambda *args, **kwargs: rules(*args, **{k: v for k, v in kwargs.items() if k not in drop})
    if 2 <= level < 12:
        picks = conv.choose_impl  # narrow strided convs as patches, as before 'split'
        conv.choose_impl = lambda *args, **kwargs: "im2col" if (i := picks(*args, **kwargs)) == "split" else i
    if level < 3:
        layers._tiled_max_pool = lambda x, kh, kw: lax.reduce_window(
            x, -jax.numpy.inf, lax.max, (1, kh, kw, 1), (1, kh, kw, 1), "VALID")
    elif level < 5:
        layers._tiled_max_pool = _reshape_max_pool
    if level < 6:
        layers._batch_norm_train = autodiff_batch_norm_train
    elif level < CPU_VARIANTS.index("+BatchNorm backward without x_hat"):
        layers._batch_norm_train = xhat_batch_norm_train()
    if level < 8:
        lenet.CPU_CHANNEL_PAD = 0  # LeNet-5's 6-channel maps as they are
    if level < 11:
        conv.KEEP_CONV_INPUT_ON_CPU = False  # XLA's own conv backward, recomputing the input as XLA likes
    if level < 13:
        layers.TILED_POOL_BROADCAST_BACKWARD = False  # the stacked stride phases for tiles too
    if level < 14:
        conv.USE_ONEDNN_ON_CPU = False  # XLA's convolutions, by the rules of conv.choose_impl
    if level < 15:
        layers.USE_ONEDNN_POOL_ON_CPU = False  # max-pools as strided views (layers._window_max_pool)
    if level < 17:
        conv.ONEDNN_SHIFTED_GRADIENTS_ON_CPU = False  # shifted-sum (greyscale) convs with XLA's gradients
    if level < CPU_VARIANTS.index("+oneDNN max-pool with AVX-512 only"):
        layers.ONEDNN_POOL_NEEDS_AVX512 = False  # oneDNN's max-pool on every CPU whose oneDNN kernels are built
    if level < CPU_VARIANTS.index("+float32 kernel-gradient paths by shape"):
        conv.ONEDNN_F32_WGRAD_BY_SHAPE = False  # oneDNN's backward-weights primitive for every float32 conv
    if level < CPU_VARIANTS.index("+float32 forwards as input gradients"):
        conv.ONEDNN_F32_FORWARD_AS_INPUT_GRAD = False  # oneDNN's forward primitive for every forward
    if level < 9:
        layers._overlapping_max_pool = lambda x, window, stride, padding: lax.reduce_window(
            x, -jax.numpy.inf, lax.max, (1, *window, 1), (1, *stride, 1), ((0, 0), *((p, p) for p in padding), (0, 0)))


def autodiff_batch_norm_train(x, scale, bias, epsilon: float, axis_name: str | None):
    """Training-mode BatchNorm before its closed-form backward: the textbook forward, differentiated by
    JAX through the mean and variance. Returns ``(y, mean, biased var)`` like ``layers._batch_norm_train``."""
    import jax.numpy as jnp
    from jax import lax

    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    mean = mean if axis_name is None else lax.pmean(mean, axis_name)
    var = jnp.mean(jnp.square(x - mean), axis=axes)
    var = var if axis_name is None else lax.pmean(var, axis_name)
    return (x - mean) * lax.rsqrt(var + epsilon) * scale + bias, mean, var


def xhat_batch_norm_train():
    """``layers._batch_norm_train`` as it was before ``+BatchNorm backward without x_hat``: its backward sums
    ``g * x_hat`` from a written-out ``x_hat``. Built on call (jax is imported only in variant processes)."""
    import functools

    import jax
    import jax.numpy as jnp
    from jax.custom_derivatives import SymbolicZero

    from cnnjax import layers

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
    def bn(x, scale, bias, epsilon, axis_name):
        return layers._batch_norm_forward(x, scale, bias, epsilon, axis_name)[0]

    def bwd(epsilon, axis_name, residuals, cotangents):
        x, mean, inv_std, scale = residuals
        g_y, g_mean, g_var = cotangents
        g_y = jnp.zeros_like(x) if isinstance(g_y, SymbolicZero) else g_y
        stats = {n: g for n, g in (("mean", g_mean), ("var", g_var)) if not isinstance(g, SymbolicZero)}
        rows, g_rows = x.reshape(-1, x.shape[-1]), g_y.reshape(-1, x.shape[-1])
        x_hat = (rows - mean) * inv_std
        g_bias, g_scale = jnp.sum(g_rows, axis=0), jnp.sum(g_rows * x_hat, axis=0)
        totals, count = layers._across_replicas(jnp.stack([g_bias, g_scale, *stats.values()]), rows.shape[0],
                                                axis_name)
        total = dict(zip(["bias", "scale", *stats], totals, strict=True))
        g_x = (scale * inv_std) * (g_rows - total["bias"] / count - x_hat * (total["scale"] / count))
        if "mean" in total:
            g_x = g_x + total["mean"] / count
        if "var" in total:
            g_x = g_x + x_hat * (2.0 * total["var"] / (count * inv_std))
        return g_x.reshape(x.shape), g_scale, g_bias

    bn.defvjp(layers._batch_norm_train_fwd, bwd, symbolic_zeros=True)
    return bn


def _reshape_max_pool(x, kh: int, kw: int):
    """The tiled max-pool before strided views: max over ``[N, Ho, kh, Wo, kw, C]``, its backward
    recomputing the first maximum from the saved input."""
    import jax
    import jax.numpy as jnp

    def windows(v):
        n, h, w, c = v.shape
        return v.reshape(n, h // kh, kh, w // kw, kw, c)

    @jax.custom_vjp
    def pool(v):
        return windows(v).max(axis=(2, 4))

    def bwd(v, g):
        tiles = windows(v)
        is_max = tiles == tiles.max(axis=(2, 4), keepdims=True)
        position = (jnp.arange(kh)[:, None] * kw + jnp.arange(kw)[None, :]).reshape(1, 1, kh, 1, kw, 1)
        first = jnp.where(is_max, position, kh * kw).min(axis=(2, 4), keepdims=True)
        return (jnp.where(position == first, g[:, :, None, :, None, :], jnp.zeros((), g.dtype)).reshape(v.shape),)

    pool.defvjp(lambda v: (pool(v), v), bwd)
    return pool(x)


def paired_ratios(a_runs: list[float], b_runs: list[float]) -> tuple[float, float]:
    """``(median of the per-round ratios B / A, B's fastest round / A's fastest round)`` of two sides' images/s,
    one entry per round."""
    if len(a_runs) != len(b_runs) or not a_runs:
        raise UsageError(f"paired rounds need the same number of runs on each side (>= 1); got {len(a_runs)} "
                         f"and {len(b_runs)}")
    return statistics.median(b / a for a, b in zip(a_runs, b_runs, strict=True)), max(b_runs) / max(a_runs)


def summarise(runs: dict[str, list[dict]], names: list[str], pick) -> dict:
    """``{variant: {model: pick(that model's images/s over the rounds)}}``."""
    return {v: {name: float(pick([r[name] for r in rs])) for name in names} for v, rs in runs.items()}


def variants_markdown(results: dict, names: list[str], batch: int, repeats: int = 1, of: str = "median") -> str:
    """Train images/s per variant (``of`` the rounds); with torch, each variant's ratio to eager in brackets
    and a last row with the geometric mean of those ratios."""
    torch_row = results.get("torch eager")
    cols = [v for v in CPU_VARIANTS if v in results]
    lines = [f"Train img/s at batch {batch}, {of} of {repeats} (ratio to PyTorch eager in brackets)", "",
             "| model | " + " | ".join(cols) + (" | torch eager |" if torch_row else " |"),
             "|---" * (len(cols) + 1 + bool(torch_row)) + "|"]
    for name in names:
        cells = []
        for v in cols:
            value = results[v][name]
            cells.append(f"{value:.0f} ({value / torch_row[name]:.2f}x)" if torch_row else f"{value:.0f}")
        tail = f" | {torch_row[name]:.0f} |" if torch_row else " |"
        lines.append(f"| {name} | " + " | ".join(cells) + tail)
    if torch_row:
        means = [statistics.geometric_mean(results[v][name] / torch_row[name] for name in names) for v in cols]
        lines.append("| geometric mean | " + " | ".join(f"{m:.2f}x" for m in means) + " | |")
    return "\n".join(lines)


def run_cpu_variant(variant: str, names: list[str], batch: int, steps: int, warmup: int = 1) -> dict:
    """Train images/s of each row ``names`` with only the CPU changes up to ``variant`` (``steps`` timed after
    ``warmup`` untimed)."""
    if variant not in CPU_VARIANTS:
        raise UsageError(f"unknown variant {variant!r}; choose one of {CPU_VARIANTS}")
    _undo_changes(variant)
    out = {}
    for name in names:
        shape = SHAPES[name]
        out[name] = time_jax_training(bench_model(name), bench_spec(shape), shape, batch, steps,
                                      warmup=warmup)["train_img_s"]
    return out


def fastest_ms(fn, *args, steps: int) -> float:
    """Milliseconds of the fastest of ``steps`` calls, each waited for (after a compile call): this machine's
    slow spells only ever lengthen a call."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def timeit(fn, steps: int, sync=None) -> float:
    """Seconds for ``steps`` calls of ``fn``; ``sync()`` (e.g. ``torch.cuda.synchronize``) is called before the
    clock starts and before it is read, so work queued on an accelerator is counted."""
    sync = sync or (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return time.perf_counter() - t


TORCH_DEVICES = ("auto", "cpu", "cuda")


def torch_device(choice: str = "auto") -> str:
    """The device the torch twins run on: 'cuda' when ``choice`` is 'auto' and this torch sees a GPU, else
    'cpu'; 'cuda' without one is an error (a GPU bench against torch on the CPU would compare nothing)."""
    import torch

    if choice not in TORCH_DEVICES:
        raise UsageError(f"--torch_device must be one of {', '.join(TORCH_DEVICES)}; got {choice!r}")
    has_cuda = torch.cuda.is_available()
    if choice == "cuda" and not has_cuda:
        raise UsageError(f"--torch_device=cuda, but torch {torch.__version__} sees no GPU; install a CUDA build "
                         "of torch or pass --torch_device=cpu")
    return "cuda" if choice == "cuda" or (choice == "auto" and has_cuda) else "cpu"


def torch_device_name(device: str) -> str:
    """``'cpu'`` or the GPU's name, for the bench's metadata."""
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def torch_layout(device: str):
    """The memory format the torch twins run in: channels-last on a GPU (torch's fast convolution layout
    there), NCHW on the CPU (as measured before)."""
    import torch

    return torch.channels_last if device == "cuda" else torch.contiguous_format


def torch_autocast(device: str, precision: str):
    """The context a twin's forward runs in: ``torch.autocast`` in bfloat16 for 'bf16', a no-op for 'fp32'."""
    import torch

    return torch.autocast(device, torch.bfloat16, enabled=precision == "bf16")


def torch_steps(name: str, shape, batch: int, device: str = "cpu", precision: str = "fp32") -> dict:
    """The torch twin of ``name`` on ``device`` with one random uint8 batch ``[batch, C, H, W]``, and its
    ``train_step`` (SGD momentum 0.9, cross-entropy) and ``eval_step`` closures; ``sync`` waits for the GPU.

    The twin runs in :func:`torch_layout`; ``precision`` 'bf16' runs the forward under ``torch.autocast`` in
    bfloat16 (float32 parameters and loss), the counterpart of cnnjax's ``mixed_precision``."""
    import numpy as np
    import torch

    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    torch.manual_seed(0)
    # Fixed shapes: let cuDNN time its algorithms once, as XLA autotunes its convolutions on a GPU.
    torch.backends.cudnn.benchmark = device == "cuda"
    layout = torch_layout(device)
    model = bench_torch_model(name).to(device, memory_format=layout)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.RandomState(0)
    images = torch.from_numpy(rng.randint(0, 256, (batch, shape[2], shape[0], shape[1])).astype(np.uint8))
    images = images.to(device).contiguous(memory_format=layout)
    labels = torch.from_numpy(rng.randint(0, 10, batch).astype(np.int64)).to(device)

    def train_step():
        x = (images.float() / 255.0 - 0.5) / 0.25
        opt.zero_grad(set_to_none=True)
        with torch_autocast(device, precision):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        opt.step()
        return loss

    def eval_step():
        with torch.no_grad(), torch_autocast(device, precision):
            return model((images.float() / 255.0 - 0.5) / 0.25)

    return {"model": model, "train_step": train_step, "eval_step": eval_step,
            "sync": torch.cuda.synchronize if device == "cuda" else None}


def bench_torch(name: str, shape, batch: int, steps: int, compiled: bool, device: str = "cpu",
                precision: str = "fp32", warmup: int = 1, modes: tuple[str, ...] = ("train", "eval")) -> dict:
    """PyTorch train and / or eval throughput (``modes``) of the torch twin of ``name`` (:func:`torch_steps`),
    eager or ``torch.compile``-d, ``steps`` timed calls after a compile call and ``warmup`` untimed ones; every
    timing waits for the device."""
    import torch

    twin = torch_steps(name, shape, batch, device, precision)
    sync = twin["sync"] or (lambda: None)
    out = {}
    for mode, fn in (("train", twin["train_step"]), ("eval", twin["eval_step"])):
        if mode not in modes:
            continue
        twin["model"].train(mode == "train")
        step = torch.compile(fn) if compiled else fn
        t = time.perf_counter()
        step()
        sync()
        if mode == "train":
            out["compile_s"] = time.perf_counter() - t
        for _ in range(max(1, warmup)):
            step()
        sync()
        out[f"{mode}_img_s"] = steps * batch / timeit(step, steps, twin["sync"])
    return out


def bench_torch_sides(name: str, shape, batch: int, steps: int, compiled: bool, device: str = "cpu",
                      precision: str = "fp32", warmup: int = 1) -> dict:
    """``{'torch_eager': ..., 'torch_compile': ...}`` of one bench row, both timed in this one process (one
    torch import and device start-up per row): eager train and eval, then, with ``compiled``, the
    ``torch.compile``-d train step (the bench's tables show no compiled eval). A compile failure (no C++
    toolchain, say) becomes ``{'error': its first line}`` instead of losing the eager figures."""
    out = {"torch_eager": bench_torch(name, shape, batch, steps, False, device, precision, warmup)}
    if compiled:
        try:
            out["torch_compile"] = bench_torch(name, shape, batch, steps, True, device, precision, warmup,
                                               modes=("train",))
        except Exception as err:  # reported in the row; the eager figures are kept
            out["torch_compile"] = {"error": (str(err).splitlines() or [type(err).__name__])[0][:160]}
    return out
