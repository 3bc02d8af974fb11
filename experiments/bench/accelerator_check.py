"""Checks of the GPU acceptance command (``experiments/gpu_acceptance.sh``), one per call, and its summary.

``python -m experiments.bench.accelerator_check CHECK [--out FILE] [--allow_cpu] [options]``. Each check prints one
result line (``CHECK: ok|FAIL ...``), merges its figures into ``FILE`` under its name (rewritten whole, atomically)
and exits 0 when it holds, 1 when it does not (2: a usage error). The checks:

- ``backend``: JAX runs on the GPU (``jax.default_backend() == "gpu"``; ``--allow_cpu`` accepts the CPU); its
  devices, device kind, jax / jaxlib versions, XLA_FLAGS and the kernels seam's line.
- ``step_parity``: for each of ``--models``, ``--steps`` train steps from one initial state and one set of batch
  indices, on the accelerator (``Runner(scan=True)``: the chunk as one ``lax.scan``) and on
  ``jax.devices("cpu")[0]`` (``scan=False``: the CPU's host loop; plain XLA, or the CPU backend unless
  ``CNNJAX_CPU_BACKEND=0``), both traced under
  ``jax.default_matmul_precision("highest")``. Holds when the mean losses agree within
  ``rtol`` :data:`LOSS_RTOL` / ``atol`` :data:`LOSS_ATOL`, the parameters and BatchNorm statistics within a
  relative L2 distance of :data:`PARAMS_REL_L2`, the first step's parameter update within :data:`UPDATE_REL_L2`, and the
  correct counts within one per step (an argmax near a tie may flip). With ``--allow_cpu`` on a CPU-only
  machine the accelerator side is a second CPU device (XLA_FLAGS
  ``--xla_force_host_platform_device_count>=2``, set here when absent) still with ``scan=True``.
- ``bf16``: ``cnnjax.train.loop.fit`` with ``mixed_precision=True`` on synthetic CIFAR-shaped data; holds when
  every epoch's train loss is finite, the last is below the first and the parameters stay float32.
- ``resume``: ``fit`` uninterrupted against ``fit(stop_after_steps=--stop_after)`` then ``fit`` again (resumed),
  in two workdirs; holds when the final parameters and BatchNorm statistics are bitwise equal. On a GPU this
  needs XLA's deterministic ops, so this check adds ``--xla_gpu_deterministic_ops=true`` to XLA_FLAGS.
- ``compile_cache``: the same ``python -m experiments.train`` run twice, each in a fresh process, with one fresh
  ``CNNJAX_COMPILATION_CACHE`` directory; reports each run's first-epoch time (``epoch_time_s`` of its
  ``metrics.jsonl``: training of epoch 1, compilation included, evaluation excluded), its process wall time,
  the files in the cache after the first run, and the ratio first / second. It only measures (holds when both
  runs finish).
- ``two_process``: ``python -m experiments.launch --num_processes=2 -- python -m experiments.train ...
  --config.parallelism=sharded --stop_after_steps=--stop_after``; holds when it exits 0 or 75 (stopped with a
  checkpoint).
- ``summary OUTDIR``: one markdown summary of an acceptance run's directory (the checks' ``checks.json``, the
  bench JSONs, ``sections.tsv``), printed and written to ``OUTDIR/summary.md``; names the device once.

The data of ``bf16`` / ``resume`` / ``compile_cache`` / ``two_process`` is ``--data`` (a directory holding
``cifar-10-batches-py``, e.g. written by ``experiments.make_synthetic_cifar``), or a synthetic set of
``--train_images`` written to a temporary directory. ``compile_cache`` and ``two_process`` never import JAX in
this process (the GPU stays free for their children).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time

CHECKS = ("backend", "step_parity", "bf16", "resume", "compile_cache", "two_process")
# step_parity's tolerances (float32, 'highest' precision on both sides). A float32 sum of K terms in another order
# differs by about sqrt(K) * 1.2e-7 relative (K ~ 2304 for a 3x3x256 conv: ~6e-6 per layer); measured between the
# CPU's scan and host-loop programs: losses equal, parameters 1e-7, updates 5e-5 at most. TF32 (a 10-bit mantissa,
# what 'default' precision may use on NVIDIA) rounds each product to ~1e-3, and a wrong kernel is off by more.
LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-5
PARAMS_REL_L2 = 1e-4
UPDATE_REL_L2 = 1e-3  # the parameters' change in the first step: a stricter view of the gradients than PARAMS_REL_L2
# step_parity's models: NAME or NAME@28 -> (input shape [H, W, C], create() keywords, crop padding + flip).
PARITY_MODELS = {"cifar_resnet20": ((32, 32, 3), {}, True), "fast_cnn": ((32, 32, 3), {}, True),
                 "lenet5@28": ((28, 28, 1), {"conv1_padding": 2}, False), "lenet5": ((32, 32, 1), {}, False),
                 "simple_cnn": ((32, 32, 3), {}, True), "gap_cnn": ((32, 32, 3), {}, True)}
# step_parity's SGD learning rate (momentum 0.9): small enough that three steps do not amplify float32 rounding
# (at 0.05, cifar_resnet20 on random images turns a first-step difference of 5e-6 into 6e-3 by the third step).
PARITY_LR = 0.01
EXIT_INTERRUPTED = 75  # experiments.train: stopped with a checkpoint (experiments.startup.EXIT_INTERRUPTED)


class CheckFailed(Exception):
    """A check ran and its condition does not hold (exit 1)."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line (see the module doc)."""
    p = argparse.ArgumentParser(prog="python -m experiments.bench.accelerator_check",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("check", choices=(*CHECKS, "summary"))
    p.add_argument("outdir", nargs="?", default="", help="summary: the acceptance run's output directory")
    p.add_argument("--out", default="", help="merge this check's result into this JSON file")
    p.add_argument("--allow_cpu", action="store_true", help="accept the CPU as the accelerator (tests, no GPU)")
    p.add_argument("--models", default="cifar_resnet20,fast_cnn,lenet5@28",
                   help=f"step_parity's models, from {', '.join(PARITY_MODELS)}")
    p.add_argument("--batch", type=int, default=32, help="step_parity: the batch size")
    p.add_argument("--steps", type=int, default=3, help="step_parity: train steps on each side")
    p.add_argument("--data", default="", help="a directory holding cifar-10-batches-py ('' : write a synthetic one)")
    p.add_argument("--train_images", type=int, default=2000, help="bf16 / resume: training images used")
    p.add_argument("--model", default="cifar_resnet20", help="bf16 / resume: the model")
    p.add_argument("--epochs", type=int, default=2, help="bf16 / resume / compile_cache: epochs")
    p.add_argument("--train_batch", type=int, default=100, help="bf16 / resume: the batch size")
    p.add_argument("--stop_after", type=int, default=5, help="resume / two_process: steps before the stop")
    p.add_argument("--chunk", type=int, default=5, help="bf16 / resume: log_every (steps per chunk)")
    p.add_argument("--train_config", default="experiments/configs/cifar10_fast.py",
                   help="compile_cache / two_process: the experiments.train config file")
    p.add_argument("--train_args", default="", help="compile_cache / two_process: more experiments.train arguments "
                   "(one shell-quoted string)")
    args = p.parse_args(argv)
    if args.check == "summary" and not args.outdir:
        p.error("summary needs OUTDIR")
    return args


def add_xla_flag(flag: str) -> None:
    """Append ``flag`` to XLA_FLAGS unless its name is there already (before JAX starts its backends)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if flag.split("=")[0] not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


def record(path: str, name: str, result: dict) -> None:
    """Merge ``result`` into the JSON object at ``path`` under ``name`` (the file rewritten whole)."""
    from cnnjax.io import read_json, write_json_atomic

    saved = read_json(path, "delete it and run the checks again") if os.path.isfile(path) else {}
    saved[name] = result
    write_json_atomic(path, saved)


# --- backend ---------------------------------------------------------------------------------------------------
def check_backend(args: argparse.Namespace) -> dict:
    """JAX's default backend, devices and versions; fails unless the backend is 'gpu' (or ``--allow_cpu``)."""
    import jax
    import jaxlib

    devices = jax.devices()
    out = {"backend": jax.default_backend(), "devices": [str(d) for d in devices], "device_count": len(devices),
           "device_kind": devices[0].device_kind, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "kernels": cpu_backend_state(),
           "process_count": jax.process_count()}
    out["line"] = (f"backend {out['backend']}, {len(devices)} x {out['device_kind']}, jax {out['jax']}, "
                   f"jaxlib {out['jaxlib']}")
    if out["backend"] != "gpu" and not args.allow_cpu:
        raise CheckFailed(f"JAX runs on {out['backend']!r}, not 'gpu' ({out['devices']}); check the CUDA plugin "
                          "(pip show jax-cuda12-plugin) and nvidia-smi", out)
    return out


def cpu_backend_state() -> str:
    """Whether cnnjax's CPU backend is switched on and its library built (never builds it)."""
    from cnnjax import kernels
    from cnnjax.cpu import onednn

    if not kernels.enabled("cpu"):
        return "cpu backend off (CNNJAX_CPU_BACKEND=0): plain XLA on every platform"
    built = getattr(onednn, "built", lambda: None)()
    return f"cpu backend on; oneDNN library {built or 'not built yet'}"


# --- step_parity -----------------------------------------------------------------------------------------------
def accelerator_device(allow_cpu: bool):
    """The device the accelerator side runs on: JAX's first non-CPU device, else (``allow_cpu``) the second CPU
    device."""
    import jax

    if jax.default_backend() != "cpu":
        return jax.devices()[0]
    cpus = jax.devices("cpu")
    if not allow_cpu or len(cpus) < 2:
        raise CheckFailed(f"no accelerator: JAX has {len(cpus)} CPU device(s) only; run on a GPU, or pass "
                          "--allow_cpu with XLA_FLAGS=--xla_force_host_platform_device_count=2", {})
    return cpus[1]


def parity_problem(name: str, batch: int, steps: int) -> dict:
    """``{'model', 'spec', 'state', 'images', 'labels', 'idx'}`` for step_parity: the host initial state (SGD
    :data:`PARITY_LR`, momentum 0.9, seed 0), 4 * ``batch`` random uint8 images and indices ``[steps, batch]``
    into them."""
    import jax
    import numpy as np
    import optax

    from cnnjax import models
    from cnnjax.data.pipeline import AugmentConfig
    from cnnjax.train.state import create_train_state
    from cnnjax.train.steps import StepSpec

    if name not in PARITY_MODELS:
        raise ValueError(f"unknown step_parity model {name!r}; choose from {', '.join(PARITY_MODELS)}")
    shape, kwargs, augmented = PARITY_MODELS[name]
    model = models.create(name.split("@")[0], num_classes=10, **kwargs)
    augment = AugmentConfig(4, True) if augmented else AugmentConfig()
    spec = StepSpec(10, (0.5,) * shape[2], (0.25,) * shape[2], augment=augment)
    if "precision" in {f.name for f in dataclasses.fields(StepSpec)}:  # a step that sets its own precision
        spec = dataclasses.replace(spec, precision="highest")
    state = create_train_state(model, optax.sgd(PARITY_LR, momentum=0.9), shape, jax.random.PRNGKey(0))
    rng = np.random.RandomState(0)
    n = 4 * batch
    return {"model": model, "spec": spec, "state": jax.device_get(state),
            "images": rng.randint(0, 256, (n, *shape)).astype(np.uint8),
            "labels": rng.randint(0, 10, n).astype(np.int32),
            "idx": rng.permutation(n)[:steps * batch].reshape(steps, batch).astype(np.int32)}


def train_on(problem: dict, device, scan: bool) -> list[tuple]:
    """``[(host state, host metrics) after the first step, (...) after all of the problem's steps]`` on ``device``,
    each from the initial state, traced at 'highest'. ``scan``: one runner whose chunk is all the steps, the first
    step alone a padded chunk of it (one program for both)."""
    import jax

    from cnnjax.train.runner import Runner

    idx = problem["idx"]
    with jax.default_matmul_precision("highest"):
        runner = Runner(problem["spec"], problem["model"].apply, "jit", [device], scan=scan, chunk_steps=len(idx))
        images, labels = runner.put_data(problem["images"], problem["labels"])
        out = []
        for rows in (idx[:1], idx):
            state, metrics = runner.train(runner.put_state(problem["state"]), images, labels, rows)
            out.append((runner.get_state(state), {k: float(v) for k, v in jax.device_get(metrics).items()}))
        return out


def rel_l2(a, b, origin=None) -> float:
    """``|a - b| / |b - origin|`` over every leaf of two trees of one structure (float64; 0 when both are 0)."""
    import jax
    import numpy as np

    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    lo = jax.tree_util.tree_leaves(origin) if origin is not None else [0.0] * len(lb)
    def sq(x, y) -> float:
        return float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))

    diff = sum(sq(x, y) for x, y in zip(la, lb, strict=True))
    norm = sum(sq(y, o) for y, o in zip(lb, lo, strict=True))
    return math.sqrt(diff / norm) if norm else math.sqrt(diff)


