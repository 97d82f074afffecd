"""Drawing masks over an image: each mask in its own colour, alpha-blended, with an opaque outline.

Masks are drawn largest first, so smaller masks (often parts of the larger ones) end up on top and
stay visible. Pure numpy; each mask is processed inside its bounding box only.
"""

import colorsys
from collections.abc import Sequence

import numpy as np

GOLDEN_RATIO_CONJUGATE = 0.618033988749895


def distinct_colours(count: int) -> np.ndarray:
    """count x 3 uint8 RGB colours, hues spread by the golden ratio so neighbours in the list differ
    most; saturation and value alternate so that colours a full hue turn apart still differ."""
    colours = []
    for i in range(count):
        hue = (i * GOLDEN_RATIO_CONJUGATE) % 1.0
        saturation, value = (0.85, 0.95) if i % 2 == 0 else (0.6, 0.8)
        colours.append([round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value)])
    return np.asarray(colours, dtype=np.uint8).reshape(count, 3)


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """HxW bool -> HxW bool: the mask pixels with a 4-neighbour outside the mask (beyond the image
    border counts as outside, so a mask touching the border is outlined along it)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def _bounding_slices(mask: np.ndarray) -> tuple[slice, slice] | None:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def render_overlay(
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    *,
    areas: Sequence[int] | None = None,
    alpha: float = 0.45,
    outline: bool = True,
    colours: np.ndarray | None = None,
) -> np.ndarray:
    """The HxWx3 uint8 image with every HxW bool mask drawn over it.

    Masks are drawn in order of decreasing area (`areas`, or counted from the masks; ties keep list
    order); the k-th drawn gets `distinct_colours(...)[k]`, or mask i `colours[i]` when `colours`
    (Nx3 uint8) is given (the same object in the same colour across pictures). A mask blends its
    colour into the pixels it covers (out = (1 - alpha) * below + alpha * colour), then, with
    `outline`, paints its outline (`mask_outline`) opaque in the same colour. `masks` may be any sequence, e.g. one that decodes
    RLEs on access: each mask is read once for its area (unless `areas` is given) and once to draw.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be HxWx3 uint8, got shape {image.shape} and dtype {image.dtype}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if areas is None:
        areas = [int(np.count_nonzero(masks[i])) for i in range(len(masks))]
    if len(areas) != len(masks):
        raise ValueError(f"{len(areas)} areas for {len(masks)} masks")
    order = np.argsort(-np.asarray(areas, dtype=np.int64), kind="stable")
    if colours is not None and len(colours) != len(masks):
        raise ValueError(f"{len(colours)} colours for {len(masks)} masks")
    drawn = distinct_colours(len(masks)) if colours is None else np.asarray(colours, dtype=np.uint8)[order]
    drawn = drawn.astype(np.float32)
    out = image.astype(np.float32)
    for rank, index in enumerate(order):
        mask = np.asarray(masks[index]).astype(bool, copy=False)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask {index} is {mask.shape[0]}x{mask.shape[1]}, the image {image.shape[0]}x{image.shape[1]}")
        box = _bounding_slices(mask)
        if box is None:
            continue
        region, inside = out[box], mask[box]
        region[inside] = (1.0 - alpha) * region[inside] + alpha * drawn[rank]
        if outline:
            region[mask_outline(inside)] = drawn[rank]
    return np.rint(out).astype(np.uint8)
