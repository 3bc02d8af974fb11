"""Resident data against device memory: fits, does not fit (one line naming data.mode=stream), CPUs skipped."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from cnnjax.errors import ConfigError
from cnnjax.train.device_memory import RESIDENT_FRACTION, check_resident_fits, free_bytes, resident_bytes, resident_fits

GIB = 2**30


class FakeDevice:
    """A device whose ``memory_stats()`` returns ``stats`` (None: as the CPU)."""

    def __init__(self, name: str, stats: dict | None):
        self.name, self.stats = name, stats

    def memory_stats(self) -> dict | None:
        return self.stats

    def __str__(self) -> str:
        return self.name


def _gpu(name: str, limit_gib: float, used_gib: float) -> FakeDevice:
    return FakeDevice(name, {"bytes_limit": int(limit_gib * GIB), "bytes_in_use": int(used_gib * GIB),
                             "peak_bytes_in_use": int(used_gib * GIB)})


def test_resident_bytes_counts_images_and_labels():
    images, labels = np.zeros((10, 32, 32, 3), np.uint8), np.zeros(10, np.int32)
    assert resident_bytes(images, labels) == 10 * 32 * 32 * 3 + 10 * 4


def test_a_split_within_the_fraction_of_the_tightest_device_fits():
    devices = [_gpu("cuda:0", 80, 1), _gpu("cuda:1", 80, 20)]  # 79 and 60 GiB free
    check_resident_fits(int(RESIDENT_FRACTION * 60 * GIB), devices)  # exactly the limit: no error
    assert resident_fits(int(RESIDENT_FRACTION * 60 * GIB), devices)
    assert free_bytes(devices[1]) == 60 * GIB


def test_a_split_too_large_for_one_device_names_data_mode_stream():
    devices = [_gpu("cuda:0", 80, 1), _gpu("cuda:1", 16, 4)]  # cuda:1 has 12 GiB free
    nbytes = 10 * GIB
    assert not resident_fits(nbytes, devices)
    with pytest.raises(ConfigError) as err:
        check_resident_fits(nbytes, devices)
    message = str(err.value)
    assert err.value.key == "data.mode"
    assert "data.mode=stream" in message and "\n" not in message
    assert "10.00 GiB" in message and "12.00 GiB free" in message and "cuda:1" in message


def test_devices_without_memory_stats_are_skipped():
    cpu = FakeDevice("TFRT_CPU_0", None)
    partial = FakeDevice("odd:0", {"bytes_in_use": 0})  # no bytes_limit
    check_resident_fits(1000 * GIB, [cpu, partial])
    assert resident_fits(1000 * GIB, [cpu])
    assert free_bytes(cpu) is None and free_bytes(partial) is None
    with pytest.raises(ConfigError, match="data.mode=stream"):  # a reporting device beside them is still checked
        check_resident_fits(1000 * GIB, [cpu, _gpu("cuda:0", 80, 0)])


def test_this_machines_devices_do_not_raise_for_a_small_split():
    check_resident_fits(1024, jax.local_devices())


def test_fit_refuses_a_resident_split_too_big_for_the_devices_and_auto_streams_it(tmp_path, monkeypatch):
    from cnnjax.data import load_splits
    from cnnjax.train import device_memory
    from cnnjax.train.loop import fit
    from tests.test_experiments import stripes

    monkeypatch.setattr(device_memory, "free_bytes", lambda device: 1000)  # every device: 1000 bytes free
    with pytest.raises(ConfigError, match="data.mode=stream"):
        fit(stripes(num_epochs=1), str(tmp_path / "w"), progress=False)
    assert not (tmp_path / "w" / "checkpoints").exists()
    assert load_splits(stripes(**{"data.mode": "auto"})).streamed  # 288 8x8 images > 500 bytes
    monkeypatch.setattr(device_memory, "free_bytes", lambda device: None)  # CPUs: the host budget decides
    assert not load_splits(stripes(**{"data.mode": "auto"})).streamed
