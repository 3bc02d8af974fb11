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
