"""Image files (JPEG, PNG, TIFF, any bit depth) as HxWx3 uint8 RGB: the one loader for images that
are not SA-1B shard members (segany-amg's files, segany-coco's and segany-convert's images).

This is the one normalisation of user images, used at training and at inference alike: converters
write these pixels into the shards (`shard_jpeg`), and segany-amg reads its files through it.
- 8-bit RGB: as is; 8-bit grey, palette and CMYK: PIL's conversion to RGB;
- RGBA / LA: the alpha channel is dropped (not composited), the colour kept;
- 16-bit, 32-bit integer and float grey: scaled linearly from the image's own darkest to its
  brightest value onto 0..255, then repeated over the three channels.
"""

from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

from segany_train.data.sa1b import BadSample

# PIL modes whose values do not fit in 8 bits: 16-bit grey PNG/TIFF, 32-bit integer, float
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


@dataclass
class LoadedImage:
    pixels: np.ndarray  # HxWx3 uint8 RGB
    format: str | None  # PIL's name of the file format (JPEG, PNG, TIFF, ...)


def load_image(data: bytes) -> LoadedImage:
    """The image in `data` as 8-bit RGB; BadSample if it cannot be decoded.

    High-bit-depth grey images are scaled from their own range (darkest to brightest value) to
    0..255: PIL's own conversion clips them to 255, so a 16-bit image became near-white.
    """
    try:
        with Image.open(BytesIO(data)) as img:
            if img.mode in HIGH_BIT_DEPTH_MODES:
                grey = _stretch_to_uint8(np.asarray(img, dtype=np.float64))
                pixels = np.repeat(grey[:, :, None], 3, axis=2)
            else:
                pixels = np.asarray(img.convert("RGB"))  # loads every pixel: a truncated file fails here
            return LoadedImage(pixels, img.format)
    except Exception as error:  # PIL raises many types for corrupt data (OSError, SyntaxError, ValueError...)
        raise BadSample(f"unreadable image: {type(error).__name__}: {error}") from None


def _stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    """HxW values mapped linearly from [min, max] to [0, 255] (a constant image maps to 0)."""
    low, high = float(values.min()), float(values.max())
    if not np.isfinite(low) or not np.isfinite(high):
        raise ValueError("the image holds non-finite values")
    scale = 255.0 / (high - low) if high > low else 0.0
    return np.rint((values - low) * scale).astype(np.uint8)


JPEG_QUALITY = 95


class ImageFileError(ValueError):
    """An image file that cannot be used; `reason` is the skip count's key ("missing_image": the
    file cannot be read, "undecodable_image": its bytes are not an image)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def load_image_file(path: Path) -> tuple[LoadedImage, bytes]:
    """The image at `path` (see `load_image`) and the file's bytes (for `shard_jpeg`); ImageFileError
    naming the file and why otherwise. The converters count their skips by its reason."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ImageFileError("missing_image", f"cannot read image {path}: {error.strerror or error}") from None
    try:
        return load_image(data), data
    except BadSample as error:
        raise ImageFileError("undecodable_image", f"cannot decode image {path}: {error}") from None


def shard_jpeg(loaded: LoadedImage, data: bytes) -> bytes:
    """The JPEG bytes a shard stores for an image loaded from `data`: a JPEG file's own bytes (no
    re-encode, no loss; it decodes to the same RGB), anything else the loaded RGB pixels at quality 95."""
    if loaded.format == "JPEG":
        return data
    out = BytesIO()
    Image.fromarray(loaded.pixels).save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()
