"""Shared test helpers."""

from __future__ import annotations

import gzip
import struct

import ml_collections
import numpy as np


def override(config: ml_collections.ConfigDict, **dotted) -> ml_collections.ConfigDict:
    """``config`` with ``{'data.mode': 'stream', 'num_epochs': 2}``-style dotted keys set (in place)."""
    for key, value in dotted.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def write_idx(path, array, magic):
    """IDX: big-endian uint32 magic, big-endian uint32 dims, then the uint8 data."""
    raw = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(raw)


def write_idx_dir(path, n_train=5, n_test=3, gz=True, seed=0):
    """The four MNIST-layout IDX files of random images / labels in ``path``; returns the arrays."""
    rng = np.random.RandomState(seed)
    arrays = {"train-images-idx3-ubyte": rng.randint(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": rng.randint(0, 10, n_train),
              "t10k-images-idx3-ubyte": rng.randint(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": rng.randint(0, 10, n_test)}
    path.mkdir(parents=True, exist_ok=True)
    for base, a in arrays.items():
        write_idx(path / (base + (".gz" if gz else "")), a, 2051 if "images" in base else 2049)
    return {k: v.astype(np.uint8) for k, v in arrays.items()}


def slow_clock(monkeypatch, step_s) -> None:
    """Make the training loop's clock (``cnnjax.train.loop._clock``) also advance ``step_s(step)`` seconds for each
    train step it runs, in either feed (resident or streamed): a machine of any speed, in no time."""
    import time

    from cnnjax.train import feed as feeds
    from cnnjax.train import loop

    offset = [0.0]

    def timed(real):
        def train(self, state, step, count, stop=None, upcoming=0):
            state, metrics = real(self, state, step, count, stop, upcoming)
            offset[0] += sum(step_s(s) for s in range(step, step + metrics["steps"]))
            return state, metrics

        return train

    for cls in (feeds.ResidentFeed, feeds.StreamFeed):
        monkeypatch.setattr(cls, "train", timed(cls.train))
    monkeypatch.setattr(loop, "_clock", lambda: time.perf_counter() + offset[0])

