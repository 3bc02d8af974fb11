"""Config validation and workdir identity, done before any data is loaded or anything is written."""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from cnnjax import checkpoint, models
from cnnjax.data.pipeline import FLIP_MODES, PAD_MODES
from cnnjax.errors import ConfigError, TrainingError
from cnnjax.io import write_json_atomic
from cnnjax.train.runner import MODES
from cnnjax.train.steps import TTA_LEVELS

# Config fields that define an experiment's checkpoints: a workdir holding checkpoints made with
# other values belongs to another experiment.
IDENTITY_KEYS = ("model.name", "model.kwargs", "data.name", "data.pad_to", "num_classes", "transfer.mode",
                 "transfer.unfreeze_from")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raise :class:`ConfigError` for the first value that cannot work."""
    if config.model.name not in models.available():
        raise ConfigError("model.name", f"names unknown model {config.model.name!r}; use one of: "
                                        f"{', '.join(models.available())}")
    if config.parallelism not in MODES:
        raise ConfigError("parallelism", f"must be jit, pmap or sharded, got {config.parallelism!r}")
    if config.batch_size < 1 or config.num_epochs < 1:
        raise ConfigError("batch_size", "and `num_epochs` must be >= 1")
    if config.get("tta", 0) not in TTA_LEVELS:
        raise ConfigError("tta", f"must be 0 (off), 1 (mirror) or 2 (mirror + translate), got {config.tta!r}")
    if config.data.get("flip_mode", "random") not in FLIP_MODES:
        raise ConfigError("data.flip_mode", f"must be random or alternate, got {config.data.flip_mode!r}")
    if config.data.get("pad_mode", "constant") not in PAD_MODES:
        raise ConfigError("data.pad_mode", f"must be constant or reflect, got {config.data.pad_mode!r}")
    if config.get("lookahead_every", 0) < 0:
        raise ConfigError("lookahead_every", "must be >= 0 (0: off)")
    if not 0.0 <= config.data.get("random_resized_crop", 0.0) <= 1.0:
        raise ConfigError("data.random_resized_crop", "must be a minimum area fraction in [0, 1] (0: off)")
    if config.num_classes < 0:
        raise ConfigError("num_classes", "must be >= 1 (0: as many as the data has)")
    if config.get("num_devices", 0) < 0:
        raise ConfigError("num_devices", "must be >= 0 (0: all local devices)")


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    value = config
    for part in dotted.split("."):
        if part not in value:
            return None  # a key older configs did not have
        value = value[part]
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def identity(config: ml_collections.ConfigDict) -> dict:
    return {k: _get(config, k) for k in IDENTITY_KEYS}


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuse a workdir whose checkpoints belong to an experiment with another identity. Writes nothing."""
    path = os.path.join(workdir, "config.json")
    if not (os.path.exists(path) and checkpoint.steps(workdir)):
        return
    with open(path) as f:
        old = identity(ml_collections.ConfigDict(json.load(f)))
    new = identity(config)
    if old != new:
        diff = {k: (old[k], new[k]) for k in IDENTITY_KEYS if old[k] != new[k]}
        raise TrainingError(f"workdir {workdir} holds checkpoints of another experiment (differs in {diff}); use a "
                            "new `workdir` or delete that one")


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())
