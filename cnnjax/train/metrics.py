"""Metric rows of a run: appended to ``metrics.jsonl`` (one JSON object per evaluation) and, when
asked, to TensorBoard event files (written by tensorboardX, which needs no TensorFlow)."""

from __future__ import annotations

import json
import os

from cnnjax.errors import CorruptFileError, UsageError
from cnnjax.io import atomic_write

FILENAME = "metrics.jsonl"


def read_rows(workdir: str) -> list[dict]:
    """The rows of ``workdir/metrics.jsonl``. A torn last line (a process killed while appending it) is
    dropped: its checkpoint was never saved, so a resume would drop that row anyway. A damaged line
    elsewhere raises :class:`CorruptFileError` naming the file and the line."""
    return _read(os.path.join(workdir, FILENAME))[0]


def _read(path: str) -> tuple[list[dict], bool]:
    """``(rows, torn)``: the rows of ``path`` (see :func:`read_rows`) and whether it lacks its final newline
    (a crash while appending: the last line is dropped if damaged, and the file must be rewritten)."""
    if not os.path.exists(path):
        return [], False
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "step" not in row:
                raise ValueError("not a metrics row")
        except ValueError as err:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            if number == len(lines):  # the last line, with no newline after it: torn by a crash
                break
            raise CorruptFileError(f"{path} line {number} is damaged ({str(err)[:60]}); delete that line, or the file "
                                   "to start its history afresh") from None
        rows.append(row)
    return rows, lines[-1] != b""


class MetricsWriter:
    """Appends rows to ``workdir/metrics.jsonl``; ``enabled=False`` (non-primary processes) writes nothing
    but keeps ``rows`` as the primary does.

    On opening, rows past ``resume_step`` (written after the checkpoint a run resumes from) are dropped
    (one atomic rewrite, only when there are such rows or a torn last line), so the file always matches the
    checkpoints.
    """

    def __init__(self, workdir: str, resume_step: int, *, enabled: bool = True, tensorboard: bool = False):
        self.path = os.path.join(workdir, FILENAME)
        self.enabled = enabled
        rows, torn = _read(self.path)  # every process keeps the history (the plots need it), one writes
        self.rows = [r for r in rows if r["step"] <= resume_step]
        if enabled and (len(self.rows) != len(rows) or torn):  # rewrite: rows past the checkpoint, or a torn
            # last line, would otherwise stay in the file (and the next row be glued onto it)
            with atomic_write(self.path) as f:
                f.writelines(json.dumps(r) + "\n" for r in self.rows)
        self._tb = None
        if enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise UsageError("TensorBoard logging needs tensorboardX: pip install 'cnnjax[tensorboard]'") from None
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
