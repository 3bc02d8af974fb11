"""Shared test helpers."""

from __future__ import annotations

import ml_collections


def override(config: ml_collections.ConfigDict, **dotted) -> ml_collections.ConfigDict:
    """``config`` with ``{'data.mode': 'stream', 'num_epochs': 2}``-style dotted keys set (in place)."""
    for key, value in dotted.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config
