"""The "beco" logger: console lines that keep tqdm bars intact, plus a log file in the run folder."""
from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger("beco")


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record))


def setup_logging(log_file: Path | None) -> logging.Logger:
    """Log to the console and ``log_file``; ``None`` (ranks other than 0) silences the logger."""
    log.setLevel(logging.INFO)
    log.handlers.clear()
    log.propagate = False
    if log_file is None:
        log.addHandler(logging.NullHandler())
        return log
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for handler in (_TqdmHandler(), logging.FileHandler(log_file)):
        handler.setFormatter(fmt)
        log.addHandler(handler)
    return log


def log_error_to_file(message: str, exc_info) -> None:
    """Write an error and its traceback to the log file only (the console gets the short message)."""
    for h in log.handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, exc_info))
