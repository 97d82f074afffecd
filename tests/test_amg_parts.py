"""The automatic mask generator's building blocks (grids, crops, stability, boxes, NMS, RLE, small
regions) against brute-force versions, pycocotools, scipy and official values."""

import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from segany_train.amg import (
    box_near_crop_edge,
    box_nms,
    coco_rle,
    crop_boxes,
    crop_masks_to_rle_counts,
    label_components,
    layer_point_grids,
    mask_to_rle_counts,
    masks_to_boxes,
    masks_to_rle_counts,
    point_grid,
    remove_small_regions,
    rle_area,
    rle_box,
    rle_counts_to_mask,
    stability_score,
    uncompressed_rle,
)


# ---------------------------------------------------------------- grids and crops


@pytest.mark.parametrize("n", [1, 2, 3, 7, 32])
def test_point_grid_is_the_cell_centres(n):
    expected = [((i + 0.5) / n, (j + 0.5) / n) for j in range(n) for i in range(n)]
    np.testing.assert_allclose(point_grid(n), np.array(expected), rtol=0, atol=1e-12)


def test_layer_grids_shrink_by_the_downscale_factor():
    assert [g.shape for g in layer_point_grids(32, 3, 2)] == [(1024, 2), (256, 2), (64, 2), (16, 2)]
    assert [g.shape for g in layer_point_grids(10, 2, 3)] == [(100, 2), (9, 2), (1, 2)]
    with pytest.raises(ValueError, match="leaves no points in crop layer 2"):
        layer_point_grids(3, 2, 2)


# crop_boxes((1500, 2250), 2, 512 / 1500) as computed by the official segment-anything 1.0
OFFICIAL_SA1B_CROPS = [
    [0, 0, 2250, 1500], [0, 0, 1381, 1006], [0, 494, 1381, 1500], [869, 0, 2250, 1006], [869, 494, 2250, 1500],
    [0, 0, 755, 567], [0, 311, 755, 878], [0, 622, 755, 1189], [0, 933, 755, 1500], [499, 0, 1254, 567],
    [499, 311, 1254, 878], [499, 622, 1254, 1189], [499, 933, 1254, 1500], [998, 0, 1753, 567],
    [998, 311, 1753, 878], [998, 622, 1753, 1189], [998, 933, 1753, 1500], [1497, 0, 2250, 567],
    [1497, 311, 2250, 878], [1497, 622, 2250, 1189], [1497, 933, 2250, 1500],
]  # fmt: skip


def test_crop_boxes_match_the_official_values():
    boxes, layers = crop_boxes((1500, 2250), 2, 512 / 1500)
    assert boxes == OFFICIAL_SA1B_CROPS
    assert layers == [0] + [1] * 4 + [2] * 16


@pytest.mark.parametrize(("size", "n_layers", "ratio"), [((181, 97), 3, 0.3), ((1024, 1024), 2, 512 / 1500), ((50, 333), 2, 0.0)])
def test_crop_boxes_tile_the_image_with_the_stated_overlap(size, n_layers, ratio):
    h, w = size
    boxes, layers = crop_boxes(size, n_layers, ratio)
    assert boxes[0] == [0, 0, w, h] and layers[0] == 0
    for layer in range(1, n_layers + 1):
        per_side = 2**layer
        layer_boxes = [b for b, lay in zip(boxes, layers) if lay == layer]
        assert len(layer_boxes) == per_side**2
        overlap = int(ratio * min(h, w) * 2 / per_side)
        covered = np.zeros((h, w), dtype=int)
        for x0, y0, x1, y1 in layer_boxes:
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            covered[y0:y1, x0:x1] += 1
        assert covered.min() >= 1  # the crops cover the image
        # columns first: crop k is column k // per_side, row k % per_side
        xs = sorted({b[0] for b in layer_boxes})
        ys = sorted({b[1] for b in layer_boxes})
        assert [b[0] for b in layer_boxes] == [x for x in xs for _ in ys]
        assert [b[1] for b in layer_boxes] == ys * len(xs)
        crop_w = math.ceil((overlap * (per_side - 1) + w) / per_side)
        crop_h = math.ceil((overlap * (per_side - 1) + h) / per_side)
        for x0, y0, x1, y1 in layer_boxes:  # full size unless cut by the image border
            assert x1 - x0 == crop_w or x1 == w
            assert y1 - y0 == crop_h or y1 == h
        # neighbours overlap by `overlap` pixels
        assert all(b - a == crop_w - overlap for a, b in zip(xs, xs[1:]))
        assert all(b - a == crop_h - overlap for a, b in zip(ys, ys[1:]))


# ---------------------------------------------------------------- mask and box operations


