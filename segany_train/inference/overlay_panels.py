"""One image shown as titled panels side by side, each with its own masks: GT | model, GT | before |
after. The same object has the same colour in every panel, clicks are drawn, each mask can carry a
score, and small images are enlarged (nearest neighbour, so pixels stay pixels).

Used by the data engine's report (GT beside the automatic masks, `data_engine/report.py`) and by
segany-finetune's overlays (GT | before | after, `segany_train/finetune_folder.py`).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from segany_train.data.mask_iou import encode_masks, rle_iou_matrix
from segany_train.inference.mask_overlay import distinct_colours, render_overlay

MIN_PANEL_SIDE = 384  # pixels: smaller images are enlarged by a whole factor to at least this
TITLE_HEIGHT = 30
GAP = 8
POSITIVE, NEGATIVE = (40, 220, 40), (230, 30, 30)


@dataclass
class Panel:
    """One panel: a title, masks (HxW bool), each mask's object (its colour: the same object index is
    the same colour in every panel), optional scores written at the masks, clicks as (x, y, positive)
    in image pixels."""

    title: str
    masks: Sequence[np.ndarray]
    objects: Sequence[int] | None = None  # default: mask i is object i
    scores: Sequence[float] | None = None
    clicks: Sequence[tuple[float, float, bool]] = field(default_factory=tuple)


def match_to_objects(masks: Sequence[np.ndarray], gt_masks: Sequence[np.ndarray], *, min_iou: float = 0.5) -> list[int]:
    """Each mask's object index for a panel beside the GT: the GT mask it overlaps best when their IoU
    is at least `min_iou`, else a new index after the GT's (a colour no GT object has)."""
    if not masks:
        return []
    extra = iter(range(len(gt_masks), len(gt_masks) + len(masks)))
    if not gt_masks:
        return [next(extra) for _ in masks]
    ious = rle_iou_matrix(encode_masks(list(masks)), encode_masks(list(gt_masks)))
    return [int(row.argmax()) if row.max() >= min_iou else next(extra) for row in ious]


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _fitting_font(text: str, width: int) -> ImageFont.ImageFont:
    """The title font, smaller for a title that would not fit `width` pixels."""
    size = TITLE_HEIGHT - 12
    font = _font(size)
    while size > 8 and font.getlength(text) > width:
        size -= 1
        font = _font(size)
    return font


def _centre(mask: np.ndarray) -> tuple[float, float] | None:
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    # the mask pixel nearest the centroid: the centroid of a ring or a crescent lies outside it
    k = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
    return float(xs[k]) + 0.5, float(ys[k]) + 0.5


def render_panels(image: np.ndarray, panels: Sequence[Panel], *, min_side: int = MIN_PANEL_SIDE) -> np.ndarray:
    """The panels side by side over the HxWx3 uint8 image, as one RGB uint8 picture."""
    height, width = image.shape[:2]
    scale = max(1, math.ceil(min_side / min(height, width)))
    objects = [list(p.objects) if p.objects is not None else list(range(len(p.masks))) for p in panels]
    palette = distinct_colours(max((max(o) + 1 for o in objects if o), default=0))
    score_font = _font(max(11, 4 * scale + 8))
    pictures = []
    for panel, indices in zip(panels, objects):
        drawn = render_overlay(image, panel.masks, colours=palette[indices] if indices else None)
        picture = Image.fromarray(drawn).resize((width * scale, height * scale), Image.NEAREST)
        draw = ImageDraw.Draw(picture)
        radius = max(4, 2 * scale)  # a click's
        for k, score in enumerate(panel.scores or []):
            centre = _centre(np.asarray(panel.masks[k], dtype=bool))
            if centre is not None:
                text = f"{score:.2f}"
                # below the mask's centre pixel (where a click often is), kept whole inside the panel
                left, top, right, bottom = draw.textbbox((0, 0), text, font=score_font, stroke_width=2, anchor="mt")
                x = min(max(centre[0] * scale, -left), picture.width - right)
                y = min(max(centre[1] * scale + radius + 2, -top), picture.height - bottom)
                draw.text((x, y), text, font=score_font, fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0), anchor="mt")
        for x, y, positive in panel.clicks:
            cx, cy = x * scale, y * scale
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=POSITIVE if positive else NEGATIVE, outline=(255, 255, 255), width=2)
        framed = Image.new("RGB", (picture.width, picture.height + TITLE_HEIGHT), (255, 255, 255))
        framed.paste(picture, (0, TITLE_HEIGHT))
        ImageDraw.Draw(framed).text((4, TITLE_HEIGHT // 2), panel.title, font=_fitting_font(panel.title, picture.width - 8), fill=(0, 0, 0), anchor="lm")
        pictures.append(np.asarray(framed))
    gap = np.full((pictures[0].shape[0], GAP, 3), 255, np.uint8)
    return np.concatenate([part for picture in pictures for part in (picture, gap)][:-1], axis=1)
