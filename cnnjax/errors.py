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


# Exit status of a run stopped by SIGTERM / SIGINT (EX_TEMPFAIL): not finished; the same command resumes.
EXIT_INTERRUPTED = 75


def exit_interrupted(signum: int, what: str) -> None:
    """End the process at once from a signal handler, in a phase where nothing needs saving: one line on
    stderr and status 75. ``os._exit``, not an exception: an exception raised by a signal handler can land
    inside a library callback (and be swallowed) or tear down native threads (a segfault at exit)."""
    import os

    os.write(2, f"interrupted by signal {signum} {what}; run the same command again\n".encode())
    os._exit(EXIT_INTERRUPTED)
