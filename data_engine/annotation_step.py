"""Stages 1 and 2: annotators label a chunk of the pool with the current model; the result is shards.

Each input shard becomes one output shard of the annotated masks plus a statistics file, the latter
written last to mark it done (`shard_outputs.py`): a run killed midway redoes only the shard it was
in, never duplicating or losing an image. A shard is streamed image by image, and masks are compared
with the GT as RLEs.
"""

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_engine.annotator import Annotator, ImageAnnotation
from data_engine.corpus import LabelledImage, read_labelled_images
from data_engine.shard_outputs import OutputImage, resume_outputs
from segany_train.data.mask_iou import encode_masks, rle_iou_matrix
from segany_train.data.sa1b import annotation_from_mask, make_record

# (image, GT masks) -> the annotator for that image; the GT is seen by the simulated annotator only
AnnotatorFactory = Callable[[LabelledImage], Annotator]
# image -> the masks shown pre-filled (stage 2), with their predicted IoUs
Prefill = Callable[[np.ndarray], list[np.ndarray]]
ANNOTATED_PREFIX = "annotated-"  # input shard i becomes annotated-<i>.tar and annotated-<i>.stats.json


@dataclass
class ImageStats:
    """What happened on one image."""

    key: str
    masks: int  # masks the image ends with: accepted pre-filled + new
    new_masks: int
    prefilled: int  # masks shown pre-filled
    prefilled_accepted: int
    prefilled_correct: int  # pre-filled masks with IoU > 0.75 to some GT object (precision)
    gt_objects: int
    seconds: float
    clicks: int
    brush_masks: int  # new masks finished with the brush/eraser
    moved_on: bool
    mask_seconds: list[float]
    mask_clicks: list[int]
    mask_ious: list[float]


def best_iou_to_gt(mask: np.ndarray, gt_masks: list[np.ndarray]) -> float:
    """The IoU of an HxW bool mask with the GT mask it overlaps best (0.0 without GT)."""
    if not gt_masks:
        return 0.0
    return float(rle_iou_matrix(encode_masks([mask]), encode_masks(gt_masks)).max())


def _image_stats(item: LabelledImage, prefilled: list[np.ndarray], result: ImageAnnotation) -> ImageStats:
    # the record holds the GT as RLEs already: only the pre-filled masks are encoded
    gt_rles = [ann["segmentation"] for ann in item.record["annotations"]]
    prefilled_ious = rle_iou_matrix(encode_masks(prefilled), gt_rles)
    return ImageStats(
        key=item.key,
        masks=result.num_accepted_prefilled + len(result.masks),
        new_masks=len(result.masks),
        prefilled=len(prefilled),
        prefilled_accepted=result.num_accepted_prefilled,
        prefilled_correct=int((prefilled_ious.max(axis=1) > 0.75).sum()) if gt_rles else 0,
        gt_objects=len(item.gt_masks),
        seconds=result.seconds,
        clicks=sum(r.num_clicks for r in result.records),
        brush_masks=sum(r.brush_used for r in result.records),
        moved_on=result.moved_on,
        mask_seconds=[r.seconds for r in result.records],
        mask_clicks=[r.num_clicks for r in result.records],
        mask_ious=[r.iou_to_gt for r in result.records],
    )


def _annotated_record(item: LabelledImage, masks: list[np.ndarray]) -> dict[str, Any]:
    info = item.record["image"]
    return make_record(
        image_id=info["image_id"],
        width=info["width"],
        height=info["height"],
        file_name=info.get("file_name", f"{item.key}.jpg"),
        annotations=[annotation_from_mask(m, annotation_id=k) for k, m in enumerate(masks)],
    )


def annotate_shards(
    input_shards: list[str],
    out_dir: str | Path,
    annotator_for: AnnotatorFactory,
    *,
    prefill: Prefill | None = None,
    first_index: int = 0,
    progress: bool = True,
    description: str = "annotate",
) -> dict[str, Any]:
    """Annotates every image of `input_shards`; input shard k becomes `annotated-<first_index+k>.tar`.

    Returns {"shards": [output shard paths], "images": [ImageStats as dicts]}; images the annotator
    gave no mask are counted in the statistics but not written to a shard.
    """

    def images_of(position: int) -> Iterator[OutputImage]:
        url = input_shards[position]
        for item in tqdm(read_labelled_images([url]), desc=f"{description} {Path(url).name}", disable=not progress):
            shown = prefill(item.image) if prefill is not None else []
            result = annotator_for(item).annotate(item.image, shown)
            kept = [shown[i] for i in result.accepted_prefilled] + result.masks
            yield asdict(_image_stats(item, shown, result)), (item.key, item.jpeg, _annotated_record(item, kept)) if kept else None

    return resume_outputs(out_dir, ANNOTATED_PREFIX, len(input_shards), images_of, first_index=first_index)


def _known(value: float | None) -> float:
    """A per-image figure read back from a stats file: unknown ones (NaN) are written as null."""
    return math.nan if value is None else value


def summarize_images(images: list[dict[str, Any]]) -> dict[str, float]:
    """Per-round statistics from per-image ones: seconds and clicks per new mask, masks per image,
    brush rate, pre-filled masks per image and their precision (NaN where a figure is unknown)."""
    n_images = max(len(images), 1)
    new = sum(i["new_masks"] for i in images)
    prefilled = sum(i["prefilled"] for i in images)
    return {
        "images": len(images),
        "masks": sum(i["masks"] for i in images),
        "masks_per_image": sum(i["masks"] for i in images) / n_images,
        "new_masks_per_image": new / n_images,
        "seconds_per_mask": sum(_known(i["seconds"]) for i in images) / max(new, 1),
        "clicks_per_mask": sum(_known(i["clicks"]) for i in images) / max(new, 1),
        "brush_rate": sum(i["brush_masks"] for i in images) / max(new, 1),
        "mean_mask_iou": float(np.mean([_known(v) for i in images for v in i["mask_ious"]])) if new else 0.0,
        "moved_on_rate": sum(i["moved_on"] for i in images) / n_images,
        "prefilled_per_image": prefilled / n_images,
        "prefilled_accepted_per_image": sum(i["prefilled_accepted"] for i in images) / n_images,
        "prefilled_precision": sum(i["prefilled_correct"] for i in images) / prefilled if prefilled else float("nan"),
        "gt_objects_per_image": sum(i["gt_objects"] for i in images) / n_images,
    }
