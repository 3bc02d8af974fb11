"""The throughput table on any device (the GPU table): cnnjax against PyTorch eager and ``torch.compile``.

``python -m experiments.bench.throughput [--quick] [--models M,...] [--batches 128,512] [--precisions fp32,bf16]
[--steps 10] [--torch_device auto] [--out FILE]`` prints a markdown table (train and eval images/s, compile time
separately, cnnjax / PyTorch eager per row) and writes JSON to FILE, rewritten whole after every row
(``"complete": false`` until the run ends); ``--render FILE,...`` prints saved rows again. The GPU table::

    python -m experiments.bench.throughput --batches 128 --precisions fp32,bf16 --steps 50 --out gpu.json

(``--quick --models lenet5 --steps 3 --notorch_compile --nopipeline`` first checks a machine's set-up in a minute).

Same network (the torch twins in experiments/bench/torch_twins.py, equal parameter counts), same batch, SGD with
momentum 0.9, cross-entropy, uint8 input normalised inside the step in both frameworks. cnnjax runs on JAX's
default device and torch on the GPU when it sees one (``--torch_device``), so on a GPU machine both sides are on
the GPU (torch with cuDNN's autotuning on, as XLA autotunes; JAX takes at most 45% of its memory, so that the
PyTorch processes have the rest); ``bf16`` rows compute in bfloat16 on both sides (float32 parameters). PyTorch
(eager, then the ``torch.compile``-d train step) runs in a process of its own for each row
(:func:`experiments.bench.lib.in_fresh_process`). The last line times a full epoch through the on-device pipeline
(permutation + crop/flip augmentation) against the same number of steps on one resident batch.
"""

from __future__ import annotations

import os
import sys

# ruff: noqa: E402  (the program's first steps below come before its imports)
if __name__ == "__main__":  # first: SIGTERM / Ctrl-C is one line and status 75 from here on (experiments.startup)
    from experiments import startup

    startup.begin(compile_cache=False)  # the signal handler, the process settings; compiles timed uncached
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")  # the GPU's rest for the PyTorch processes

import time

from absl import flags

