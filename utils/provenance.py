"""What made an output folder: the one rule for every tool that reuses or replaces outputs.

A folder a tool fills (score maps, predictions, a first-stage step's files, the demo's and the
noise study's outputs, a prepared COCO tree) holds a record, ``_provenance.json``:

    {"tool": "main.py --test",
     "inputs": {"checkpoint": {"sha256": "...", "path": "..."}},   # files by content hash,
     "settings": {...}}                                            # folders by their record's digest

``settings`` are the values that change the outputs' bytes, nothing else (not worker counts,
not paths to moved copies of the same data). The rule, in ``plan`` and ``commit``:

- no folder, or one without files the tool writes: made afresh;
- the same record: reused, a rerun adds only what is missing (a killed run resumes);
- another record: refused, naming every difference (recorded value vs this run's); with the
  tool's overwrite option its outputs are deleted and made again;
- outputs but no record: refused, overwrite or not: nothing in a folder whose maker is unknown
  is reused or deleted.

``plan`` decides without touching anything, so a tool runs all its other checks (the
checkpoint fits, the data is there) before ``commit`` deletes; ``commit`` deletes only files
matching the tool's own output patterns, then writes the record. A downstream folder records its
upstream folder's digest, so remaking the upstream (another checkpoint's maps) makes every
downstream folder stale, and it is refused instead of being reused.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from utils.errors import OutputExistsError, RunError
from utils.io import save_json, save_text

RECORD_NAME = "_provenance.json"


def plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples as lists, paths as strings), so a record compares
    equal to itself after a round trip through the file."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def sha256(path: str | os.PathLike) -> str:
    """The file's SHA-256 (hashed once per process while its size and mtime stay the same)."""
    path = Path(path).resolve()
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


def file_input(path: str | os.PathLike) -> dict[str, str]:
    """A file input: identified by its content, so a copy elsewhere is the same input."""
    return {"sha256": sha256(path), "path": str(Path(path).resolve())}


def folder_input(folder: str | os.PathLike, patterns: Iterable[str] = ("*",),
                 record_name: str = RECORD_NAME) -> dict[str, str]:
    """An upstream folder: identified by its own record's digest. A folder another tool filled
    without a record (e.g. the reference's score maps) is identified by its listing of names,
    sizes and modification times, which changes when any file is rewritten."""
    folder = Path(folder)
    stored = read_record(folder / record_name)
    if stored is not None:
        return {"record": digest(stored), "path": str(folder.resolve())}
    listing = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                     for pattern in patterns for p in folder.glob(pattern) if p.is_file())
    return {"listing": hashlib.sha256(json.dumps(listing).encode()).hexdigest(), "path": str(folder.resolve())}


def make_record(tool: str, inputs: dict[str, dict[str, str]], settings: dict[str, Any]) -> dict[str, Any]:
    return plain({"tool": tool, "inputs": inputs, "settings": settings})


def _identity(record: dict[str, Any]) -> dict[str, Any]:
    """What decides reuse: paths are for people reading the record, not part of it."""
    return {"tool": record.get("tool"), "settings": record.get("settings"),
            "inputs": {name: {k: v for k, v in (given or {}).items() if k != "path"}
                       for name, given in (record.get("inputs") or {}).items()}}


def digest(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(_identity(plain(record)), sort_keys=True).encode()).hexdigest()


