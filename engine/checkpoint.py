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
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # Resumable checkpoints hold RNG states (numpy arrays, tuples): not weights-only data.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"cannot read checkpoint {path}: {e}") from e


def load_nets(obj: dict, nets: list[nn.Module], source: str) -> None:
    """Load `net_state_dict` strictly into the nets; a DDP `module.` prefix is accepted."""
    if "net_state_dict" not in obj:
        raise ValueError(f"{source}: no 'net_state_dict' entry (keys: {sorted(obj)[:10]})")
    states = obj["net_state_dict"]
    for name, net in zip(NET_NAMES, nets):
        if name not in states:
            raise ValueError(f"{source}: 'net_state_dict' has no '{name}' (has {sorted(states)})")
        state = strip_module_prefix(states[name])
        target = unwrap(net)
        ours = target.state_dict()
        missing = sorted(set(ours) - set(state))
        unexpected = sorted(set(state) - set(ours))
        if missing or unexpected:
            raise ValueError(f"{source}: '{name}' does not match the model: missing {missing[:10]} "
                             f"({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)})")
        bad = [k for k in ours if ours[k].shape != state[k].shape]
        if bad:
            raise ValueError(f"{source}: '{name}' shape mismatch for {bad[:10]}, e.g. {bad[0]}: "
                             f"checkpoint {tuple(state[bad[0]].shape)} vs model {tuple(ours[bad[0]].shape)}")
        target.load_state_dict(state, strict=True)
