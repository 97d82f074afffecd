"""JPEG decoding straight to a target size, using libjpeg's DCT scaling when the target is smaller,
and an SA-1B sample's image at full size, checked against its record."""

from io import BytesIO
from typing import Any

import numpy as np
from PIL import Image

from segany_train.data.sa1b import BadSample


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the JPEG header, without decoding pixels; BadSample if unreadable."""
    try:
        with Image.open(BytesIO(data)) as img:
            return img.size[1], img.size[0]
    except Exception as error:  # PIL raises many types for corrupt data
        raise BadSample(f"undecodable image: {type(error).__name__}: {error}") from None


def decode_jpeg_resized(data: bytes, height: int, width: int) -> np.ndarray:
    """The image as height x width x 3 uint8 RGB.

    `draft` lets libjpeg decode at 1/2, 1/4 or 1/8 scale (the smallest that is still at least the
    target), which skips most of the IDCT work; PIL's antialiased bilinear resize does the rest.
    """
    try:
        with Image.open(BytesIO(data)) as img:
            img.draft("RGB", (width, height))
            img = img.convert("RGB")
            if img.size != (width, height):
                img = img.resize((width, height), Image.BILINEAR)
            return np.asarray(img)
    except Exception as error:  # truncated or corrupt data surfaces as OSError, SyntaxError, ValueError...
        raise BadSample(f"undecodable image: {type(error).__name__}: {error}") from None


def decode_record_image(jpeg: bytes, record: dict[str, Any]) -> np.ndarray:
    """The full-resolution HxWx3 uint8 RGB image of an SA-1B sample; BadSample if it is undecodable
    or its size differs from the record's."""
    height, width = record["image"]["height"], record["image"]["width"]
    actual = jpeg_size(jpeg)
    if actual != (height, width):
        raise BadSample(f"JSON says {height}x{width} but the image is {actual[0]}x{actual[1]}")
    return decode_jpeg_resized(jpeg, height, width)
