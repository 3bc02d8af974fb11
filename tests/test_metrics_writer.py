"""The metrics writer appends JSONL rows, drops rows past the checkpoint a run resumes from, writes
nothing in non-primary processes, and optionally writes TensorBoard event files without TensorFlow."""

from __future__ import annotations

import json
import os
import struct

from cnnjax.train.metrics import MetricsWriter, read_rows


def _row(epoch: int) -> dict:
    return {"epoch": epoch, "step": 10 * epoch, "train_loss": 1.0 / epoch, "test_accuracy": 0.1 * epoch}


def test_appends_rows_without_rewriting(tmp_path):
    w = MetricsWriter(str(tmp_path), resume_step=0)
    w.write(_row(1))
    inode = os.stat(tmp_path / "metrics.jsonl").st_ino
    w.write(_row(2))
    assert os.stat(tmp_path / "metrics.jsonl").st_ino == inode  # appended in place, not replaced
    assert read_rows(str(tmp_path)) == [_row(1), _row(2)]


def test_resume_drops_rows_past_the_checkpoint(tmp_path):
    w = MetricsWriter(str(tmp_path), resume_step=0)
    for e in (1, 2, 3):
        w.write(_row(e))
    # The run died after writing epoch 3's row and before its checkpoint: resume from step 20.
    w = MetricsWriter(str(tmp_path), resume_step=20)
    assert w.rows == [_row(1), _row(2)]
    assert read_rows(str(tmp_path)) == [_row(1), _row(2)]
    w.write(_row(3))
    assert [r["epoch"] for r in read_rows(str(tmp_path))] == [1, 2, 3]


def test_disabled_writer_keeps_history_but_writes_nothing(tmp_path):
    MetricsWriter(str(tmp_path), 0).write(_row(1))
    before = (tmp_path / "metrics.jsonl").read_text()
    w = MetricsWriter(str(tmp_path), resume_step=10, enabled=False, tensorboard=True)
    w.write(_row(2))
    assert w.rows == [_row(1), _row(2)]
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert not (tmp_path / "tensorboard").exists()


def _records(path: str) -> list[bytes]:
    """TFRecord framing: length (u64), crc (u32), payload, crc (u32)."""
    out, data = [], open(path, "rb").read()
    while data:
        (n,) = struct.unpack("<Q", data[:8])
        out.append(data[12:12 + n])
        data = data[16 + n:]
    return out


def test_tensorboard_event_files_hold_the_scalars(tmp_path):
    w = MetricsWriter(str(tmp_path), 0, tensorboard=True)
    w.write(_row(1))
    w.write(_row(2))
    w.close()
    files = os.listdir(tmp_path / "tensorboard")
    assert len(files) == 1 and files[0].startswith("events.out.tfevents")
    payload = b"".join(_records(str(tmp_path / "tensorboard" / files[0])))
    assert payload.count(b"train_loss") == 2 and payload.count(b"test_accuracy") == 2
    assert b"epoch" not in payload  # the axis, not a scalar
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1]) == _row(2)