def compare_sides(name: str, problem: dict, accel, ref, first: tuple | None = None) -> dict:
    """step_parity's figures for one model: the accelerator side ``accel`` against the CPU side ``ref`` (each
    ``(state, metrics)`` after all steps) and whether they agree (see the module doc for the bounds). The update
    bound applies to ``first = (accel, ref)`` after one step when given: over several steps training amplifies
    float32 rounding (``update_rel_l2_all`` reports it)."""
    (sa, ma), (sb, mb) = accel, ref
    (fa, _), (fb, _) = first if first is not None else (accel, ref)
    loss_a, loss_b = ma["loss_sum"] / ma["count"], mb["loss_sum"] / mb["count"]
    batch = problem["idx"].shape[1]
    out = {"model": name, "steps": int(mb["count"]) // batch, "loss_accel": loss_a, "loss_cpu": loss_b,
           "loss_rel": abs(loss_a - loss_b) / max(abs(loss_b), 1e-30),
           "correct_diff": abs(ma["correct"] - mb["correct"]),
           "params_rel_l2": rel_l2(sa.params, sb.params),
           "update_rel_l2": rel_l2(fa.params, fb.params, problem["state"].params),
           "update_rel_l2_all": rel_l2(sa.params, sb.params, problem["state"].params),
           "batch_stats_rel_l2": rel_l2(sa.batch_stats, sb.batch_stats)}
    out["ok"] = bool(ma["count"] == mb["count"] == problem["idx"].size
                     and abs(loss_a - loss_b) <= LOSS_ATOL + LOSS_RTOL * abs(loss_b)
                     and out["correct_diff"] <= out["steps"]
                     and out["params_rel_l2"] < PARAMS_REL_L2 and out["batch_stats_rel_l2"] < PARAMS_REL_L2
                     and out["update_rel_l2"] < UPDATE_REL_L2)
    return out


