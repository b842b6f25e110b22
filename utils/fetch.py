"""Downloading, verifying, installing and unpacking the files of `utils/downloads.py`'s table.

One file's path, for an `Entry`:
1. ``<target>`` present: verified against the entry's hash and skipped (an unverifiable file
   is skipped with its SHA-256 printed; a file that fails is an error, never overwritten).
2. Otherwise it downloads into ``<target>.part``, resuming a partial one with an HTTP Range
   request (a server that ignores Range sends the whole file, which restarts the part).
3. The part is checked (size, then hash); a mismatch deletes it and names both hashes. A part
   with no published hash is kept, its SHA-256 printed, and installed only with
   ``accept_unverified``.
4. The part is renamed onto ``<target>`` (atomic), so ``<target>`` is only ever a checked file.
5. Data archives then unpack: the entry's folder inside the archive lands at its destination
   by one rename; a destination already there means the step is done.

Errors are one line and name the URL or file; the network ones also give the manual route
(download the URL yourself, put it at the target, rerun: the file is then verified).
"""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from utils.errors import ConfigError, DataError

CHUNK = 1 << 20
HASH_KINDS = {"sha256": 64, "md5": 32, "sha256-prefix": 8}   # kind -> hex digits
USER_AGENT = "beco-fetch/1"


class DownloadError(DataError):
    """The server could not be reached, refused the file, or the transfer broke off."""


class UnreachableError(DownloadError):
    """No answer, or an HTTP error answer: the user may fetch the file by hand."""


class HashMismatchError(DataError):
    """A downloaded or present file is not the published one; the message gives both hashes."""


class UnverifiedError(DataError):
    """A file with no published hash, downloaded but not installed without --accept-unverified."""


@dataclass(frozen=True)
class Read:
    """A config key that reads an installed file, and the value that points it there."""
    config: str          # the YAML file holding the key's default
    key: str             # dotted, as given on the command line (model.backbone.pretrained)
    value: Any


@dataclass(frozen=True)
class Entry:
    kind: str                                 # weights | data
    url: str
    hash: str | None                          # "sha256:<64>", "md5:<32>", "sha256-prefix:<8>"
    size: int | None                          # bytes, when published
    target: str                               # relative to the root: where the file is installed
    reads: tuple[Read, ...] = ()
    unpack: tuple[str, str] | None = None     # (folder inside the archive, destination folder)
    prepare: str | None = None                # a preparation step run once its inputs are here
    note: str = ""

    @property
    def hash_kind(self) -> str:
        return self.hash.split(":", 1)[0] if self.hash else "none"

    @property
    def hash_value(self) -> str | None:
        return self.hash.split(":", 1)[1] if self.hash else None


def manual_route(entry: Entry, name: str, root: Path) -> str:
    return (f"manual route: download {entry.url} yourself, put it at {root / entry.target} and rerun "
            f"`python tools/fetch.py {entry.kind} {name}` (it is verified there)")


def digest(path: Path, algorithm: str, progress: bool = False) -> str:
    """The hex digest of a file, read in chunks."""
    h = hashlib.new(algorithm)
    size = path.stat().st_size
    with open(path, "rb") as f, _bar(size, f"hash {path.name}", progress) as bar:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _bar(total: int | None, desc: str, enabled: bool, initial: int = 0):
    from tqdm import tqdm  # a bar only where the caller asks for one
    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, leave=False)


def check(entry: Entry, path: Path, progress: bool = False) -> tuple[bool | None, str]:
    """(True, text) when ``path`` is the published file, (False, text) when it is not, (None,
    text) when the entry has no hash; the text names what was compared (both hashes or sizes)."""
    size = path.stat().st_size
    if entry.size is not None and size != entry.size:
        return False, f"size: expected {entry.size} bytes, found {size}"
    kind, expected = entry.hash_kind, entry.hash_value
    if expected is None:
        return None, f"no published hash; sha256 {digest(path, 'sha256', progress)}"
    found = digest(path, "md5" if kind == "md5" else "sha256", progress)
    if kind == "sha256-prefix":
        found = found[:len(expected)]
    if found != expected.lower():
        return False, f"{kind}: expected {expected}, found {found}"
    return True, f"{kind} {expected}"


