"""Generic strict loading of weights files into a module, for both stages.

Each segmenter's file, and the first stage's networks, own a pure
`checkpoint_filter_fn(state_dict) -> state_dict` that renames a file's keys to
their own (timm's idea); this module holds the small key helpers those filters
share and the one loader that reads a file, unwraps it, applies a filter and
loads strictly. Any key that
does not match, or a shape that differs, is an error naming it, never a
partial load.
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable, Dict, Iterable, List, Mapping, Union

import safetensors.torch
import torch
from torch import Tensor, nn

from utils.errors import BecoError, CheckpointError, InputNotFoundError

StateDict = Dict[str, Tensor]
FilterFn = Callable[[Mapping[str, Tensor]], StateDict]

_LIST_LIMIT = 20


class CheckpointMismatchError(BecoError, KeyError, ValueError):
    """Checkpoint keys or shapes do not match the module. Subclasses both
    KeyError and ValueError so callers may catch either."""

    def __str__(self) -> str:
        # KeyError's default __str__ quotes its argument; keep the message readable.
        return str(self.args[0]) if self.args else ""


def strip_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> StateDict:
    """Remove `prefix` from the keys that start with it; other keys are kept."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def unwrap(net: nn.Module) -> nn.Module:
    """The module inside torch.compile's and DistributedDataParallel/DataParallel's wrappers
    (or the net itself)."""
    net = getattr(net, "_orig_mod", net)
    return net.module if hasattr(net, "module") else net


def strip_module_prefix(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Undo the `module.` prefix that DistributedDataParallel/DataParallel add."""
    return strip_prefix(state_dict, "module.")


def drop_num_batches_tracked(state_dict: Mapping[str, Tensor]) -> StateDict:
    """BN step counters carry no learnt information and vary between frameworks."""
    return {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}


def drop_keys_with_prefix(state_dict: Mapping[str, Tensor], *prefixes: str) -> StateDict:
    return {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def unwrap_state_dict(obj: Any) -> StateDict:
    """The state dict inside a checkpoint object: a flat dict of tensors, or one
    wrapped as `{"state_dict": ..., ...}` (mmcv/mmcls files); `module.` prefixes removed."""
    if isinstance(obj, Mapping) and "state_dict" in obj and _is_state_dict(obj["state_dict"]):
        obj = obj["state_dict"]
    if not _is_state_dict(obj):
        if isinstance(obj, Mapping):
            head = sorted(map(str, obj))[:_LIST_LIMIT]
            detail = f"a dict whose keys are {head} (values not all tensors)"
        else:
            detail = f"a {type(obj).__name__}"
        raise ValueError(f"not a recognised checkpoint: expected a state dict or a dict with 'state_dict', "
                         f"got {detail}")
    return strip_module_prefix(obj)


def key_listing(keys: Iterable[str]) -> str:
    """`count: [first keys, sorted]` for error messages."""
    keys = sorted(keys)
    shown = ", ".join(keys[:_LIST_LIMIT])
    more = f", ... ({len(keys) - _LIST_LIMIT} more)" if len(keys) > _LIST_LIMIT else ""
    return f"{len(keys)}: [{shown}{more}]"


def check_state_dict_matches(module: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """Raise unless `state_dict` has exactly the module's keys (BN step
    counters aside) with the same shapes."""
    expected = {k: v for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"checkpoint {source} does not match {type(module).__name__} after key mapping; "
            f"missing keys {key_listing(missing)}; unexpected keys {key_listing(unexpected)}")
    wrong = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if state_dict[k].shape != v.shape]
    if wrong:
        shown = "; ".join(wrong[:_LIST_LIMIT])
        raise CheckpointMismatchError(f"checkpoint {source}: {len(wrong)} shape mismatch(es): {shown}")


class UnpicklingRefused(CheckpointError):
    """A torch file that names Python objects beyond tensors and plain values: loading it could
    run code, so it is not loaded; ``name`` is the first such object."""

    def __init__(self, message: str, name: str) -> None:
        super().__init__(message)
        self.name = name


def _first_line(error: Exception) -> str:
    """torch's message in one line: its weights-only message is a page of advice around the one
    line that says what was wrong."""
    text = str(error)
    found = re.search(r"WeightsUnpickler error: *(.*)", text)
    if found:
        return found.group(1).strip() or "not a PyTorch file"
    if isinstance(error, EOFError):
        return "the file is empty or cut short"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def is_safetensors_file(path: Union[str, "os.PathLike[str]"]) -> bool:
    """Whether `path` holds the safetensors format (Hugging Face's `model.safetensors`): an 8-byte
    little-endian header length, then a JSON header. Told by content, not by name, so a renamed
    file still reads; PyTorch's files start with a zip or pickle header, never with this."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = os.path.getsize(path)
    except OSError:
        return False  # torch.load below reports the unreadable file as before
    return len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size


def read_torch_file(path: Union[str, "os.PathLike[str]"], *, trust: bool = False,
                    allowed: Iterable[Any] = ()) -> Any:
    """A safetensors file (which holds only tensors) read as a flat state dict; otherwise
    ``torch.load`` of a file onto the CPU, with ``weights_only=True``: tensors, plain values
    and the ``allowed`` globals only, so a file from elsewhere cannot run code while it loads.
    ``trust`` unpickles anything (the user's explicit choice for a file they trust). Raises
    ``UnpicklingRefused`` naming the object a file needs beyond that, ``CheckpointError`` with
    torch's one-line reason for a truncated or foreign file."""
    if is_safetensors_file(path):
        try:
            return safetensors.torch.load_file(os.fspath(path), device="cpu")
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"cannot read {os.fspath(path)}: {_first_line(err)}") from None
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as err:  # noqa: BLE001 - the restricted unpickler raises several types
        found = None if trust else re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if found:
            raise UnpicklingRefused(f"{os.fspath(path)} holds pickled Python objects ({found.group(1)}) and loading "
                                    f"them can run code", found.group(1)) from None
        raise CheckpointError(f"cannot read {os.fspath(path)}: {_first_line(err)}") from None