def check_step_parity(args: argparse.Namespace) -> dict:
    """``--steps`` steps of each of ``--models`` on the accelerator (scan) against the CPU (host loop)."""
    import jax

    accel_device, cpu = accelerator_device(args.allow_cpu), jax.devices("cpu")[0]
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        problem = parity_problem(name, args.batch, args.steps)
        (accel_first, accel_all), (cpu_first, cpu_all) = (train_on(problem, accel_device, True),
                                                          train_on(problem, cpu, False))
        rows.append(compare_sides(name, problem, accel_all, cpu_all, first=(accel_first, cpu_first)))
        print(f"# {name}: loss {rows[-1]['loss_accel']:.6f} vs {rows[-1]['loss_cpu']:.6f}, params rel L2 "
              f"{rows[-1]['params_rel_l2']:.1e}, update rel L2 {rows[-1]['update_rel_l2']:.1e}", flush=True)
    out = {"accelerator": str(accel_device), "cpu": str(cpu), "batch": args.batch, "rows": rows,
           "tolerance": {"loss_rtol": LOSS_RTOL, "loss_atol": LOSS_ATOL, "params_rel_l2": PARAMS_REL_L2,
                         "update_rel_l2": UPDATE_REL_L2}}
    out["line"] = f"{args.steps} steps, {accel_device} (scan) vs {cpu} (host loop): " + "; ".join(
        f"{r['model']} loss rel {r['loss_rel']:.1e} params {r['params_rel_l2']:.1e} first update "
        f"{r['update_rel_l2']:.1e}{'' if r['ok'] else ' (OUT OF TOLERANCE)'}" for r in rows)
    if not all(r["ok"] for r in rows):
        raise CheckFailed(out["line"], out)
    return out


