"""Tests for segany_train.prompting: SAM's simulated point, box and correction-click prompts."""

import numpy as np
import pytest
import torch

from segany_train.model.prompt_encoder import IGNORE_LABEL, PromptEncoder
from segany_train.prompting import (
    box_to_points,
    boxes_from_masks,
    center_correction_clicks,
    distance_to_boundary,
    error_regions,
    noisy_boxes,
    sample_correction_clicks,
    sample_points_in_masks,
)

DEVICES = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def gen(seed: int = 0, device: torch.device = torch.device("cpu")) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def random_masks(n: int, h: int, w: int, p: float = 0.3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, h, w, generator=gen(seed)) < p


def to_pixels(coords: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of the (col + 0.5) * scale convention -> (rows, cols) long; asserts exactness."""
    pix = coords / scale - 0.5
    assert torch.allclose(pix, pix.round(), atol=1e-4)
    pix = pix.round().long()
    return pix[:, 1], pix[:, 0]


def at(masks: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return masks[torch.arange(masks.shape[0], device=masks.device), rows, cols]


# --- points --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_sampled_points_lie_inside_their_masks(device, scale):
    masks = random_masks(200, 9, 13, p=0.1).to(device)
    masks[0] = False
    masks[1] = False
    masks[1, 4, 7] = True  # a 1-pixel mask: its only possible point
    coords, valid = sample_points_in_masks(masks, gen(1, device), scale=scale)
    assert coords.shape == (200, 2) and coords.dtype == torch.float32 and coords.device.type == device.type
    assert torch.equal(valid, masks.flatten(1).any(1))
    rows, cols = to_pixels(coords[valid], scale)
    assert at(masks[valid], rows, cols).all()
    assert torch.equal(coords[1].cpu(), torch.tensor([7.5, 4.5]) * scale)


def test_point_sampling_is_uniform():
    mask = torch.zeros(12, 12, dtype=torch.bool)
    mask[1:5, 1:5] = True  # area 16
    mask[6:12, 2:10] = True  # area 48: 1:3
    masks = mask.expand(4000, 12, 12)
    coords, valid = sample_points_in_masks(masks, gen(2))
    assert valid.all()
    rows, cols = to_pixels(coords)
    assert at(masks, rows, cols).all()
    frac_small = (rows < 5).float().mean().item()
    assert abs(frac_small - 0.25) < 0.03
    # Every one of the 64 pixels is hit (a skipped pixel would be a ~e^-60 event if uniform).
    assert len(set((rows * 12 + cols).tolist())) == 64


def test_empty_masks_are_invalid_not_an_error():
    masks = torch.zeros(3, 5, 5, dtype=torch.bool)
    masks[1, 2, 3] = True
    coords, valid = sample_points_in_masks(masks, gen())
    assert valid.tolist() == [False, True, False]
    assert torch.isnan(coords[[0, 2]]).all() and torch.equal(coords[1], torch.tensor([3.5, 2.5]))


# --- boxes ---------------------------------------------------------------------------------------


def test_noisy_box_statistics():
    n = 20000
    box = torch.tensor([100.0, 200.0, 160.0, 240.0])  # w 60 -> std 6, h 40 -> std 4 (far below the cap)
    noise = noisy_boxes(box.expand(n, 4), gen(3)) - box
    std = noise.std(dim=0)
    expected = torch.tensor([6.0, 4.0, 6.0, 4.0])
    assert ((std - expected).abs() / expected < 0.1).all(), std
    assert (noise.mean(dim=0).abs() < 0.05 * expected).all()
    assert noise.abs().max() <= 20.0


def test_noisy_box_noise_is_capped():
    box = torch.tensor([10.0, 20.0, 3010.0, 2020.0])  # std would be 300/200 px
    noise = noisy_boxes(box.expand(5000, 4), gen(4)) - box
    assert noise.abs().max() <= 20.0 + 1e-3
    assert noise.abs().max() > 19.9  # the cap is actually reached
    noise = noisy_boxes(box.expand(100, 4), gen(4), max_noise=5.0) - box
    assert noise.abs().max() <= 5.0 + 1e-3


def test_noisy_boxes_stay_ordered_and_clipped():
    boxes = torch.tensor([[50.0, 50.0, 51.0, 51.0], [0.0, 0.0, 100.0, 64.0]]).repeat(500, 1)
    out = noisy_boxes(boxes, gen(5), noise_std_fraction=2.0, image_size=(64, 100))  # (h, w)
    assert (out[:, 0] <= out[:, 2]).all() and (out[:, 1] <= out[:, 3]).all()
    assert (out[:, 0::2] >= 0).all() and (out[:, 0::2] <= 100).all()
    assert (out[:, 1::2] >= 0).all() and (out[:, 1::2] <= 64).all()


def test_boxes_from_masks_and_box_to_points():
    masks = torch.zeros(3, 8, 10, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 7, 0] = True
    boxes = boxes_from_masks(masks)
    assert boxes.shape == (3, 4)
    assert torch.equal(boxes[0], torch.tensor([3.0, 2.0, 9.0, 5.0]))  # x1/y1 exclusive
    assert torch.equal(boxes[1], torch.tensor([0.0, 7.0, 1.0, 8.0]))
    assert torch.isnan(boxes[2]).all()  # empty mask
    assert torch.equal(boxes_from_masks(masks, scale=4.0)[0], torch.tensor([12.0, 8.0, 36.0, 20.0]))

    coords, labels = box_to_points(boxes[:2])
    assert coords.shape == (2, 2, 2) and labels.shape == (2, 2) and labels.dtype == torch.long
    assert torch.equal(coords[0], torch.tensor([[3.0, 2.0], [9.0, 5.0]]))
    assert labels.tolist() == [[2, 3], [2, 3]]


# --- correction clicks ---------------------------------------------------------------------------


def test_error_regions():
    pred = torch.tensor([[[True, True, False, False]]])
    gt = torch.tensor([[[True, False, True, False]]])
    fn, fp = error_regions(pred, gt)
    assert fn.tolist() == [[[False, False, True, False]]]
    assert fp.tolist() == [[[False, True, False, False]]]


@pytest.mark.parametrize("device", DEVICES)
def test_sampled_correction_clicks_land_in_the_error(device):
    gt = random_masks(300, 10, 11, p=0.4, seed=6).to(device)
    pred = random_masks(300, 10, 11, p=0.4, seed=7).to(device)
    pred[:5] = gt[:5]  # no error
    coords, labels, valid = sample_correction_clicks(pred, gt, gen(8, device), scale=2.0)
    fn, fp = error_regions(pred, gt)
    assert torch.equal(valid, (fn | fp).flatten(1).any(1)) and not valid[:5].any()
    assert (labels[:5] == IGNORE_LABEL).all() and torch.isnan(coords[:5]).all()
    rows, cols = to_pixels(coords[valid], 2.0)
    assert at((fn | fp)[valid], rows, cols).all()
    assert torch.equal(labels[valid] == 1, at(fn[valid], rows, cols))
    assert set(labels[valid].tolist()) == {0, 1}


def test_sampled_correction_clicks_follow_error_areas():
    gt = torch.zeros(8, 8, dtype=torch.bool)
    pred = torch.zeros(8, 8, dtype=torch.bool)
    gt[0:2, 0:4] = True  # FN area 8
    pred[4:8, 0:6] = True  # FP area 24: 1:3
    _, labels, valid = sample_correction_clicks(pred.expand(4000, 8, 8), gt.expand(4000, 8, 8), gen(9))
    assert valid.all()
    assert abs((labels == 1).float().mean().item() - 0.25) < 0.03


@pytest.mark.parametrize("side", [9, 10])
def test_first_center_click_is_the_centre_of_a_square(side):
    gt = torch.zeros(1, 32, 40, dtype=torch.bool)
    gt[0, 5 : 5 + side, 20 : 20 + side] = True
    coords, labels, valid = center_correction_clicks(torch.zeros_like(gt), gt, scale=4.0)
    assert valid.item() and labels.item() == 1
    centre = torch.tensor([20 + side / 2, 5 + side / 2]) * 4.0
    assert (coords[0] - centre).abs().max() <= 1.0 * 4.0


def test_first_center_click_in_a_rectangle_is_on_its_medial_axis():
    gt = torch.zeros(1, 20, 40, dtype=torch.bool)
    gt[0, 3:10, 5:36] = True  # 7 x 31: deepest pixels are row 6, columns 8..32 (distance 4)
    coords, labels, valid = center_correction_clicks(torch.zeros_like(gt), gt)
    rows, cols = to_pixels(coords)
    assert rows.item() == 6 and 8 <= cols.item() <= 32 and labels.item() == 1
    assert cols.item() == 8  # ties: first in row-major order


def test_center_click_picks_the_largest_error_region():
    gt = torch.zeros(2, 30, 30, dtype=torch.bool)
    pred = torch.zeros(2, 30, 30, dtype=torch.bool)
    # Mask 0: big FN (GT the model missed), small FP. Mask 1: the other way round.
    gt[0, 2:14, 2:14] = True
    pred[0, 20:23, 20:23] = True
    pred[1, 2:14, 2:14] = True
    gt[1, 20:23, 20:23] = True
    gt[:, 25:29, 0:4] = pred[:, 25:29, 0:4] = True  # a correct region elsewhere
    coords, labels, valid = center_correction_clicks(pred, gt)
    assert valid.all() and labels.tolist() == [1, 0]
    rows, cols = to_pixels(coords)
    assert ((rows >= 2) & (rows < 14) & (cols >= 2) & (cols < 14)).all()
    fn, fp = error_regions(pred, gt)
    assert at(fn, rows, cols).tolist() == [True, False] and at(fp, rows, cols).tolist() == [False, True]


def test_center_click_no_error_and_ties():
    gt = random_masks(2, 6, 6, seed=10)
    coords, labels, valid = center_correction_clicks(gt.clone(), gt)
    assert not valid.any() and (labels == IGNORE_LABEL).all() and torch.isnan(coords).all()
    # Equal-size FN and FP: as in RITM (fn_max > fp_max is strict), the FP region wins.
    gt = torch.zeros(1, 10, 10, dtype=torch.bool)
    pred = torch.zeros(1, 10, 10, dtype=torch.bool)
    gt[0, 1:4, 1:4] = True
    pred[0, 6:9, 6:9] = True
    coords, labels, valid = center_correction_clicks(pred, gt)
    assert labels.item() == 0 and torch.equal(coords[0], torch.tensor([7.5, 7.5]))


# --- distance transform --------------------------------------------------------------------------


def brute_force_distance(masks: torch.Tensor) -> torch.Tensor:
    """O((HW)^2) reference: distance from each pixel to the nearest False pixel of the 1-padded mask."""
    n, h, w = masks.shape
    padded = torch.nn.functional.pad(masks, (1, 1, 1, 1), value=False)
    ys, xs = torch.meshgrid(torch.arange(h + 2.0), torch.arange(w + 2.0), indexing="ij")
    pts = torch.stack([ys.flatten(), xs.flatten()], 1).double()
    d = torch.cdist(pts, pts)  # (H+2)(W+2) x (H+2)(W+2)
    d = d.expand(n, -1, -1).masked_fill(padded.flatten(1)[:, None, :], float("inf"))
    return d.amin(-1).reshape(n, h + 2, w + 2)[:, 1:-1, 1:-1].float()


@pytest.mark.parametrize(
    "shape,p", [((40, 7, 7), 0.5), ((40, 9, 14), 0.8), ((20, 16, 5), 0.95), ((5, 12, 12), 1.0)]
)
def test_distance_transform_is_exact(shape, p):
    masks = random_masks(*shape, p=p, seed=11)
    dist = distance_to_boundary(masks)
    assert dist.shape == masks.shape and dist.dtype == torch.float32
    torch.testing.assert_close(dist, brute_force_distance(masks), atol=1e-5, rtol=0)
    assert (dist[~masks] == 0).all() and (dist[masks] >= 1).all()
    # One mask per chunk (each with its own window) gives the same result.
    assert torch.equal(distance_to_boundary(masks, chunk_bytes=1), dist)


def test_distance_transform_matches_scipy():
    from scipy import ndimage  # a test-only reference (the dev extra installs it)

    masks = random_masks(8, 48, 33, p=0.9, seed=12)
    masks[0] = True
    masks[1, 5:40, 3:30] = True
    ref = np.stack([ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1] for m in masks.numpy()])
    torch.testing.assert_close(distance_to_boundary(masks), torch.from_numpy(ref).float(), atol=1e-5, rtol=0)


def test_distance_transform_degenerate_shapes():
    assert distance_to_boundary(torch.zeros(0, 4, 4, dtype=torch.bool)).shape == (0, 4, 4)
    assert distance_to_boundary(torch.zeros(2, 3, 3, dtype=torch.bool)).eq(0).all()
    assert distance_to_boundary(torch.ones(1, 1, 1, dtype=torch.bool)).item() == 1.0


# --- devices, reproducibility, model compatibility -----------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_generator_makes_results_reproducible(device):
    masks = random_masks(64, 16, 16, seed=13).to(device)
    pred = random_masks(64, 16, 16, seed=14).to(device)
    boxes = boxes_from_masks(masks, scale=4.0)
    runs = [
        (
            sample_points_in_masks(masks, gen(s, device))[0],
            noisy_boxes(boxes, gen(s, device)),
            sample_correction_clicks(pred, masks, gen(s, device))[0],
        )
        for s in (21, 21, 22)
    ]
    for a, b, c in zip(*runs):
        assert a.device.type == device.type
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
    coords, labels, valid = center_correction_clicks(pred, masks)
    assert coords.device.type == labels.device.type == valid.device.type == device.type


def test_invalid_clicks_are_harmless_to_the_prompt_encoder():
    # NaN coords with IGNORE_LABEL (what invalid clicks return) must give a finite, zero token.
    enc = PromptEncoder(embed_dim=8, image_embedding_size=(4, 4), input_image_size=(64, 64))
    gt = torch.zeros(2, 16, 16, dtype=torch.bool)
    gt[0, 2:6, 2:6] = True
    coords, labels, valid = sample_correction_clicks(gt.clone(), gt, gen())
    assert not valid.any()
    tokens = enc.embed_labelled_points(coords[:, None], labels[:, None])
    assert torch.equal(tokens, torch.zeros_like(tokens))
