"""Speed runs: the PyTorch twin of a cnnjax recipe and the end-to-end timing harness (no flags here:
the commands are ``experiments.bench.speedrun`` and ``experiments.bench.speedrun_torch``)."""

from __future__ import annotations

import math
import statistics
import subprocess
import tempfile
import time

from cnnjax.errors import UsageError

TIME = "/usr/bin/time"

# Config values the twin reproduces; anything else set to a non-default value is refused.
_DEFAULTS = {"data.crop_padding": 0, "data.cutout": 0, "data.random_resized_crop": 0.0, "data.resize_to": 0,
             "data.classes": (), "data.train_per_class": 0, "weight_decay": 0.0, "lookahead_every": 0,
             "whiten_init_images": 0, "grad_clip_norm": 0.0, "mixed_precision": False, "warmup_epochs": 0.0,
             "transfer.mode": "scratch"}


def check_supported(c) -> None:
    """Raise :class:`UsageError` naming the first config field the twin cannot reproduce."""
    def get(path):  # not cnnjax.train.checks._get: that module imports JAX, which the twin's process must not
        node = c
        for part in path.split("."):
            node = node[part]
        return tuple(node) if isinstance(node, (list, tuple)) else node

    for path, default in _DEFAULTS.items():
        if get(path) != default:
            raise UsageError(f"the torch twin does not reproduce {path}={get(path)!r}; use a config without it")
    checks = {"optimizer": ("adam", "sgd", "nesterov"), "schedule": ("onecycle", "cosine", "constant"),
              "tta": (0, 1), "data.flip_mode": ("random",), "data.name": ("fashion_mnist", "mnist")}
    for path, allowed in checks.items():
        if get(path) not in allowed:
            raise UsageError(f"the torch twin supports {path} in {allowed}, not {get(path)!r}")
    if not c.data.dir:
        raise UsageError("the torch twin reads local IDX files: pass --config.data.dir=<dir with the four IDX files>")


def lr_at(c, step: int, total: int) -> float:
    """The learning rate of optax's schedule for ``c`` at ``step`` (as cnnjax.train.optim builds it)."""
    lr = c.learning_rate
    if c.schedule == "constant":
        return lr
    if c.schedule == "cosine":
        return 0.5 * lr * (1 + math.cos(math.pi * min(step, total) / total))
    # optax.cosine_onecycle_schedule(total, lr, pct_start): 25 / 1e4 divisors, cosine both ways.
    up = int(c.pct_start * total)
    start, end = lr / 25.0, lr / 25.0 / 1e4
    if step < up:
        return start + (lr - start) * 0.5 * (1 - math.cos(math.pi * step / up))
    frac = min(1.0, (step - up) / max(1, total - up))
    return lr + (end - lr) * 0.5 * (1 - math.cos(math.pi * frac))


def train_twin(c, threads: int = 0) -> dict:
    """Train and evaluate the torch twin of config ``c`` (see :func:`check_supported`); returns accuracies
    and times."""
    check_supported(c)
    t0 = time.perf_counter()
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(c.seed)
    ds, tensor = _twin_data(c)
    model = _twin_model(c)
    t_train = time.perf_counter()
    steps = _train_epochs(c, model, tensor(ds.train_images), torch.from_numpy(ds.train_labels.astype("int64")))
    train_s = time.perf_counter() - t_train
    return {"framework": f"torch {torch.__version__} eager, {torch.get_num_threads()} threads",
            "model": c.model.name, "epochs": c.num_epochs, "steps": steps,
            "val_accuracy": _accuracy(c, model, tensor, ds.val_images, ds.val_labels),
            "test_accuracy": _accuracy(c, model, tensor, ds.test_images, ds.test_labels),
            "train_s": round(train_s, 2), "in_process_s": round(time.perf_counter() - t0, 2)}


