"""The "beco" logger: console lines that keep tqdm bars intact, plus a log file in the run folder."""
from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger("beco")


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record))


class _Held(logging.Handler):
    """Keeps the records logged before the run folder may be written, for its log file."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def setup_logging(log_file: Path | None) -> logging.Logger:
    """Log to the console and ``log_file``; ``None`` (ranks other than 0) silences the logger.
    Lines logged since ``setup_console_logging`` are written to the file first."""
    held = [r for h in log.handlers if isinstance(h, _Held) for r in h.records]
    log.setLevel(logging.INFO)
    log.handlers.clear()
    log.propagate = False
    if log_file is None:
        log.addHandler(logging.NullHandler())
        return log
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    file_handler = logging.FileHandler(log_file)
    for handler in (_TqdmHandler(), file_handler):
        handler.setFormatter(fmt)
        log.addHandler(handler)
    for record in held:
        file_handler.handle(record)
    return log


def setup_console_logging() -> logging.Logger:
    """Console only, for the start of a run before its folder may be written; the lines are
    kept and go to the log file once ``setup_logging`` opens it."""
    log.setLevel(logging.INFO)
    log.handlers.clear()
    log.propagate = False
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.addHandler(_Held())
    return log


def log_error_to_file(message: str, exc_info) -> None:
    """Write an error and its traceback to the log file only (the console gets the short message)."""
    for h in log.handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, exc_info))