from cnnjax.errors import UsageError
from cnnjax.io import write_json_atomic
from experiments import cli, startup
from experiments.bench.lib import (
    PRECISIONS,
    SHAPES,
    WARMUP_STEPS,
    bench_model,
    bench_torch_sides,
    in_fresh_process,
    machine,
    read_saved_result,
    torch_device,
    torch_device_name,
)

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined when it runs, not on import)."""
    flags.DEFINE_bool("quick", False, "batch 128 only, 3 timed steps, resnet18@224 at batch 16")
    flags.DEFINE_list("batches", ["128", "512"], "batch sizes of each row (without --quick)")
    flags.DEFINE_bool("pipeline", True, "add the on-device pipeline's epoch-overhead line (cifar_resnet20)")
    flags.DEFINE_string("out", "", "write the results as JSON here")
    flags.DEFINE_list("render", [], "print the table of these saved --out files' rows (the first one's machine "
                      "line) and time nothing")
    flags.DEFINE_integer("steps", 10, "timed steps per row (after warm-up)")
    flags.DEFINE_integer("warmup", WARMUP_STEPS, "untimed train steps per row before the timed ones, on both sides")
    flags.DEFINE_bool("torch", True, "also time PyTorch (eager and torch.compile)")
    flags.DEFINE_bool("torch_compile", True, "with --torch, also time torch.compile's train step (needs a C++ "
                      "toolchain)")
    flags.DEFINE_list("models", ["lenet5", "improved_cnn", "cifar_resnet20", "resnet18", "resnet18@224", "fast_cnn"],
                      "rows to run (NAME or NAME@SIZE)")
    flags.DEFINE_list("precisions", ["fp32"], "fp32 and / or bf16 (bfloat16 compute, float32 parameters) rows")
    flags.DEFINE_string("torch_device", "auto", "auto (the GPU when torch sees one, else the CPU) | cpu | cuda")


def bench_jax(name: str, shape, batch: int, steps: int, precision: str = "fp32", warmup: int = 1) -> dict:
    """cnnjax train (real Runner, ``warmup`` untimed steps first) and eval throughput for one row, on JAX's
    default device."""
    import jax
    import numpy as np

    from cnnjax.train.evaluation import zero_totals
    from experiments.bench.lib import bench_spec, time_jax_training

    model, spec = bench_model(name), bench_spec(shape, precision)
    out = time_jax_training(model, spec, shape, batch, steps, warmup=warmup)
    evaluator, state = out["runner"].evaluator, out["state"]  # the state stays on the device (jit mode)
    totals = zero_totals(spec.num_classes)
    ev = evaluator.eval_fn  # (totals, params, batch_stats, images, labels, mask) -> totals + this batch's metrics
    batch_arrays = {"images": out["images"], "labels": out["labels"], "mask": np.ones(batch, np.float32)}
    args = (jax.device_put(totals, evaluator.replicated), *evaluator.put_variables((state.params, state.batch_stats)),
            *evaluator.put_batch(batch_arrays))
    jax.block_until_ready(ev(*args))
    t = time.perf_counter()
    for _ in range(steps):
        result = ev(*args)
    jax.block_until_ready(result)
    return {"train_img_s": out["train_img_s"], "eval_img_s": steps * batch / (time.perf_counter() - t),
            "compile_s": out["compile_s"]}


def bench_pipeline(batch: int = 128, n: int = 10_000) -> dict:
    """Full epoch through the pipeline (gather + augmentation) vs the same steps on one batch."""
    import jax
    import numpy as np
    import optax

    from cnnjax import models
    from cnnjax.data.pipeline import AugmentConfig, epoch_batches
    from cnnjax.train.runner import Runner
    from cnnjax.train.state import create_train_state
    from cnnjax.train.steps import StepSpec

    model = models.create("cifar_resnet20")
    rng = np.random.RandomState(0)
    data = rng.randint(0, 256, (n, 32, 32, 3)).astype(np.uint8), rng.randint(0, 10, n).astype(np.int32)
    out = {}
    for label, aug, idx_fn in (
        ("pipeline_epoch_s", AugmentConfig(4, True), lambda: epoch_batches(jax.random.PRNGKey(0), n, batch)),
        ("resident_batch_s", AugmentConfig(), lambda: jax.numpy.zeros((n // batch, batch), jax.numpy.int32)
         + jax.numpy.arange(batch)),
    ):
        runner = Runner(StepSpec(10, (0.5,) * 3, (0.25,) * 3, augment=aug), model.apply)
        state = runner.put_state(create_train_state(model, optax.sgd(0.01, momentum=0.9), (32, 32, 3),
                                                    jax.random.PRNGKey(0)))
        images, labels = runner.put_data(*data)
        idx = idx_fn()
        state, m = runner.train(state, images, labels, idx[:1])  # compile
        jax.block_until_ready(m)
        t = time.perf_counter()
        state, m = runner.train(state, images, labels, idx)
        jax.block_until_ready(m)
        out[label] = time.perf_counter() - t
    out["overhead_ratio"] = out["pipeline_epoch_s"] / out["resident_batch_s"]
    out["steps"] = n // batch
    return out


def render(paths: list[str]) -> str:
    """The markdown table of the rows saved in ``paths`` (``--out`` files, finished or cut short), in order, under
    the first file's machine line."""
    saved = [read_saved_result(p, "experiments.bench.throughput") for p in paths]
    return markdown([r for d in saved for r in d["rows"]], None, saved[0]["meta"])