def read_record(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{path} is unreadable ({e}): move the folder away or delete the file by hand") from e
    if not isinstance(record, dict) or "tool" not in record:
        raise RunError(f"{path} is not a provenance record: move the folder away")
    return record


def differences(stored: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: recorded -> now`` for every entry that differs, inputs and settings flattened."""
    def flat(d: Any, prefix: str) -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix: d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    a, b = flat(_identity(plain(stored)), ""), flat(_identity(plain(new)), "")
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


@dataclass
class Plan:
    """What ``commit`` will do to ``folder``: ``new`` (nothing there), ``reuse`` (same record) or
    ``replace`` (overwrite asked; the tool's outputs go)."""
    folder: Path
    record: dict[str, Any]
    action: str
    outputs: tuple[str, ...]
    record_path: Path

    @property
    def reuse(self) -> bool:
        return self.action == "reuse"


def _made_files(folder: Path, outputs: Iterable[str]) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted({p for pattern in outputs for p in folder.glob(pattern) if not p.name.startswith(RECORD_NAME[:-5])})


def plan(folder: str | os.PathLike, record: dict[str, Any], outputs: Iterable[str], *, overwrite: bool,
         overwrite_flag: str = "--overwrite", record_name: str = RECORD_NAME, redo_stale: bool = False,
         legacy: str | None = None) -> Plan:
    """Decide what to do with ``folder`` for ``record``; raises ``OutputExistsError`` when its
    outputs were made by something else (other inputs, other settings, or nothing recorded).
    ``outputs``: glob patterns (relative to the folder) of what the tool writes there.
    ``legacy``: the file an earlier version of the tool recorded itself in: such a folder is the
    tool's own, but its settings are unknown, so it is refused, and replaced with overwrite.
    ``redo_stale``: another record replaces the outputs instead of refusing, for a tool whose
    outputs are a pure function of the recorded inputs (COCO's masks of an annotation file)."""
    folder = Path(folder)
    outputs = tuple(outputs)
    record_path = folder / record_name
    stored = read_record(record_path)
    if stored is None and legacy and (folder / legacy).is_file():
        stored = {"tool": f"an earlier version ({legacy})", "inputs": {}, "settings": {}}
        outputs = (*outputs, legacy)
    if stored is None:
        made = _made_files(folder, outputs)
        if made:
            raise OutputExistsError(
                f"{folder} holds {len(made)} output file(s) (e.g. {made[0].name}) but no {record_name} saying "
                f"what made them: nothing there is reused or deleted{' (even with ' + overwrite_flag + ')' if overwrite else ''}; "
                f"move the folder away or choose another one")
        return Plan(folder, record, "new", outputs, record_path)
    diff = differences(stored, record)
    if overwrite or (diff and redo_stale):
        return Plan(folder, record, "replace", outputs, record_path)
    if diff:
        raise OutputExistsError(
            f"{folder} was made from other inputs or settings ({record_path}; recorded -> this run): "
            f"{'; '.join(diff[:8])}{f'; and {len(diff) - 8} more' if len(diff) > 8 else ''}. "
            f"Pass {overwrite_flag} to replace its outputs, or choose another folder")
    return Plan(folder, record, "reuse", outputs, record_path)


def commit(p: Plan) -> Plan:
    """Carry out ``p``: on ``replace`` delete the tool's outputs (files and folders matching its
    patterns, nothing else), then write the record. Outputs first: a kill in between leaves the
    old record over fewer files, which a rerun refuses or replaces, never reuses as new."""
    if p.action == "replace":
        for path in _made_files(p.folder, p.outputs):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    if p.action != "reuse" or read_record(p.record_path) != p.record:
        save_json(p.record_path, p.record)
    return p


def withdraw(p: Plan) -> None:
    """After a failed start: a folder ``p`` created that holds none of the tool's outputs loses its
    record again (and goes, when nothing else is in it), so a failed step leaves nothing behind."""
    if p.action != "new" or _made_files(p.folder, p.outputs):
        return
    p.record_path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        p.folder.rmdir()  # only when empty


def prepare(folder: str | os.PathLike, record: dict[str, Any], outputs: Iterable[str], *, overwrite: bool,
            **options: Any) -> Plan:
    """``plan`` (with its keyword ``options``) then ``commit``, for a tool whose other checks
    have all run already."""
    return commit(plan(folder, record, outputs, overwrite=overwrite, **options))


def set_aside(*paths: Path) -> int:
    """Rename the existing ``paths`` to ``<stem>.N<suffix>`` with one N for all of them, the first
    number none of them uses yet, so no earlier version is ever lost; returns N."""
    n = 1
    while any(p.with_name(f"{p.stem}.{n}{p.suffix}").exists() for p in paths):
        n += 1
    for p in paths:
        if p.exists():
            os.replace(p, p.with_name(f"{p.stem}.{n}{p.suffix}"))
    return n


def keep_numbered(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path``; a different file already there is kept as ``<stem>.1<suffix>``,
    ``.2`` and so on (``set_aside``)."""
    path = Path(path)
    if path.is_file() and path.read_text() != text:
        set_aside(path)
    return save_text(path, text)
