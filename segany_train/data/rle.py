"""COCO RLE decoding at a chosen resolution, without decoding the full-resolution mask.

A COCO RLE lists alternating run lengths (0s first) over the column-major pixel order. To sample the
mask at a set of source rows and columns (a nearest-neighbour resize, a crop, a flip: all are index
vectors), it is enough to know, for each wanted pixel, which run it falls in: one `searchsorted` over
the run boundaries. Cost: O(runs + wanted pixels inside the mask's box) instead of O(H*W), which for
a 1500x2250 SA-1B mask sampled at 256 px is ~50x less work than pycocotools' full decode.
"""

import numpy as np
import torch
from torch.nn import functional as F


def rle_counts(counts: str | bytes) -> np.ndarray:
    """Run lengths of a compressed COCO RLE string (pycocotools' LEB128-style code), vectorised.

    Each character carries 5 value bits and a continuation bit (0x20); the last character of a
    number carries the sign in bit 0x10; from the third number on, each is stored as the difference
    to the number two places before it.
    """
    raw = np.frombuffer(counts.encode("ascii") if isinstance(counts, str) else counts, dtype=np.uint8)
    if raw.size == 0:
        return np.zeros(0, dtype=np.int64)
    code = raw.astype(np.int64) - 48
    if code.min() < 0 or code.max() > 63:
        raise ValueError("RLE counts contain characters outside the COCO alphabet")
    more = (code & 0x20) != 0
    if more[-1]:
        raise ValueError("RLE counts end in the middle of a number")
    ends = np.flatnonzero(~more)
    starts = np.concatenate(([0], ends[:-1] + 1))
    group = np.repeat(np.arange(ends.size), ends - starts + 1)
    position = np.arange(code.size) - starts[group]
    values = np.add.reduceat((code & 0x1F) << (5 * position), starts)
    lengths = ends - starts + 1
    negative = (code[ends] & 0x10) != 0
    values[negative] |= -1 << (5 * lengths[negative])
    # number m (m > 2) is stored relative to number m - 2: running sums over odd and even places
    runs = values.copy()
    runs[1::2] = values[1::2].cumsum()
    runs[2::2] = values[2::2].cumsum()
    return runs


def nearest_indices(source: int, target: int) -> np.ndarray:
    """Source index of each target pixel for a nearest-neighbour resize, exactly as torch computes it."""
    idx = F.interpolate(torch.arange(source, dtype=torch.float32)[None, None], size=target, mode="nearest")
    return idx[0, 0].to(torch.int64).numpy()


def decode_rle_at(
    rle: dict, rows: np.ndarray, cols: np.ndarray, bbox: list[float] | None = None
) -> np.ndarray:
    """mask[rows][:, cols] of an RLE {size: [h, w], counts: str}, as a len(rows) x len(cols) bool array.

    `bbox` (x, y, w, h, as in the annotation) restricts the lookups to the mask's box; pixels outside
    it are background by definition.
    """
    h, w = (int(v) for v in rle["size"])
    runs = rle_counts(rle["counts"])
    if runs.sum() != h * w or (runs[1:] < 0).any() or (runs[:1] < 0).any():
        raise ValueError(f"RLE runs cover {int(runs.sum())} pixels, the {h}x{w} mask has {h * w}")
    out = np.zeros((len(rows), len(cols)), dtype=bool)
    row_sel, col_sel = np.arange(len(rows)), np.arange(len(cols))
    if bbox is not None:
        x0, y0, bw, bh = bbox
        row_sel = row_sel[(rows >= np.floor(y0)) & (rows < np.ceil(y0 + bh))]
        col_sel = col_sel[(cols >= np.floor(x0)) & (cols < np.ceil(x0 + bw))]
        if row_sel.size == 0 or col_sel.size == 0:
            return out
    # column-major flat index of each wanted pixel; run i covers [bounds[i], bounds[i+1])
    flat = cols[col_sel][None, :] * h + rows[row_sel][:, None]
    run_index = np.searchsorted(np.cumsum(runs), flat, side="right")
    out[np.ix_(row_sel, col_sel)] = (run_index & 1).astype(bool)  # odd runs are foreground
    return out
