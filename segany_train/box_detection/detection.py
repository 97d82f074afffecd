"""Detection with a trained box head: image embeddings -> boxes and scores, best first."""

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from segany_train.amg.mask_ops import box_nms
from segany_train.box_detection.box_head import BoxHead
from segany_train.box_detection.box_targets import decode_boxes


def _input_sizes(input_size: Sequence[Any], count: int) -> list[tuple[int, int]]:
    """One (h, w) for every image, or a list of them -> `count` (h, w) pairs."""
    one_pair = len(input_size) == 2 and all(isinstance(v, (int, np.integer)) for v in input_size)
    sizes = [input_size] * count if one_pair else list(input_size)
    if len(sizes) != count or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise ValueError(f"input_size must be one (h, w) or {count} of them (one per image), got {input_size!r}")
    return [(int(s[0]), int(s[1])) for s in sizes]


@torch.no_grad()
def detect_boxes(
    head: BoxHead,
    embeddings: torch.Tensor,
    *,
    score_threshold: float,
    max_detections: int,
    input_size: Sequence[Any],
    nms_threshold: float = 0.7,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """BxCxhxw embeddings -> per image (Kx4 XYXY boxes in input pixels, K scores), best first.

    Keeps the cells that are a local maximum (3x3) of their slot's objectness and score at least
    `score_threshold`, clips their boxes to the image's input size (h, w) (one pair for all images or
    one per image), drops boxes left empty, removes boxes overlapping a better one by IoU above
    `nms_threshold`, and returns at most `max_detections`.
    """
    if not 0.0 <= score_threshold <= 1.0 or not 0.0 < nms_threshold <= 1.0:
        raise ValueError(f"score_threshold must be in [0, 1] and nms_threshold in (0, 1], got {score_threshold}, {nms_threshold}")
    if max_detections < 1:
        raise ValueError(f"max_detections must be positive, got {max_detections}")
    if embeddings.dim() != 4:
        raise ValueError(f"embeddings must be BxCxhxw, got shape {tuple(embeddings.shape)}")
    sizes = _input_sizes(input_size, embeddings.shape[0])
    logits, params = head.eval()(embeddings)
    scores = logits.sigmoid()  # BxSxhxw
    peaks = scores == F.max_pool2d(scores, 3, stride=1, padding=1)
    boxes = decode_boxes(params, head.stride)  # BxSxhxwx4
    results = []
    for b, (h, w) in enumerate(sizes):
        keep = peaks[b] & (scores[b] >= score_threshold)
        found, score = boxes[b][keep], scores[b][keep]
        limit = torch.tensor([w, h, w, h], dtype=found.dtype, device=found.device)
        found = torch.minimum(found.clamp(min=0), limit)
        nonempty = (found[:, 2] > found[:, 0]) & (found[:, 3] > found[:, 1])
        found, score = found[nonempty], score[nonempty]
        order = box_nms(found, score, nms_threshold)[:max_detections]
        results.append((found[order], score[order]))
    return results
