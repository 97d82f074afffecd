"""SAM's mask losses: focal + dice (20:1) on the best of the multimask outputs, plus the IoU head loss.

Pure tensor functions. Shapes: logits NxMxHxW (M mask outputs per prompt), gt NxHxW bool. A rollout
iteration's prompts come in output groups (3 outputs for a single point, 1 otherwise): `grouped_sam_loss`.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from segany_train.data.mask_iou import dense_mask_iou
from segany_train.prompting.rollout import OutputGroup, scatter_rows


@dataclass(frozen=True)
class LossWeights:
    focal: float = 20.0
    dice: float = 1.0
    iou: float = 1.0
    iou_loss: str = "mse"  # "mse" (SAM) or "l1" (SAM 2)
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


def focal_loss(logits: torch.Tensor, gt: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss averaged over pixels: NxMxHxW, NxHxW -> NxM."""
    target = gt[:, None].to(logits.dtype).expand_as(logits)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return (alpha_t * (1 - p_t) ** gamma * ce).flatten(2).mean(-1)


def dice_loss(logits: torch.Tensor, gt: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice of sigmoid(logits) with the GT: NxMxHxW, NxHxW -> NxM."""
    prob = logits.sigmoid().flatten(2)
    target = gt[:, None].to(logits.dtype).flatten(2)
    inter = (prob * target).sum(-1)
    return 1 - (2 * inter + smooth) / (prob.sum(-1) + target.sum(-1) + smooth)


@dataclass
class IterationLoss:
    """Loss parts of one decoder iteration, each already summed over masks (divide by the mask count)."""

    total: torch.Tensor
    focal: torch.Tensor
    dice: torch.Tensor
    iou: torch.Tensor
    best: torch.Tensor  # N: index of the output that was backpropagated
    true_iou: torch.Tensor  # N: IoU of that output with the GT
    predicted_iou: torch.Tensor  # N: the IoU head's prediction for that output


def sam_loss(logits: torch.Tensor, iou_pred: torch.Tensor, gt: torch.Tensor, weights: LossWeights) -> IterationLoss:
    """The SAM loss of one iteration.

    With several outputs per prompt only the one of lowest mask loss is backpropagated (ambiguity);
    the IoU head is trained on every output against that output's actual IoU.
    """
    focal = focal_loss(logits, gt, weights.focal_alpha, weights.focal_gamma)
    dice = dice_loss(logits, gt)
    mask_loss = weights.focal * focal + weights.dice * dice  # N x M
    best = mask_loss.argmin(dim=1)
    rows = torch.arange(logits.shape[0], device=logits.device)
    true_iou = dense_mask_iou(logits.detach() > 0, gt)
    if weights.iou_loss == "mse":
        iou_loss = F.mse_loss(iou_pred, true_iou, reduction="none").mean(1)
    elif weights.iou_loss == "l1":
        iou_loss = F.l1_loss(iou_pred, true_iou, reduction="none").mean(1)
    else:
        raise ValueError(f"iou_loss must be 'mse' or 'l1', got {weights.iou_loss!r}")
    focal_best, dice_best = focal[rows, best], dice[rows, best]
    total = (mask_loss[rows, best] + weights.iou * iou_loss).sum()
    return IterationLoss(
        total, focal_best.sum(), dice_best.sum(), iou_loss.sum(), best, true_iou[rows, best], iou_pred[rows, best]
    )


def grouped_sam_loss(groups: Sequence[OutputGroup], gt: torch.Tensor, weights: LossWeights) -> IterationLoss:
    """The SAM loss of one iteration from its output groups (`run_rollout`): `sam_loss` on each group's
    own outputs, 3 per single-point prompt and 1 per other prompt (never copies of the one), summed;
    the per-prompt parts (best, true_iou, predicted_iou) come back in prompt order."""
    parts = [(g.rows, sam_loss(g.logits, g.iou_pred, gt if g.rows is None else gt[g.rows], weights)) for g in groups]
    n = gt.shape[0]

    def merged(field: str) -> torch.Tensor:
        return scatter_rows(n, [(rows, getattr(loss, field)) for rows, loss in parts])

    return IterationLoss(
        *(sum(getattr(loss, field) for _, loss in parts) for field in ("total", "focal", "dice", "iou")),
        best=merged("best"),
        true_iou=merged("true_iou"),
        predicted_iou=merged("predicted_iou"),
    )
