"""Masks as COCO run-length encodings, without Python loops over pixels.

An uncompressed COCO RLE of an HxW mask lists alternating run lengths over the column-major
(Fortran) pixel order, background first: a mask whose first pixel is set starts with a 0 run.
Here `counts` is that list as an int64 numpy array; `uncompressed_rle` and `coco_rle` wrap it in the
dicts pycocotools and the official generator use.
"""

from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils


def masks_to_rle_counts(masks: torch.Tensor) -> list[np.ndarray]:
    """KxHxW boolean masks (any device) -> K uncompressed RLE counts.

    The runs change where the column-major flattened mask differs from its predecessor; those
    positions are found for all masks at once on the masks' device, and only they reach the CPU.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be KxHxW, got shape {tuple(masks.shape)}")
    k, h, w = masks.shape
    if k == 0:
        return []
    flat = masks.transpose(1, 2).reshape(k, h * w)
    mask_index, position = (flat[:, 1:] != flat[:, :-1]).nonzero(as_tuple=True)
    starts_set = flat[:, 0].cpu().numpy()
    mask_index, position = mask_index.cpu().numpy(), position.cpu().numpy()
    splits = np.cumsum(np.bincount(mask_index, minlength=k))[:-1]
    out = []
    for first_set, changes in zip(starts_set, np.split(position + 1, splits)):
        boundaries = np.concatenate([[0], changes, [h * w]])
        counts = np.diff(boundaries)
        out.append(np.concatenate([[0], counts]) if first_set else counts)
    return out


def crop_masks_to_rle_counts(
    masks: torch.Tensor,
    boxes: torch.Tensor,
    crop_origin: tuple[int, int],
    image_size: tuple[int, int],
    *,
    scan_boxes: bool | None = None,
) -> list[np.ndarray]:
    """RLE counts of K masks of a crop, placed in the whole image (zeros outside the crop).

    masks: Kxhxw bool, the crop's pixels; boxes: Kx4 their tight XYXY boxes in the crop frame (as
    `masks_to_boxes` gives, [0, 0, 0, 0] when empty); crop_origin: (x0, y0) of the crop in the
    image; image_size: (H, W). With `scan_boxes` (the default on the CPU) each mask's box alone is
    scanned with numpy (most masks are small); otherwise the masks are padded to the image and
    encoded together on their device.
    """
    height, width = image_size
    x_off, y_off = crop_origin
    if scan_boxes is None:
        scan_boxes = masks.device.type == "cpu"
    if not scan_boxes:
        pad = (x_off, width - x_off - masks.shape[2], y_off, height - y_off - masks.shape[1])
        return masks_to_rle_counts(torch.nn.functional.pad(masks, pad))
    masks, boxes = masks.cpu(), boxes.cpu()
    out = []
    for mask, (x0, y0, x1, y1) in zip(masks.numpy(), boxes.tolist()):
        box_h = y1 - y0 + 1
        # each box column with a background pixel above and below: changes come in start/end pairs
        columns = np.zeros((x1 - x0 + 1, box_h + 2), dtype=bool)
        columns[:, 1:-1] = mask[y0 : y1 + 1, x0 : x1 + 1].T
        col, row = np.divmod(np.flatnonzero(columns[:, 1:] != columns[:, :-1]), box_h + 1)
        changes = (col + x0 + x_off) * height + (row + y0 + y_off)
        # a run reaching the image's bottom row goes on at the top of the next column if that is set
        joined = np.flatnonzero(changes[2::2] == changes[1:-1:2])
        if joined.size:
            changes = np.delete(changes, np.concatenate([2 * joined + 1, 2 * joined + 2]))
        if changes.size and changes[-1] == height * width:  # set up to the last pixel
            changes = changes[:-1]
        out.append(np.diff(np.concatenate([[0], changes, [height * width]])))
    return out


def mask_to_rle_counts(mask: np.ndarray) -> np.ndarray:
    """One HxW boolean numpy mask -> uncompressed RLE counts."""
    return masks_to_rle_counts(torch.as_tensor(np.asarray(mask, dtype=bool))[None])[0]


def rle_counts_to_mask(counts: np.ndarray, height: int, width: int) -> np.ndarray:
    """Uncompressed RLE counts -> HxW bool (a transposed view of a column-major buffer)."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() != height * width:
        raise ValueError(f"RLE runs cover {int(counts.sum())} pixels, a {height}x{width} mask has {height * width}")
    values = (np.arange(counts.size) % 2).astype(bool)
    return np.repeat(values, counts).reshape(width, height).T


def rle_area(counts: np.ndarray) -> int:
    """Pixels set: the sum of the odd (foreground) runs."""
    return int(np.asarray(counts)[1::2].sum())


def uncompressed_rle(counts: np.ndarray, height: int, width: int) -> dict[str, Any]:
    """{"size": [h, w], "counts": [int, ...]}, as the official generator's "uncompressed_rle" output."""
    return {"size": [int(height), int(width)], "counts": [int(c) for c in counts]}


def coco_rle(counts: np.ndarray, height: int, width: int) -> dict[str, Any]:
    """{"size": [h, w], "counts": str}: the compressed COCO RLE (pycocotools' string code), JSON-ready."""
    rle = mask_utils.frPyObjects(uncompressed_rle(counts, height, width), int(height), int(width))
    return {"size": [int(height), int(width)], "counts": rle["counts"].decode("ascii")}


def column_runs(counts: np.ndarray, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The RLE's runs cut at column boundaries: (column, first row, last row, value), P each, in pixel order.

    Every pixel lies in exactly one piece; pieces of one column alternate in value (RLE runs are maximal).
    """
    counts = np.asarray(counts, dtype=np.int64)
    ends = np.cumsum(counts)
    starts = ends - counts
    nonempty = counts > 0
    value = (np.arange(counts.size) % 2 == 1)[nonempty]
    starts, ends = starts[nonempty], ends[nonempty]
    first_col, last_col = starts // height, (ends - 1) // height
    pieces = last_col - first_col + 1
    run = np.repeat(np.arange(starts.size), pieces)
    within = np.arange(run.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    col = first_col[run] + within
    first_row = np.where(within == 0, starts[run] % height, 0)
    last_row = np.where(col == last_col[run], (ends[run] - 1) % height, height - 1)
    return col, first_row, last_row, value[run]


def rle_counts_from_column_runs(first_row: np.ndarray, last_row: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Inverse of `column_runs` after the pieces' values changed: merges equal neighbours into RLE counts."""
    lengths = last_row - first_row + 1
    change = np.flatnonzero(value[1:] != value[:-1]) + 1
    counts = np.add.reduceat(lengths, np.r_[0, change])
    return np.concatenate([[0], counts]) if value[0] else counts


def rle_box(counts: np.ndarray, height: int) -> np.ndarray:
    """Tight XYXY box (inclusive, int64) of the mask; [0, 0, 0, 0] when empty, as `masks_to_boxes`."""
    col, first_row, last_row, value = column_runs(counts, height)
    if not value.any():
        return np.zeros(4, dtype=np.int64)
    col, first_row, last_row = col[value], first_row[value], last_row[value]
    return np.array([col.min(), first_row.min(), col.max(), last_row.max()], dtype=np.int64)
