"""Every weights and data file `tools/fetch.py` can fetch: one table, name -> `Entry`.

Where each hash comes from (never computed by us, never guessed):
- `sha256-prefix`: the first 8 hex digits of the file's SHA-256 in its published name
  (torchvision's `<name>-<8 hex>.pth`, which torchvision itself checks on download, and
  OpenMMLab's `..._<date>-<8 hex>.pth`, written by its publish script).
- `md5`: torchvision's VOC / SBD dataset code (torchvision/datasets/voc.py, sbd.py).
- `sha256`: TensorFlow Datasets' recorded checksums with their sizes (url_checksums/coco.txt,
  voc.txt) for COCO; the Hugging Face file page's Git LFS SHA-256 for nvidia/mit-b0.
- `None`: no published hash found (MiT-B1..B5): fetch.py prints the SHA-256 it computed and
  installs the file only with `--accept-unverified`.

`reads` names the config keys that read the installed file and the value to give them; the
final report says whether that value is already the config's default.
"""
from __future__ import annotations

from utils.fetch import Entry, Read

_TV = "https://download.pytorch.org/models"
_HF = "https://huggingface.co/nvidia"
_COCO = "https://images.cocodataset.org"

_DEEPLABV3P = "configs/model/deeplabv3plus.yaml"
_DEEPLABV2 = "configs/model/deeplabv2.yaml"
_SEGFORMER = "configs/model/segformer.yaml"
_FIRST_VOC = "configs/first_stage/voc.yaml"
_DATA_VOC = "configs/data/voc.yaml"
_DATA_COCO = "configs/data/coco.yaml"

# MiT-B0's SHA-256 as the Hugging Face page of pytorch_model.bin shows it (unchanged on main
# since the "Update model" commit of Oct 2021). No published hash was found for B1..B5.
_MIT_SHA256 = {"b0": "sha256:4af8348c2a802bf76115d34797ff5ce1d9f110bb8593c22d9b66d8bd7fa227fc"}


def _mit(variety: str) -> Entry:
    target = f"data/model_zoo/mit_{variety}.pth"
    return Entry(
        kind="weights",
        url=f"{_HF}/mit-{variety}/resolve/main/pytorch_model.bin",
        hash=_MIT_SHA256.get(variety),
        size=None,
        target=target,
        reads=(Read(_SEGFORMER, "model.backbone.pretrained", target),
               Read(_SEGFORMER, "model.backbone.variety", variety)),
        note=f"ImageNet-1K MiT-{variety.upper()}, Hugging Face nvidia/mit-{variety} (transformers key layout)",
    )


