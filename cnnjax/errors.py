"""The project's own error types. Messages name config fields in backticks (`learning_rate`, `workdir`)
so that command-line front ends can rewrite them as their flags (``--config.learning_rate``)."""

from __future__ import annotations


class CnnjaxError(Exception):
    """Base of the errors a user can fix; the message says what to do."""


class ConfigError(CnnjaxError, ValueError):
    """A config value that cannot work; ``key`` is its dotted name (``data.pad_to``)."""

    def __init__(self, key: str, problem: str):
        self.key, self.problem = key, problem
        super().__init__(f"`{key}` {problem}")


class TrainingError(CnnjaxError, RuntimeError):
    """A run that cannot go on (diverged, a workdir of another experiment, an incompatible checkpoint)."""


class CheckpointError(CnnjaxError, FileNotFoundError):
    """A checkpoint that is missing or cannot be restored."""


class UsageError(CnnjaxError, ValueError):
    """An argument or flag value that cannot work (an unknown model or optimizer name, a bad option)."""


class MissingFileError(CnnjaxError, FileNotFoundError):
    """A file or directory the user named that does not exist or cannot be read."""


class CorruptFileError(CnnjaxError, ValueError):
    """A file the project wrote (config.json, metrics.jsonl, a checkpoint) that is damaged; the message
    names it and what to do."""


class DataFormatError(CnnjaxError, ValueError):
    """A data file exists but is not in the expected format (bad magic, counts, keys, labels, an image that
    cannot be decoded); the message names it."""
