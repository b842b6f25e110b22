"""The project's error types and how the command-line tools report them (both stages).

Every error a user can act on derives from ``BecoError``: the tools print its one-line
message (main.py and first-stage/irn/run_sample.py: ``error: <message>`` on stderr) and exit
with its ``exit_code`` (2 for config, option and usage errors, 1 for data and run errors).
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import re
import sys
from typing import Callable


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


# The first stage's own kinds. Some also derive from the built-in type they replaced
# (FileNotFoundError, RuntimeError), so callers that caught those keep working.

class OptionError(ConfigError):
    """A command-line option's value its parser cannot check (exit 2); the message names the flag."""


class DeviceError(OptionError, RuntimeError):
    """``--device`` names a device this machine does not have."""


class MissingInputError(DataError, FileNotFoundError):
    """A file a first-stage step reads is absent: weights of an earlier step, an output to export."""


class WeightsError(DataError, RuntimeError):
    """A weights file exists but does not fit the network; the message names the file."""


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


def exit_status(command: Callable[[], object], prefix: str = "error") -> int:
    """A script's exit status: what ``command()`` returns when that is an int, else 0; or, when it
    stops on one of our errors, that error's code after its one line on stderr
    (``<prefix>: <message>``). Anything else is a bug and keeps its traceback."""
    try:
        result = command()
        return result if isinstance(result, int) else 0
    except BecoError as e:
        print(f"{prefix}: {one_line(e)}", file=sys.stderr)
        return e.exit_code


# torch.multiprocessing.spawn re-raises a child's error as ProcessRaisedException whose message
# is the child's traceback; its last line is "<module>.<Type>: <message>".
_LAST_LINE = re.compile(r"^(?:[\w.]+\.)?(\w+): (.*)$")


def _known_names() -> dict[str, int]:
    """Every BecoError type defined so far, by class name, with its exit code."""
    names: dict[str, int] = {}
    todo: list[type[BecoError]] = [BecoError]
    while todo:
        cls = todo.pop()
        names.setdefault(cls.__name__, cls.exit_code)
        todo.extend(cls.__subclasses__())
    return names


def spawned_error(error: BaseException) -> tuple[int, str] | None:
    """(exit code, message) of one of our errors raised in a spawned process (make_cam's and
    make_sem_seg's shards), else None."""
    lines = str(error).rstrip().splitlines()
    if type(error).__name__ != "ProcessRaisedException" or not lines:
        return None
    m = _LAST_LINE.match(lines[-1])
    if m is None:
        return None
    code = _known_names().get(m.group(1))
    return None if code is None else (code, m.group(2))
