"""Metric rows of a run: appended to ``metrics.jsonl`` (one JSON object per evaluation) and, when
asked, to TensorBoard event files (written by tensorboardX, which needs no TensorFlow)."""

from __future__ import annotations

import json
import os

from cnnjax.io import atomic_write

FILENAME = "metrics.jsonl"


def read_rows(workdir: str) -> list[dict]:
    path = os.path.join(workdir, FILENAME)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsWriter:
    """Appends rows to ``workdir/metrics.jsonl``; ``enabled=False`` (non-primary processes) writes nothing
    but keeps ``rows`` as the primary does.

    On opening, rows past ``resume_step`` (written after the checkpoint a run resumes from) are dropped
    (one atomic rewrite, only when there are such rows), so the file always matches the checkpoints.
    """

    def __init__(self, workdir: str, resume_step: int, *, enabled: bool = True, tensorboard: bool = False):
        self.path = os.path.join(workdir, FILENAME)
        self.enabled = enabled
        rows = read_rows(workdir)  # every process keeps the history (the plots need it), one writes
        self.rows = [r for r in rows if r["step"] <= resume_step]
        if enabled and len(self.rows) != len(rows):
            with atomic_write(self.path) as f:
                f.writelines(json.dumps(r) + "\n" for r in self.rows)
        self._tb = None
        if enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise ImportError("TensorBoard logging needs tensorboardX: pip install 'cnnjax[tensorboard]'") from None
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    @property
    def epoch_rows(self) -> list[dict]:
        """The per-evaluation rows (without the run's closing summary row)."""
        return [r for r in self.rows if "train_loss" in r]

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._tb is not None:
            for key, value in row.items():
                if key not in ("epoch", "step") and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, row["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
