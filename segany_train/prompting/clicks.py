"""Correction clicks from the error between a predicted and a ground-truth mask.

Two variants: `sample_correction_clicks` (training, SAM appendix A: a point drawn uniformly from the
error region) and `center_correction_clicks` (evaluation, SAM section 7.1 / RITM: the deterministic
point deepest inside the largest error region). Coordinates follow `points.py`: (x, y) pixel centres
times `scale`. Masks without any error get valid=False, NaN coords and label IGNORE_LABEL (the
prompt encoder zeroes such tokens and the decoder masks them out, so a batch can keep them).

SAM 2's alternative of sampling the correction click from the GT instead of the error region is
`sample_points_in_masks(gt)` with label 1.
"""

import torch

from segany_train.model.prompt_encoder import BACKGROUND, FOREGROUND, IGNORE_LABEL
from segany_train.prompting.distance import squared_distance_to_boundary
from segany_train.prompting.points import pixel_centres, sample_flat_indices


def error_regions(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pred, gt: NxHxW bool -> (false_negative NxHxW bool = gt & ~pred, false_positive = pred & ~gt)."""
    pred, gt = pred.bool(), gt.bool()
    return gt & ~pred, pred & ~gt


def _clicks(
    flat_index: torch.Tensor, positive: torch.Tensor, valid: torch.Tensor, width: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shared packaging: N indices, N bool "in FN", N bool valid -> (coords Nx2, labels N, valid N)."""
    coords = pixel_centres(flat_index, width, scale).masked_fill(~valid.unsqueeze(1), float("nan"))
    labels = torch.where(positive, FOREGROUND, BACKGROUND)
    labels = torch.where(valid, labels, IGNORE_LABEL).to(torch.long)
    return coords, labels, valid


def sample_correction_clicks(
    pred: torch.Tensor, gt: torch.Tensor, generator: torch.Generator | None = None, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training correction click: a point drawn uniformly from the whole error region FN | FP.

    pred, gt: NxHxW bool. Returns (coords Nx2 float32, labels N long, valid N bool): label 1
    (foreground) when the point falls in the false-negative part, 0 when in the false-positive part,
    so FN/FP are hit in proportion to their areas. valid=False where pred == gt.
    """
    fn, fp = error_regions(pred, gt)
    index, valid = sample_flat_indices(fn | fp, generator)
    positive = fn.reshape(fn.shape[0], -1).gather(1, index.unsqueeze(1)).squeeze(1)
    return _clicks(index, positive, valid, gt.shape[-1], scale)


def center_correction_clicks(
    pred: torch.Tensor, gt: torch.Tensor, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Evaluation correction click (RITM protocol, used by SAM section 7.1); deterministic.

    pred, gt: NxHxW bool. For the false-negative and false-positive regions, compute each pixel's
    Euclidean distance to the region boundary (outside the image counts as outside the region);
    click at the deepest pixel of the region whose maximum distance is larger (the "largest error
    region"), the first in row-major order on ties. Label 1 for FN, 0 for FP. As in RITM, an exact
    FN/FP tie goes to FP. Returns (coords Nx2 float32, labels N long, valid N bool); valid=False
    where pred == gt.

    For the first click of the protocol (no prediction yet) pass pred = all False: the click is then
    the GT point farthest from the object boundary, with label 1.
    """
    fn, fp = error_regions(pred, gt)
    n = fn.shape[0]
    # Both regions in one batched call; squared distances order the same as distances.
    dist = squared_distance_to_boundary(torch.cat([fn, fp])).reshape(2, n, -1)
    best, index = dist.max(dim=2)  # 2xN; max returns the first maximal index (row-major ties)
    positive = best[0] > best[1]
    index = torch.where(positive, index[0], index[1])
    valid = best.amax(dim=0) > 0  # a non-empty region has distance >= 1 somewhere
    return _clicks(index, positive, valid, gt.shape[-1], scale)