def download(url: str, part: Path, size_hint: int | None = None, progress: bool = True,
             timeout: float = 60.0) -> int:
    """Fetch ``url`` into ``part``, resuming what ``part`` already holds; the final byte count.

    A partial part asks for the rest (``Range: bytes=<n>-``): a 206 answer appends, a 200
    answer (the server ignores Range) rewrites the part from the start, a 416 answer means the
    part already holds the whole file. A transfer that breaks off keeps the part for a rerun."""
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            return have
        raise UnreachableError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UnreachableError(f"cannot reach {url} ({reason})") from None
    with resp:
        resumed = have > 0 and resp.status == 206 and _range_start(resp) == have
        if resp.status == 206 and have and not resumed:
            # a range other than the one asked for: drop the part and ask for the whole file
            part.unlink(missing_ok=True)
            return download(url, part, size_hint, progress, timeout)
        if not resumed:
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else size_hint
        mode = "ab" if resumed else "wb"
        with open(part, mode) as f, _bar(total, part.name.removesuffix(".part"), progress, have) as bar:
            try:
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    have += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:
                raise DownloadError(f"{url}: transfer broke off after {have} bytes ({type(e).__name__}); "
                                    f"rerun to resume from {part}") from None
    if total is not None and have < total:
        raise DownloadError(f"{url}: transfer broke off after {have} of {total} bytes; rerun to resume from {part}")
    return have


def _range_start(resp) -> int | None:
    """The first byte of a 206 answer's ``Content-Range: bytes <start>-<end>/<total>``."""
    text = resp.headers.get("Content-Range", "")
    try:
        return int(text.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def install(name: str, entry: Entry, root: Path, *, accept_unverified: bool = False, progress: bool = True,
            timeout: float = 60.0, log: Callable[[str], None] = print) -> str:
    """Make ``root/entry.target`` the entry's verified file; returns how (present, downloaded)."""
    target = root / entry.target
    if target.is_file():
        ok, text = check(entry, target, progress)
        if ok is False:
            raise HashMismatchError(f"{target} is present but is not {name} ({text}); move it away "
                                    f"and rerun to fetch it again")
        log(f"{name}: {target} present, " + ("verified, " if ok else "not verified: ") + f"{text}; skipped")
        return "present"
    part = target.with_name(target.name + ".part")
    try:
        download(entry.url, part, entry.size, progress, timeout)
    except UnreachableError as e:
        raise UnreachableError(f"{e}; {manual_route(entry, name, root)}") from None
    ok, text = check(entry, part, progress)
    if ok is False:
        part.unlink()
        raise HashMismatchError(f"{name}: {entry.url} is not the published file ({text}); "
                                f"the download was deleted, nothing installed")
    if ok is None and not accept_unverified:
        raise UnverifiedError(f"{name}: {entry.url} has {text}; kept unverified at {part}, not installed: "
                              f"check that hash and rerun with --accept-unverified to install it")
    os.replace(part, target)
    log(f"{name}: downloaded {target}, " + ("verified " if ok else "installed unverified: ") + text)
    return "downloaded"


def unpack(name: str, entry: Entry, root: Path, *, delete_archive: bool = False,
           log: Callable[[str], None] = print) -> Path:
    """Extract the entry's folder from its archive to its destination (one rename at the end)."""
    assert entry.unpack is not None
    inner, dest = PurePosixPath(entry.unpack[0]), root / entry.unpack[1]
    archive = root / entry.target
    if dest.exists():
        log(f"{name}: {dest} already unpacked; skipped")
        return dest
    work = dest.with_name(f".{dest.name}.unpack")
    if work.exists():       # an unpack that was killed: start it again
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        _extract(archive, inner, work)
        if not (work / inner).is_dir():
            raise DataError(f"{archive} holds no folder {inner}/: not the {name} archive")
        os.replace(work / inner, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"{name}: unpacked {archive.name} -> {dest}")
    if delete_archive:
        archive.unlink()
        log(f"{name}: deleted {archive}")
    return dest


def _inside(member: str, inner: PurePosixPath) -> bool:
    path = PurePosixPath(member)
    if path.is_absolute() or ".." in path.parts:
        raise DataError(f"archive member {member!r} points outside the archive: refused")
    return path == inner or inner in path.parents


def _extract(archive: Path, inner: PurePosixPath, out: Path) -> None:
    """Only the members under ``inner``, with paths that stay inside ``out``."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                z.extractall(out, [m for m in z.namelist() if _inside(m.rstrip("/"), inner)])
            return
        with tarfile.open(archive) as t:
            members = [m for m in t.getmembers() if _inside(m.name, inner)]
            t.extractall(out, members, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"cannot unpack {archive}: {e}") from None


def resolve_names(names: list[str], kind: str, table: dict[str, Entry],
                  groups: dict[str, tuple[str, ...]] | None = None) -> list[str]:
    """The table's names for the command line's names (groups expanded), in order, each once."""
    groups = groups or {}
    out: list[str] = []
    for n in names:
        for m in groups.get(n, (n,)):
            if m not in table:
                known = sorted(k for k, e in table.items() if e.kind == kind) + sorted(
                    g for g, ms in groups.items() if all(table[x].kind == kind for x in ms if x in table))
                raise ConfigError(f"unknown {kind} entry '{m}'; known: {', '.join(known)}")
            if table[m].kind != kind:
                raise ConfigError(f"'{m}' is a {table[m].kind} entry: python tools/fetch.py {table[m].kind} {m}")
            if m not in out:
                out.append(m)
    return out

