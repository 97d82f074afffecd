"""Mask IoU, one implementation for each form masks take here: dense bool tensors and COCO RLEs.

`dense_mask_iou` compares masks already in memory as tensors (the loss and the click protocol at the
decoder's resolution, a chunk of upsampled masks, the simulated annotator's one mask). Masks that
are kept, many per image, at the image's resolution are compared as RLEs (`rle_iou_matrix`,
pycocotools works on the runs): an SA-1B image holds ~100 masks of 1500x2250 pixels, 1.3 GB as a
float32 matrix and a few hundred kB as RLEs. The ground truth is RLE in the records already; a mask
the model or an annotator made is encoded once.
"""

from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils


def dense_mask_iou(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """IoU of bool masks: pred ...xMxHxW (M candidates per GT, or none) with gt ...xHxW -> ...xM
    (a scalar's worth for HxW with HxW); 1 where both are empty."""
    target = gt.unsqueeze(-3)
    inter = (pred & target).sum((-2, -1)).float()
    union = (pred | target).sum((-2, -1)).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def encode_masks(masks: list[np.ndarray]) -> list[dict[str, Any]]:
    """COCO RLEs of HxW bool masks, one at a time (a stack of them would be the full-size copy)."""
    return [mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8)) for mask in masks]


def rle_iou_matrix(rles: list[dict[str, Any]], other: list[dict[str, Any]]) -> np.ndarray:
    """len(rles) x len(other) IoU of two lists of RLEs of one image (counts as bytes or text); 0 where
    both masks are empty."""
    if not rles or not other:
        return np.zeros((len(rles), len(other)))
    return np.asarray(mask_utils.iou(rles, other, [0] * len(other)), dtype=np.float64).reshape(len(rles), len(other))
