"""High-bit-depth images are scaled from their own range, not clipped to white."""

from io import BytesIO

import numpy as np
import pytest
from PIL import Image

from segany_train.data import coco
from segany_train.data.image_loading import load_image
from segany_train.data.sa1b import BadSample
from segany_train.inference import amg_cli


def encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_a_16_bit_image_keeps_its_contrast(fmt):
    values = np.tile(np.linspace(1000, 4000, 90), (60, 1)).astype(np.uint16)  # 12 bits used, as in medical images
    loaded = load_image(encoded(values, fmt))
    assert loaded.pixels.shape == (60, 90, 3) and loaded.pixels.dtype == np.uint8
    assert loaded.pixels[0, 0, 0] == 0 and loaded.pixels[0, -1, 0] == 255
    assert 100 < loaded.pixels.mean() < 155


def test_a_float_tiff_is_scaled():
    values = np.tile(np.linspace(-1.0, 1.0, 50, dtype=np.float32), (40, 1))
    assert load_image(encoded(values, "TIFF")).pixels[0, [0, -1], 1].tolist() == [0, 255]


def test_an_8_bit_image_is_unchanged_and_garbage_is_refused():
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3)).astype(np.uint8)
    assert np.array_equal(load_image(encoded(rgb, "PNG")).pixels, rgb)
    with pytest.raises(BadSample):
        load_image(b"not an image")


def test_segany_amg_and_coco_read_a_16_bit_png_with_its_contrast(tmp_path):
    values = np.tile(np.linspace(1000, 4000, 90), (60, 1)).astype(np.uint16)
    path = tmp_path / "scan.png"
    path.write_bytes(encoded(values, "PNG"))
    item = amg_cli.InputImage("scan", 1, "scan.png", path=path)
    amg_cli.load_pixels(item)
    assert 100 < item.pixels.mean() < 155 and item.jpeg is None
    jpeg = coco._read_jpeg(path, 90, 60)
    assert 100 < np.asarray(Image.open(BytesIO(jpeg))).mean() < 155