def test_stability_score_matches_a_brute_force_count():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 17, 23, generator=gen) * 2
    logits[1, 3] = -5.0  # empty at both cutoffs
    score = stability_score(logits, 0.0, 1.0)
    assert score.shape == (2, 5) and score.dtype == torch.float32
    x = logits.numpy()
    for i in range(2):
        for j in range(5):
            inner = sum(1 for v in x[i, j].ravel() if v > 1.0)
            outer = sum(1 for v in x[i, j].ravel() if v > -1.0)
            if outer == 0:
                assert math.isnan(score[i, j].item())
            else:
                assert score[i, j].item() == pytest.approx(inner / outer, abs=1e-7)
    with np.errstate(invalid="ignore"):
        expected = (x > 0.75).sum((-1, -2)) / (x > 0.25).sum((-1, -2))
    np.testing.assert_allclose(stability_score(logits, 0.5, 0.25).numpy(), expected, atol=1e-7)
    # the torch path (used off the CPU, and for other dtypes) agrees with the numpy one
    halves = logits.to(torch.bfloat16)
    reference = stability_score(halves.float(), 0.0, 1.0)
    torch.testing.assert_close(stability_score(halves, 0.0, 1.0), reference, equal_nan=True)


def test_masks_to_boxes_matches_brute_force():
    gen = torch.Generator().manual_seed(1)
    masks = torch.rand(3, 4, 19, 31, generator=gen) > 0.97
    masks[0, 0] = False
    masks[1, 2] = False
    masks[1, 2, 5, 7] = True
    boxes = masks_to_boxes(masks)
    assert boxes.shape == (3, 4, 4) and boxes.dtype == torch.int64
    for i in range(3):
        for j in range(4):
            ys, xs = np.nonzero(masks[i, j].numpy())
            expected = [0, 0, 0, 0] if ys.size == 0 else [xs.min(), ys.min(), xs.max(), ys.max()]
            assert boxes[i, j].tolist() == expected
    assert masks_to_boxes(torch.zeros(0, 5, 5, dtype=torch.bool)).shape == (0, 4)


def _greedy_nms_reference(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Textbook greedy NMS, float32 IoU as torchvision computes it; ties keep index order."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    b = boxes.astype(np.float32)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    keep, removed = [], set()
    for pos, i in enumerate(order):
        if i in removed:
            continue
        keep.append(i)
        for j in order[pos + 1 :]:
            w = max(np.float32(0), min(b[i, 2], b[j, 2]) - max(b[i, 0], b[j, 0]))
            h = max(np.float32(0), min(b[i, 3], b[j, 3]) - max(b[i, 1], b[j, 1]))
            inter = np.float32(w * h)
            with np.errstate(invalid="ignore"):
                iou = inter / np.float32(area[i] + area[j] - inter)
            if float(iou) > threshold:
                removed.add(j)
    return keep


@pytest.mark.parametrize("block_size", [1024, 7])
def test_box_nms_matches_a_greedy_loop(block_size):
    rng = np.random.default_rng(2)
    for trial in range(20):
        n = int(rng.integers(0, 60))
        xy = rng.integers(0, 40, (n, 2))
        wh = rng.integers(0, 25, (n, 2))  # some boxes are degenerate (IoU NaN)
        boxes = np.concatenate([xy, xy + wh], axis=1)
        scores = rng.integers(0, 4, n).astype(np.float32) / 4  # many ties
        threshold = [0.7, 0.3, 0.5][trial % 3]
        keep = box_nms(torch.as_tensor(boxes).float(), torch.as_tensor(scores), threshold, block_size=block_size)
        assert keep.dtype == torch.int64
        assert keep.tolist() == _greedy_nms_reference(boxes, scores, threshold)


def test_box_nms_keeps_the_first_of_equal_duplicates_and_rejects_bad_shapes():
    boxes = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10], [1, 1, 10, 10]]).float()
    assert box_nms(boxes, torch.ones(4), 0.7).tolist() == [0, 1]
    assert box_nms(boxes, torch.tensor([0.5, 0.5, 0.9, 0.5]), 0.7).tolist() == [2, 1]
    with pytest.raises(ValueError, match="Nx4 boxes and N scores"):
        box_nms(boxes, torch.ones(3), 0.7)


def test_box_near_crop_edge_matches_brute_force():
    rng = np.random.default_rng(3)
    crop, image = [40, 30, 140, 100], [0, 0, 200, 100]
    xy = rng.integers(0, 80, (200, 2))
    boxes = np.concatenate([xy, xy + rng.integers(0, 40, (200, 2))], axis=1)  # crop frame
    near = box_near_crop_edge(torch.as_tensor(boxes), crop, image).numpy()
    for box, flag in zip(boxes, near):
        full = box + np.array([crop[0], crop[1], crop[0], crop[1]])
        expected = any(abs(full[k] - crop[k]) <= 20 and abs(full[k] - image[k]) > 20 for k in range(4))
        assert flag == expected


# ---------------------------------------------------------------- run-length encoding


