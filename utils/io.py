"""Atomic file writes: a crash mid-write never leaves a truncated file behind."""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path``.

    The temp file lives in the target directory so the rename stays on one file
    system and is atomic; the previous file survives any failure of ``write``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _new_temp(path: Path) -> str:
    """An empty ``.<name>.<random>.tmp`` beside ``path``, created with mode 0o666 so the umask
    gives it (and the file it becomes) the permissions ``open()`` would: ``tempfile.mkstemp``
    makes 0600 files, which the rest of a group on a shared cluster cannot read."""
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def save_png(path: str | os.PathLike, array: np.ndarray, palette: np.ndarray | None = None) -> Path:
    """Save uint8 (H, W) or (H, W, 3) as PNG; with ``palette`` a (H, W) map becomes mode P."""
    img = Image.fromarray(np.ascontiguousarray(array))
    if palette is not None:
        img = img.convert("P") if img.mode != "L" else img
        img.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def save_jpeg(path: str | os.PathLike, array: np.ndarray, quality: int = 95) -> Path:
    img = Image.fromarray(np.ascontiguousarray(array))
    return atomic_write(path, lambda tmp: img.save(tmp, format="JPEG", quality=quality))


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append .npy to the temp name
            np.save(f, array)
    return atomic_write(path, write)


def save_json(path: str | os.PathLike, obj: Any) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
    return atomic_write(path, write)


def save_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    return atomic_write(path, write)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines log (train_log.jsonl, val_log.jsonl); [] when there is none."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
