"""The one reader per file format of every data set: id lists, images, label maps,
confidence masks; and ``SplitFiles``, where one split's files are.

Every reader names the id and the path in its error, so a bad file stops a run with
a message a user can act on. Used by the second stage's data sets, ``test.py`` and
the first stage alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from utils.voc import IGNORE_INDEX


from utils.errors import DataError  # re-exported: the readers raise it


def read_id_list(path: str | Path) -> list[str]:
    """Ids of a list file, the first token of each line, kept as strings (first-stage QUIRK-8).

    An id listed twice is refused: it would be trained on twice per epoch and counted twice
    in every score."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split list not found: {path}")
    first_line: dict[str, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        item_id = line.split()[0]
        if item_id in first_line:
            raise DataError(f"id '{item_id}' is listed twice in {path}, on lines {first_line[item_id]} and {number}")
        first_line[item_id] = number
    if not first_line:
        raise DataError(f"split list is empty: {path}")
    return list(first_line)


def read_split(list_dir: str | Path, split: str) -> list[str]:
    """Ids of ``<list_dir>/<split>.txt``."""
    return read_id_list(Path(list_dir) / f"{split}.txt")


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{what} directory not found: {path}")
    return path


def require_files(ids: list[str], directory: Path, suffix: str, what: str) -> None:
    missing = [i for i in ids if not (directory / f"{i}{suffix}").is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{what} missing for id '{missing[0]}': {directory / (missing[0] + suffix)}{more}")


def _open(path: Path, item_id: str, what: str, allow_truncated: bool = False) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()  # decode now: a truncated file raises here, not inside a transform
    except FileNotFoundError:
        raise DataError(f"{what} missing for id '{item_id}': {path}") from None
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        if allow_truncated and isinstance(e, OSError) and "truncated" in str(e):
            return _load_truncated(path)
        raise DataError(f"{what} for id '{item_id}' is unreadable or truncated: {path} ({e})") from None
    return img


def _load_truncated(path: Path) -> Image.Image:
    """A truncated JPEG decoded as far as it goes, the rest filled by PIL (grey), as the
    reference loads COCO's few truncated files (it sets PIL's switch process-wide, spec
    segmenters-and-coco §2.2; here it is on for this one read only)."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        img = Image.open(path)
        img.load()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    return img


def read_image(path: Path, item_id: str, allow_truncated: bool = False) -> Image.Image:
    """RGB; grey (L) and CMYK JPEGs are converted, as COCO needs."""
    return _open(path, item_id, "image", allow_truncated).convert("RGB")


def read_label(path: Path, item_id: str, num_classes: int, what: str = "label",
               ignore_index: int | None = IGNORE_INDEX) -> Image.Image:
    """A single-channel label map; palette indices are read raw, never through the palette.

    Values must be class ids or ``ignore_index`` (None: the data set has no void value,
    COCO's ground truth)."""
    img = _open(path, item_id, what)
    if img.mode not in ("L", "P"):
        raise DataError(f"{what} for id '{item_id}' must be a single-channel (L or P) PNG, "
                        f"got mode {img.mode}: {path}")
    arr = np.asarray(img)
    bad = arr >= num_classes
    if ignore_index is not None:
        bad &= arr != ignore_index
    if bad.any():
        values = sorted(set(np.unique(arr[bad]).tolist()))[:10]
        allowed = f"0..{num_classes - 1}" + (f" and {ignore_index}" if ignore_index is not None else "")
        raise DataError(f"{what} for id '{item_id}' has values {values} outside {allowed}: {path}")
    return Image.fromarray(arr, mode="L")


def mask_values(img: Image.Image, path: Path, item_id: str) -> np.ndarray:
    """The grey values of a confidence mask (H, W): L and 1-bit as they are, palette PNGs by
    raw index, LA and RGBA without their alpha, RGB only when its three channels agree."""
    if img.mode in ("LA", "RGBA"):
        img = img.convert("L" if img.mode == "LA" else "RGB")
    arr = np.asarray(img)
    if arr.ndim == 3:
        if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            raise DataError(f"confidence mask for id '{item_id}' is a colour image ({img.mode} with channels that "
                            f"differ): {path}; the first stage writes grey 0/255 masks")
        arr = arr[..., 0]
    return arr.astype(np.uint8) if arr.dtype == bool else arr


def read_mask(path: Path, item_id: str) -> Image.Image:
    """Confidence mask as an L image of 0/1: non-zero is reliable (spec §1, §15).

    Accepts the first stage's RGB 0/255 files and single-channel 0/1 or 0/255 ones; any
    other value set is refused (a JPEG-compressed mask, a pseudo-label given as a mask),
    since thresholding it would silently invent a mask.
    """
    img = _open(path, item_id, "confidence mask")
    arr = mask_values(img, path, item_id)
    values = np.unique(arr)
    if not (set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}):
        shown = values[:10].tolist()
        raise DataError(f"confidence mask for id '{item_id}' has values {shown}{' ...' if len(values) > 10 else ''}, "
                        f"not a binary 0/1 or 0/255 mask (JPEG-compressed? a pseudo-label?): {path}")
    return Image.fromarray((arr > 0).astype(np.uint8), mode="L")


# What a user does about label 255 (void) on a pixel the mask marks reliable; one sentence for the
# loader's error and the data check's (datasets/verify.py).
VOID_UNDER_RELIABLE_ADVICE = ("a reliable pixel needs a class, so label 255 (void) is accepted only where the "
                              "confidence mask is 0 (unreliable; the co-training term learns it there): mark those "
                              "pixels 0 in the masks, e.g. by importing the labels with tools/import_labels.py, "
                              "which makes every 255 unreliable")


def void_under_reliable(label: np.ndarray, mask: np.ndarray) -> int:
    """Pixels labelled 255 (void) that the mask marks reliable (non-zero).

    Compared on the two maps' common top-left part: maps of one size, or of two sizes under
    ``data.mask_size_mismatch: crop_like_reference``, where the crop box cuts both from the top-left
    corner and whatever lies outside a map comes in as 0 (a reliable pixel outside the label is
    background, not void)."""
    h, w = min(label.shape[0], mask.shape[0]), min(label.shape[1], mask.shape[1])
    return int(np.count_nonzero((label[:h, :w] == IGNORE_INDEX) & (mask[:h, :w] != 0)))


def void_under_reliable_problem(item_id: str, count: int, label_path: Path, mask_path: Path) -> str:
    return (f"id '{item_id}': {count} pixels are labelled 255 (void) in {label_path} but marked reliable in "
            f"{mask_path}")


def check_void_under_reliable(item_id: str, label: Image.Image, mask: Image.Image, label_path: Path,
                              mask_path: Path) -> None:
    """Refuse label 255 under mask 1: CE ignores the pixel and co-training skips it (mask 1), so
    it would train nothing, silently."""
    count = void_under_reliable(np.asarray(label), np.asarray(mask))
    if count:
        raise DataError(f"{void_under_reliable_problem(item_id, count, label_path, mask_path)}; "
                        f"{VOID_UNDER_RELIABLE_ADVICE}")


def check_sizes(item_id: str, reference: tuple[Image.Image, Path], *others: tuple[Image.Image, Path]) -> None:
    ref, ref_path = reference
    for img, path in others:
        if img.size != ref.size:
            raise DataError(f"id '{item_id}': {path} is {img.width}x{img.height} but {ref_path} "
                            f"is {ref.width}x{ref.height} (width x height)")



def png_name(item_id: str) -> str:
    """``<id>.png``: how VOC names its ground truth, and every data set its pseudo-labels and masks."""
    return f"{item_id}.png"


@dataclass(frozen=True)
class SplitFiles:
    """The files of one split: ``<image_dir>/<id>.jpg`` and ``<gt_dir>/<gt_name(id)>``.

    ``gt_name`` is a module-level function (picklable for loader workers): VOC names its
    ground truth by id, COCO by the integer image id.
    """
    ids: list[str]
    image_dir: Path
    gt_dir: Path | None
    gt_name: Callable[[str], str] = png_name

    def image(self, item_id: str) -> Path:
        return self.image_dir / f"{item_id}.jpg"

    def gt(self, item_id: str) -> Path:
        if self.gt_dir is None:
            raise ValueError("this split has no ground truth")
        return self.gt_dir / self.gt_name(item_id)

    def check(self, with_gt: bool) -> None:
        """Every id's image (and ground truth) exists: fails in seconds, naming the first missing one."""
        require_dir(self.image_dir, "image")
        require_files(self.ids, self.image_dir, ".jpg", "image")
        if with_gt:
            require_dir(self.gt_dir, "ground-truth")
            missing = [i for i in self.ids if not self.gt(i).is_file()]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise DataError(f"ground truth missing for id '{missing[0]}': {self.gt(missing[0])}{more}")

    def subset(self, ids: list[str]) -> "SplitFiles":
        return SplitFiles(ids, self.image_dir, self.gt_dir, self.gt_name)
