"""PASCAL VOC constants: class names and the colour palette of its label PNGs."""
from __future__ import annotations

import numpy as np

# Background first, then the 20 foreground classes in VOC's order (label id = index).
VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
    "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
IGNORE_INDEX = 255


def voc_palette(n: int = 256) -> np.ndarray:
    """The VOC colour map as an (n, 3) uint8 array.

    VOC spreads the bits of the label id over the high bits of R, G and B, so
    neighbouring ids get very different colours; id 255 (void) comes out cream.
    """
    palette = np.zeros((n, 3), dtype=np.uint8)
    for label in range(n):
        r = g = b = 0
        c = label
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette[label] = (r, g, b)
    return palette


def colorize(label: np.ndarray) -> np.ndarray:
    """Label map (H, W) of ids -> RGB uint8 image with the VOC palette."""
    return voc_palette()[label.astype(np.uint8)]
