"""How long a training run takes to act on SIGTERM: ``python -m experiments.stop_latency --trials 5 --
--config experiments/configs/NAME.py [--config.key=value ...]``.

Each trial starts ``experiments.train`` in a fresh workdir, waits for the first epoch line, sends
SIGTERM after a random delay (uniform in ``--min_delay_s``..``--max_delay_s``), and measures the
time from the signal to the "interrupted ... checkpoint saved" line and to the process's exit. The
step time comes from the run's metrics (``epoch_time_s / steps``). Prints one row per trial, the
worst case, and writes them to ``--out`` (JSON) when given.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("trials", 5, "runs to interrupt")
flags.DEFINE_float("min_delay_s", 0.5, "earliest signal, seconds after the first epoch line")
flags.DEFINE_float("max_delay_s", 3.0, "latest signal, seconds after the first epoch line")
flags.DEFINE_integer("seed", 0, "seeds the delays")
flags.DEFINE_string("out", None, "write the rows as JSON here")

_STOPPED = re.compile(r"interrupted \(signal 15\) at epoch (\d+), step (\d+)")


def trial(train_args: list[str], delay_s: float) -> dict:
    """One interrupted run; the times are seconds from the signal."""
    with tempfile.TemporaryDirectory() as workdir:
        cmd = [sys.executable, "-m", "experiments.train", *train_args, "--workdir", workdir, "--noprogress",
               "--config.plots=False"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            for line in proc.stdout:
                if line.startswith("epoch   1/"):
                    break
            else:
                raise RuntimeError(f"the run ended before its first epoch: {proc.stderr.read()[-2000:]}")
            time.sleep(delay_s)
            sent = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            to_line = None
            for line in proc.stdout:
                if _STOPPED.search(line):
                    to_line = time.perf_counter() - sent
                    stopped = _STOPPED.search(line).groups()
            proc.wait(timeout=600)
            to_exit = time.perf_counter() - sent
        finally:
            proc.kill()
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            first = json.loads(f.readline())
    steps = first["step"]
    return {"delay_s": delay_s, "exit_status": proc.returncode, "signal_to_message_s": to_line,
            "signal_to_exit_s": to_exit, "stopped_at": "epoch {}, step {}".format(*stopped) if to_line else None,
            "step_s": first["epoch_time_s"] / steps, "steps_per_epoch": steps}


def main(argv):
    train_args = argv[1:]
    if not train_args:
        raise app.UsageError("pass the training flags after --, e.g. -- --config experiments/configs/NAME.py")
    rng = random.Random(FLAGS.seed)
    rows = []
    for i in range(FLAGS.trials):
        row = trial(train_args, rng.uniform(FLAGS.min_delay_s, FLAGS.max_delay_s))
        rows.append(row)
        print(f"trial {i + 1}: signal {row['delay_s']:.2f} s into epoch 2 -> stopped at {row['stopped_at']}, "
              f"message after {row['signal_to_message_s']:.2f} s, exit {row['exit_status']} after "
              f"{row['signal_to_exit_s']:.2f} s (one step {row['step_s'] * 1000:.1f} ms)", flush=True)
    worst = max(rows, key=lambda r: r["signal_to_exit_s"])
    print(f"worst case over {len(rows)} trials: message {max(r['signal_to_message_s'] for r in rows):.2f} s, exit "
          f"{worst['signal_to_exit_s']:.2f} s after the signal; one step {worst['step_s'] * 1000:.1f} ms")
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    app.run(main)
