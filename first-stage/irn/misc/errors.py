"""The first stage's error types, all the project's own (``utils/errors.py``).

``run_sample.py`` reports any of them as one line ``error: <message>`` on stderr, the traceback
in ``<work_dir>/log.txt``, and exits with the error's ``exit_code``: 2 for option (usage and
config) errors, 1 for data and run errors. Every other exception is a bug and keeps its
traceback.

Some also derive from the built-in type they replaced (``FileNotFoundError``,
``RuntimeError``) so callers that caught those keep working.
"""
from __future__ import annotations

import re

from utils.errors import BecoError, ConfigError, DataError, RunError, one_line


class OptionError(ConfigError):
    """A command-line option's value that argparse cannot check (exit 2); names the flag."""


class DeviceError(OptionError, RuntimeError):
    """``--device`` names a device this machine does not have."""


class MissingInputError(DataError, FileNotFoundError):
    """A file a step reads is absent: weights of an earlier step, an output to export."""


class WeightsError(DataError, RuntimeError):
    """A weights file exists but does not fit the network; the message names the file."""


def error_types() -> tuple[type[BaseException], ...]:
    """What the driver reports in one line: the project's errors and the label reader's."""
    from datasets.prepare.cls_labels import LabelError  # a ValueError of a shared module, not a BecoError
    return (BecoError, LabelError)


def exit_code(error: BaseException) -> int:
    return int(getattr(error, "exit_code", 1))


# torch.multiprocessing.spawn re-raises a child's error as ProcessRaisedException whose message
# is the child's traceback; its last line is "<module>.<Type>: <message>".
_LAST_LINE = re.compile(r"^(?:[\w.]+\.)?(\w+): (.*)$")


def _known_names() -> dict[str, int]:
    names: dict[str, int] = {}
    todo = list(error_types())
    while todo:
        cls = todo.pop()
        names.setdefault(cls.__name__, int(getattr(cls, "exit_code", 1)))
        todo.extend(cls.__subclasses__())
    return names


def spawned_error(error: BaseException) -> tuple[int, str] | None:
    """(exit code, message) of one of our errors raised in a spawned process, else None."""
    lines = str(error).rstrip().splitlines()
    if type(error).__name__ != "ProcessRaisedException" or not lines:
        return None
    m = _LAST_LINE.match(lines[-1])
    if m is None:
        return None
    code = _known_names().get(m.group(1))
    return None if code is None else (code, m.group(2))


__all__ = ["BecoError", "ConfigError", "DataError", "RunError", "OptionError", "DeviceError", "MissingInputError",
           "WeightsError", "error_types", "exit_code", "spawned_error", "one_line"]
