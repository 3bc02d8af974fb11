"""Config validation and workdir identity, done before any data is loaded or anything is written."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import ml_collections

from cnnjax import checkpoint, models
from cnnjax.data import CLASS_NAMES
from cnnjax.data.pipeline import FLIP_MODES, PAD_MODES
from cnnjax.errors import ConfigError, TrainingError
from cnnjax.io import read_json, write_json_atomic
from cnnjax.train.experiment import PRECISIONS
from cnnjax.train.runner import MODES, SCAN_CHOICES
from cnnjax.train.steps import TTA_LEVELS
from cnnjax.train.timeline import check_replans

# Config fields that define an experiment's checkpoints: a workdir holding checkpoints made with
# other values belongs to another experiment.
IDENTITY_KEYS = ("model.name", "model.kwargs", "data.name", "data.pad_to", "num_classes", "transfer.mode",
                 "transfer.unfreeze_from")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raise :class:`ConfigError` for the first value that cannot work."""
    if config.model.name not in models.available():
        raise ConfigError("model.name", f"names unknown model {config.model.name!r}; use one of: "
                                        f"{', '.join(models.available())}")
    if config.parallelism not in ("auto", *MODES):
        raise ConfigError("parallelism", f"must be auto, jit, pmap or sharded, got {config.parallelism!r}")
    if config.get("loop", {}).get("scan", "auto") not in SCAN_CHOICES:
        raise ConfigError("loop.scan", f"must be auto, on or off, got {config.loop.scan!r}")
    if config.get("precision", "default") not in PRECISIONS:
        raise ConfigError("precision", f"must be default, high or highest, got {config.precision!r}")
    for key in ("batch_size", "eval_batch_size", "num_epochs", "log_every"):
        if config.get(key, 1) < 1:
            raise ConfigError(key, f"must be >= 1, got {config[key]!r}")
    budget = config.get("time_budget_s", 0.0)
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget >= 0):
        raise ConfigError("time_budget_s", f"must be a finite number of seconds >= 0 (0: off), got {budget!r}")
    check_replans(config.get("budget_replans", ()))
    members = config.get("ensemble_members", 1)
    if not (isinstance(members, int) and members >= 1):
        raise ConfigError("ensemble_members", f"must be a whole number >= 1 (1: one model), got {members!r}")
    if not (math.isfinite(config.learning_rate) and config.learning_rate > 0):
        raise ConfigError("learning_rate", f"must be a finite number > 0, got {config.learning_rate!r}")
    if not 0.0 <= config.label_smoothing < 1.0:
        raise ConfigError("label_smoothing", f"must be in [0, 1), got {config.label_smoothing!r}")
    if not 0.0 < config.data.get("val_fraction", 0.1) < 1.0:
        raise ConfigError("data.val_fraction", f"must be in (0, 1), got {config.data.val_fraction!r}")
    _check_classes(config)
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


DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def with_deterministic_flag(xla_flags: str) -> str:
    """``XLA_FLAGS`` with XLA's deterministic GPU ops on (``config.deterministic``): convolutions, reductions and
    scatters that give the same bits on every run, so that a resumed GPU run equals an uninterrupted one. It must
    be in the environment before JAX starts its GPU backend (``experiments.train`` puts it there)."""
    kept = [f for f in xla_flags.split() if not f.startswith("--xla_gpu_deterministic_ops")]
    return " ".join([*kept, DETERMINISTIC_FLAG])


def check_deterministic(config: ml_collections.ConfigDict, platform: str, xla_flags: str) -> None:
    """Raise :class:`ConfigError` when ``config.deterministic`` asks for deterministic GPU ops that the running
    backend (``platform``, started with ``xla_flags``) does not have."""
    if config.get("deterministic", False) and platform == "gpu" and DETERMINISTIC_FLAG not in xla_flags.split():
        raise ConfigError("deterministic", f"needs XLA_FLAGS={DETERMINISTIC_FLAG} before JAX starts; run through "
                                           "experiments.train, or set it in the environment")


def _check_classes(config: ml_collections.ConfigDict) -> None:
    """``data.classes`` against the dataset's class count where it is known without loading it."""
    classes = tuple(config.data.get("classes", ()) or ())
    known = CLASS_NAMES.get(config.data.name)
    if not classes:
        return
    if len(set(classes)) != len(classes) or any(int(c) < 0 or (known and int(c) >= len(known)) for c in classes):
        top = f"0..{len(known) - 1}" if known else ">= 0"
        raise ConfigError("data.classes", f"must be distinct class indices in {top}, got {classes}")
    if config.num_classes not in (0, len(classes)):
        raise ConfigError("num_classes", f"is {config.num_classes} but `data.classes` keeps {len(classes)} classes")


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    value = config
    for part in dotted.split("."):
        if part not in value:
            return None  # a key older configs did not have
        value = value[part]
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def identity(config: ml_collections.ConfigDict) -> dict:
    """The :data:`IDENTITY_KEYS` values as ``config.json`` holds them (tuples as lists), ``model.kwargs`` without
    entries equal to the model's own defaults: ``widths=(64, 256, 256)`` given or left out builds one model."""
    found = json.loads(json.dumps({k: _get(config, k) for k in IDENTITY_KEYS}))
    if found["model.name"] in models.available() and found["model.kwargs"]:
        model = models.create(found["model.name"])
        defaults = {k: getattr(model, k) for k in found["model.kwargs"] if hasattr(model, k)}
        defaults = json.loads(json.dumps(defaults, default=repr))
        found["model.kwargs"] = {k: v for k, v in found["model.kwargs"].items() if k not in defaults
                                 or v != defaults[k]}
    return found


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict | None:
    """Refuse a workdir whose checkpoints belong to an experiment with another identity; return the config it
    was started with (``config.json``) when it has checkpoints to resume from, else None. Writes nothing."""
    path = os.path.join(workdir, "config.json")
    if not (os.path.exists(path) and checkpoint.steps(workdir)):
        return None
    saved = ml_collections.ConfigDict(read_json(path, "delete it to resume with this config (the checkpoint must "
                                                      "still fit the model), or use a new `workdir`"))
    old = identity(saved)
    new = identity(config)
    if old != new:
        diff = {k: (old[k], new[k]) for k in IDENTITY_KEYS if old[k] != new[k]}
        raise TrainingError(f"workdir {workdir} holds checkpoints of another experiment (differs in {diff}); use a "
                            "new `workdir` or delete that one")
    return saved


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())
