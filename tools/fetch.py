"""Fetch ImageNet weights and the data sets, verified against their published hashes.

    python tools/fetch.py list                          every entry: size, target, config key, hash
    python tools/fetch.py weights resnetv1d101-mmcls resnet50-v1 mit-b2
    python tools/fetch.py data voc2012 sbd              ends with data/VOC2012 + SegmentationClassAug
    python tools/fetch.py data coco2014                 images, annotations, then prepare_coco

Each file downloads to ``<target>.part`` (a rerun resumes it), is checked against the table's
SHA-256, MD5 or file-name hash prefix (utils/downloads.py), and only then renamed into place.
A file already there is verified and skipped. Archives unpack into data/, then the preparation
tools run (tools/prepare_voc_aug.py's and tools/prepare_coco.py's library functions) once all
their inputs are present; a rerun skips every finished step. Entries without a published
hash print the SHA-256 computed here and install only with ``--accept-unverified``.
Without network: download the URL the error names by hand, put the file at the target it
names, and rerun the same command. Errors: one line, exit status 1 (2 for an unknown name).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from datasets.prepare.coco import prepare_coco
from tools.prepare_voc_aug import PrepareError, prepare
from utils.config import load_yaml
from utils.downloads import DOWNLOADS, GROUPS
from utils.errors import ConfigError, DataError, exit_status
from utils.fetch import Entry, install, resolve_names, unpack
from utils.io import save_json

REPO = Path(__file__).resolve().parents[1]
VOC_AUG_STAMP = "data/downloads/voc_aug.done.json"

Step = Callable[[Path, dict[str, Entry], bool], str]


def prepare_voc_aug(root: Path, table: dict[str, Entry], progress: bool) -> str:
    """SegmentationClassAug, train_aug.txt and cls_labels.json once VOC and SBD are unpacked."""
    voc, sbd = root / table["voc2012"].unpack[1], root / table["sbd"].unpack[1]
    missing = [n for n, p in (("voc2012", voc), ("sbd", sbd)) if not p.is_dir()]
    if missing:
        return f"voc_aug: SegmentationClassAug waits for {' and '.join(missing)}: python tools/fetch.py data {' '.join(missing)}"
    stamp = root / VOC_AUG_STAMP
    if stamp.is_file() and (voc / "SegmentationClassAug").is_dir():
        return f"voc_aug: {voc / 'SegmentationClassAug'} already prepared ({stamp}); skipped"
    try:
        summary = prepare(voc, sbd, progress=progress)
    except PrepareError as e:
        raise DataError(f"voc_aug: {e}") from None
    save_json(stamp, summary)
    return (f"voc_aug: {voc / 'SegmentationClassAug'} and train_aug.txt ({summary['train_aug']} ids), "
            f"{summary['cls_labels']}")


def prepare_coco_step(root: Path, table: dict[str, Entry], progress: bool) -> str:
    """COCO's masks, lists and image-level labels for each split whose images are unpacked."""
    annotations = root / table["coco2014-annotations"].unpack[1]
    coco = annotations.parent
    splits = [s for s in ("train", "val") if (root / table[f"coco2014-{s}"].unpack[1]).is_dir()]
    if not annotations.is_dir() or not splits:
        waits = ([] if annotations.is_dir() else ["coco2014-annotations"]) + ([] if splits else ["coco2014-train"])
        return f"coco: preparation waits for {' and '.join(waits)}: python tools/fetch.py data {' '.join(waits)}"
    summary = prepare_coco(coco, splits, progress=progress)   # skips splits that are up to date
    done = ", ".join(f"{s}: {summary['splits'][s]['images']} images" for s in splits)
    return f"coco: prepared {coco} ({done})"


PREPARE_STEPS: dict[str, Step] = {"voc_aug": prepare_voc_aug, "coco": prepare_coco_step}