def load_pretrained(
    module: nn.Module,
    path_or_obj: Union[str, "os.PathLike[str]", Mapping[str, Any]],
    filter_fn: FilterFn,
    config_key: str = "",
    *,
    missing_hint: str = "set it to null to train from scratch",
    counters_from_file: bool = False,
) -> List[str]:
    """Load foreign weights into `module` strictly; returns the loaded keys.

    `path_or_obj` is a file path or an already-loaded checkpoint object;
    `filter_fn` maps its keys to the module's; `config_key` names the setting
    the path came from in the errors, `missing_hint` what to do when the file
    is absent. The file is read with `weights_only=True`, which refuses
    arbitrary pickled objects (unpickling them could run code); the torchvision,
    mmcls and NVlabs ImageNet files load with it. BN step counters are never
    required; the module keeps its own unless `counters_from_file`, which takes
    those the file has (the first stage has always carried them over).
    """
    if isinstance(path_or_obj, (str, os.PathLike)):
        source = os.fspath(path_or_obj)
        where = f"config key '{config_key}': " if config_key else ""
        if not os.path.isfile(source):
            raise InputNotFoundError(f"{where}no file {source} ({missing_hint})")
        try:
            obj = read_torch_file(source)
        except CheckpointError as err:
            raise CheckpointError(f"{where}{err}; not loaded as weights") from None
    else:
        source, obj = "<in-memory object>", path_or_obj
    try:
        mapped = filter_fn(unwrap_state_dict(obj))
    except ValueError as err:
        raise ValueError(f"checkpoint {source}: {err}") from None
    state_dict = drop_num_batches_tracked(mapped)
    check_state_dict_matches(module, state_dict, source)
    # The strict load below sees a complete dict: BN step counters from the file
    # or the module's own.
    full: Dict[str, Tensor] = dict(state_dict)
    for k, v in module.state_dict().items():
        if k.endswith("num_batches_tracked"):
            full[k] = mapped[k] if counters_from_file and k in mapped else v
    module.load_state_dict(full, strict=True)
    return sorted(state_dict)
