"""Stage 3 and annotation stream a shard image by image and compare masks as RLEs: their peak memory
(numpy's allocations, traced) does not grow with the number of images in the shard."""

import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from data_engine.annotation_step import annotate_shards
from data_engine.annotator import ImageAnnotation, MaskRecord
from data_engine.automatic_step import generate_one_shard
from segany_train.data.mask_iou import encode_masks, rle_iou_matrix
from tests.shards import write_shards

IMAGE = dict(height=240, width=360, num_masks=8)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[int, str]:
    """One shard of 6 images and one of 24 (the same kind of images)."""
    root = tmp_path_factory.mktemp("shards")
    return {n: str(write_shards(root / str(n), num_images=n, per_shard=n, **IMAGE)[0]) for n in (6, 24)}


def _peak(work: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


class ChannelGenerator:
    """A stand-in automatic mask generator that keeps nothing: one mask per colour channel."""

    def generate(self, image: np.ndarray) -> list[dict]:
        h, w = image.shape[:2]
        return [
            {"segmentation": image[..., c] > 128, "predicted_iou": 0.9, "stability_score": 0.9, "point_coords": [[0.0, 0.0]], "crop_box": [0, 0, w, h]}
            for c in range(3)
        ]


class CopyTheGroundTruth:
    """A stand-in annotation tool: the new masks are the GT objects."""

    def __init__(self, gt_masks: list[np.ndarray]) -> None:
        self.gt_masks = gt_masks

    def annotate(self, image: np.ndarray, prefilled: list[np.ndarray]) -> ImageAnnotation:
        records = [MaskRecord(k, (), 0, 5.0, 1.0, 1.0, False) for k in range(len(self.gt_masks))]
        return ImageAnnotation(masks=list(self.gt_masks), records=records)


def test_stage3_peak_memory_does_not_grow_with_the_shard(shards, tmp_path):
    small, large = (_peak(lambda: generate_one_shard(ChannelGenerator(), shards[n], 0, tmp_path / str(n), progress=False)) for n in (6, 24))
    assert large < 1.2 * small, (small, large)


def test_annotation_peak_memory_does_not_grow_with_the_shard(shards, tmp_path):
    def annotate(n: int) -> None:
        out = annotate_shards([shards[n]], tmp_path / str(n), lambda item: CopyTheGroundTruth(item.gt_masks), prefill=lambda image: [image[..., 0] > 128], progress=False)
        assert len(out["images"]) == n

    small, large = _peak(lambda: annotate(6)), _peak(lambda: annotate(24))
    assert large < 1.2 * small, (small, large)


def test_rle_iou_matrix_against_brute_force():
    rng = np.random.default_rng(0)
    a = [rng.random((7, 9)) < 0.4 for _ in range(3)]
    b = [rng.random((7, 9)) < 0.5 for _ in range(4)] + [np.zeros((7, 9), bool)]
    expected = np.array([[(x & y).sum() / max((x | y).sum(), 1) for y in b] for x in a])
    assert np.allclose(rle_iou_matrix(encode_masks(a), encode_masks(b)), expected)
    # SA-1B records hold counts as text
    as_text = [{"size": r["size"], "counts": r["counts"].decode()} for r in encode_masks(b)]
    assert np.allclose(rle_iou_matrix(encode_masks(a), as_text), expected)
    assert rle_iou_matrix([], encode_masks(b)).shape == (0, 5)
    assert mask_utils.area(encode_masks(a)).tolist() == [int(m.sum()) for m in a]
