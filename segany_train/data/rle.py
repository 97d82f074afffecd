"""COCO RLE decoding at a chosen resolution, without decoding the full-resolution masks.

A COCO RLE lists alternating run lengths (0s first) over the column-major pixel order. To sample a
mask at a set of source rows and columns (a nearest-neighbour resize, a crop, a flip: all are index
vectors), it is enough to know, for each wanted pixel, which run it falls in: one `searchsorted` over
the run boundaries. Cost: O(runs + wanted pixels inside the mask's box) instead of O(H*W). All masks
of an image are decoded together: their runs are concatenated (each sums to H*W, so one cumulative
sum gives every mask's boundaries offset by k*H*W) and looked up in one call, which keeps numpy's
per-call overhead from dominating for the typical SA-1B mask.

`pycocotools_rle` is the one place a segmentation in any of the forms the project meets (a binary mask,
an SA-1B RLE with text counts, a pycocotools RLE with bytes counts, COCO's uncompressed RLE) becomes
what pycocotools takes.
"""

from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.nn import functional as F


def pycocotools_rle(segmentation: Any, *, size: tuple[int, int] | None = None) -> dict[str, Any]:
    """The compressed RLE pycocotools takes, {size: [h, w], counts: bytes}, from an HxW binary mask,
    a compressed RLE (counts str or bytes) or an uncompressed one (counts a list of run lengths).

    With `size` (h, w), a segmentation of another size is refused. Anything else is a ValueError
    that says what was wrong; corrupt counts surface when the RLE is decoded.
    """
    if isinstance(segmentation, np.ndarray):
        if segmentation.ndim != 2:
            raise ValueError(f"a binary mask must be HxW, got shape {segmentation.shape}")
        h, w = segmentation.shape
        encoded = None
    elif isinstance(segmentation, dict) and "counts" in segmentation and isinstance(segmentation.get("size"), (list, tuple)):
        h, w = (int(v) for v in segmentation["size"])
        counts = segmentation["counts"]
        if not isinstance(counts, (list, str, bytes)):
            raise ValueError(f"RLE counts must be a list or a string, not {type(counts).__name__}")
        encoded = counts
    else:
        raise ValueError("segmentation must be an HxW binary mask or an RLE dict with 'size' and 'counts'")
    if size is not None and (h, w) != tuple(size):
        raise ValueError(f"segmentation of size {h}x{w} does not match the {size[0]}x{size[1]} image")
    if encoded is None:
        return mask_utils.encode(np.asfortranarray(segmentation.astype(np.uint8)))
    if isinstance(encoded, list):
        return mask_utils.frPyObjects({"size": [h, w], "counts": encoded}, h, w)
    return {"size": [h, w], "counts": encoded.encode("ascii") if isinstance(encoded, str) else encoded}


def _segment_cumsum(values: np.ndarray, segment: np.ndarray) -> np.ndarray:
    """Cumulative sums of `values` restarting at each new `segment` id (ids non-decreasing)."""
    total = values.cumsum()
    first = np.flatnonzero(np.r_[True, segment[1:] != segment[:-1]])
    base = np.r_[0, total[first[1:] - 1]]
    return total - np.repeat(base, np.diff(np.r_[first, values.size]))


