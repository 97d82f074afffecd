"""The box detector's training loss: CenterNet's penalty-reduced focal loss on the objectness, plus
L1 on the box parameters and GIoU on the boxes, both weighted by the regression weights."""

import torch
from torch.nn import functional as F

from segany_train.box_detection.box_head import BoxHead
from segany_train.box_detection.box_targets import params_to_boxes


def generalized_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise GIoU of Nx4 XYXY boxes `a` and `b` -> N, in [-1, 1]."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    inter = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    hull = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).prod(-1)
    return inter / union - (hull - union) / hull


def detector_loss(
    head: BoxHead, embeddings: torch.Tensor, heat: torch.Tensor, params: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """The scalar loss of `head` on BxCxhxw embeddings against their stacked `BoxTargets`: heat and
    weight BxSxhxw, params BxSxhxwx4."""
    logits, predicted = head(embeddings)  # BxSxhxw, BxSx4xhxw
    positive = heat >= 1.0
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = logits.sigmoid()
    focal = torch.where(positive, -log_p * (1 - p) ** 2, -log_not_p * p**2 * (1 - heat) ** 4)
    focal = focal.sum() / positive.sum().clamp(min=1)
    regress = weight > 0
    if not regress.any():  # a batch of images without boxes: only the objectness learns
        return focal
    w = weight[regress]
    pred = predicted.movedim(2, -1)[regress]  # Nx4
    target = params[regress]
    l1 = ((pred - target).abs().sum(-1) * w).sum() / w.sum()
    h, wd = heat.shape[-2:]
    col = torch.arange(wd, dtype=pred.dtype, device=pred.device).expand(*heat.shape)[regress] + 0.5
    row = torch.arange(h, dtype=pred.dtype, device=pred.device)[:, None].expand(*heat.shape)[regress] + 0.5
    # the stride cancels out of the IoU, so boxes are compared in cells
    giou = generalized_iou(params_to_boxes(pred, col, row, 1.0), params_to_boxes(target, col, row, 1.0))
    return focal + l1 + ((1 - giou) * w).sum() / w.sum()
