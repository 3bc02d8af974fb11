"""Does a resident training split fit in device memory?

A resident split (``data.mode=resident``) is replicated on every device of the run (see
:mod:`cnnjax.train.runner`), next to the training state and the step's activations. The check here allows the
split at most :data:`RESIDENT_FRACTION` of the memory still free on the device with the least of it
(``memory_stats()``: ``bytes_limit - bytes_in_use``), keeping the rest for the state, the activations and
XLA's workspace. Devices that report no memory statistics (the CPU: ``memory_stats()`` is None, or lacks
those keys) are not checked: the host memory check of ``data.resident_max_gb`` covers them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from cnnjax.errors import ConfigError

RESIDENT_FRACTION = 0.5
"""The largest share of a device's free memory a resident split may take."""

_GIB = 2**30


def resident_bytes(images: np.ndarray, labels: np.ndarray) -> int:
    """Bytes a resident copy of ``images [N, ...]`` and ``labels [N]`` takes on one device (their ``nbytes``)."""
    return int(np.asarray(images).nbytes) + int(np.asarray(labels).nbytes)


def free_bytes(device: Any) -> int | None:
    """``bytes_limit - bytes_in_use`` of ``device.memory_stats()``; None where the device reports neither."""
    stats = device.memory_stats()
    if not stats or "bytes_limit" not in stats or "bytes_in_use" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats["bytes_in_use"])


def tightest_device(devices: Iterable[Any]) -> tuple[Any, int] | None:
    """``(device, free bytes)`` of the device of ``devices`` with the least free memory; None when none of
    them reports its memory (CPUs)."""
    known = [(d, free) for d in devices if (free := free_bytes(d)) is not None]
    return min(known, key=lambda pair: pair[1]) if known else None


def resident_fits(nbytes: int, devices: Iterable[Any]) -> bool:
    """Whether a split of ``nbytes``, replicated on every device, takes at most :data:`RESIDENT_FRACTION` of
    the free memory of each of ``devices`` that reports it (True when none does)."""
    tightest = tightest_device(devices)
    return tightest is None or nbytes <= RESIDENT_FRACTION * tightest[1]


def check_resident_fits(nbytes: int, devices: Iterable[Any]) -> None:
    """Raise :class:`cnnjax.errors.ConfigError` (``data.mode``) naming ``data.mode=stream`` when a resident split
    of ``nbytes`` does not fit the devices (see :func:`resident_fits`); return None when it fits."""
    tightest = tightest_device(devices)
    if tightest is None or nbytes <= RESIDENT_FRACTION * tightest[1]:
        return
    device, free = tightest
    raise ConfigError("data.mode", f"resident: the training split ({nbytes / _GIB:.2f} GiB, replicated on every "
                                   f"device) needs at most {RESIDENT_FRACTION:.0%} of the free memory of {device} "
                                   f"({free / _GIB:.2f} GiB free; the rest is kept for the state and activations); "
                                   "set data.mode=stream")
