"""IoU between masks compared as COCO RLEs (pycocotools), never as full-resolution matrices.

An SA-1B image holds ~100 masks of 1500x2250 pixels: as a float32 matrix that is 1.3 GB, as RLEs a
few hundred kB, and pycocotools' `iou` works on the runs. The ground truth is already RLE in the
records; a mask the model or an annotator made is encoded once.
"""

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


def encode_masks(masks: list[np.ndarray]) -> list[dict[str, Any]]:
    """COCO RLEs of HxW bool masks, one at a time (a stack of them would be the full-size copy)."""
    return [mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8)) for mask in masks]


def rle_iou_matrix(rles: list[dict[str, Any]], other: list[dict[str, Any]]) -> np.ndarray:
    """len(rles) x len(other) IoU of two lists of RLEs of one image (counts as bytes or text); 0 where
    both masks are empty."""
    if not rles or not other:
        return np.zeros((len(rles), len(other)))
    return np.asarray(mask_utils.iou(rles, other, [0] * len(other)), dtype=np.float64).reshape(len(rles), len(other))
