"""COCO mask AP/AR of automatic masks against SA-1B ground truth, class-agnostic, via pycocotools.

Every GT mask and every predicted mask gets category 1 ("object"); a prediction's score is its
predicted IoU. The numbers are `pycocotools.cocoeval.COCOeval(iouType="segm")`'s own twelve stats.
"""

import contextlib
import io
from collections.abc import Sequence
from typing import Any

from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segany_train.data.rle import pycocotools_rle

OBJECT_CATEGORY = 1
# detections per image counted (COCOeval's maxDets): AP and the size-range stats count the last
# (largest) many best-scored masks per image, AR@k the k best. COCO's (1, 10, 100) cuts SA-1B-like
# images short: about 100 GT masks each, and a generator keeps more (150 perfect masks of a
# 150-mask image scored AP 0.663 under 100)
DEFAULT_MAX_DETS = (1, 100, 1000)


def stat_names(max_dets: tuple[int, int, int] = DEFAULT_MAX_DETS) -> tuple[str, ...]:
    """COCOeval.stats' names in order, with AR@k for the k of `max_dets`."""
    return (
        "AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
        *(f"AR@{k}" for k in max_dets), "AR_small", "AR_medium", "AR_large",
    )  # fmt: skip


STAT_NAMES = stat_names()


def check_max_dets(max_dets: Sequence[int]) -> None:
    """ValueError unless `max_dets` is three ascending positive counts."""
    if len(max_dets) != 3 or list(max_dets) != sorted(max_dets) or min(max_dets) < 1:
        raise ValueError(f"max_dets must be three ascending positive counts, got {tuple(max_dets)}")


def _image_entries(gt_records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    # image ids are positions in the list: records from different sources may repeat an image_id
    return [
        {"id": i, "height": r["image"]["height"], "width": r["image"]["width"]} for i, r in enumerate(gt_records)
    ]


def _coco(images: list[dict[str, Any]], annotations: list[dict[str, Any]]) -> COCO:
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": [{"id": OBJECT_CATEGORY, "name": "object"}]}
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()
    return coco


def _annotation(rle: dict[str, Any], ann_id: int, image_id: int, **extra: Any) -> dict[str, Any]:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": OBJECT_CATEGORY,
        "segmentation": rle,
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": 0,
        **extra,
    }


def coco_mask_ap(
    gt_records: Sequence[dict[str, Any]],
    predictions: Sequence[Sequence[dict[str, Any]]],
    *,
    max_dets: tuple[int, int, int] = DEFAULT_MAX_DETS,
) -> dict[str, float]:
    """The twelve COCO segm stats, by name (`stat_names(max_dets)`), of predicted masks against GT.

    max_dets: COCOeval's maxDets, ascending; AP counts the max_dets[2] best-scored masks per image
    (see DEFAULT_MAX_DETS).

    gt_records: one SA-1B record per image ({"image": {height, width, ...}, "annotations": [...]}).
    predictions[i]: image i's masks, each a dict with "segmentation" (see `segany_train.data.rle.pycocotools_rle`) and
    "predicted_iou" (the score), as `SamAutomaticMaskGenerator.generate` returns them. A stat with
    no GT in its range is -1, as COCOeval reports it.
    """
    check_max_dets(max_dets)
    if len(gt_records) != len(predictions):
        raise ValueError(f"{len(gt_records)} GT records but predictions for {len(predictions)} images")
    images = _image_entries(gt_records)
    gt_anns, dt_anns = [], []
    for i, (record, masks) in enumerate(zip(gt_records, predictions)):
        size = [record["image"]["height"], record["image"]["width"]]
        for ann in record["annotations"]:
            gt_anns.append(_annotation(pycocotools_rle(ann["segmentation"]), len(gt_anns) + 1, i))
        for mask in masks:
            rle = pycocotools_rle(mask["segmentation"])
            if list(rle["size"]) != size:
                raise ValueError(f"image {i}: a predicted mask is {rle['size']} but the image is {size}")
            dt_anns.append(_annotation(rle, len(dt_anns) + 1, i, score=float(mask["predicted_iou"])))
    evaluator = COCOeval(_coco(images, gt_anns), _coco(images, dt_anns), iouType="segm")
    evaluator.params.maxDets = [int(k) for k in max_dets]
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its tables
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [float(v) for v in evaluator.stats]
    # COCOeval's summary computes the first AP at maxDets=100 whatever params.maxDets says (-1 when
    # 100 is not among them): all areas, all IoU thresholds, at max_dets[2] instead
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # T x R x K, all areas, the largest maxDets
    valid = precision[precision > -1]
    stats[0] = float(valid.mean()) if valid.size else -1.0
    return dict(zip(stat_names(tuple(max_dets)), stats))
