"""One orbax CheckpointManager per run: LatestN + BestN retention, best by the selection metric,
atomic saves, one-off saves, old layouts refused."""

from __future__ import annotations

import os

import chex
import numpy as np
import pytest

from cnnjax import checkpoint
from cnnjax.errors import CheckpointError


def _state(v: float) -> dict:
    return {"params": {"w": np.full((3,), v, np.float32)}, "batch_stats": {}, "step": np.int32(v)}


def test_keeps_latest_two_plus_best_and_finds_each(tmp_path):
    store = checkpoint.CheckpointStore(str(tmp_path), keep_latest=2)
    accuracies = {10: 0.5, 20: 0.9, 30: 0.7, 40: 0.6}
    for step, acc in accuracies.items():
        store.save(step, _state(step), {"epoch": step // 10}, metrics={"val_accuracy": acc})
    store.save(45, _state(45), {"epoch": 5, "partial": {"count": 3.0}})  # mid-epoch: no metrics
    assert store.steps() == [20, 40, 45]  # latest two (40, 45) plus the best (20)
    store.close()
    assert checkpoint.steps(str(tmp_path)) == [20, 40, 45]
    assert checkpoint.find(str(tmp_path), "best") == 20
    assert checkpoint.find(str(tmp_path), "latest") == 45
    assert checkpoint.find(str(tmp_path), "40") == 40
    variables, meta = checkpoint.restore_variables(str(tmp_path), "best")
    chex.assert_trees_all_equal(variables["params"], _state(20)["params"])
    assert meta["epoch"] == 2 and meta["step"] == 20 and "batch_stats" not in variables
    with pytest.raises(CheckpointError, match="available steps: \\[20, 40, 45\\]"):
        checkpoint.find(str(tmp_path), "30")
    with pytest.raises(ValueError, match="'best', 'latest' or a step number"):
        checkpoint.find(str(tmp_path), "newest")


def test_restore_latest_resumes_the_full_state(tmp_path):
    store = checkpoint.CheckpointStore(str(tmp_path))
    assert store.restore_latest(_state(0)) is None
    store.save(7, _state(7), {"epoch": 1, "partial": {"loss_sum": 1.5}})
    state, meta = store.restore_latest(_state(0))
    store.close()
    assert meta["partial"] == {"loss_sum": 1.5}
    chex.assert_trees_all_equal(state, _state(7))  # params, batch_stats and step


def test_best_without_any_evaluation_is_the_latest(tmp_path):
    checkpoint.save(str(tmp_path), 0, {"params": {"w": np.ones(2, np.float32)}}, {"epoch": 0})
    assert checkpoint.find(str(tmp_path), "best") == 0


def test_an_unfinished_save_is_not_a_checkpoint(tmp_path):
    store = checkpoint.CheckpointStore(str(tmp_path))
    store.save(10, _state(10), {"epoch": 1}, metrics={"val_accuracy": 0.5})
    store.close()
    # What a process killed in the middle of a save leaves behind: orbax's temporary directory.
    os.makedirs(tmp_path / "checkpoints" / "20.orbax-checkpoint-tmp-123" / "state")
    assert checkpoint.steps(str(tmp_path)) == [10]
    assert checkpoint.find(str(tmp_path), "latest") == 10


def test_missing_and_old_layouts_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint in .*; train first"):
        checkpoint.find(str(tmp_path), "best")
    os.makedirs(tmp_path / "checkpoints" / "latest" / "10")
    with pytest.raises(CheckpointError, match="layout of an older cnnjax"):
        checkpoint.steps(str(tmp_path))


def _damage(workdir, step: int, how: str) -> str:
    """Flip bytes in (or truncate) the largest data file of checkpoint ``step``; returns its path."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(workdir, "checkpoints", str(step)))
             for f in fs if f != checkpoint.CHECKSUMS]
    victim = max(files, key=os.path.getsize)
    data = bytearray(open(victim, "rb").read())
    if how == "flip":
        for i in range(len(data) // 3, len(data) // 3 + 16):
            data[i] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    open(victim, "wb").write(bytes(data))
    return victim


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_damaged_checkpoint_is_named_and_resume_falls_back_to_an_intact_one(tmp_path, how):
    store = checkpoint.CheckpointStore(str(tmp_path))
    for step in (10, 20):
        store.save(step, _state(step), {"epoch": step // 10}, metrics={"val_accuracy": step / 100})
    store.close()
    assert checkpoint.verify(str(tmp_path), 20) is None
    _damage(str(tmp_path), 20, how)
    assert "differ from their checksums" in checkpoint.verify(str(tmp_path), 20)
    with pytest.raises(CheckpointError, match=r"checkpoint 20 .* is damaged: .*intact checkpoints: \[10\]"):
        checkpoint.restore_variables(str(tmp_path), "latest")
    variables, _ = checkpoint.restore_variables(str(tmp_path), "10")
    chex.assert_trees_all_equal(variables["params"], _state(10)["params"])
    store = checkpoint.CheckpointStore(str(tmp_path))
    with pytest.warns(UserWarning, match="checkpoint 20 .* is damaged.*resuming from an older one"):
        state, meta = store.restore_latest(_state(0))
    assert store.steps() == [10]  # the damaged one is gone: the run saves step 20 again
    store.close()
    chex.assert_trees_all_equal(state, _state(10))
    assert meta["epoch"] == 1


def test_a_process_dying_between_orbax_commit_and_the_checksums_leaves_a_usable_checkpoint(tmp_path):
    """Killed after orbax renamed checkpoint 20 into place but before its checksum file was written:
    20 is restored (unverified: there is nothing to check it against), 10 stays verified."""
    store = checkpoint.CheckpointStore(str(tmp_path))
    store.save(10, _state(10), {"epoch": 1})
    store.save(20, _state(20), {"epoch": 2})
    store.close()
    os.unlink(tmp_path / "checkpoints" / "20" / checkpoint.CHECKSUMS)
    assert checkpoint.verify(str(tmp_path), 20) is None and checkpoint.verify(str(tmp_path), 10) is None
    store = checkpoint.CheckpointStore(str(tmp_path))
    state, meta = store.restore_latest(_state(0))
    store.close()
    chex.assert_trees_all_equal(state, _state(20))
    assert meta["epoch"] == 2
