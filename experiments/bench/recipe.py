"""Epoch time of the fast recipe (``cifar10_fast``, airbench94-style ``fast_cnn``) on CIFAR-shaped data, cnnjax
against the same net and per-step work in PyTorch, eager and ``torch.compile``-d.

``python -m experiments.bench.recipe [--train 50000] [--epochs 2] [--precision fp32|bf16] [--torch_device auto]
[--notorch_compile] [--out FILE] [-- --config.key=value ...]``; ``--render FILE`` prints a saved run's table.

The data is a learnable stand-in in CIFAR-10's format, written first (``experiments.make_synthetic_cifar``): its
accuracies mean nothing, only the times do.

- cnnjax: ``python -m experiments.train`` with the recipe's config (evaluation every epoch, no plots), in its own
  process. Its epoch times are those ``metrics.jsonl`` records: training only, evaluation excluded.
- PyTorch: the twin net (``FastNet`` of experiments/bench/torch_twins.py) with the recipe's per-step work, read
  from the config the cnnjax run wrote: on-device gather of a shuffled batch, per-image random flip and
  translation (reflect padding), label-smoothed cross-entropy, Nesterov SGD with the frozen whitening kernel, 64x
  learning rate on BatchNorm biases and the schedule, lookahead. As many steps per epoch as cnnjax ran; every
  epoch waits for the device. ``bf16`` runs the forward under ``torch.autocast`` (cnnjax: ``mixed_precision``).

Epoch 1 includes compilation on both sides; the last epoch is the steady-state figure. Prints a markdown table.
"""

from __future__ import annotations

import sys

# ruff: noqa: E402  (the program's first steps below come before its imports)
if __name__ == "__main__":  # first: SIGTERM / Ctrl-C is one line and status 75 from here on (experiments.startup)
    from experiments import startup

    startup.begin()  # the signal handler, then the process settings (cnnjax.cpu.process)

import json
import os
import subprocess
import tempfile
import time

from absl import flags

from cnnjax.errors import UsageError
from cnnjax.io import write_json_atomic
from experiments import cli, startup
from experiments.bench.lib import (
    PRECISIONS,
    bench_torch_model,
    read_saved_result,
    torch_autocast,
    torch_device,
    torch_device_name,
    torch_layout,
)

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined when it runs, not on import)."""
    flags.DEFINE_integer("train", 50_000, "synthetic CIFAR-shaped training images (10% are held out for validation)")
    flags.DEFINE_integer("test", 2_000, "synthetic test images")
    flags.DEFINE_integer("epochs", 2, "epochs on each side (>= 2: the first includes compilation)")
    flags.DEFINE_enum("precision", "fp32", list(PRECISIONS), "fp32, or bf16 compute on both sides")
    flags.DEFINE_string("torch_device", "auto", "auto (the GPU when torch sees one, else the CPU) | cpu | cuda")
    flags.DEFINE_bool("torch_compile", True, "also time the twin under torch.compile (needs a C++ toolchain)")
    flags.DEFINE_string("config", "experiments/configs/cifar10_fast.py", "the recipe's config file")
    flags.DEFINE_string("out", "", "write the results as JSON here")
    flags.DEFINE_string("render", "", "print the table of this saved --out file (finished or cut short) and time "
                        "nothing")


def run_cnnjax(data_root: str, workdir: str, overrides: list[str]) -> dict:
    """Train the recipe with ``experiments.train``; returns its config and per-epoch times and steps."""
    mixed = "True" if FLAGS.precision == "bf16" else "False"
    cmd = [sys.executable, "-m", "experiments.train", f"--config={FLAGS.config}", f"--workdir={workdir}",
           f"--config.data.dir={data_root}", "--config.data.name=cifar10", f"--config.num_epochs={FLAGS.epochs}",
           "--config.eval_every=1", "--config.plots=False", f"--config.mixed_precision={mixed}", "--noprogress",
           *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"the cnnjax run failed (exit {done.returncode}): {tail}")
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "epoch_time_s" in r]
    return {"config": config, "epoch_s": [r["epoch_time_s"] for r in rows],
            "steps_per_epoch": rows[0]["step"] // rows[0]["epoch"]}


def run_torch(images, labels, config: dict, steps_per_epoch: int, device: str, compiled: bool) -> dict:
    """Epoch times of the twin under the recipe's per-step work (see the module doc) on ``device``."""
    import torch

    torch.manual_seed(0)
    step = _torch_step(images, labels, config, steps_per_epoch, device, compiled)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    batch = config["batch_size"]
    epoch_s, i = [], 0
    for _ in range(FLAGS.epochs):
        order = torch.randperm(len(images), device=device)
        sync()
        t = time.perf_counter()
        for s in range(steps_per_epoch):
            step(i, order[s * batch:(s + 1) * batch])
            i += 1
        sync()
        epoch_s.append(time.perf_counter() - t)
    return {"epoch_s": epoch_s}


