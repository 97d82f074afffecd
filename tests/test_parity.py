"""Our model and SamPredictor against outputs of the official segment-anything 1.0 implementation."""

import numpy as np
import pytest
import torch

from segany_train import SamPredictor

TOL = 1e-4


def test_image_embedding_matches_official(parity, parity_sam):
    predictor = SamPredictor(parity_sam)
    predictor.set_image(parity["image"].numpy())
    assert predictor.input_size == tuple(parity["input_size"])
    embedding = predictor.get_image_embedding()
    assert embedding.shape == parity["image_embedding"].shape
    assert (embedding - parity["image_embedding"]).abs().max().item() < TOL


@pytest.mark.parametrize("case_index", range(4))
def test_predict_matches_official(parity, parity_sam, case_index):
    case = parity["cases"][case_index]
    predictor = SamPredictor(parity_sam)
    predictor.set_image(parity["image"].numpy())
    kwargs = {k: (v.numpy() if torch.is_tensor(v) else v) for k, v in case["kwargs"].items()}
    masks, iou, low_res = predictor.predict(**kwargs, return_logits=True)
    assert masks.shape == tuple(case["masks"].shape)
    assert iou.shape == tuple(case["iou"].shape)
    assert low_res.shape == tuple(case["low_res_logits"].shape)
    np.testing.assert_allclose(masks, case["masks"].numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(iou, case["iou"].numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(low_res, case["low_res_logits"].numpy(), atol=TOL, rtol=0)
    # thresholded masks, as the official predict returns them by default
    binary, _, _ = predictor.predict(**kwargs)
    assert binary.dtype == bool
    np.testing.assert_array_equal(binary, masks > 0.0)


def test_bgr_input_is_flipped(parity, parity_sam):
    predictor = SamPredictor(parity_sam)
    predictor.set_image(parity["image"].numpy()[..., ::-1].copy(), image_format="BGR")
    assert (predictor.get_image_embedding() - parity["image_embedding"]).abs().max().item() < TOL
