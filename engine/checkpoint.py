"""Resumable checkpoints and the reference's `best_ckpt.pth` format (spec second-stage §6).

Writes go to a temp file in the same folder and are renamed into place, so a
crash or a kill mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.checkpoint import strip_module_prefix, unwrap
from utils.errors import CheckpointError
from utils.io import atomic_write

LATEST = "latest_ckpt.pth"
BEST = "best_ckpt.pth"
NET_NAMES = ("network1", "network2")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: str | Path, obj: dict) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_best(path: str | Path, nets: list[nn.Module]) -> Path:
    """Only the networks, as `{"net_state_dict": {"network1": ..., "network2": ...}}` (reference format)."""
    return save(path, {"net_state_dict": {name: unwrap(n).state_dict() for name, n in zip(NET_NAMES, nets)}})


def load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # Resumable checkpoints hold RNG states (numpy arrays, tuples): not weights-only data.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e


def load_nets(obj: dict, nets: list[nn.Module], source: str) -> None:
    """Load `net_state_dict` strictly into the nets; a DDP `module.` prefix is accepted."""
    if "net_state_dict" not in obj:
        raise CheckpointError(f"{source}: no 'net_state_dict' entry (keys: {sorted(obj)[:10]})")
    states = obj["net_state_dict"]
    for name, net in zip(NET_NAMES, nets):
        if name not in states:
            raise CheckpointError(f"{source}: 'net_state_dict' has no '{name}' (has {sorted(states)})")
        state = strip_module_prefix(states[name])
        target = unwrap(net)
        ours = target.state_dict()
        missing = sorted(set(ours) - set(state))
        unexpected = sorted(set(state) - set(ours))
        if missing or unexpected:
            raise CheckpointError(f"{source}: '{name}' does not match the model: missing {missing[:10]} "
                             f"({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)})")
        bad = [k for k in ours if ours[k].shape != state[k].shape]
        if bad:
            raise CheckpointError(f"{source}: '{name}' shape mismatch for {bad[:10]}, e.g. {bad[0]}: "
                             f"checkpoint {tuple(state[bad[0]].shape)} vs model {tuple(ours[bad[0]].shape)}")
        target.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------- run folders and resume

# What makes a folder "a run": a new run never writes into one (it would overwrite its
# best_ckpt.pth and append to its logs).
RUN_MARKERS = ("config.yaml", LATEST, BEST, "train_log.jsonl", "val_log.jsonl")
# Keys a resume may change without changing the run: where things are and how much is shown.
RESUME_FREE = ("logging.", "test.", "data.root", "data.num_workers", "data.synthetic", "data.val_batch_size",
               "train.log_interval", "train.num_vis", "train.ckpt_interval", "train.cudnn_benchmark")


def check_new_run_folder(run_dir: Path) -> None:
    """Refuse to start a run in a folder that holds another run, naming it and how to resume."""
    from utils.errors import RunError
    found = [m for m in RUN_MARKERS if (run_dir / m).exists()]
    if found:
        resume = f"resume it with --ckpt {run_dir / LATEST}" if (run_dir / LATEST).is_file() else "it has no latest_ckpt.pth to resume"
        raise RunError(f"{run_dir} holds another run ({', '.join(found)}): {resume}, or start a new one "
                       f"in another folder (--logging_tag / --run_id)")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, this run's value) for every key that differs and changes the
    run (``RESUME_FREE`` keys may differ)."""
    def free(key: str) -> bool:
        return any(key.startswith(f) if f.endswith(".") else key == f or key.startswith(f + ".")
                   for f in RESUME_FREE)
    a, b = _flat(saved), _flat(current)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not free(k)]


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete what killed atomic writes left behind (``.<name>.<random>.tmp``, utils/io.py)."""
    stale = [p for p in run_dir.glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def truncate_jsonl(path: Path, keep) -> int:
    """Rewrite ``path`` (atomically) with the records ``keep(record)`` accepts; returns how many
    were dropped. A resumed run removes what the killed run logged after its checkpoint, so each
    iteration is logged once."""
    import json
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by the kill
            continue
        if keep(record):
            kept.append(line)
    if len(kept) != len(lines):
        from utils.io import save_text
        save_text(path, "".join(f"{line}\n" for line in kept))
    return len(lines) - len(kept)