def main(argv):
    del argv
    if FLAGS.render:
        print(render(FLAGS.render))
        return
    import jax

    if not FLAGS.quick and not (FLAGS.batches and all(b.isdigit() and int(b) > 0 for b in FLAGS.batches)):
        raise UsageError(f"--batches must list positive batch sizes, e.g. 128,512; got {','.join(FLAGS.batches)!r}")
    batches = [128] if FLAGS.quick else [int(b) for b in FLAGS.batches]
    steps = 3 if FLAGS.quick else FLAGS.steps
    unknown = [n for n in FLAGS.models if n not in SHAPES] + [p for p in FLAGS.precisions if p not in PRECISIONS]
    if unknown:
        raise UsageError(f"unknown bench row or precision {unknown[0]!r}; rows: {', '.join(SHAPES)}; "
                         f"precisions: {', '.join(PRECISIONS)}")
    device = torch_device(FLAGS.torch_device) if FLAGS.torch else None
    torch_version, torch_on = "n/a", "n/a"
    if FLAGS.torch:
        import torch

        torch_version, torch_on = torch.__version__, torch_device_name(device)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "device": str(jax.devices()[0]),
            "jax": jax.__version__,
            "torch": torch_version, "torch_device": torch_on, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "quick": FLAGS.quick, "steps": steps, "warmup": FLAGS.warmup}
    rows = []
    # Precision-major order: a run stopped early (a device lease, say) has every model's float32 row first.
    for precision in FLAGS.precisions:
        for name in FLAGS.models:
            for batch in batches:
                b = 16 if (FLAGS.quick and name.endswith("@224")) else batch
                row = {"model": name, "input": "x".join(map(str, SHAPES[name])), "batch": b, "precision": precision}
                row["jax"] = bench_jax(name, SHAPES[name], b, steps, precision, FLAGS.warmup)
                if FLAGS.torch:
                    try:
                        row.update(in_fresh_process(bench_torch_sides, name, SHAPES[name], b, steps,
                                                    FLAGS.torch_compile, device, precision, FLAGS.warmup))
                    except RuntimeError as err:  # the twin failed: the row keeps cnnjax's figures and says why
                        row["torch_eager"] = {"error": str(err)[:240]}
                rows.append(row)
                print_row(row, flush=True)
                if FLAGS.out:  # every finished row kept, whole-file writes only
                    write_json_atomic(FLAGS.out, {"meta": meta, "rows": rows, "complete": False})
                    startup.install_rows_saved(FLAGS.out)
    pipeline = bench_pipeline() if FLAGS.pipeline else None
    print(markdown(rows, pipeline, meta))
    if FLAGS.out:
        write_json_atomic(FLAGS.out, {"meta": meta, "rows": rows, "pipeline": pipeline, "complete": True})


def _fmt(d: dict, key: str) -> str:
    return f"{d[key]:.0f}" if key in d else "n/a"


def print_row(row: dict, flush: bool = False) -> None:
    j, t = row["jax"], row.get("torch_eager", {})
    ratio = j["train_img_s"] / t["train_img_s"] if "train_img_s" in t else float("nan")
    print(f"# {row['model']} {row['input']} b{row['batch']} {row.get('precision', 'fp32')}: "
          f"cnnjax {j['train_img_s']:.0f} img/s, torch eager {_fmt(t, 'train_img_s')} img/s, ratio {ratio:.2f}",
          flush=flush)


def markdown(rows: list, pipeline: dict | None, meta: dict) -> str:
    head = ("| model | input | batch | precision | cnnjax train img/s | torch eager | torch.compile | cnnjax / eager | "
            "cnnjax eval img/s | torch eval | cnnjax compile s |")
    lines = [f"Machine: {meta['machine']} (cnnjax on {meta['device']}, torch on {meta.get('torch_device', 'cpu')}); "
             f"jax {meta['jax']}, torch {meta['torch']}; {meta['date']}; XLA_FLAGS={meta['xla_flags'] or '(none)'}",
             "", head, "|" + "---|" * 11]
    for r in rows:
        j, te, tc = r["jax"], r.get("torch_eager", {}), r.get("torch_compile", {})
        ratio = f"{j['train_img_s'] / te['train_img_s']:.2f}" if "train_img_s" in te else "n/a"
        lines.append(f"| {r['model']} | {r['input']} | {r['batch']} | {r.get('precision', 'fp32')} | "
                     f"{j['train_img_s']:.0f} | "
                     f"{_fmt(te, 'train_img_s')} | {_fmt(tc, 'train_img_s')} | {ratio} | {j['eval_img_s']:.0f} | "
                     f"{_fmt(te, 'eval_img_s')} | {j['compile_s']:.1f} |")
    if pipeline is None:
        return "\n".join(lines)
    lines += ["", f"Pipeline overhead (cifar_resnet20, batch 128, {pipeline['steps']} steps): full epoch with "
              f"on-device shuffle + crop/flip {pipeline['pipeline_epoch_s']:.2f} s vs one resident batch "
              f"{pipeline['resident_batch_s']:.2f} s -> ratio {pipeline['overhead_ratio']:.3f}"]
    return "\n".join(lines)


if __name__ == "__main__":
    define_flags()
    sys.exit(cli.run(main))