def _torch_optimizer(net, config: dict):
    """The recipe's Nesterov SGD in torch's units: ``(optimizer, base learning rate)``, BatchNorm biases in a group
    of their own at ``bias_lr_scale`` times the rate (``initial`` is each group's multiplier)."""
    import torch

    batch, momentum = config["batch_size"], config["momentum"]
    kilostep = 1024 * (1 + 1 / (1 - momentum))  # the recipe's units: loss summed over the batch
    lr = config["learning_rate"] / kilostep
    decay = config["weight_decay"] * batch / kilostep / lr
    norm_biases = [p for n, p in net.named_parameters() if "norm" in n and n.endswith("bias")]
    others = [p for n, p in net.named_parameters() if p.requires_grad and not any(p is q for q in norm_biases)]
    groups = [{"params": norm_biases, "initial": config["bias_lr_scale"]}, {"params": others, "initial": 1.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True, weight_decay=decay), lr


def _torch_augment(device: str, pad: int):
    """Per image: flip with probability 1/2, translate by up to ``pad`` pixels (reflect padding)."""
    import torch
    import torch.nn.functional as F

    rows = torch.arange(32, device=device)

    def augment(x):
        flip = torch.rand(len(x), device=device) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        if not pad:
            return x
        xp = F.pad(x, (pad,) * 4, mode="reflect")
        dy, dx = torch.randint(0, 2 * pad + 1, (2, len(x), 1), device=device)
        n = torch.arange(len(x), device=device).view(-1, 1, 1)
        return xp[n, :, (rows + dy)[:, :, None], (rows + dx)[:, None, :]].permute(0, 3, 1, 2)

    return augment


def _torch_step(images, labels, config: dict, steps_per_epoch: int, device: str, compiled: bool):
    """``step(i, batch indices)``: the recipe's step ``i`` on the twin, with its schedule and lookahead."""
    import jax
    import ml_collections
    import numpy as np
    import torch
    import torch.nn.functional as F

    from cnnjax.data.sources import MEAN_STD
    from cnnjax.train.optim import make_schedule

    layout = torch_layout(device)
    net = bench_torch_model("fast_cnn").to(device, memory_format=layout)
    net.whiten.weight.requires_grad_(False)  # set from data once, then frozen (as cnnjax's 'frozen' group)
    model = torch.compile(net) if compiled else net
    opt, lr = _torch_optimizer(net, config)
    slow = [p.detach().clone() for p in net.parameters()]
    data = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)
    labels = torch.from_numpy(labels.astype(np.int64)).to(device)
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) * 255 for v in MEAN_STD["cifar10"])
    augment = _torch_augment(device, config["data"]["crop_padding"])
    # The learning-rate multiplier of every step, from cnnjax's own schedule for this config (computed once).
    schedule = make_schedule(ml_collections.ConfigDict(config), steps_per_epoch, FLAGS.epochs)
    rates = np.asarray(jax.vmap(schedule)(np.arange(steps_per_epoch * FLAGS.epochs))) / config["learning_rate"]
    every = config.get("lookahead_every", 0)
    net.train()

    def step(i, idx):
        for group in opt.param_groups:
            group["lr"] = lr * group["initial"] * float(rates[i])
        x = ((augment(data[idx].float()) - mean) / std).contiguous(memory_format=layout)
        with torch_autocast(device, FLAGS.precision):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), labels[idx], label_smoothing=config["label_smoothing"],
                               reduction="sum")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if every and (i + 1) % every == 0:
            with torch.no_grad():
                fast = list(net.parameters())
                torch._foreach_lerp_(slow, fast, 1 - 0.95 ** every)
                torch._foreach_copy_(fast, slow)

    return step


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Fast recipe on CIFAR-shaped data: {meta['steps_per_epoch']} steps of {meta['batch']} per epoch, "
             f"{meta['precision']}; cnnjax on {meta['jax_device']}, torch on {meta['torch_device']}; "
             f"jax {meta['jax']}, torch {meta['torch']}; {meta['date']}", "",
             "| side | epoch 1 s (with compile) | last epoch s | last epoch img/s | cnnjax speed / side's |",
             "|---|---:|---:|---:|---:|"]
    ours = rows[0]["epoch_s"][-1]
    for r in rows:
        last = r["epoch_s"][-1]
        lines.append(f"| {r['side']} | {r['epoch_s'][0]:.2f} | {last:.2f} | "
                     f"{meta['steps_per_epoch'] * meta['batch'] / last:.0f} | {last / ours:.2f} |")
    return "\n".join(lines)


