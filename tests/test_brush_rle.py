"""Label Studio's brush RLE: the format's bits written out by hand, round trips, the SA-1B RLE through
pycocotools, and one-line errors. (Interoperability with Label Studio's own encoder and decoder is
checked in tests/test_label_studio.py, inside Label Studio's venv.)"""

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from segany_train.data.brush_rle import brush_rle_to_mask, mask_to_brush_rle
from segany_train.data.sa1b import annotation_from_mask


def _bytes(bits: str) -> list[int]:
    bits += "0" * (-len(bits) % 8)
    return [int(bits[k : k + 8], 2) for k in range(0, len(bits), 8)]


def test_a_two_pixel_mask_is_the_bits_the_format_describes():
    # header: 8 values, word size 8 (stored 7), run field sizes 3, 4, 8, 16 (stored minus one);
    # then two repeat tokens: flag 1, field 0 (3 bits), length 4 (stored 3), the byte
    header = f"{8:032b}" + f"{7:05b}" + "0010" + "0011" + "0111" + "1111"
    expected = _bytes(header + "1" + "00" + "011" + "11111111" + "1" + "00" + "011" + "00000000")
    mask = np.array([[True, False]])
    assert mask_to_brush_rle(mask) == expected
    assert np.array_equal(brush_rle_to_mask(expected, height=1, width=2), mask)
    # literal tokens (flag 0), which Label Studio's own encoder writes for changing values
    literal = _bytes(header + "0" + "01" + "0111" + "11111111" * 4 + "00000000" * 4)
    assert np.array_equal(brush_rle_to_mask(literal, height=1, width=2), mask)


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (96, 128), (300, 250)])
def test_masks_round_trip_and_match_pycocotools(shape):
    rng = np.random.default_rng(sum(shape))
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    masks = [
        np.zeros(shape, bool),
        np.ones(shape, bool),
        rng.random(shape) > 0.5,  # a run per pixel
        (yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (min(h, w) / 3) ** 2,
    ]
    for mask in masks:
        back = brush_rle_to_mask(mask_to_brush_rle(mask), height=h, width=w)
        assert np.array_equal(back, mask)
        # to the SA-1B/COCO RLE and back through pycocotools
        rle = annotation_from_mask(back, annotation_id=0)["segmentation"]
        assert rle["size"] == [h, w]
        assert np.array_equal(mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool), mask)


def test_runs_longer_than_the_widest_field_are_split():
    mask = np.ones((300, 300), bool)  # 360,000 values: more than 2**16 in one run
    rle = mask_to_brush_rle(mask)
    assert np.array_equal(brush_rle_to_mask(rle, height=300, width=300), mask)


def test_bad_brush_rles_are_refused_in_one_line():
    good = mask_to_brush_rle(np.eye(4, dtype=bool))
    with pytest.raises(ValueError, match="holds 64 values, a 5x4 RGBA image has 80"):
        brush_rle_to_mask(good, height=5, width=4)
    with pytest.raises(ValueError, match="ends in the middle of a token"):
        brush_rle_to_mask(good[:-3], height=4, width=4)
    with pytest.raises(ValueError, match="needs a 53-bit header"):
        brush_rle_to_mask([1, 2, 3], height=4, width=4)
    with pytest.raises(ValueError, match="byte values"):
        brush_rle_to_mask([300] * 10, height=4, width=4)
    with pytest.raises(ValueError, match="byte values"):
        brush_rle_to_mask(["x"], height=4, width=4)
    with pytest.raises(ValueError, match="HxW bool"):
        mask_to_brush_rle(np.zeros((4, 4), np.uint8))
