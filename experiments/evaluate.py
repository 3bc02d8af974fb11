"""Evaluate a checkpoint: ``python -m experiments.evaluate --workdir DIR [--checkpoint best|latest|STEP]
[--split test|val]``. "best" is the checkpoint with the highest validation accuracy. For an ensemble run
(``config.ensemble_members > 1``: DIR/member_k) it evaluates the members' checkpoints by their mean logits.
Restores params and batch_stats only (no optimizer state), in any number of processes whatever number wrote the
checkpoint. Prints the accuracy recorded during training, per-class accuracy and a last line
``{split}_accuracy: 0.XXXX`` (process 0 only).
"""

from __future__ import annotations

# ruff: noqa: E402  (the program's first steps below come before its imports)
if __name__ == "__main__":  # first: SIGTERM / Ctrl-C is one line and status 75 from here on (experiments.startup)
    from experiments import startup

    startup.begin()  # the signal handler, then the process settings (cnnjax.cpu.process)

import os
import sys

from absl import flags

from cnnjax.errors import MissingFileError
from experiments import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "a training workdir (holds config.json and checkpoints)")
flags.DEFINE_string("checkpoint", "best", "best | latest | a step number")
flags.DEFINE_string("data_dir", None, "override config data.dir (local raw files)")
flags.DEFINE_enum("split", "test", ["test", "val"], "which split to evaluate")
cli.define_distributed_flags()


def evaluate_workdir(workdir: str, which: str = "best", data_dir: str | None = None, split: str = "test") -> dict:
    """Restore ``which`` from ``workdir`` and evaluate ``split`` of the config's data; returns metrics, the
    checkpoint's meta and ``recorded`` (the accuracy training recorded for it on ``split``, or None)."""
    import ml_collections

    from cnnjax.data import load_splits
    from cnnjax.io import read_json
    from cnnjax.train.ensemble import evaluate_checkpoints, member_dirs

    members = member_dirs(workdir)
    path = os.path.join(members[0] if members else workdir, "config.json")
    if not os.path.exists(path):
        raise MissingFileError(f"{path} not found: `workdir` must be a directory written by experiments.train")
    config = ml_collections.ConfigDict(read_json(path, "restore it from a copy of the run, or write it again"))
    if data_dir is not None:
        config.data.dir = data_dir
    data = load_splits(config)
    evals, metas = evaluate_checkpoints(members or [workdir], config, which, (split,), data)
    ev = evals[split]
    if members:  # an ensemble run: its members' checkpoints `which`, scored by their mean logits
        summary = os.path.join(workdir, "ensemble.json")
        recorded = read_json(summary, "delete it").get(f"{split}_accuracy") if (
            which == "latest" and os.path.exists(summary)) else None
        meta = {"step": [m.get("step") for m in metas], "members": len(members)}
    else:
        meta = metas[0]
        recorded = recorded_accuracy(workdir, meta, split)
    ev["meta"], ev["class_names"], ev["recorded"] = meta, data.class_names, recorded
    return ev


def recorded_accuracy(workdir: str, meta: dict, split: str) -> float | None:
    """What training recorded for this checkpoint on ``split``: its meta, else the run's summary row
    (the best checkpoint's test accuracy is measured after the run)."""
    from cnnjax.train.metrics import read_rows

    if f"{split}_accuracy" in meta:
        return meta[f"{split}_accuracy"]
    for row in read_rows(workdir):
        if row.get("best_step") == meta.get("step") and f"best_{split}_accuracy" in row:
            return row[f"best_{split}_accuracy"]
    return None


def main(argv):
    del argv
    cli.join_cluster()
    from cnnjax import distributed

    split = FLAGS.split
    ev = evaluate_workdir(FLAGS.workdir, FLAGS.checkpoint, FLAGS.data_dir, split)
    if not distributed.is_primary():
        return
    meta, recorded = ev["meta"], ev["recorded"]
    print(f"checkpoint: {FLAGS.checkpoint} (step {meta.get('step')}, epoch {meta.get('epoch')}, recorded "
          f"{split}_accuracy " + (f"{recorded:.4f})" if recorded is not None else "none)"))
    print("per-class accuracy:")
    for name, acc in zip(ev["class_names"], ev["per_class_accuracy"], strict=True):
        print(f"  {name:14s} {acc:.4f}")
    print(f"{split}_loss: {ev['loss']:.4f}")
    print(f"{split}_accuracy: {ev['accuracy']:.4f}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    sys.exit(cli.run(main))
