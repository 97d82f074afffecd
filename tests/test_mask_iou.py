"""The two mask IoUs (dense tensors, COCO RLEs) against a brute-force count and each other."""

import numpy as np
import pytest
import torch

from segany_train.data.mask_iou import dense_mask_iou, encode_masks, rle_iou_matrix


def _brute_force(a: np.ndarray, b: np.ndarray) -> float:
    inter = sum(1 for y in range(a.shape[0]) for x in range(a.shape[1]) if a[y, x] and b[y, x])
    union = sum(1 for y in range(a.shape[0]) for x in range(a.shape[1]) if a[y, x] or b[y, x])
    return inter / union if union else 1.0


def test_dense_and_rle_iou_agree_with_brute_force():
    rng = np.random.default_rng(0)
    pred = rng.random((4, 3, 13, 17)) < rng.random((4, 3, 1, 1))  # N x M candidates of varied density
    gt = rng.random((4, 13, 17)) < 0.3
    pred[0, 0] = gt[0]  # a perfect candidate
    dense = dense_mask_iou(torch.from_numpy(pred), torch.from_numpy(gt))
    assert dense.shape == (4, 3)
    for n in range(4):
        rle = rle_iou_matrix(encode_masks(list(pred[n])), encode_masks([gt[n]]))[:, 0]
        for m in range(3):
            assert float(dense[n, m]) == pytest.approx(_brute_force(pred[n, m], gt[n]), abs=1e-6)
            assert rle[m] == pytest.approx(_brute_force(pred[n, m], gt[n]), abs=1e-6)
    assert float(dense[0, 0]) == 1.0
    # one mask against one: a scalar's worth; both empty counts as a match for the dense form
    empty = torch.zeros(5, 5, dtype=torch.bool)
    assert dense_mask_iou(empty, empty).tolist() == [1.0]
    assert rle_iou_matrix(encode_masks([empty.numpy()]), encode_masks([empty.numpy()])).tolist() == [[0.0]]

