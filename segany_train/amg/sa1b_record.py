"""The SA-1B record of one image from the automatic mask generator's records."""

from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from segany_train.data.sa1b import annotation_from_rle, make_record


def _as_coco_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """A record's segmentation, whatever its output mode, as a compressed COCO RLE."""
    if isinstance(segmentation, np.ndarray):
        if segmentation.shape != (height, width):
            raise ValueError(f"mask of shape {segmentation.shape} does not match the {height}x{width} image")
        return mask_utils.encode(np.asfortranarray(segmentation.astype(np.uint8)))
    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        raise ValueError("segmentation must be an HxW mask or an RLE dict with 'size' and 'counts'")
    if [int(v) for v in segmentation["size"]] != [height, width]:
        raise ValueError(f"RLE size {segmentation['size']} does not match the {height}x{width} image")
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def sa1b_record_from_masks(
    image_id: int,
    width: int,
    height: int,
    file_name: str,
    records: Sequence[dict[str, Any]],
    *,
    first_annotation_id: int = 0,
) -> dict[str, Any]:
    """The SA-1B JSON record of one image from `SamAutomaticMaskGenerator.generate` records (any output mode).

    Annotation ids count up from `first_annotation_id`; bbox and area come from the RLE
    (`data.sa1b.annotation_from_rle`), predicted_iou, stability_score, crop_box and point_coords
    from the record. The result can go to `SA1BShardWriter.write` or be dumped as the image's JSON.
    """
    annotations = [
        annotation_from_rle(
            _as_coco_rle(record["segmentation"], height, width),
            annotation_id=first_annotation_id + k,
            predicted_iou=record.get("predicted_iou"),
            stability_score=record.get("stability_score"),
            crop_box=record.get("crop_box"),
            point_coords=record.get("point_coords"),
        )
        for k, record in enumerate(records)
    ]
    return make_record(image_id=image_id, width=width, height=height, file_name=file_name, annotations=annotations)