def config_default(config: str, key: str) -> Any:
    """A key's value in the YAML file that holds its default (``model.`` dropped for a file of
    configs/model/, as those files hold the section's keys)."""
    raw = load_yaml(REPO / config)
    parts = key.split(".")
    if parts[0] == Path(config).parent.name:
        parts = parts[1:]
    value: Any = raw
    for p in parts:
        value = value.get(p) if isinstance(value, dict) else None
    return value


def _where(name: str, entry: Entry, root: Path) -> str:
    place = root / (entry.unpack[1] if entry.unpack else entry.target)
    uses = []
    for r in entry.reads:
        default = config_default(r.config, r.key)
        value = str(r.value).lower() if isinstance(r.value, bool) else r.value
        uses.append(f"{r.key} ({r.config}) reads it by default" if default == r.value
                    else f"set {r.key}={value} ({r.config} has {default})")
    return f"{name}: {place}; " + "; ".join(uses)


def fetch(kind: str, names: list[str], *, root: Path = Path("."), table: dict[str, Entry] = DOWNLOADS,
          groups: dict[str, tuple[str, ...]] = GROUPS, steps: dict[str, Step] = PREPARE_STEPS,
          accept_unverified: bool = False, delete_archives: bool = False, progress: bool = True,
          timeout: float = 60.0, log: Callable[[str], None] = print) -> list[str]:
    """Install, unpack and prepare the named entries; the closing lines (where each one went and
    which config key reads it), also logged."""
    chosen = resolve_names(names, kind, table, groups)
    for name in chosen:
        entry = table[name]
        if entry.unpack and (root / entry.unpack[1]).exists():
            log(f"{name}: {root / entry.unpack[1]} already unpacked; skipped")
            continue
        install(name, entry, root, accept_unverified=accept_unverified, progress=progress, timeout=timeout, log=log)
        if entry.unpack:
            unpack(name, entry, root, delete_archive=delete_archives, log=log)
    for step in dict.fromkeys(table[n].prepare for n in chosen if table[n].prepare):
        log(steps[step](root, table, progress))
    lines = [_where(n, table[n], root) for n in chosen]
    log("done:\n  " + "\n  ".join(lines))
    return lines


def _size(n: int | None) -> str:
    return "?" if n is None else f"{n / 2 ** 20:,.0f} MiB" if n >= 2 ** 20 else f"{n} B"


def list_lines(table: dict[str, Entry] = DOWNLOADS) -> list[str]:
    rows = [("name", "kind", "size", "target", "config key", "hash")]
    for name, e in table.items():
        by_config: dict[str, list[str]] = {}
        for r in e.reads:
            by_config.setdefault(r.config, []).append(r.key)
        keys = "; ".join(f"{', '.join(k)} ({c})" for c, k in by_config.items())
        rows.append((name, e.kind, _size(e.size), e.unpack[1] if e.unpack else e.target, keys, e.hash_kind))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
    groups = "; ".join(f"{g} = {' '.join(m)}" for g, m in GROUPS.items())
    return lines + [f"groups: {groups}", "hash none: no published hash; installed only with --accept-unverified"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["weights", "data", "list"])
    p.add_argument("names", nargs="*", help="entries of `list` (or a group)")
    p.add_argument("--root", type=Path, default=Path("."), help="folder the targets (data/...) are relative to")
    p.add_argument("--accept-unverified", action="store_true",
                   help="install files that have no published hash (their SHA-256 is printed)")
    p.add_argument("--delete-archives", action="store_true", help="delete each data archive once unpacked")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a server")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return exit_status(lambda: run(parse_args(argv)))


def run(args: argparse.Namespace) -> None:
    if args.command == "list":
        print("\n".join(list_lines()))
        return
    if not args.names:
        raise ConfigError(f"name what to fetch: python tools/fetch.py {args.command} NAME... "
                          f"(python tools/fetch.py list shows them)")
    fetch(args.command, args.names, root=args.root, accept_unverified=args.accept_unverified,
          delete_archives=args.delete_archives, progress=not args.quiet, timeout=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
