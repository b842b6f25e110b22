"""The project's error types and how the command-line tools report them.

Every error a user can act on derives from ``BecoError``: the tools print its one-line
message and exit with its ``exit_code`` (2 for config and usage errors, 1 for data and
run errors). Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import re


class BecoError(Exception):
    """An error the user can act on; the message names the file, id or key."""
    exit_code = 1


class ConfigError(BecoError, ValueError):
    """A config file, override or command-line option is invalid; the message names the key."""
    exit_code = 2


class DataError(BecoError, ValueError):
    """Bad or missing input data; the message names the id and the file."""


class RunError(BecoError):
    """A run folder or checkpoint that cannot be used as asked (another run's folder, a resume
    with other settings, a diverged loss); the message says what to do instead."""


class CheckpointError(RunError, ValueError):
    """A checkpoint that is missing, unreadable or does not fit the model."""


class OutputExistsError(BecoError, FileExistsError):
    """A folder holds outputs made with other settings; they are never silently replaced."""


class InputNotFoundError(BecoError, FileNotFoundError):
    """A file the config names (weights, a checkpoint) does not exist."""


# PyTorch re-raises an error of a loader worker as the same type with the worker's whole
# traceback as its message: "Caught DataError in DataLoader worker process 0.\nOriginal
# Traceback ...\ndatasets.readers.DataError: <the message>".
_WORKER = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback", re.S)


def one_line(error: BaseException) -> str:
    """The error's own message, also when it was raised in a DataLoader worker."""
    text = str(error)
    if _WORKER.match(text):
        last = text.rstrip().splitlines()[-1]
        name = type(error).__name__
        text = last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
    return text