def _random_masks(seed: int, k: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = rng.random((k, h, w)) < rng.uniform(0.05, 0.95, (k, 1, 1))
    masks[0] = False
    masks[1] = True
    masks[2, 0, 0] = True  # starts with a set pixel: counts begin with a 0 run
    return masks


def test_rle_encoding_matches_pycocotools():
    masks = _random_masks(4, 6, 13, 9)
    counts = masks_to_rle_counts(torch.as_tensor(masks))
    for mask, c in zip(masks, counts):
        reference = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        ours = coco_rle(c, 13, 9)
        assert ours["counts"] == reference["counts"].decode() and ours["size"] == [13, 9]
        assert rle_area(c) == mask_utils.area(reference) == mask.sum()
        x, y, bw, bh = mask_utils.toBbox(reference)
        box = rle_box(c, 13).tolist()
        assert box == ([0, 0, 0, 0] if not mask.any() else [x, y, x + bw - 1, y + bh - 1])
        assert box == masks_to_boxes(torch.as_tensor(mask)).tolist()
        # uncompressed RLE, as pycocotools reads it, and back to the mask
        unc = uncompressed_rle(c, 13, 9)
        assert all(isinstance(v, int) for v in unc["counts"])
        np.testing.assert_array_equal(mask_utils.decode(mask_utils.frPyObjects(unc, 13, 9)), mask)
        np.testing.assert_array_equal(rle_counts_to_mask(c, 13, 9), mask)
    assert masks_to_rle_counts(torch.zeros(0, 4, 4, dtype=torch.bool)) == []
    assert masks_to_rle_counts(torch.tensor([[[True, False], [True, True]]]))[0].tolist() == [0, 2, 1, 1]
    with pytest.raises(ValueError, match="cover 5 pixels"):
        rle_counts_to_mask(np.array([2, 3]), 2, 2)


def test_crop_masks_are_encoded_in_the_image_frame():
    rng = np.random.default_rng(7)
    for trial in range(60):
        height, width = (int(v) for v in rng.integers(1, 25, 2))
        h, w = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
        x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        masks = _random_masks(trial, 5, h, w) if h * w > 1 else rng.random((5, h, w)) < 0.5
        if trial % 4 == 0:  # runs that wrap from the image's bottom row to the top of the next column
            masks[3, 0, :] = masks[3, -1, :] = True
        masks_t = torch.as_tensor(masks)
        boxes = masks_to_boxes(masks_t)
        counts = crop_masks_to_rle_counts(masks_t, boxes, (x0, y0), (height, width))
        padded = crop_masks_to_rle_counts(masks_t, boxes, (x0, y0), (height, width), scan_boxes=False)
        assert [c.tolist() for c in counts] == [c.tolist() for c in padded]
        for mask, c in zip(masks, counts):
            placed = np.zeros((height, width), dtype=bool)
            placed[y0 : y0 + h, x0 : x0 + w] = mask
            reference = mask_utils.encode(np.asfortranarray(placed.astype(np.uint8)))
            assert coco_rle(c, height, width)["counts"] == reference["counts"].decode()
            assert c.tolist() == mask_to_rle_counts(placed).tolist()


# ---------------------------------------------------------------- connected components, small regions


@pytest.mark.parametrize("connectivity", [4, 8])
def test_label_components_matches_scipy(connectivity):
    ndimage = pytest.importorskip("scipy.ndimage")
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    rng = np.random.default_rng(5)
    for _ in range(40):
        h, w = rng.integers(1, 30, 2)
        mask = rng.random((h, w)) < rng.uniform(0.1, 0.8)
        expected, n_expected = ndimage.label(mask, structure)
        n, labels = label_components(mask, connectivity)
        assert n == n_expected
        np.testing.assert_array_equal(labels, expected)  # both number components in raster order


def _remove_small_regions_reference(mask: np.ndarray, min_area: int, mode: str) -> tuple[np.ndarray, bool]:
    """The official postprocessing's rule, on scipy's 8-connected labels."""
    ndimage = pytest.importorskip("scipy.ndimage")
    working = ~mask if mode == "holes" else mask
    labels, n = ndimage.label(working, np.ones((3, 3)))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    small = [i + 1 for i in range(n) if sizes[i] < min_area]
    if not small:
        return mask, False
    if mode == "holes":
        return mask | np.isin(labels, small), True
    keep = [i for i in range(1, n + 1) if i not in small] or [int(np.argmax(sizes)) + 1]
    return np.isin(labels, keep), True


def test_remove_small_regions_matches_a_reference():
    rng = np.random.default_rng(6)
    for trial in range(60):
        h, w = rng.integers(2, 40, 2)
        mask = rng.random((h, w)) < rng.uniform(0.1, 0.9)
        min_area = int(rng.integers(1, 12)) if trial % 5 else h * w + 1  # every region small
        counts = mask_to_rle_counts(mask)
        for mode in ("holes", "islands"):
            expected, expected_changed = _remove_small_regions_reference(mask, min_area, mode)
            new_counts, changed = remove_small_regions(counts, h, w, min_area, mode)
            assert changed == expected_changed
            np.testing.assert_array_equal(rle_counts_to_mask(new_counts, h, w), expected)
            assert new_counts.sum() == h * w
    with pytest.raises(ValueError, match="mode must be"):
        remove_small_regions(np.array([4]), 2, 2, 3, "both")
