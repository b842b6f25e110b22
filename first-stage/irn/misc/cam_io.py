"""CAM files (spec §7.2): ``<cam_dir>/<id>.npy`` holding a pickled dict

    keys      (K,)       int64    0-based class indices of the image's classes, ascending
    cam       (K, h4, w4) float32 stride-4 CAM, each channel divided by (its max + 1e-5)
    high_res  (K, H, W)  float32 full-resolution CAM, same normalisation

We write numpy arrays; the reference wrote torch tensors for ``keys``/``cam``
(QUIRK-10), so the reader accepts both and always returns numpy.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from utils.errors import DataError
from utils.io import atomic_write


class CamFileError(DataError):
    """Missing or malformed CAM file; the message names the id and path."""


def _to_numpy(v):
    if isinstance(v, np.ndarray):
        return v
    if hasattr(v, "detach"):  # a torch tensor from a reference-made file
        return v.detach().cpu().numpy()
    return np.asarray(v)


def save_cam(path: str | Path, keys: np.ndarray, cam: np.ndarray, high_res: np.ndarray) -> Path:
    data = {"keys": np.asarray(keys, dtype=np.int64), "cam": np.asarray(cam, dtype=np.float32),
            "high_res": np.asarray(high_res, dtype=np.float32)}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a name
            np.save(f, data, allow_pickle=True)
    return atomic_write(path, write)


def load_cam(path: str | Path, item_id: str | None = None) -> dict[str, np.ndarray]:
    """Read a CAM file (ours or the reference's) → {keys int64, cam float32, high_res float32}.

    Keys absent from the file (e.g. no ``high_res``) are absent from the result.
    """
    path = Path(path)
    name = item_id or path.stem
    if not path.is_file():
        raise CamFileError(f"CAM file missing for id '{name}': {path} (run make_cam first)")
    try:
        obj = np.load(path, allow_pickle=True)
        data = obj.item() if isinstance(obj, np.ndarray) and obj.dtype == object else obj
    except Exception as e:  # noqa: BLE001 - unpickling can raise almost anything
        raise CamFileError(f"CAM file for id '{name}' is unreadable: {path} ({e})") from None
    if not isinstance(data, dict) or "keys" not in data:
        raise CamFileError(f"CAM file for id '{name}' is not a dict with 'keys': {path}")
    out: dict[str, np.ndarray] = {"keys": _to_numpy(data["keys"]).astype(np.int64).reshape(-1)}
    for k in ("cam", "high_res"):
        if k in data:
            out[k] = _to_numpy(data[k]).astype(np.float32, copy=False)
            if out[k].shape[0] != out["keys"].shape[0]:
                raise CamFileError(f"CAM file for id '{name}': '{k}' has {out[k].shape[0]} channels "
                                   f"but there are {out['keys'].shape[0]} keys: {path}")
            # A NaN wins every arg-max: thresholds and seeds would take it for the top class.
            bad = int(np.count_nonzero(~np.isfinite(out[k])))
            if bad:
                raise CamFileError(f"CAM file for id '{name}' holds NaN/Inf at {bad} values in '{k}': {path}")
    return out


__all__ = ["save_cam", "load_cam", "CamFileError"]