def render(path: str) -> str:
    """The markdown table of a saved ``--out`` file."""
    saved = read_saved_result(path, "experiments.bench.recipe")
    return markdown(saved["rows"], saved["meta"])


def main(argv):
    if FLAGS.render:
        print(render(FLAGS.render))
        return
    overrides = argv[1:]
    if FLAGS.epochs < 2 or FLAGS.train < 5 or FLAGS.test < 1:
        raise UsageError("--epochs must be >= 2 (the first includes compilation), --train >= 5 and --test >= 1")
    import jax
    import torch

    from cnnjax.data import sources

    device = torch_device(FLAGS.torch_device)
    with tempfile.TemporaryDirectory(prefix="recipe_") as tmp:
        made = subprocess.run([sys.executable, "-m", "experiments.make_synthetic_cifar", f"--out={tmp}",
                               f"--train={FLAGS.train}", f"--test={FLAGS.test}"], capture_output=True, text=True)
        if made.returncode != 0:
            raise RuntimeError(f"writing the synthetic data failed: {made.stderr.strip().splitlines()[-1:]}")
        ours = run_cnnjax(tmp, os.path.join(tmp, "run"), overrides)
        data = sources.load("cifar10", tmp)
    meta = {"date": time.strftime("%Y-%m-%d"), "jax": jax.__version__, "torch": torch.__version__,
            "jax_device": str(jax.devices()[0]), "torch_device": torch_device_name(device),
            "precision": FLAGS.precision, "batch": ours["config"]["batch_size"],
            "steps_per_epoch": ours["steps_per_epoch"], "train_images": FLAGS.train}
    sides = [("torch eager", False)] + ([("torch.compile", True)] if FLAGS.torch_compile else [])
    rows = []

    def keep(row: dict) -> None:
        """Print a finished side and rewrite ``--out`` whole with every side so far."""
        rows.append(row)
        print(f"# {row['side']}: epochs {', '.join(f'{s:.2f}' for s in row['epoch_s'])} s", flush=True)
        if FLAGS.out:
            write_json_atomic(FLAGS.out, {"meta": meta, "rows": rows, "complete": len(rows) == 1 + len(sides)})
            startup.install_rows_saved(FLAGS.out)

    keep({"side": "cnnjax", "epoch_s": ours["epoch_s"]})
    for side, compiled in sides:
        keep({"side": side, **run_torch(data.train_images, data.train_labels, ours["config"],
                                        ours["steps_per_epoch"], device, compiled)})
    print(markdown(rows, meta))


if __name__ == "__main__":
    define_flags()
    sys.exit(cli.run(main))
