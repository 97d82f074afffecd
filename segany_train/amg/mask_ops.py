"""Batched mask and box operations of the automatic mask generator, in torch (any device).

Boxes are XYXY with inclusive pixel coordinates, as the official generator computes them: a mask
covering columns 3..7 has x0 = 3, x1 = 7 (so its XYWH width is 4, not 5).
"""

import numpy as np
import torch


def stability_score(mask_logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """IoU of each mask binarised at threshold + offset and at threshold - offset: ...xHxW -> ... float32.

    The first mask lies inside the second, so the IoU is a ratio of pixel counts. A mask empty at
    both cutoffs scores NaN (0 / 0), which fails every ">=" filter. Thresholds are compared in the
    logits' dtype, as torch compares a tensor with a Python number. On the CPU the counting is done
    by numpy, which counted several times faster than torch's boolean sums when measured.
    """
    high, low = mask_threshold + offset, mask_threshold - offset
    if mask_logits.device.type == "cpu" and mask_logits.dtype in (torch.float32, torch.float64):
        height, width = mask_logits.shape[-2:]
        values = mask_logits.detach().numpy().reshape(*mask_logits.shape[:-2], height * width)
        cast = values.dtype.type
        inner = np.count_nonzero(values > cast(high), axis=-1).astype(np.float32)
        outer = np.count_nonzero(values > cast(low), axis=-1).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            return torch.from_numpy(np.asarray(inner / outer, dtype=np.float32))
    inner = (mask_logits > high).sum(dim=(-2, -1), dtype=torch.int32)
    outer = (mask_logits > low).sum(dim=(-2, -1), dtype=torch.int32)
    return inner.to(torch.float32) / outer.to(torch.float32)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight XYXY boxes (inclusive, int64) around ...xHxW boolean masks -> ...x4; [0, 0, 0, 0] for an empty mask."""
    if masks.dim() < 2:
        raise ValueError(f"masks must be ...xHxW, got shape {tuple(masks.shape)}")
    h, w = masks.shape[-2:]
    if masks.numel() == 0:
        return torch.zeros(*masks.shape[:-2], 4, dtype=torch.int64, device=masks.device)
    # max over uint8 measured several times faster than any() over bool
    pixels = masks.view(torch.uint8) if masks.dtype == torch.bool else (masks != 0).view(torch.uint8)
    rows = pixels.amax(dim=-1)  # ...xH
    cols = pixels.amax(dim=-2)  # ...xW
    # argmax returns the first maximum: the first True from the front and, flipped, from the back
    y0 = rows.argmax(dim=-1)
    y1 = (h - 1) - rows.flip(-1).argmax(dim=-1)
    x0 = cols.argmax(dim=-1)
    x1 = (w - 1) - cols.flip(-1).argmax(dim=-1)
    boxes = torch.stack([x0, y0, x1, y1], dim=-1)
    return boxes * (rows.amax(dim=-1, keepdim=True) > 0)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Nx4 XYXY -> N, (x1 - x0) * (y1 - y0) in the boxes' dtype."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _pairwise_iou(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """IoU of every box of `rows` (Rx4) with every box of `cols` (Cx4) -> RxC, torchvision's formula."""
    area_r, area_c = box_area(rows)[:, None], box_area(cols)[None, :]
    width = (torch.minimum(rows[:, None, 2], cols[None, :, 2]) - torch.maximum(rows[:, None, 0], cols[None, :, 0])).clamp(min=0)
    height = (torch.minimum(rows[:, None, 3], cols[None, :, 3]) - torch.maximum(rows[:, None, 1], cols[None, :, 1])).clamp(min=0)
    inter = width * height
    return inter / (area_r + area_c - inter)


def box_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, block_size: int = 1024) -> torch.Tensor:
    """Greedy non-maximum suppression: indices (int64) of the kept boxes, highest score first.

    boxes: Nx4 XYXY float, scores: N. A box is dropped when its IoU with a kept higher-scoring box is
    above `iou_threshold` (IoU computed in the boxes' dtype as torchvision does, compared in float64
    as its C++ kernel does; degenerate boxes have IoU NaN and are never dropped). Equal scores keep
    index order (a stable sort), where torchvision's unstable sort leaves the order of ties to the
    platform. The IoUs are computed `block_size` rows at a time on the boxes' device; only the greedy
    pass (one O(N) step per kept box) runs on the CPU.
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4 or scores.shape != boxes.shape[:1]:
        raise ValueError(f"box_nms needs Nx4 boxes and N scores, got {tuple(boxes.shape)} and {tuple(scores.shape)}")
    n = boxes.shape[0]
    order = torch.sort(scores, descending=True, stable=True).indices
    ordered = boxes[order]
    suppressed = np.zeros(n, dtype=bool)
    keep = []
    for start in range(0, n, block_size):
        stop = min(n, start + block_size)
        overlaps = _pairwise_iou(ordered[start:stop], ordered[start:]).double() > iou_threshold
        # a box only suppresses the boxes after it in score order
        later = torch.arange(start, n, device=boxes.device)[None, :] > torch.arange(start, stop, device=boxes.device)[:, None]
        overlaps = (overlaps & later).cpu().numpy()
        for i in range(stop - start):
            if suppressed[start + i]:
                continue
            keep.append(start + i)
            suppressed[start:] |= overlaps[i]
    return order[torch.as_tensor(keep, dtype=torch.int64, device=boxes.device)]


def box_near_crop_edge(
    boxes: torch.Tensor, crop_box: list[int], image_box: list[int], atol: float = 20.0
) -> torch.Tensor:
    """N bool: the box (Nx4 XYXY in the crop's frame) lies within `atol` px of an edge of the crop
    that is not also an edge of the image (such masks are probably cut off by the crop)."""
    crop = torch.as_tensor(crop_box, dtype=torch.float32, device=boxes.device)
    image = torch.as_tensor(image_box, dtype=torch.float32, device=boxes.device)
    boxes = boxes.to(torch.float32) + crop[[0, 1, 0, 1]]
    near_crop_edge = (boxes - crop).abs() <= atol
    near_image_edge = (boxes - image).abs() <= atol
    return (near_crop_edge & ~near_image_edge).any(dim=1)


def box_xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """...x4 XYXY -> ...x4 XYWH (width x1 - x0, height y1 - y0)."""
    return torch.cat([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], dim=-1)