# --- training checks (bf16, resume) ----------------------------------------------------------------------------
def synthetic_data(args: argparse.Namespace, tmp: str) -> str:
    """``--data``, or a synthetic CIFAR-shaped set of twice ``--train_images`` (every class can give a tenth of
    ``--train_images``) and 500 test images written under ``tmp``: a directory holding ``cifar-10-batches-py``."""
    if args.data:
        return args.data
    root = os.path.join(tmp, "data")
    done = subprocess.run([sys.executable, "-m", "experiments.make_synthetic_cifar", f"--out={root}",
                           f"--train={2 * args.train_images}", "--test=500"], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"make_synthetic_cifar failed: {(done.stderr.strip().splitlines() or [''])[-1]}")
    return root


def train_config(args: argparse.Namespace, data: str, mixed_precision: bool):
    """A small CIFAR-10 config of ``--model`` on ``data``: ``--train_images`` images (a tenth per class),
    ``--train_batch`` (also the eval batch), ``--epochs``, chunks of ``--chunk`` steps, SGD 0.05 momentum 0.9,
    crop + flip, no plots, no decoded-array cache. The defaults give 20 steps per epoch in chunks of 5, and
    ``resume`` stops after 5: every call compiles one chunk length."""
    from experiments.configs.base import cifar10_config

    c = cifar10_config(args.model)
    c.data.dir, c.data.cache_dir = data, ""
    c.data.train_per_class = max(1, args.train_images // 10)
    c.batch_size, c.eval_batch_size = args.train_batch, args.train_batch
    c.num_epochs, c.log_every, c.plots = args.epochs, args.chunk, False
    c.learning_rate, c.mixed_precision = 0.05, mixed_precision
    return c


def epoch_rows(workdir: str) -> list[dict]:
    """The per-epoch rows of ``workdir/metrics.jsonl`` (those with ``epoch_time_s``)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "epoch_time_s" in r]


def check_bf16(args: argparse.Namespace) -> dict:
    """A short ``mixed_precision`` training: finite, decreasing epoch losses and float32 parameters."""
    import copy

    import jax
    import numpy as np

    from cnnjax import checkpoint
    from cnnjax.train.loop import fit

    with tempfile.TemporaryDirectory(prefix="bf16_") as tmp:
        config = train_config(args, synthetic_data(args, tmp), mixed_precision=True)
        fit(copy.deepcopy(config), os.path.join(tmp, "run"), progress=False)
        rows = epoch_rows(os.path.join(tmp, "run"))
        variables, _ = checkpoint.restore_variables(os.path.join(tmp, "run"), "latest")
    losses = [r["train_loss"] for r in rows]
    dtypes = sorted({str(np.asarray(x).dtype) for x in jax.tree_util.tree_leaves(variables)})
    out = {"model": args.model, "train_loss": losses, "val_accuracy": [r["val_accuracy"] for r in rows],
           "epoch_s": [r["epoch_time_s"] for r in rows], "variable_dtypes": dtypes}
    out["line"] = (f"{args.model} bf16, {len(rows)} epochs: train loss {' -> '.join(f'{v:.4f}' for v in losses)}, "
                   f"val acc {out['val_accuracy'][-1]:.3f}, variables {'/'.join(dtypes)}")
    if not (len(losses) >= 2 and all(map(math.isfinite, losses)) and losses[-1] < losses[0]
            and dtypes == ["float32"]):
        raise CheckFailed(out["line"] + " (expected finite, decreasing losses and float32 variables)", out)
    return out


def check_resume(args: argparse.Namespace) -> dict:
    """Uninterrupted ``fit`` against stopped + resumed ``fit``: bitwise-equal final variables."""
    import copy

    import jax
    import numpy as np

    from cnnjax import checkpoint
    from cnnjax.train.loop import fit

    with tempfile.TemporaryDirectory(prefix="resume_") as tmp:
        config = train_config(args, synthetic_data(args, tmp), mixed_precision=False)
        config.deterministic = True  # fit refuses a GPU run without XLA's deterministic ops
        whole, parts = os.path.join(tmp, "whole"), os.path.join(tmp, "parts")
        fit(copy.deepcopy(config), whole, progress=False)
        stopped = fit(copy.deepcopy(config), parts, progress=False, stop_after_steps=args.stop_after)
        fit(copy.deepcopy(config), parts, progress=False)
        (a, meta_a), (b, meta_b) = (checkpoint.restore_variables(d, "latest") for d in (whole, parts))
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    if len(la) != len(lb):
        raise CheckFailed(f"the resumed run has {len(lb)} variables, the uninterrupted one {len(la)}", {})
    differing = sum(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb, strict=True))
    out = {"model": args.model, "stopped": {k: stopped.get(k) for k in ("interrupted", "epoch", "step_in_epoch")},
           "leaves": len(la), "differing_leaves": differing, "rel_l2": rel_l2(b, a),
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "steps": [meta_a.get("step"), meta_b.get("step")]}
    out["line"] = (f"{args.model}, stopped after {args.stop_after} steps (epoch {stopped.get('epoch')}) and resumed: "
                   f"{len(la) - differing}/{len(la)} leaves bitwise equal (rel L2 {out['rel_l2']:.1e})")
    if not (stopped.get("interrupted") and differing == 0 and out["steps"][0] == out["steps"][1]):
        raise CheckFailed(out["line"], out)
    return out


# --- subprocess checks (compile_cache, two_process) ------------------------------------------------------------
def train_command(args: argparse.Namespace, data: str, workdir: str) -> list[str]:
    """``python -m experiments.train`` of ``--train_config`` on ``data`` (CIFAR-10 format), ``--epochs``,
    evaluation every epoch, no plots, no progress bar, then ``--train_args``."""
    return [sys.executable, "-m", "experiments.train", f"--config={args.train_config}", f"--workdir={workdir}",
            f"--config.data.dir={data}", "--config.data.name=cifar10", f"--config.num_epochs={args.epochs}",
            "--config.eval_every=1", "--config.plots=False", "--noprogress", *shlex.split(args.train_args)]


def timed_run(cmd: list[str], env: dict, log: str) -> tuple[int, float, str]:
    """``(exit status, wall seconds, last output line)`` of ``cmd``; its output appended to ``log``."""
    t = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n{done.stdout}{done.stderr}(exit {done.returncode}, {wall:.1f} s)\n")
    # The run's own last line when it ended as it should, its error (stderr) when it did not.
    text = done.stdout if done.returncode in (0, EXIT_INTERRUPTED) else done.stderr
    lines = (text.strip() or done.stdout.strip() or done.stderr.strip()).splitlines()
    errors = [line for line in lines if "error:" in line] if done.returncode not in (0, EXIT_INTERRUPTED) else []
    return done.returncode, wall, (errors or lines or ["(no output)"])[-1]


def compile_stages(line: str) -> dict[str, float]:
    """The seconds of ``experiments.train --compile_stats``'s last line (:func:`cnnjax.compile_cache.describe_stages`)
    by stage: trace, lower, xla_compile, cache_load, saved."""
    if not line.startswith("compilation: "):
        raise CheckFailed(f"experiments.train --compile_stats ended with {line!r}, not its compilation line", {})
    numbers = [float(word) for word in line.replace("(", " ").split() if word.replace(".", "", 1).isdigit()]
    return dict(zip(("trace", "lower", "xla_compile", "cache_load", "saved"), numbers, strict=True))


def check_compile_cache(args: argparse.Namespace) -> dict:
    """The same training twice, each a fresh process sharing one fresh ``CNNJAX_COMPILATION_CACHE``: first-epoch
    time (metrics.jsonl ``epoch_time_s``) and process wall time of each, and their ratios."""
    with tempfile.TemporaryDirectory(prefix="compile_cache_") as tmp:
        data, cache = synthetic_data(args, tmp), os.path.join(tmp, "cache")
        os.makedirs(cache)
        env = dict(os.environ, CNNJAX_COMPILATION_CACHE=cache)
        log = os.path.join(tmp, "runs.log")
        runs = []
        for k in (1, 2):
            workdir = os.path.join(tmp, f"run{k}")
            status, wall, last = timed_run([*train_command(args, data, workdir), "--compile_stats"], env, log)
            if status:
                raise CheckFailed(f"run {k} of {args.train_config} exited {status}: {last}", {"runs": runs})
            runs.append({"first_epoch_s": epoch_rows(workdir)[0]["epoch_time_s"], "process_s": wall,
                         "cache_files": sum(len(files) for _, _, files in os.walk(cache)),
                         "stages_s": compile_stages(last)})
    first, second = runs
    out = {"config": args.train_config, "train_args": args.train_args, "runs": runs,
           "first_epoch_ratio": first["first_epoch_s"] / second["first_epoch_s"],
           "process_ratio": first["process_s"] / second["process_s"],
           "timed": "epoch 1's epoch_time_s in metrics.jsonl (training with compilation, no evaluation), and "
                    "the process wall time"}
    out["xla_ratio"] = first["stages_s"]["xla_compile"] / max(
        second["stages_s"]["xla_compile"] + second["stages_s"]["cache_load"], 1e-9)
    out["line"] = (f"XLA compile {first['stages_s']['xla_compile']:.1f} s cold, "
                   f"{second['stages_s']['xla_compile'] + second['stages_s']['cache_load']:.1f} s with the cache "
                   f"({out['xla_ratio']:.1f}x; tracing {second['stages_s']['trace']:.1f} s each run); "
                   f"first epoch {first['first_epoch_s']:.1f} s cold, {second['first_epoch_s']:.1f} s with the cache "
                   f"({out['first_epoch_ratio']:.1f}x); process {first['process_s']:.1f} s / {second['process_s']:.1f}"
                   f" s; {first['cache_files']} cache files after run 1")
    return out


def check_two_process(args: argparse.Namespace) -> dict:
    """Two processes of one sharded run through ``experiments.launch``, stopped after ``--stop_after`` steps."""
    with tempfile.TemporaryDirectory(prefix="two_process_") as tmp:
        data = synthetic_data(args, tmp)
        train = train_command(args, data, os.path.join(tmp, "run"))
        cmd = [sys.executable, "-m", "experiments.launch", "--num_processes=2", "--", *train,
               "--config.parallelism=sharded", f"--stop_after_steps={args.stop_after}"]
        log = os.path.join(tmp, "launch.log")
        status, wall, last = timed_run(cmd, dict(os.environ), log)
        with open(log) as f:
            tail = f.read().strip().splitlines()[-12:]
    out = {"status": status, "process_s": wall, "tail": tail, "config": args.train_config,
           "line": f"2 processes, sharded, stop after {args.stop_after} steps: exit {status} in {wall:.1f} s ({last})"}
    if status not in (0, EXIT_INTERRUPTED):
        raise CheckFailed(out["line"], out)
    return out


# --- summary ---------------------------------------------------------------------------------------------------
def _load(path: str) -> dict:
    """The JSON object at ``path``, or ``{}`` when it is missing or unreadable (a section that did not run)."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def _sections(outdir: str) -> list[list[str]]:
    """``sections.tsv``'s rows: name, budget s, exit status, seconds."""
    try:
        with open(os.path.join(outdir, "sections.tsv")) as f:
            return [line.rstrip("\n").split("\t") for line in f if line.strip()]
    except OSError:
        return []


def _img_s(side: dict) -> float | None:
    return side.get("train_img_s") if isinstance(side, dict) else None


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "n/a"


def _num(x: float | None) -> str:
    return f"{x:.0f}" if x else "n/a"


def bench_lines(rows: list[dict]) -> list[str]:
    """The bench rows' table with the issue's goals: at batch <= 128 cnnjax ahead of PyTorch eager and of
    ``torch.compile``; above, within 5% of ``torch.compile``."""
    lines = ["## Bench rows (train images/s)", "",
             "| model | batch | precision | cnnjax | torch eager | torch.compile | cnnjax / eager | cnnjax / compile "
             "| goal |", "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ours, eager, comp = _img_s(r.get("jax", {})), _img_s(r.get("torch_eager")), _img_s(r.get("torch_compile"))
        if not (ours and eager and comp):
            goal = "n/a"
        elif r["batch"] <= 128:
            goal = "met" if ours > eager and ours > comp else "missed (ahead of eager and compile)"
        else:
            goal = "met" if ours >= 0.95 * comp else "missed (within 5% of compile)"
        lines.append(f"| {r['model']} | {r['batch']} | {r.get('precision', 'fp32')} | {_num(ours)} | "
                     f"{_num(eager)} | {_num(comp)} | {_ratio(ours, eager)} | {_ratio(ours, comp)} | {goal} |")
    return lines


def recipe_lines(saved: dict, cache: dict) -> list[str]:
    """The fast recipe's epochs (cnnjax, eager, compile) with its goal, and the warm-cache first epoch against
    PyTorch eager's first epoch (goal: at most 2x)."""
    sides = {r["side"]: r["epoch_s"] for r in saved.get("rows", [])}
    meta = saved.get("meta", {})
    lines = [f"## Fast recipe ({meta.get('steps_per_epoch', '?')} steps of {meta.get('batch', '?')} per epoch, "
             f"{meta.get('precision', '?')}, CIFAR-shaped synthetic data)", "",
             "| side | epoch 1 s (compile) | last epoch s | cnnjax speed / side's |", "|---|---:|---:|---:|"]
    ours = sides.get("cnnjax", [None])[-1]
    for side, epochs in sides.items():
        lines.append(f"| {side} | {epochs[0]:.2f} | {epochs[-1]:.2f} | {_ratio(epochs[-1], ours)} |")
    comp = sides.get("torch.compile", [None])[-1]
    if ours and comp:
        lines += ["", f"Goal, last epoch at least as fast as torch.compile's: {'met' if ours <= comp else 'missed'}."]
    runs, eager = cache.get("runs", []), sides.get("torch eager", [None])[0]
    if len(runs) == 2:
        lines += ["", f"Compile cache: first epoch {runs[0]['first_epoch_s']:.2f} s cold, "
                  f"{runs[1]['first_epoch_s']:.2f} s warm ({cache['first_epoch_ratio']:.1f}x; process "
                  f"{runs[0]['process_s']:.1f} s / {runs[1]['process_s']:.1f} s)."]
        if eager:
            warm = runs[1]["first_epoch_s"] / eager
            lines.append(f"Warm first epoch / PyTorch eager's first epoch: {warm:.2f} (goal <= 2: "
                         f"{'met' if warm <= 2 else 'missed'}).")
    return lines


def summary(outdir: str) -> str:
    """The markdown summary of an acceptance run's ``outdir``; the device is named once, in the title."""
    checks = _load(os.path.join(outdir, "checks.json"))
    bench = [_load(os.path.join(outdir, f"throughput_{p}.json")) for p in ("fp32", "bf16")]
    recipe = _load(os.path.join(outdir, "recipe.json"))
    be = checks.get("backend", {})
    meta = next((b["meta"] for b in bench if b.get("meta")), recipe.get("meta", {}))
    device = be.get("device_kind") or meta.get("device", "unknown device")
    lines = [f"# GPU acceptance on {device}", "",
             f"{be.get('device_count', '?')} device(s), backend {be.get('backend', '?')}; jax {be.get('jax', '?')}, "
             f"jaxlib {be.get('jaxlib', '?')}, torch {meta.get('torch', '?')}", "",
             "| section | budget s | took s | exit | result |", "|---|---:|---:|---:|---|"]
    for name, budget, status, took in _sections(outdir):
        result = checks.get(name, {})
        text = result.get("line", "") if name != "backend" else f"JAX on {be.get('backend', '?')} (title)"
        if name.startswith("throughput_") or name == "recipe":
            saved = _load(os.path.join(outdir, f"{name}.json"))
            text = f"{len(saved.get('rows', []))} rows, complete: {saved.get('complete', False)}"
        verdict = "" if not result else ("ok: " if result.get("ok") else "FAIL: ")
        timed_out = " (timed out)" if status == "124" else ""
        lines.append(f"| {name} | {budget} | {took} | {status}{timed_out} | {verdict}{text.replace('|', '/')} |")
    rows = [r for b in bench for r in b.get("rows", [])]
    if rows:
        lines += [""] + bench_lines(rows)
    if recipe or checks.get("compile_cache"):
        lines += [""] + recipe_lines(recipe, checks.get("compile_cache", {}))
    return "\n".join(lines)


RUNNERS = {"backend": check_backend, "step_parity": check_step_parity, "bf16": check_bf16, "resume": check_resume,
           "compile_cache": check_compile_cache, "two_process": check_two_process}


def main(argv: list[str] | None = None) -> int:
    """Run one check (or the summary); 0 when it holds, 1 when it does not."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.check == "summary":
        text = summary(args.outdir)
        with open(os.path.join(args.outdir, "summary.md"), "w") as f:
            f.write(text + "\n")
        print(text)
        return 0
    if args.allow_cpu and args.check in ("backend", "step_parity"):
        add_xla_flag("--xla_force_host_platform_device_count=2")  # a second CPU device for step_parity
    if args.check == "resume":  # bitwise-reproducible GPU kernels; the CPU's already are
        from cnnjax.train.checks import with_deterministic_flag

        os.environ["XLA_FLAGS"] = with_deterministic_flag(os.environ.get("XLA_FLAGS", ""))
    try:
        result, ok = RUNNERS[args.check](args), True
    except CheckFailed as failed:
        result, ok = {**failed.args[1], "line": failed.args[0]}, False
    result["ok"] = ok
    print(f"{args.check}: {'ok' if ok else 'FAIL'} {result['line']}", flush=True)
    if args.out:
        record(args.out, args.check, result)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
