"""What the benchmarks share: the bench rows (models and input shapes), cnnjax's and PyTorch's timed train steps,
and running one side in a fresh process of its own. Imports nothing heavy (jax, torch) until a function needs it."""

from __future__ import annotations

import json
import os
import platform
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
# The later torchvision families at ImageNet's size (``python -m experiments.bench.cpu --models zoo --batch 32``).
ZOO_ROWS = ("mobilenet_v2@224", "efficientnet_b0@224", "convnext_tiny@224", "regnet_y_400mf@224", "densenet121@224")
SHAPES = {"lenet5": (32, 32, 1), "improved_cnn": (32, 32, 3), "cifar_resnet20": (32, 32, 3), "resnet18": (32, 32, 3),
          "resnet18@224": (224, 224, 3), "fast_cnn": (32, 32, 3), "simple_cnn@28": (28, 28, 1),
          "fast_cnn@28": (28, 28, 1), "fast_cnn@28+residual": (28, 28, 1),
          **{row: (224, 224, 3) for row in ZOO_ROWS}}
# Rows whose model needs arguments: (cnnjax kwargs, torch twin kwargs). fast_cnn@28 is the net of the
# Fashion-MNIST recipes (fashion_mnist_30min, unpadded greyscale); +residual airbench96's groups.
ROW_KWARGS = {"simple_cnn@28": ({"image_size": 28}, {"c_in": 1, "image_size": 28}),
              "fast_cnn@28": ({}, {"c_in": 1}),
              "fast_cnn@28+residual": ({"residual": True}, {"c_in": 1, "residual": True})}


def bench_model(name: str):
    """The cnnjax model of bench row ``name`` (10 classes)."""
    from cnnjax import models

    return models.create(name.split("@")[0], num_classes=10, **ROW_KWARGS.get(name, ({}, {}))[0])


# Untimed steps before the timed ones, on both sides: cnnjax's step with the CPU backend reaches its steady time only
# after several steps, PyTorch eager's from its second.
WARMUP_STEPS = 10
# Marks the child's result line in in_fresh_process's output.
_RESULT_MARK = "cnnjax-result: "


def in_fresh_process(function: Callable, *args: Any, env: dict | None = None) -> Any:
    """``function(*args)`` run in a new Python process (``env``, default this one's environment) and its result,
    both passed as JSON; a failure raises ``RuntimeError`` with the child's last line of stderr.

    The benchmarks time each side this way, so that nothing one side set up in its process (a library's threads
    and OpenMP runtime, the allocator's state) can touch another side's figures."""
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


def machine() -> str:
    """This machine in one line, for a result's header: the CPU's model name and its cores."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def bench_torch_model(name: str):
    """The torch twin of bench row ``name`` (10 classes)."""
    from experiments.bench import torch_zoo

    return torch_zoo.build(name.split("@")[0], num_classes=10, **ROW_KWARGS.get(name, ({}, {}))[1])


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
    there), NCHW on the CPU."""
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
