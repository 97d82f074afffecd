"""One SA-1B record -> one SAM sample: the resized, padded image the model takes and masks sampled at
the mask resolution (the loss's in training, the click protocol's in evaluation).

Only what is used gets decoded: masks are chosen from the annotations' metadata (area) before any
pixel is touched, each chosen mask is sampled straight at the loss resolution (`rle.decode_rle_at`),
and the JPEG is decoded at a reduced DCT scale when the target is smaller than the image.
Geometry (resize, large-scale-jitter crop, flip) is expressed as source index vectors, so the
image, the masks and the boxes go through exactly the same transform.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from segany_train.data.image_decoding import decode_jpeg_resized, jpeg_size
from segany_train.data.rle import decode_rles_at, nearest_indices
from segany_train.data.sa1b import BadSample
from segany_train.model.transforms import ResizeLongestSide


@dataclass(frozen=True)
class SamSampleConfig:
    """How a record becomes a sample (training and evaluation alike)."""

    image_size: int = 1024  # model input side; the image's longest side is resized to it
    mask_size: int = 256  # side of the GT masks (the decoder's low-res logits)
    max_masks: int = 64  # masks sampled per image
    max_area_fraction: float = 0.9  # masks covering more of the image are dropped
    # masks smaller than this at the loss resolution are dropped: a mask of a few low-res pixels is
    # mostly aliasing, and a corpus dominated by them teaches a small model to predict nothing
    min_mask_pixels: int = 1
    large_scale_jitter: bool = False
    jitter_scale: tuple[float, float] = (0.1, 2.0)
    horizontal_flip: bool = False
    # carry the kept masks' RLEs (`segmentations`), for measuring at the image's own resolution;
    # only without augmentation, where the masks' frame is the image's
    keep_segmentations: bool = False

    def __post_init__(self) -> None:
        if self.max_masks < 1:
            raise ValueError(f"max_masks must be at least 1 (a sample without masks trains nothing), got {self.max_masks}")
        if self.image_size % self.mask_size != 0:
            raise ValueError(f"image_size {self.image_size} must be a multiple of mask_size {self.mask_size}")
        if self.keep_segmentations and (self.large_scale_jitter or self.horizontal_flip):
            raise ValueError("keep_segmentations needs large_scale_jitter and horizontal_flip off (the RLEs are unaugmented)")


@dataclass(frozen=True)
class _Window:
    """Where the (possibly scaled) image lands in the padded square, in mask-frame pixels."""

    scaled: tuple[int, int]  # resized mask-frame size before cropping (h, w)
    offset: tuple[int, int]  # crop offset (y, x) inside the resized frame
    visible: tuple[int, int]  # cropped size (h, w), at most mask_size
    flip: bool


def _choose_window(height: int, width: int, cfg: SamSampleConfig, rng: np.random.Generator) -> _Window:
    scale = rng.uniform(*cfg.jitter_scale) if cfg.large_scale_jitter else 1.0
    mh, mw = ResizeLongestSide.get_preprocess_shape(height, width, max(1, round(cfg.mask_size * scale)))
    oy = int(rng.integers(0, mh - cfg.mask_size + 1)) if mh > cfg.mask_size else 0
    ox = int(rng.integers(0, mw - cfg.mask_size + 1)) if mw > cfg.mask_size else 0
    flip = bool(cfg.horizontal_flip and rng.random() < 0.5)
    return _Window((mh, mw), (oy, ox), (min(cfg.mask_size, mh - oy), min(cfg.mask_size, mw - ox)), flip)


def _usable_annotations(record: dict[str, Any], cfg: SamSampleConfig) -> list[dict[str, Any]]:
    height, width = record["image"]["height"], record["image"]["width"]
    limit = cfg.max_area_fraction * height * width
    return [a for a in record["annotations"] if 0 < a.get("area", 0) <= limit]


def _masks(anns: list[dict[str, Any]], record: dict[str, Any], win: _Window, cfg: SamSampleConfig) -> np.ndarray:
    """K x mask_size x mask_size bool, padded bottom/right."""
    height, width = record["image"]["height"], record["image"]["width"]
    rows = nearest_indices(height, win.scaled[0])[win.offset[0] : win.offset[0] + win.visible[0]]
    cols = nearest_indices(width, win.scaled[1])[win.offset[1] : win.offset[1] + win.visible[1]]
    if win.flip:
        cols = cols[::-1]
    out = np.zeros((len(anns), cfg.mask_size, cfg.mask_size), dtype=bool)
    try:
        out[:, : len(rows), : len(cols)] = decode_rles_at([a["segmentation"] for a in anns], rows, cols)
    except (ValueError, KeyError, TypeError) as error:
        raise BadSample(f"malformed RLE ({error})") from None
    return out


def _image(jpeg: bytes, record: dict[str, Any], win: _Window, cfg: SamSampleConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """3 x image_size x image_size uint8 (zero padded) and the size of the image inside it."""
    height, width = record["image"]["height"], record["image"]["width"]
    ratio = cfg.image_size // cfg.mask_size
    if win.scaled == ResizeLongestSide.get_preprocess_shape(height, width, cfg.mask_size) and win.offset == (0, 0):
        # no jitter: exactly the predictor's resize, so training and inference see the same pixels
        target = ResizeLongestSide.get_preprocess_shape(height, width, cfg.image_size)
    else:
        target = ResizeLongestSide.get_preprocess_shape(height, width, max(win.scaled) * ratio)
    pixels = decode_jpeg_resized(jpeg, *target)
    y0, x0 = win.offset[0] * ratio, win.offset[1] * ratio
    crop = pixels[y0 : y0 + cfg.image_size, x0 : x0 + cfg.image_size]
    if win.flip:
        crop = crop[:, ::-1]
    out = np.zeros((3, cfg.image_size, cfg.image_size), dtype=np.uint8)
    out[:, : crop.shape[0], : crop.shape[1]] = crop.transpose(2, 0, 1)
    return out, (crop.shape[0], crop.shape[1])


def _boxes(masks: np.ndarray, ratio: int) -> np.ndarray:
    """XYXY boxes in input-frame pixels of K non-empty mask-frame masks."""
    rows, cols = masks.any(axis=2), masks.any(axis=1)  # K x M each
    m = masks.shape[1]
    y0, y1 = rows.argmax(1), m - rows[:, ::-1].argmax(1)
    x0, x1 = cols.argmax(1), m - cols[:, ::-1].argmax(1)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.float32) * ratio


def valid_region(valid_size: torch.Tensor, mask_size: int) -> torch.Tensor:
    """Bx2 (h, w) valid sizes (`build_sam_sample`'s `valid_size`) -> BxMxM bool: where each image lies
    in its mask frame, the rest being padding. Training and evaluation both take it from the sample,
    where the GT masks were placed, rather than recomputing it from another size and rounding."""
    coords = torch.arange(mask_size, device=valid_size.device)
    return (coords[None, :, None] < valid_size[:, 0, None, None]) & (coords[None, None, :] < valid_size[:, 1, None, None])


def build_sam_sample(
    key: str, jpeg: bytes, record: dict[str, Any], cfg: SamSampleConfig, rng: np.random.Generator
) -> dict[str, Any]:
    """A sample, or BadSample naming what makes the record unusable.

    Returns key, image (3xSxS uint8), masks (KxMxM bool), boxes (Kx4 float, XYXY input pixels),
    annotation_ids (K), input_size (h, w of the image inside the padding), valid_size (h, w of the image
    in the mask frame: the masks' rows and columns that are not padding), original_size (H, W),
    num_annotations (the record's annotation count, so a caller can count the masks left out), and
    with `cfg.keep_segmentations` segmentations (K RLE dicts of the kept masks, in order).
    """
    height, width = record["image"]["height"], record["image"]["width"]
    actual = jpeg_size(jpeg)
    if actual != (height, width):
        raise BadSample(f"JSON says {height}x{width} but the image is {actual[0]}x{actual[1]}")
    anns = _usable_annotations(record, cfg)
    if not anns:
        raise BadSample("no usable mask (none, empty, or all covering > max_area_fraction)")
    if len(anns) > cfg.max_masks:
        anns = [anns[i] for i in sorted(rng.choice(len(anns), cfg.max_masks, replace=False))]
    win = _choose_window(height, width, cfg, rng)
    masks = _masks(anns, record, win, cfg)
    # a mask can shrink below the minimum at low resolution, or be cropped away
    visible = masks.sum(axis=(1, 2)) >= max(cfg.min_mask_pixels, 1)
    if not visible.any():
        raise BadSample(f"no mask has {max(cfg.min_mask_pixels, 1)}+ pixels at the training resolution")
    masks = masks[visible]
    image, input_size = _image(jpeg, record, win, cfg)
    sample = {
        "key": key,
        "image": torch.from_numpy(image),
        "masks": torch.from_numpy(masks),
        "boxes": torch.from_numpy(_boxes(masks, cfg.image_size // cfg.mask_size)),
        "annotation_ids": torch.tensor([a["id"] for a, v in zip(anns, visible) if v], dtype=torch.long),
        "input_size": input_size,
        "valid_size": win.visible,
        "original_size": (height, width),
        "num_annotations": len(record["annotations"]),
    }
    if cfg.keep_segmentations:
        sample["segmentations"] = [a["segmentation"] for a, v in zip(anns, visible) if v]
    return sample
