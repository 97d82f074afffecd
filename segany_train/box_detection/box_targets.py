"""Boxes -> the per-cell training targets of a `BoxHead` (CenterNet-style), and its per-cell box
parameters (dx, dy, log w, log h) -> boxes."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

SIGMA_FRACTION = 1 / 6  # Gaussian sigma per axis as a fraction of the box side (CenterNet's diameter / 6)
MIN_SIGMA = 0.5  # cells: even a box smaller than a cell spreads some target onto its neighbours
REGRESSION_MIN_WEIGHT = 0.3  # cells whose Gaussian value is below this do not regress the box


@dataclass(frozen=True)
class BoxTargets:
    """Training targets of one image for S size slots on an hxw grid.

    heat: Sxhxw objectness targets in [0, 1], exactly 1 at the cell of a box centre; params: Sxhxwx4
    (dx, dy, log w, log h) of the box each cell regresses; weight: Sxhxw regression weights (0: the
    cell regresses nothing)."""

    heat: torch.Tensor
    params: torch.Tensor
    weight: torch.Tensor


def box_slots(boxes: torch.Tensor, *, stride: float, scale_edges: Sequence[float]) -> torch.Tensor:
    """Kx4 XYXY boxes -> K int64 size slots: how many of `scale_edges` (cells) sqrt(w * h) reaches."""
    sizes = ((boxes[:, 2] - boxes[:, 0]).clamp(min=1.0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=1.0)).sqrt() / stride
    return torch.bucketize(sizes, torch.tensor(scale_edges, dtype=sizes.dtype, device=sizes.device), right=True)


def encode_targets(
    boxes: torch.Tensor, grid_size: tuple[int, int], *, stride: float, scale_edges: Sequence[float]
) -> BoxTargets:
    """Kx4 XYXY boxes (input pixels) -> the `BoxTargets` of an image whose embedding grid is `grid_size`.

    A side under one pixel counts as one pixel (log sizes stay finite). Where two boxes of one slot
    want the same cell, the one with the higher Gaussian there regresses, and on a tie (two centres
    in one cell) the smaller box: the other is lost, as in any one-box-per-cell detector.
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be Kx4 XYXY, got shape {tuple(boxes.shape)}")
    h, w = grid_size
    num_slots = len(scale_edges) + 1
    boxes = boxes.to(torch.float32)
    # smallest first: argmax picks the first of equal values, which makes ties go to the smaller box
    areas = (boxes[:, 2] - boxes[:, 0]).clamp(min=1.0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=1.0)
    boxes = boxes[torch.sort(areas, stable=True).indices]
    k = boxes.shape[0]
    slots = box_slots(boxes, stride=stride, scale_edges=scale_edges)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2 / stride, (boxes[:, 1] + boxes[:, 3]) / 2 / stride  # K, in cells
    bw = (boxes[:, 2] - boxes[:, 0]).clamp(min=1.0) / stride
    bh = (boxes[:, 3] - boxes[:, 1]).clamp(min=1.0) / stride
    col = torch.arange(w, dtype=torch.float32) + 0.5
    row = torch.arange(h, dtype=torch.float32) + 0.5
    sx, sy = (bw * SIGMA_FRACTION).clamp(min=MIN_SIGMA), (bh * SIGMA_FRACTION).clamp(min=MIN_SIGMA)
    gauss = torch.exp(
        -((col[None, None, :] - cx[:, None, None]) ** 2) / (2 * sx[:, None, None] ** 2)
        - ((row[None, :, None] - cy[:, None, None]) ** 2) / (2 * sy[:, None, None] ** 2)
    )  # Kxhxw
    ci = cy.floor().long().clamp(0, h - 1)
    cj = cx.floor().long().clamp(0, w - 1)
    gauss[torch.arange(k), ci, cj] = 1.0  # the centre cell is a positive wherever in it the centre lies
    heat = torch.zeros(num_slots, h, w)
    params = torch.zeros(num_slots, h, w, 4)
    weight = torch.zeros(num_slots, h, w)
    for s in range(num_slots):
        members = torch.nonzero(slots == s).flatten()
        if members.numel() == 0:
            continue
        g = gauss[members]
        heat[s], owner = g.max(dim=0)
        chosen = members[owner]  # hxw: index of the box each cell regresses
        params[s] = torch.stack(
            [cx[chosen] - col[None, :], cy[chosen] - row[:, None], bw[chosen].log(), bh[chosen].log()], dim=-1
        )
        weight[s] = torch.where(heat[s] >= REGRESSION_MIN_WEIGHT, heat[s], 0.0)
    return BoxTargets(heat=heat, params=params, weight=weight)


def decode_boxes(params: torch.Tensor, stride: float) -> torch.Tensor:
    """...x4xhxw box parameters (dx, dy, log w, log h per cell) -> ...xhxwx4 XYXY boxes in input pixels."""
    h, w = params.shape[-2:]
    col = torch.arange(w, dtype=params.dtype, device=params.device) + 0.5
    row = torch.arange(h, dtype=params.dtype, device=params.device)[:, None] + 0.5
    p = params.movedim(-3, -1)  # ...xhxwx4
    return params_to_boxes(p, col, row, stride)


def params_to_boxes(p: torch.Tensor, col: torch.Tensor, row: torch.Tensor, stride: float) -> torch.Tensor:
    """...x4 (dx, dy, log w, log h) -> ...x4 XYXY pixels, for the cell centres `col` and `row` (in
    cells, broadcast against `p`'s leading dimensions)."""
    cx, cy = (col + p[..., 0]) * stride, (row + p[..., 1]) * stride
    half_w, half_h = p[..., 2].exp() * (stride / 2), p[..., 3].exp() * (stride / 2)
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1)
