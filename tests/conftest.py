"""Shared fixtures: the one factory for generated data sets (`synthetic_set`), tiny hand-written
VOC and COCO trees, and configs pointing at them."""
from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets.prepare.coco import prepare_coco
from datasets.synthetic.coco import make_synthetic_coco
from datasets.synthetic.voc import make_synthetic_voc
from engine.config import load_config
from utils.config import Config
from utils.voc import voc_palette

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 4

# Every registered segmenter's CPU-size config (small backbone, no ImageNet weights) and the
# stride of its pre_logits; tests parametrised over models.MODELS fail for one missing here.
CPU_CONFIGS = {
    "deeplabv3plus": ("demo.yaml", 4),
    "deeplabv2": ("demo_deeplabv2.yaml", 8),
    "segformer": ("demo_segformer.yaml", 4),
}


def write_tiny_voc(root: Path, train_ids: list[str], val_ids: list[str], size=(40, 56), seed: int = 0) -> Path:
    """A VOC tree with random content: enough for loaders, not for learning."""
    rng = np.random.default_rng(seed)
    voc = root / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True, exist_ok=True)
    (root / "irn_pseudo_label").mkdir(exist_ok=True)
    (root / "irn_mask").mkdir(exist_ok=True)
    h, w = size
    for i in train_ids + val_ids:
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{i}.jpg")
        label = rng.integers(0, NUM_CLASSES, (h, w), dtype=np.uint8)
        gt = Image.fromarray(np.where(rng.random((h, w)) < 0.05, 255, label).astype(np.uint8), mode="L").convert("P")
        gt.putpalette(voc_palette().reshape(-1).tolist())
        gt.save(voc / "SegmentationClass" / f"{i}.png")
        if i in train_ids:
            Image.fromarray(label, mode="L").save(root / "irn_pseudo_label" / f"{i}.png")
            m = (rng.random((h, w)) < 0.5).astype(np.uint8) * 255
            Image.fromarray(np.stack([m] * 3, -1)).save(root / "irn_mask" / f"{i}.png")
    lists = voc / "ImageSets/Segmentation"
    (lists / "train_aug.txt").write_text("".join(f"{i}\n" for i in train_ids))
    (lists / "train.txt").write_text("".join(f"{i}\n" for i in train_ids[: max(1, len(train_ids) // 2)]))
    (lists / "val.txt").write_text("".join(f"{i}\n" for i in val_ids))
    return root


def tiny_config(root: Path, *overrides: str) -> Config:
    base = [f"data.root={root}", f"data.num_classes={NUM_CLASSES}",
            "data.crop_size=32", "data.val_size=32"]
    return load_config(REPO / "configs/beco_voc.yaml", base + list(overrides))


@pytest.fixture(autouse=True)
def sigterm_left_as_found():
    """A test that leaves SIGTERM ignored or handled in the pytest process changes every later
    test in it: fork pools made there could not be terminated and hung the run (CI, once)."""
    before = signal.getsignal(signal.SIGTERM)
    yield
    after = signal.getsignal(signal.SIGTERM)
    if after != before:
        signal.signal(signal.SIGTERM, before)
        pytest.fail(f"the test left SIGTERM's handler at {after!r} (it was {before!r})")


@pytest.fixture
def tiny_voc(tmp_path: Path) -> Path:
    return write_tiny_voc(tmp_path / "data", ["2007_000001", "2007_000002", "2007_000003", "2007_000004"],
                          ["2008_000001", "2008_000002"])


@pytest.fixture(scope="session")
def synthetic_set(tmp_path_factory):
    """The one factory for generated data: ``synthetic_set("voc", train=4, val=2, ...)`` -> data root.

    Keyword arguments are the generator's (datasets.synthetic.voc.make_synthetic_voc, or
    make_synthetic_coco for "coco"; ``prepared=True`` also runs prepare_coco). The same kind and
    settings give the same folder, made once per session (per xdist worker): tests only read it.
    """
    made: dict[tuple, Path] = {}

    def make(kind: str = "voc", *, prepared: bool = False, **settings) -> Path:
        key = (kind, prepared, tuple(sorted(settings.items())))
        if key not in made:
            root = tmp_path_factory.mktemp(f"synthetic_{kind}") / "data"
            if kind == "voc":
                make_synthetic_voc(root, progress=False, **settings)
            else:
                make_synthetic_coco(root, **settings)
                if prepared:
                    prepare_coco(root, workers=1, progress=False)
            made[key] = root
        return made[key]
    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin-wait slowdowns on a busy 2-core box."""
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


COCO_LABELS = (1, 12, 80)  # sparse label ids: person, stop sign, toothbrush


def write_tiny_coco(root: Path, train_ids: list[int], val_ids: list[int], size=(40, 56), seed: int = 0,
                    grey: int | None = None) -> Path:
    """A prepared COCO tree (images, mask/<split>2014/<int id>.png, pseudo-labels and masks by
    stem) with random content over COCO_LABELS; image ``grey`` (an id) is a single-channel JPEG."""
    from datasets.coco import stem_of
    rng = np.random.default_rng(seed)
    h, w = size
    for split, ids in (("train", train_ids), ("val", val_ids)):
        (root / f"{split}2014").mkdir(parents=True, exist_ok=True)
        (root / "mask" / f"{split}2014").mkdir(parents=True, exist_ok=True)
        for i in ids:
            stem = stem_of(split, i)
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            img = Image.fromarray(pixels[..., 0] if i == grey else pixels)
            img.save(root / f"{split}2014" / f"{stem}.jpg")
            label = rng.choice(np.array((0,) + COCO_LABELS, np.uint8), (h, w))
            Image.fromarray(label, mode="L").save(root / "mask" / f"{split}2014" / f"{i}.png")
            if split == "train":
                for d in ("irn_pseudo_label", "irn_mask"):
                    (root / d).mkdir(exist_ok=True)
                Image.fromarray(label, mode="L").save(root / "irn_pseudo_label" / f"{stem}.png")
                m = (rng.random((h, w)) < 0.5).astype(np.uint8) * 255
                Image.fromarray(np.stack([m] * 3, -1)).save(root / "irn_mask" / f"{stem}.png")
    return root


def tiny_coco_config(root: Path, *overrides: str) -> Config:
    base = [f"data.root={root}", "data.crop_size=32", "data.val_size=32", "data.num_workers=0"]
    return load_config(REPO / "configs/beco_coco.yaml", base + list(overrides))


def eval_nets(cfg: Config, seed: int) -> list:
    """The config's test nets (engine.inference.build_test_nets) from ``seed``, with non-trivial
    BatchNorm statistics so that eval-mode outputs differ between the nets and from zero."""
    import torch
    from engine.inference import build_test_nets
    torch.manual_seed(seed)
    nets = build_test_nets(cfg, torch.device("cpu"))
    for net in nets:
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return nets
