"""Step make_sem_seg (spec §12, BECO version): random walk of the CAMs → pseudo-labels and scores.

For every id of ``train_list``: IRN boundary map of the unpadded image pair ``[x, flip(x)]``,
random walk of the stride-4 CAMs (sparse by default, ``--rw_mode dense`` = the reference's
matrix powers), ×4 upsample, global-max normalisation, background plane
``sem_seg_bg_thres``, argmax. Writes

    <sem_seg_out_dir>/<id>.png   uint8 class ids 0..C (mode L)
    <score_dir>/<id>.pt          {"pred": int64 (H, W), "score": float32 (K+1, H, W), "keys": int64 (K+1,)}

Score files keep the reference's layout but hold CPU tensors (QUIRK-12 fixed; ``--score_fp16``
stores the score as float16 like the reference's COCO files). An image without any class (COCO,
§16.2) skips the network and the walk: its PNG is all zero and its score file holds just the
background plane (``keys`` [0]), which is how gen_mask recognises it (no separate "check" folder,
QUIRK-5). Both files are written
atomically; ids with both files present are skipped unless ``--overwrite``. With several CUDA
devices one process per device takes a round-robin share; results do not depend on the split.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datasets.views import InferenceView, data_source
from irn.misc.cam_io import CamFileError, load_cam
from irn.misc.random_walk import random_walk, rw_to_scores
from irn.misc.runtime import (first_item, get_logger, pending, progress, read_ids, run_on_devices, save_torch,
                              shard_workers, worker_share)
from irn.step.train_irn import irn_module, irn_weights_path
from utils.io import save_png

_SPARSE_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def sem_seg_dir(args: Any) -> Path:
    return Path(args.sem_seg_out_dir)


def score_dir(args: Any) -> Path:
    return Path(args.score_dir)


def cam_dir(args: Any) -> Path:
    return Path(args.cam_out_dir)


def save_score(path: str | Path, pred: torch.Tensor, score: torch.Tensor, keys: torch.Tensor,
               fp16: bool = False) -> Path:
    """``{pred, score, keys}`` as CPU tensors via torch.save, atomically."""
    data = {"pred": pred.detach().cpu().long(),
            "score": score.detach().cpu().to(torch.float16 if fp16 else torch.float32),
            "keys": torch.as_tensor(keys).detach().cpu().long()}

    return save_torch(data, path)


def build_inference_net(args: Any, device: torch.device) -> torch.nn.Module:
    module = irn_module(args)
    model = module.EdgeDisplacement(depth=args.backbone_depth, pad_to=args.irn_infer_pad_to)
    module.load_irn_weights(model, irn_weights_path(args))
    return model.to(device).eval()


def labels_for_image(model: torch.nn.Module, pair: torch.Tensor, cam: dict[str, np.ndarray],
                     size: tuple[int, int], args: Any, device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pred (H, W), score (K+1, H, W), keys (K+1,)) for one image; ``pair`` is (2, 3, H, W).

    K = 0 (no class): no network, no walk; pred all 0, score the background plane alone (what
    the walk would give, without its cost).
    """
    if np.asarray(cam["keys"]).size == 0:
        h, w = int(size[0]), int(size[1])
        score = torch.full((1, h, w), float(args.sem_seg_bg_thres), dtype=torch.float32)
        return torch.zeros((h, w), dtype=torch.int64), score, torch.zeros(1, dtype=torch.int64)
    with torch.no_grad():
        edge, _ = model(pair.to(device, non_blocking=True))
    cams = torch.from_numpy(cam["cam"]).to(device)
    if cams.shape[1:] != edge.shape[1:]:
        raise CamFileError(f"stride-4 CAM {tuple(cams.shape[1:])} and boundary map {tuple(edge.shape[1:])} differ "
                         f"for an image of {size[0]}x{size[1]}")
    keys = torch.from_numpy(np.concatenate([[0], cam["keys"] + 1])).long()
    dtype_name = args.rw_sparse_dtype
    if dtype_name not in _SPARSE_DTYPES:
        raise ValueError(f"rw_sparse_dtype must be one of {sorted(_SPARSE_DTYPES)}, got {dtype_name!r}")
    # One thread: the walk runs in as many processes as there are shards or GPUs.
    rw = random_walk(cams, edge, beta=args.beta, exp_times=args.exp_times, radius=args.rw_radius,
                     mode=args.rw_mode, allow_tf32=args.rw_allow_tf32, sparse_dtype=_SPARSE_DTYPES[dtype_name],
                     cpu_threads=1)
    score, pred = rw_to_scores(rw, size, keys, args.sem_seg_bg_thres)
    return pred, score, keys


def _work(part: int, n_parts: int, args: Any, ids: list[str]) -> None:
    device, mine = worker_share(args.device, part, n_parts, ids, args.torch_threads)
    if not mine:
        return
    model = build_inference_net(args, device)
    # Unpadded single-scale pairs [x, fliplr(x)]; the random walk's keys come from the CAM files.
    dataset = InferenceView(mine, data_source(args), scales=(1.0,), with_labels=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=first_item,
                                         num_workers=shard_workers(args.num_workers, n_parts))
    sem_dir, sc_dir, c_dir = sem_seg_dir(args), score_dir(args), cam_dir(args)
    fp16 = args.score_fp16
    for item in progress(loader, f"make_sem_seg[{part}]" if n_parts > 1 else "make_sem_seg", total=len(mine),
                         enabled=not args.no_progress, position=part):
        name = item["name"]
        cam = load_cam(c_dir / f"{name}.npy", name)
        if "cam" not in cam:
            raise CamFileError(f"CAM file for id '{name}' has no stride-4 'cam': {c_dir / (name + '.npy')}")
        try:
            pred, score, keys = labels_for_image(model, torch.from_numpy(item["img"]), cam, item["size"], args, device)
        except CamFileError as e:
            raise CamFileError(f"make_sem_seg: id '{name}': {e}: {c_dir / (name + '.npy')}") from None
        except Exception as e:  # a bug: keep its traceback, say which image
            e.add_note(f"make_sem_seg: while processing id '{name}'")
            raise
        # Score first: an id counts as done only when its PNG exists too.
        save_score(sc_dir / f"{name}.pt", pred, score, keys, fp16)
        save_png(sem_dir / f"{name}.png", pred.cpu().numpy().astype(np.uint8))


def run(args: Any) -> dict[str, Any]:
    log = get_logger()
    ids = read_ids(args, "train_list")
    sem_dir, sc_dir = sem_seg_dir(args), score_dir(args)
    todo = pending(ids, [(sem_dir, ".png"), (sc_dir, ".pt")], args.overwrite)
    log.info(f"make_sem_seg: {len(ids)} ids, {len(ids) - len(todo)} already done, rw_mode {args.rw_mode}, "
             f"beta {args.beta}, exp_times {args.exp_times}, radius {args.rw_radius}, "
             f"bg threshold {args.sem_seg_bg_thres}")
    start = time.perf_counter()
    if todo:
        run_on_devices(_work, args, todo)
    seconds = time.perf_counter() - start
    return {"images": len(ids), "written": len(todo),
            "seconds_per_image": seconds / len(todo) if todo else None, "rw_mode": args.rw_mode}


__all__ = ["run", "save_score", "labels_for_image", "build_inference_net", "sem_seg_dir", "score_dir"]
