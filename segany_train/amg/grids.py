"""Where the automatic mask generator prompts: point grids and the crop boxes of the zoomed-in layers."""

import math

import numpy as np


def point_grid(points_per_side: int) -> np.ndarray:
    """An NxN grid of cell centres in [0, 1]^2 as (N*N)x2 (x, y), row by row (x fastest).

    Cell centres, not the corners: the grid keeps half a cell away from the image border.
    """
    if points_per_side < 1:
        raise ValueError(f"points_per_side must be at least 1, got {points_per_side}")
    half_cell = 1 / (2 * points_per_side)
    side = np.linspace(half_cell, 1 - half_cell, points_per_side)
    xs = np.broadcast_to(side[None, :], (points_per_side, points_per_side))
    ys = np.broadcast_to(side[:, None], (points_per_side, points_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def layer_point_grids(points_per_side: int, n_layers: int, downscale_per_layer: int) -> list[np.ndarray]:
    """One grid per crop layer (layer 0 is the whole image): layer i has points_per_side / downscale**i a side."""
    grids = []
    for layer in range(n_layers + 1):
        side = int(points_per_side / (downscale_per_layer**layer))
        if side < 1:
            raise ValueError(
                f"points_per_side={points_per_side} with crop_n_points_downscale_factor={downscale_per_layer} "
                f"leaves no points in crop layer {layer}"
            )
        grids.append(point_grid(side))
    return grids


def crop_boxes(image_size: tuple[int, int], n_layers: int, overlap_ratio: float) -> tuple[list[list[int]], list[int]]:
    """Crop boxes (XYXY, integer pixels) of every layer, with each box's layer index.

    Layer 0 is the whole image; layer i >= 1 tiles the image with 2^i x 2^i crops that overlap by
    `overlap_ratio` of the short side scaled by 2 / 2^i (so deeper layers overlap less in pixels).
    Crops are listed column by column (all y offsets of the first x offset, then the next x).
    """
    im_h, im_w = image_size
    boxes, layers = [[0, 0, im_w, im_h]], [0]
    short_side = min(im_h, im_w)
    for layer in range(1, n_layers + 1):
        per_side = 2**layer
        overlap = int(overlap_ratio * short_side * (2 / per_side))
        crop_w = int(math.ceil((overlap * (per_side - 1) + im_w) / per_side))
        crop_h = int(math.ceil((overlap * (per_side - 1) + im_h) / per_side))
        for i in range(per_side):
            x0 = int((crop_w - overlap) * i)
            for j in range(per_side):
                y0 = int((crop_h - overlap) * j)
                boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
                layers.append(layer)
    return boxes, layers
