"""Evaluate a checkpoint on the test split: ``python -m experiments.evaluate --workdir DIR
[--checkpoint best|latest|STEP]``. Restores params and batch_stats only (no optimizer state).
Prints per-class accuracy and a last line ``test_accuracy: 0.XXXX``.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

from experiments import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "a training workdir (holds config.json and checkpoints)")
flags.DEFINE_string("checkpoint", "best", "best | latest | a step number")
flags.DEFINE_string("data_dir", None, "override config data.dir (local raw files)")


def evaluate_workdir(workdir: str, which: str = "best", data_dir: str | None = None) -> dict:
    """Restore ``which`` from ``workdir`` and evaluate the config's test split; returns metrics + meta."""
    import ml_collections

    from cnnjax import checkpoint
    from cnnjax.train.loop import build_model, build_spec, load_data, prepare_images
    from cnnjax.train.steps import Runner, evaluate_split

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: --workdir must be a directory written by experiments.train")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    if data_dir is not None:
        config.data.dir = data_dir
    variables, meta = checkpoint.restore_variables(workdir, which)
    ds = load_data(config)
    test_images = prepare_images(ds.test_images, config.data.pad_to)
    config.parallelism = "jit"
    model, _ = build_model(config)  # no optimizer, no weight loading: the checkpoint has the weights
    runner = Runner(build_spec(config, ds.name, steps_per_epoch=1), model.apply)
    ev = evaluate_split(runner.eval_fn, variables["params"], variables.get("batch_stats", {}), test_images,
                        ds.test_labels, config.eval_batch_size)
    ev["meta"], ev["class_names"] = meta, ds.class_names
    return ev


def main(argv):
    del argv
    ev = evaluate_workdir(FLAGS.workdir, FLAGS.checkpoint, FLAGS.data_dir)
    meta = ev["meta"]
    print(f"checkpoint: {FLAGS.checkpoint} (epoch {meta.get('epoch')}, recorded test_accuracy "
          f"{meta.get('test_accuracy', float('nan')):.4f})")
    print("per-class accuracy:")
    for name, acc in zip(ev["class_names"], ev["per_class_accuracy"], strict=True):
        print(f"  {name:14s} {acc:.4f}")
    print(f"test_loss: {ev['loss']:.4f}")
    print(f"test_accuracy: {ev['accuracy']:.4f}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    sys.exit(cli.run(main))