def rle_counts_batch(counts: list[str | bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Run lengths of several compressed COCO RLE strings (pycocotools' LEB128-style code).

    Returns the runs of all masks concatenated and, per mask, the index of its first run (K+1
    offsets). Each character carries 5 value bits and a continuation bit (0x20); a number's last
    character carries the sign in bit 0x10; from the third number on, each is stored as the
    difference to the number two places before it. Raises ValueError for a malformed string.
    """
    encoded = [c.encode("ascii") if isinstance(c, str) else bytes(c) for c in counts]
    char_ends = np.cumsum([len(c) for c in encoded])
    code = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.int64) - 48
    if code.size and (code.min() < 0 or code.max() > 63):
        raise ValueError("RLE counts contain characters outside the COCO alphabet")
    more = (code & 0x20) != 0
    nonempty = np.diff(np.r_[0, char_ends]) > 0
    if more[char_ends[nonempty] - 1].any():
        raise ValueError("RLE counts end in the middle of a number")
    ends = np.flatnonzero(~more)
    starts = np.r_[0, ends[:-1] + 1]
    position = np.arange(code.size) - np.repeat(starts, ends - starts + 1)
    values = np.add.reduceat((code & 0x1F) << (5 * position), starts) if ends.size else np.zeros(0, np.int64)
    negative = (code[ends] & 0x10) != 0
    values[negative] |= -1 << (5 * (ends - starts + 1)[negative])
    offsets = np.r_[0, np.searchsorted(ends, char_ends - 1, side="right")]  # numbers per mask
    mask_id = np.repeat(np.arange(len(encoded)), np.diff(offsets))
    local = np.arange(values.size) - offsets[mask_id]
    runs = values.copy()
    # number m (m > 2) is stored relative to number m - 2: running sums over odd and even places
    for first in (1, 2):
        sel = (local >= first) & (local % 2 == first % 2)
        if sel.any():
            runs[sel] = _segment_cumsum(values[sel], mask_id[sel])
    return runs, offsets


def rle_counts(counts: str | bytes) -> np.ndarray:
    """Run lengths of one compressed COCO RLE string."""
    return rle_counts_batch([counts])[0]


def nearest_indices(source: int, target: int) -> np.ndarray:
    """Source index of each target pixel for a nearest-neighbour resize, exactly as torch computes it."""
    idx = F.interpolate(torch.arange(source, dtype=torch.float32)[None, None], size=target, mode="nearest")
    return idx[0, 0].to(torch.int64).numpy()


def parse_rles(rles: list[dict]) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(runs, offsets as `rle_counts_batch` gives them, h, w) of K >= 1 RLEs of one image, checked:
    ValueError names the first mask whose size differs from the first's or whose runs do not cover
    its h*w pixels exactly."""
    h, w = (int(v) for v in rles[0]["size"])
    for k, rle in enumerate(rles):
        if [int(v) for v in rle["size"]] != [h, w]:
            raise ValueError(f"mask {k}: size {rle['size']} differs from the image's {[h, w]}")
    runs, offsets = rle_counts_batch([rle["counts"] for rle in rles])
    per_mask = np.add.reduceat(runs, offsets[:-1]) if runs.size else np.zeros(len(rles), np.int64)
    per_mask[np.diff(offsets) == 0] = 0
    bad = np.flatnonzero((per_mask != h * w) | np.r_[np.minimum.reduceat(runs, offsets[:-1]) < 0 if runs.size else [True]])
    if bad.size:
        raise ValueError(f"mask {bad[0]}: RLE runs cover {int(per_mask[bad[0]])} pixels, the {h}x{w} mask has {h * w}")
    return runs, offsets, h, w


def _extents(runs: np.ndarray, offsets: np.ndarray, h: int) -> np.ndarray:
    """K x 4 (first row, end row, first column, end column) holding each mask's foreground, from its
    runs alone; an empty mask gets empty ranges.

    The annotations' bbox is not used: SA-1B's is one pixel short of the RLE in width and height, and
    a box is only metadata while the runs are the mask. A run that spans columns counts as every row,
    a superset, which is all the lookups need.
    """
    k = len(offsets) - 1
    extents = np.zeros((k, 4), np.int64)
    mask_id = np.repeat(np.arange(k), np.diff(offsets))
    local = np.arange(runs.size) - offsets[mask_id]
    foreground = (local % 2 == 1) & (runs > 0)  # runs alternate background/foreground, background first
    if not foreground.any():
        return extents
    end = _segment_cumsum(runs, mask_id)[foreground]  # one past each foreground run, in its mask
    start, last, owner = end - runs[foreground], end - 1, mask_id[foreground]
    c0, c1 = start // h, last // h
    wraps = c0 != c1
    r0, r1 = np.where(wraps, 0, start % h), np.where(wraps, h - 1, last % h)
    first = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])  # owners are sorted: one group per mask
    ids = owner[first]
    extents[ids, 0] = np.minimum.reduceat(r0, first)
    extents[ids, 1] = np.maximum.reduceat(r1, first) + 1
    extents[ids, 2] = c0[first]
    extents[ids, 3] = np.maximum.reduceat(c1, first) + 1
    return extents


def decode_rles_at(rles: list[dict], rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """mask[rows][:, cols] of K RLEs {size: [h, w], counts: str} of one image: K x len(rows) x len(cols) bool.

    Lookups are restricted to each mask's extent, read from its runs. ValueError names the first
    malformed RLE.
    """
    out = np.zeros((len(rles), len(rows), len(cols)), dtype=bool)
    if not rles:
        return out
    runs, offsets, h, w = parse_rles(rles)
    queries, targets, owners = [], [], []
    all_rows, all_cols = np.arange(len(rows)), np.arange(len(cols))
    for k, (r0, r1, c0, c1) in enumerate(_extents(runs, offsets, h)):
        r_sel = all_rows[(rows >= r0) & (rows < r1)]
        c_sel = all_cols[(cols >= c0) & (cols < c1)]
        if r_sel.size == 0 or c_sel.size == 0:
            continue
        # column-major flat pixel index, offset by k*H*W to land in mask k's runs
        queries.append((cols[c_sel][None, :] * h + rows[r_sel][:, None] + k * h * w).ravel())
        targets.append((k * out[0].size + r_sel[:, None] * len(cols) + c_sel[None, :]).ravel())
        owners.append(np.full(r_sel.size * c_sel.size, k))
    if queries:
        run_index = np.searchsorted(runs.cumsum(), np.concatenate(queries), side="right")
        # a mask's runs alternate background/foreground from its first run
        out.reshape(-1)[np.concatenate(targets)] = ((run_index - offsets[np.concatenate(owners)]) & 1).astype(bool)
    return out


def decode_rle_at(rle: dict, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """mask[rows][:, cols] of one RLE, as a len(rows) x len(cols) bool array."""
    return decode_rles_at([rle], rows, cols)[0]
