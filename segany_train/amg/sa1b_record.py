"""The SA-1B record of one image from the automatic mask generator's records."""

from collections.abc import Sequence
from typing import Any

from segany_train.data.rle import pycocotools_rle
from segany_train.data.sa1b import annotation_from_rle, make_record


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
            pycocotools_rle(record["segmentation"], size=(height, width)),
            annotation_id=first_annotation_id + k,
            predicted_iou=record.get("predicted_iou"),
            stability_score=record.get("stability_score"),
            crop_box=record.get("crop_box"),
            point_coords=record.get("point_coords"),
        )
        for k, record in enumerate(records)
    ]
    return make_record(image_id=image_id, width=width, height=height, file_name=file_name, annotations=annotations)
