"""Resumable checkpoints and the reference's `best_ckpt.pth` format (spec second-stage §6).

Writes go to a temp file in the same folder and are renamed into place, so a
crash or a kill mid-write leaves the previous checkpoint intact. Everything written here is
tensors and plain values, and is read back with ``torch.load(weights_only=True)``: a checkpoint
from a drive link cannot run code while it loads (unless the user passes --trust-checkpoint).
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.checkpoint import UnpicklingRefused, read_torch_file, strip_module_prefix, unwrap
from utils.errors import CheckpointError, RunError
from utils.io import atomic_write, save_text
from utils.logs import log

LATEST = "latest_ckpt.pth"
BEST = "best_ckpt.pth"
NET_NAMES = ("network1", "network2")
# The flag that loads a checkpoint holding more than tensors and plain values (main.py).
TRUST_FLAG = "--trust-checkpoint"


def rng_state() -> dict[str, Any]:
    """This process's random streams in types ``torch.load(weights_only=True)`` reads: tensors,
    ints, floats, strings, tuples (numpy's state array would need unpickling numpy)."""
    np_state = np.random.get_state(legacy=False)
    state = {"python": random.getstate(),
             "numpy": {"bit_generator": np_state["bit_generator"],
                       "state": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                                 "pos": int(np_state["state"]["pos"])},
                       "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned, also after a save and load; the numpy tuple of
    checkpoints written before is accepted too (they load with --trust-checkpoint only)."""
    random.setstate(tuple(state["python"]))
    np_state = state["numpy"]
    if isinstance(np_state, dict):
        key = np.asarray(torch.as_tensor(np_state["state"]["key"]).numpy(), dtype=np.uint32)
        np_state = {**np_state, "state": {**np_state["state"], "key": key}}
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: str | Path, obj: dict) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_best(path: str | Path, nets: list[nn.Module]) -> Path:
    """Only the networks, as `{"net_state_dict": {"network1": ..., "network2": ...}}` (reference format)."""
    return save(path, {"net_state_dict": {name: unwrap(n).state_dict() for name, n in zip(NET_NAMES, nets)}})


def load(path: str | Path, trust: bool = False) -> dict:
    """A checkpoint's dict, read with ``weights_only=True``: tensors and plain values only, so
    a file from elsewhere cannot run code while it loads. Every checkpoint this project writes
    loads so. ``trust`` (--trust-checkpoint) unpickles anything, for foreign files and those of
    older versions; never for a file from an unknown source."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if trust:
        log.warning(f"{TRUST_FLAG}: loading {path} with full unpickling; a malicious file can run code")
    try:
        obj = read_torch_file(path, trust=trust)
    except UnpicklingRefused as e:
        older = (" (resumable checkpoints of earlier versions of this project hold numpy's RNG state so)"
                 if e.name.startswith("numpy") else "")
        raise CheckpointError(f"{e}: refused; if you trust where the file comes from, pass {TRUST_FLAG}{older}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a checkpoint: it holds {_what(obj)}, not a dict with 'net_state_dict'")
    return obj


def _what(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"


def load_nets(obj: dict, nets: list[nn.Module], source: str) -> None:
    """Load `net_state_dict` strictly into the nets; a DDP `module.` prefix is accepted."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source} is not a checkpoint: it holds {_what(obj)}, not a dict with 'net_state_dict'")
    if "net_state_dict" not in obj:
        raise CheckpointError(f"{source}: no 'net_state_dict' entry (keys: {sorted(obj)[:10]})")
    states = obj["net_state_dict"]
    if not isinstance(states, dict):
        raise CheckpointError(f"{source}: 'net_state_dict' holds {_what(states)}, not the nets' state dicts")
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
        save_text(path, "".join(f"{line}\n" for line in kept))
    return len(lines) - len(kept)
