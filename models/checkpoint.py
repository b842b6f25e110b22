"""Backbone checkpoint key mapping and strict loading (spec/second-stage.md §3,
"Loading the mmclassification checkpoint").

The mapping is a chain of small pure functions on state dicts; only
`load_backbone_weights` touches a module or the disk. Loading is always
strict: any key that does not match, or a shape that differs, is an error,
never a partial load.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, Iterable, List, Mapping, Union

import torch
from torch import Tensor, nn

StateDict = Dict[str, Tensor]

_MMCLS_STEM = re.compile(r"^stem\.(\d+)\.(conv|bn)\.(.+)$")
_LIST_LIMIT = 20


class CheckpointMismatchError(KeyError, ValueError):
    """Checkpoint keys or shapes do not match the module. Subclasses both
    KeyError and ValueError so callers may catch either."""

    def __str__(self) -> str:
        # KeyError's default __str__ quotes its argument; keep the message readable.
        return str(self.args[0]) if self.args else ""


def strip_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> StateDict:
    """Remove `prefix` from the keys that start with it; other keys are kept."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def strip_module_prefix(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Undo the `module.` prefix that DistributedDataParallel/DataParallel add."""
    return strip_prefix(state_dict, "module.")


def drop_num_batches_tracked(state_dict: Mapping[str, Tensor]) -> StateDict:
    """BN step counters carry no learnt information and vary between frameworks."""
    return {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}


def drop_keys_with_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> StateDict:
    return {k: v for k, v in state_dict.items() if not k.startswith(prefix)}


def mmcls_stem_key(key: str) -> str:
    """`stem.<i>.conv.*` -> `stem_layer.conv<i+1>.*`, `stem.<i>.bn.*` -> `stem_layer.bn<i+1>.*`."""
    match = _MMCLS_STEM.match(key)
    if match is None:
        return key
    index, kind, rest = match.groups()
    return f"stem_layer.{kind}{int(index) + 1}.{rest}"


def mmcls_to_ours(state_dict: Mapping[str, Tensor]) -> StateDict:
    """mmclassification ResNetV1d naming -> ours.

    Drops `num_batches_tracked` and the ImageNet classifier `head.fc.*`,
    strips `backbone.`, renames the stem. Block names already agree.
    """
    sd = drop_num_batches_tracked(state_dict)
    sd = drop_keys_with_prefix(sd, "head.fc.")
    sd = strip_prefix(sd, "backbone.")
    return {mmcls_stem_key(k): v for k, v in sd.items()}


def torchvision_to_ours(state_dict: Mapping[str, Tensor]) -> StateDict:
    """A plain torchvision-style state dict (no `backbone.` prefix, block names
    `layerN.M.convK/bnK/downsample.*`, classifier `fc.*`) -> ours.

    Drops `fc.*` and `num_batches_tracked`; nothing is renamed. A real
    torchvision ResNet has a single 7x7 `conv1`/`bn1` stem, which has no
    counterpart in the deep V1d stem: it is left as is, so the strict loader
    reports `conv1.*`/`bn1.*` as unexpected and `stem_layer.*` as missing
    instead of loading the blocks alone. A state dict already in our naming
    (such as the reference's converted `resnetv1d101_mmcv.pth`) passes
    through unchanged apart from the dropped keys.
    """
    sd = drop_num_batches_tracked(state_dict)
    return drop_keys_with_prefix(sd, "fc.")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _looks_mmcls(state_dict: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(("backbone.", "head.fc.")) or _MMCLS_STEM.match(k) for k in state_dict)


def detect_and_map(obj: Any) -> StateDict:
    """Backbone state dict in our naming from any accepted checkpoint form:

    - an mmclassification checkpoint `{"state_dict": ..., "meta": ...}`;
    - a plain state dict in mmclassification naming (with or without `backbone.`);
    - a plain torchvision-style state dict, or one already in our naming.

    `module.` prefixes are removed first.
    """
    if isinstance(obj, Mapping) and "state_dict" in obj and _is_state_dict(obj["state_dict"]):
        obj = obj["state_dict"]
    if not _is_state_dict(obj):
        if isinstance(obj, Mapping):
            head = sorted(map(str, obj))[:_LIST_LIMIT]
            detail = f"a dict whose keys are {head} (values not all tensors)"
        else:
            detail = f"a {type(obj).__name__}"
        raise ValueError(f"not a recognised checkpoint: expected a state dict or a dict with 'state_dict', got {detail}")
    sd = strip_module_prefix(obj)
    return mmcls_to_ours(sd) if _looks_mmcls(sd) else torchvision_to_ours(sd)


def _listing(keys: Iterable[str]) -> str:
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
            f"missing keys {_listing(missing)}; unexpected keys {_listing(unexpected)}")
    wrong = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if state_dict[k].shape != v.shape]
    if wrong:
        shown = "; ".join(wrong[:_LIST_LIMIT])
        raise CheckpointMismatchError(f"checkpoint {source}: {len(wrong)} shape mismatch(es): {shown}")


def load_backbone_weights(
    backbone: nn.Module,
    path_or_obj: Union[str, "os.PathLike[str]", Mapping[str, Any]],
    weights_only: bool = True,
) -> List[str]:
    """Load a backbone checkpoint strictly; returns the loaded keys.

    `path_or_obj` is a file path or an already-loaded checkpoint object.
    `weights_only=True` refuses arbitrary pickled objects in the file; the
    mmclassification ImageNet checkpoints load with it.
    """
    if isinstance(path_or_obj, (str, os.PathLike)):
        source = os.fspath(path_or_obj)
        obj = torch.load(source, map_location="cpu", weights_only=weights_only)
    else:
        source, obj = "<in-memory object>", path_or_obj
    try:
        state_dict = detect_and_map(obj)
    except ValueError as err:
        raise ValueError(f"checkpoint {source}: {err}") from None
    check_state_dict_matches(backbone, state_dict, source)
    # BN step counters were dropped on purpose; keep the module's own so the
    # strict load below sees a complete dict.
    own = backbone.state_dict()
    full: Dict[str, Tensor] = dict(state_dict)
    for k, v in own.items():
        if k.endswith("num_batches_tracked"):
            full[k] = v
    backbone.load_state_dict(full, strict=True)
    return sorted(state_dict)