DOWNLOADS: dict[str, Entry] = {
    "resnetv1d101-mmcls": Entry(
        kind="weights",
        url="https://download.openmmlab.com/mmclassification/v0/resnet/"
            "resnetv1d101_b32x8_imagenet_20210531-6e13bcd3.pth",
        hash="sha256-prefix:6e13bcd3",
        size=None,
        target="data/model_zoo/resnetv1d101_mmcv.pth",
        reads=(Read(_DEEPLABV3P, "model.backbone.pretrained", "data/model_zoo/resnetv1d101_mmcv.pth"),),
        note="ImageNet ResNetV1d-101 (mmclassification), the reference's DeepLabV3+ backbone",
    ),
    "resnet101-v2": Entry(
        kind="weights",
        url=f"{_TV}/resnet101-cd907fc2.pth",
        hash="sha256-prefix:cd907fc2",
        size=None,
        target="data/model_zoo/resnet-101_v2.pth",
        reads=(Read(_DEEPLABV2, "model.backbone.pretrained", "data/model_zoo/resnet-101_v2.pth"),),
        note="torchvision ResNet101_Weights.IMAGENET1K_V2, the reference's DeepLabV2 backbone",
    ),
    "resnet101-v1": Entry(
        kind="weights",
        url=f"{_TV}/resnet101-63fe2227.pth",
        hash="sha256-prefix:63fe2227",
        size=None,
        target="data/model_zoo/resnet101-63fe2227.pth",
        reads=(Read(_DEEPLABV2, "model.backbone.pretrained", "data/model_zoo/resnet101-63fe2227.pth"),),
        note="torchvision ResNet101_Weights.IMAGENET1K_V1",
    ),
    "resnet50-v1": Entry(
        kind="weights",
        url=f"{_TV}/resnet50-0676ba61.pth",
        hash="sha256-prefix:0676ba61",
        size=None,
        target="data/model_zoo/resnet50-0676ba61.pth",
        reads=(Read(_FIRST_VOC, "backbone_weights", "data/model_zoo/resnet50-0676ba61.pth"),),
        note="torchvision ResNet50_Weights.IMAGENET1K_V1 (torchvision's current file of the V1 "
             "weights; the reference names the older upload resnet50-19c8e357.pth)",
    ),
    "resnet50-v2": Entry(
        kind="weights",
        url=f"{_TV}/resnet50-11ad3fa6.pth",
        hash="sha256-prefix:11ad3fa6",
        size=None,
        target="data/model_zoo/resnet50-11ad3fa6.pth",
        reads=(Read(_FIRST_VOC, "backbone_weights", "data/model_zoo/resnet50-11ad3fa6.pth"),),
        note="torchvision ResNet50_Weights.IMAGENET1K_V2",
    ),
    **{f"mit-{v}": _mit(v) for v in ("b0", "b1", "b2", "b3", "b4", "b5")},
    "voc2012": Entry(
        kind="data",
        url="https://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
        hash="md5:6cd6e144f989b92b3379bac3b3de84fd",
        size=1999639040,
        target="data/downloads/VOCtrainval_11-May-2012.tar",
        unpack=("VOCdevkit/VOC2012", "data/VOC2012"),
        prepare="voc_aug",
        reads=(Read(_DATA_VOC, "data.root", "data"),
               Read(_FIRST_VOC, "voc12_root", "data/VOC2012")),
        note="PASCAL VOC 2012 trainval: images, annotations, segmentation ground truth",
    ),
    "sbd": Entry(
        kind="data",
        url="https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/"
            "semantic_contours/benchmark.tgz",
        hash="md5:82b4d87ceb2ed10f6038a1cba92111cb",
        size=None,
        target="data/downloads/benchmark.tgz",
        unpack=("benchmark_RELEASE", "data/benchmark_RELEASE"),
        prepare="voc_aug",
        reads=(Read(_DATA_VOC, "data.aug", True),),
        note="SBD (Hariharan et al.): the extra labels of train_aug (SegmentationClassAug)",
    ),
    "coco2014-train": Entry(
        kind="data",
        url=f"{_COCO}/zips/train2014.zip",
        hash="sha256:ede4087e640bddba550e090eae701092534b554b42b05ac33f0300b984b31775",
        size=13510573713,
        target="data/downloads/train2014.zip",
        unpack=("train2014", "data/coco/train2014"),
        prepare="coco",
        reads=(Read(_DATA_COCO, "data.root", "data/coco"),),
        note="COCO 2014 train images (82,783)",
    ),
    "coco2014-val": Entry(
        kind="data",
        url=f"{_COCO}/zips/val2014.zip",
        hash="sha256:fe9be816052049c34717e077d9e34aa60814a55679f804cd043e3cbee3b9fde0",
        size=6645013297,
        target="data/downloads/val2014.zip",
        unpack=("val2014", "data/coco/val2014"),
        prepare="coco",
        reads=(Read(_DATA_COCO, "data.root", "data/coco"),),
        note="COCO 2014 val images (40,504)",
    ),
    "coco2014-annotations": Entry(
        kind="data",
        url=f"{_COCO}/annotations/annotations_trainval2014.zip",
        hash="sha256:031296bbc80c45a1d1f76bf9a90ead27e94e99ec629208449507a4917a3bf009",
        size=252872794,
        target="data/downloads/annotations_trainval2014.zip",
        unpack=("annotations", "data/coco/annotations"),
        prepare="coco",
        reads=(Read(_DATA_COCO, "data.root", "data/coco"),
               Read("configs/first_stage/coco.yaml", "coco_root", "data/coco")),
        note="COCO 2014 train/val instance annotations",
    ),
}

# Names that stand for several entries on the command line.
GROUPS: dict[str, tuple[str, ...]] = {
    "coco2014": ("coco2014-train", "coco2014-val", "coco2014-annotations"),
    "mit": tuple(f"mit-{v}" for v in ("b0", "b1", "b2", "b3", "b4", "b5")),
}
