"""Stream vs resident: epoch time ratio on real image folders, and peak memory of a streamed run whose
decoded training split is larger than memory should allow.

``python -m experiments.bench_stream [--rows lenet5,resnet18@224] [--memory] [--out FILE]``

* rows: the same config trained for 2 epochs with ``data.mode=resident`` and ``data.mode=stream``
  (each in its own process); the second epoch's ``epoch_time_s`` from metrics.jsonl is compared
  (the first includes compilation). lenet5: Fashion-MNIST exported as a PNG folder (32x32 grey);
  resnet18@224: Fashion-MNIST exported as a 224x224 RGB JPEG folder.
* memory: a folder of hard links to one 640x480 JPEG whose decoded 224x224x3 training split is
  > 4 GiB, trained in stream mode for ``--memory_steps`` steps; the peak of the summed resident set
  size (RSS) of the training process and all its descendants, sampled every 0.1 s from /proc.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("rows", ["lenet5", "resnet18@224"], "which stream-vs-resident rows to run")
flags.DEFINE_bool("memory", True, "run the > 4 GiB streaming memory measurement")
flags.DEFINE_integer("memory_steps", 12, "training steps of the memory run")
flags.DEFINE_string("data_dir", "/usr/share/datasets/fashion-mnist", "Fashion-MNIST IDX directory")
flags.DEFINE_string("out", "", "write the results as JSON here")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = {  # name -> (export args, train overrides)
    "lenet5": (["--per_class", "600", "--size", "32", "--format", "png", "--channels", "1"],
               ["--config.model.name=lenet5", "--config.data.image_size=32", "--config.data.channels=1",
                "--config.batch_size=128"]),
    "resnet18@224": (["--per_class", "40", "--size", "224", "--format", "jpg", "--channels", "3"],
                     ["--config.model.name=resnet18", "--config.data.image_size=224", "--config.data.channels=3",
                      "--config.batch_size=16", "--config.eval_batch_size=32"]),
}


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, **kw)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return out


def _train_cmd(folder: str, workdir: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "experiments.train", "--config", "experiments/configs/stripes_tiny.py",
            "--workdir", workdir, "--config.data.name=folder", f"--config.data.dir={folder}",
            "--config.num_classes=10", "--config.optimizer=sgd", "--config.plots=False", "--noprogress",
            "--config.data.cache_dir=", *overrides]


def stream_vs_resident(name: str, tmp: str) -> dict:
    export, overrides = ROWS[name]
    folder = os.path.join(tmp, name)
    _run([sys.executable, "-m", "experiments.export_folder", "--dataset", "fashion_mnist", "--out", folder,
          "--data_dir", FLAGS.data_dir, *export])
    out = {"model": name}
    for mode in ("resident", "stream"):
        workdir = os.path.join(tmp, f"{name}-{mode}")
        _run(_train_cmd(folder, workdir, *overrides, "--config.num_epochs=2", f"--config.data.mode={mode}"))
        rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
        out[f"{mode}_epoch_s"] = [r for r in rows if "train_loss" in r][1]["epoch_time_s"]
    out["ratio"] = out["stream_epoch_s"] / out["resident_epoch_s"]
    return out


def _tree_rss(pid: int) -> int:
    """Summed RSS in bytes of ``pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
        todo += children.get(p, [])
    return total


def streaming_memory(tmp: str) -> dict:
    import numpy as np
    from PIL import Image

    per_image = 224 * 224 * 3  # decoded bytes of one image at image_size 224
    n_train_needed = (4 * 2**30) // per_image + 1
    n_total = int(n_train_needed / 0.7) + 100
    folder = os.path.join(tmp, "big")
    src = os.path.join(tmp, "one.jpg")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(src, quality=90)
    for k in range(n_total):
        d = os.path.join(folder, f"class{k % 10}")
        os.makedirs(d, exist_ok=True)
        os.link(src, os.path.join(d, f"{k:06d}.jpg"))
    cmd = _train_cmd(folder, os.path.join(tmp, "big-run"), "--config.model.name=gap_cnn",
                     "--config.data.image_size=224", "--config.data.channels=3", "--config.data.mode=stream",
                     "--config.batch_size=32",
                     "--config.log_every=2", f"--stop_after_steps={FLAGS.memory_steps}")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, done = 0, threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    sampler.start()
    stdout, stderr = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"streaming run failed:\n{stderr[-3000:]}")
    header = next(line for line in stdout.splitlines() if "train /" in line)
    n_train = int(header.split(":")[1].split()[0])
    return {"files": n_total, "train_images": n_train, "decoded_train_gib": n_train * per_image / 2**30,
            "steps": FLAGS.memory_steps, "peak_tree_rss_gib": peak / 2**30, "wall_s": time.perf_counter() - t0}


def main(argv):
    del argv
    results = {"rows": [], "memory": None}
    tmp = tempfile.mkdtemp(prefix="bench_stream_")
    try:
        for name in FLAGS.rows:
            row = stream_vs_resident(name, tmp)
            results["rows"].append(row)
            print(f"{name}: resident {row['resident_epoch_s']:.2f} s/epoch, stream {row['stream_epoch_s']:.2f} "
                  f"s/epoch, stream / resident {row['ratio']:.2f}", flush=True)
        if FLAGS.memory:
            m = results["memory"] = streaming_memory(tmp)
            print(f"stream memory: {m['train_images']} train images = {m['decoded_train_gib']:.2f} GiB decoded; "
                  f"peak RSS of the process tree {m['peak_tree_rss_gib']:.2f} GiB over {m['steps']} steps "
                  f"({m['wall_s']:.0f} s)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