def _twin_data(c):
    """``(splits, tensor)``: the config's splits as cnnjax loads them (numpy only) and ``tensor(uint8 [N, H, W, 1])
    -> float [N, 1, P, P]``, normalised and zero-padded as cnnjax's data preparation does (not imported: that
    module imports JAX, which the twin's process must not)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from cnnjax.data.sources import MEAN_STD, load
    from cnnjax.data.splits import with_validation

    ds = with_validation(load(c.data.name, c.data.dir, c.data.cache_dir or None), c.data.val_fraction,
                         c.data.split_seed)
    mean, std = (float(v[0]) for v in MEAN_STD[c.data.name])

    def tensor(images):
        x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        pad = (int(c.data.pad_to) - x.shape[-1]) // 2 if c.data.pad_to else 0
        x = F.pad(x, (pad,) * 4) if pad > 0 else x
        return (x.float() / 255.0 - mean) / std

    return ds, tensor


def _twin_model(c):
    """The zoo model's torch twin for config ``c`` (greyscale input)."""
    from experiments.bench import torch_twins

    grey = {} if c.model.name == "lenet5" else {"c_in": 1}  # LeNet's twin is greyscale already
    return torch_twins.build(c.model.name, num_classes=c.num_classes, **grey, **dict(c.model.kwargs))


def _train_epochs(c, model, train_x, train_y) -> int:
    """Train ``model`` for the config's epochs (its optimizer, schedule, flips and label smoothing); returns the
    steps taken."""
    import torch
    import torch.nn.functional as F

    if c.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=c.learning_rate)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=c.learning_rate, momentum=c.momentum,
                              nesterov=c.optimizer == "nesterov")
    steps_per_epoch = len(train_y) // c.batch_size
    total = steps_per_epoch * c.num_epochs
    gen = torch.Generator().manual_seed(c.seed)
    model.train()
    step = 0
    for _ in range(c.num_epochs):
        order = torch.randperm(len(train_y), generator=gen)[: steps_per_epoch * c.batch_size]
        for idx in order.view(steps_per_epoch, c.batch_size):
            x, y = train_x[idx], train_y[idx]
            if c.data.flip:
                flip = torch.rand(len(idx), generator=gen) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            for group in opt.param_groups:
                group["lr"] = lr_at(c, step, total)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y, label_smoothing=c.label_smoothing).backward()
            opt.step()
            step += 1
    return step


def _accuracy(c, model, tensor, images, labels) -> float:
    """Accuracy of ``model`` in eval mode on ``images`` (with the config's mirror TTA)."""
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), c.eval_batch_size):
            x = tensor(images[start:start + c.eval_batch_size])
            logits = model(x)
            if c.tta:
                logits = 0.5 * (logits + model(x.flip(-1)))
            correct += int((logits.argmax(1).numpy() == labels[start:start + c.eval_batch_size]).sum())
    return correct / len(labels)


def timed(cmd: list[str]) -> tuple[float, str]:
    """``(wall seconds, stdout)`` of ``cmd`` run under ``/usr/bin/time``; a failure raises with its last line."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as t:
        done = subprocess.run([TIME, "-f", "%e", "-o", t.name, *cmd], capture_output=True, text=True, check=False)
        if done.returncode:
            tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {done.returncode}: {tail}")
        return float(t.read().strip().splitlines()[-1]), done.stdout


def final_accuracies(workdir: str) -> dict:
    """Validation and test accuracy of the last evaluated epoch in ``workdir/metrics.jsonl``."""
    from cnnjax.train.metrics import read_rows

    last = [r for r in read_rows(workdir) if "test_accuracy" in r and "final_test_accuracy" not in r][-1]
    return {"val_accuracy": last["val_accuracy"], "test_accuracy": last["test_accuracy"]}


def summary(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Median wall time and accuracies of each side's runs."""
    return {side: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "val_accuracy", "test_accuracy")}
            for side, rs in runs.items()}


def markdown(runs: dict[str, list[dict]], medians: dict[str, dict]) -> str:
    lines = ["| side | run | wall s | val acc | test acc |", "|---|---|---:|---:|---:|"]
    for side, rs in runs.items():
        for i, r in enumerate(rs, 1):
            lines.append(f"| {side} | {i} | {r['wall_s']:.1f} | {100 * r['val_accuracy']:.2f}% | "
                         f"{100 * r['test_accuracy']:.2f}% |")
        m = medians[side]
        lines.append(f"| **{side}** | median | **{m['wall_s']:.1f}** | {100 * m['val_accuracy']:.2f}% | "
                     f"**{100 * m['test_accuracy']:.2f}%** |")
    return "\n".join(lines)

