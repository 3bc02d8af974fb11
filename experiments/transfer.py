"""Offline transfer-learning study on Fashion-MNIST (runs on a CPU).

1. Pretrain a ResNet-18 on Fashion-MNIST classes 0-4 (T-shirt, Trouser, Pullover, Dress, Coat).
2. Transfer to classes 5-9 (Sandal, Shirt, Sneaker, Bag, Ankle boot) with K labelled training
   images per class, comparing scratch vs feature extraction vs fine-tuning on the 5,000 test
   images of classes 5-9.

``python -m experiments.transfer --workdir DIR --data_dir /usr/share/datasets/fashion-mnist``
writes ``DIR/results.md`` (table), ``DIR/results.json`` and ``DIR/transfer_vs_k.png``.
"""

from __future__ import annotations

# ruff: noqa: E402  (the program's first steps below come before its imports)
if __name__ == "__main__":  # first: SIGTERM / Ctrl-C is one line and status 75 from here on (experiments.startup)
    from experiments import startup

    startup.begin()  # the signal handler, then the process settings (cnnjax.cpu.process)

import json
import math
import os
import sys
import time

from absl import flags

from cnnjax.errors import UsageError
from experiments import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "output directory")
flags.DEFINE_string("data_dir", "/usr/share/datasets/fashion-mnist", "Fashion-MNIST IDX directory")
flags.DEFINE_list("ks", ["10", "50", "500"], "labelled training images per target class")
flags.DEFINE_list("modes", ["scratch", "feature_extraction", "finetune"], "what to compare")
flags.DEFINE_integer("pretrain_per_class", 1200, "source training images per class (0: all 6000)")
flags.DEFINE_integer("pretrain_epochs", 3, "source pretraining epochs")
flags.DEFINE_integer("target_steps", 150, "optimizer steps per target run (epochs derived from K)")
flags.DEFINE_integer("seed", 0, "seed for subsets and initialisation")


def base(data_dir: str, seed: int):
    from experiments.configs.base import base_config

    c = base_config()
    c.seed = seed
    c.model.name = "resnet18"
    c.num_classes = 5
    c.data.name = "fashion_mnist"
    c.data.dir = data_dir
    c.data.pad_to = 32
    c.data.crop_padding = 2
    c.optimizer = "adam"
    c.learning_rate = 1e-3
    c.schedule = "cosine"
    c.eval_batch_size = 500
    c.plots = False
    return c


def pretrain_config(data_dir: str, seed: int, per_class: int, epochs: int):
    c = base(data_dir, seed)
    c.data.classes = (0, 1, 2, 3, 4)
    c.data.train_per_class = per_class
    c.batch_size = min(128, 5 * per_class) if per_class else 128  # smoke runs: fewer than 128 images
    c.num_epochs = epochs
    return c


def target_config(data_dir: str, seed: int, k: int, mode: str, pretrained: str, steps: int):
    c = base(data_dir, seed)
    c.data.classes = (5, 6, 7, 8, 9)
    c.data.train_per_class = k
    c.batch_size = min(64, 5 * k // 2)
    steps_per_epoch = (5 * k) // c.batch_size
    c.num_epochs = max(1, math.ceil(steps / steps_per_epoch))
    c.eval_every = c.num_epochs  # evaluate once, at the end
    c.log_every = steps_per_epoch
    if mode != "scratch":
        c.transfer.init_from = pretrained
        c.transfer.mode = mode
        c.transfer.unfreeze_from = "stem"
        c.transfer.backbone_lr = 1e-4  # seed 002: backbone 1e-4 vs head 1e-3
    return c


def main(argv):
    del argv
    from cnnjax import viz
    from cnnjax.train.loop import fit

    out = FLAGS.workdir
    if not out:
        raise UsageError("--workdir is required")
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    pre_dir = os.path.join(out, "pretrain_classes_0-4")
    pre = fit(pretrain_config(FLAGS.data_dir, FLAGS.seed, FLAGS.pretrain_per_class, FLAGS.pretrain_epochs),
              pre_dir, progress=False)
    results = {"pretrain": {"test_accuracy_classes_0-4": pre.get("test_accuracy"),
                            "wall_s": time.perf_counter() - t0}, "runs": []}
    for k in map(int, FLAGS.ks):
        for mode in FLAGS.modes:
            t = time.perf_counter()
            cfg = target_config(FLAGS.data_dir, FLAGS.seed, k, mode, pre_dir, FLAGS.target_steps)
            row = fit(cfg, os.path.join(out, f"k{k}_{mode}"), progress=False)
            results["runs"].append({"k": k, "mode": mode, "test_accuracy": row["test_accuracy"],
                                    "epochs": cfg.num_epochs, "steps": row["step"],
                                    "wall_s": time.perf_counter() - t})
            print(f"K={k:4d} {mode:18s} test_accuracy {row['test_accuracy']:.4f}", flush=True)
    results["total_wall_s"] = time.perf_counter() - t0
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    ks = [int(k) for k in FLAGS.ks]
    acc = {(r["k"], r["mode"]): r["test_accuracy"] for r in results["runs"]}
    lines = ["| K per class | " + " | ".join(FLAGS.modes) + " |", "|---:|" + "---:|" * len(FLAGS.modes)]
    lines += [f"| {k} | " + " | ".join(f"{100 * acc[(k, m)]:.2f}%" for m in FLAGS.modes) + " |" for k in ks]
    table = "\n".join(lines)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("# Fashion-MNIST transfer: classes 0-4 -> 5-9 (ResNet-18, test accuracy on classes 5-9)\n\n")
        f.write(f"Pretraining on classes 0-4: test accuracy {100 * pre['test_accuracy']:.2f}% "
                f"({FLAGS.pretrain_epochs} epochs, {FLAGS.pretrain_per_class or 6000} images/class).\n\n")
        f.write(table + f"\n\nTotal wall time: {results['total_wall_s']:.0f} s.\n")
    viz.plot_lines(ks, {m: [100 * acc[(k, m)] for k in ks] for m in FLAGS.modes},
                   os.path.join(out, "transfer_vs_k.png"), xlabel="labelled images per class (K)",
                   ylabel="test accuracy on classes 5-9 (%)", title="Transfer from classes 0-4", logx=True)
    print(table)
    print(f"total wall time {results['total_wall_s']:.0f} s; results in {out}/results.md")


if __name__ == "__main__":
    sys.exit(cli.run(main))
