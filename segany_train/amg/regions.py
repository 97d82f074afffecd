"""Connected components and small-region removal on run-length encoded masks (numpy, no OpenCV).

Components are found on the RLE's column pieces (`rle.column_runs`) rather than on pixels: two
pieces of the same value in neighbouring columns touch when their row ranges overlap (4-connected)
or come within one row (8-connected); pieces of one column never touch another of the same value.
The piece graph is merged by vectorised union-find (hook larger roots onto smaller ones, then
pointer jumping), so the cost grows with the number of runs, not of pixels. Connectivity is
symmetric under transposition, so labelling the column-major runs labels the image.
"""

import numpy as np

from segany_train.amg.rle import column_runs, mask_to_rle_counts, rle_counts_from_column_runs


def _touching_pairs(
    col: np.ndarray, first_row: np.ndarray, last_row: np.ndarray, height: int, connectivity: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j) of pieces (sorted by column, then row) in neighbouring columns that touch."""
    reach = 1 if connectivity == 8 else 0
    stride = height + 2  # keeps every column's keys apart, even after +-1 row
    key_first = col * stride + first_row
    key_last = col * stride + last_row
    # pieces of column c + 1 touching piece i: last row >= first_row[i] - reach, first row <= last_row[i] + reach
    lo = np.searchsorted(key_last, (col + 1) * stride + first_row - reach, side="left")
    hi = np.searchsorted(key_first, (col + 1) * stride + last_row + reach, side="right")
    n_pairs = np.maximum(hi - lo, 0)
    i = np.repeat(np.arange(col.size), n_pairs)
    j = np.repeat(lo, n_pairs) + np.arange(i.size) - np.repeat(np.cumsum(n_pairs) - n_pairs, n_pairs)
    return i, j


def _union_find_roots(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Root (smallest member) of each of n nodes' component, given undirected edges (i, j)."""
    parent = np.arange(n)
    while i.size:
        root_i, root_j = parent[i], parent[j]
        crossing = root_i != root_j
        if not crossing.any():
            break
        i, j, root_i, root_j = i[crossing], j[crossing], root_i[crossing], root_j[crossing]
        # pointers only go to smaller indices, so the forest never gets a cycle
        np.minimum.at(parent, np.maximum(root_i, root_j), np.minimum(root_i, root_j))
        while True:
            grandparent = parent[parent]
            if np.array_equal(grandparent, parent):
                break
            parent = grandparent
    return parent


def _label_pieces(
    col: np.ndarray, first_row: np.ndarray, last_row: np.ndarray, height: int, width: int, connectivity: int
) -> tuple[np.ndarray, np.ndarray]:
    """Component of each piece (0..n-1, numbered by first pixel in row-major order) and the components' sizes."""
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    if col.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    roots = _union_find_roots(col.size, *_touching_pairs(col, first_row, last_row, height, connectivity))
    unique_roots, component = np.unique(roots, return_inverse=True)
    first_pixel = np.full(unique_roots.size, height * width, dtype=np.int64)
    np.minimum.at(first_pixel, component, first_row * width + col)
    rank = np.empty(unique_roots.size, dtype=np.int64)
    rank[np.argsort(first_pixel)] = np.arange(unique_roots.size)
    component = rank[component]
    sizes = np.bincount(component, weights=last_row - first_row + 1).astype(np.int64)
    return component, sizes


def label_components(mask: np.ndarray, connectivity: int = 8) -> tuple[int, np.ndarray]:
    """Connected components of an HxW boolean mask: (count n, HxW int32 labels: 0 off, 1..n on).

    Components are numbered in row-major order of their first pixel (as a raster scan meets them).
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be HxW, got shape {mask.shape}")
    h, w = mask.shape
    col, first_row, last_row, value = column_runs(mask_to_rle_counts(mask), h)
    component, sizes = _label_pieces(col[value], first_row[value], last_row[value], h, w, connectivity)
    piece_label = np.zeros(col.size, dtype=np.int32)
    piece_label[value] = component + 1
    labels = np.repeat(piece_label, last_row - first_row + 1).reshape(w, h).T
    return int(sizes.size), np.ascontiguousarray(labels)


def remove_small_regions(
    counts: np.ndarray, height: int, width: int, min_area: int, mode: str, connectivity: int = 8
) -> tuple[np.ndarray, bool]:
    """Fill holes ("holes") or drop islands ("islands") smaller than `min_area` pixels of an RLE mask.

    Returns the new RLE counts and whether anything was removed. As in the official generator, both
    use 8-connectivity (background holes too), a region counts as small when its area is below
    `min_area`, and when every island is small the largest one is kept (the first in raster order
    among equals) and the mask counts as changed even if it had only that island.
    """
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    col, first_row, last_row, value = column_runs(counts, height)
    target = value if mode == "islands" else ~value
    component, sizes = _label_pieces(col[target], first_row[target], last_row[target], height, width, connectivity)
    small = sizes < min_area
    if not small.any():
        return np.asarray(counts), False
    new_value = value.copy()
    if mode == "holes":
        new_value[np.flatnonzero(target)[small[component]]] = True
    else:
        keep = ~small
        if not keep.any():
            keep[np.argmax(sizes)] = True
        new_value[np.flatnonzero(target)[~keep[component]]] = False
    return rle_counts_from_column_runs(first_row, last_row, new_value), True
