"""Automatic-mask evaluation: the generator on every image of SA-1B shards, scored with COCO AP."""

from collections import Counter
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from segany_train.data.image_decoding import decode_record_image
from segany_train.data.pipeline import SkipLog, read_records
from segany_train.data.sa1b import BadSample, check_masks
from segany_train.evaluation.coco_ap import DEFAULT_MAX_DETS, coco_mask_ap
from segany_train.evaluation.periodic_report import PeriodicReport


class MaskGenerator(Protocol):
    """What the evaluation needs of `SamAutomaticMaskGenerator`: generate(HxWx3 uint8) -> records."""

    def generate(self, image: np.ndarray) -> list[dict[str, Any]]: ...


def evaluate_automatic_masks(
    generator: MaskGenerator,
    urls: list[str],
    *,
    max_images: int | None = None,
    progress: bool = True,
    max_dets: tuple[int, int, int] = DEFAULT_MAX_DETS,
    report_every: int = 0,
) -> dict[str, Any]:
    """Generates masks for every image of the shards (in order, at full resolution) and scores them.

    Returns stats (COCO's twelve, named by `coco_ap.stat_names(max_dets)`), max_dets (the detections
    per image counted), images, images_skipped ({reason: n}), gt_masks and predicted_masks (totals
    over the evaluated images). `report_every`: a line on stderr every that many images
    (`PeriodicReport`; 0: none), for runs without the progress bar.
    """
    SkipLog.take()  # forget skips of earlier readers in this process
    skipped: Counter = Counter()
    gt_records: list[dict[str, Any]] = []
    predictions: list[list[dict[str, Any]]] = []
    bar = tqdm(total=max_images, desc="automatic masks", unit="img", disable=not progress)
    report = PeriodicReport("automatic masks", report_every, total=max_images)
    records = read_records(urls) if max_images is None or max_images > 0 else iter(())
    for key, jpeg, record in records:
        try:
            check_masks(record)  # COCOeval loops forever on some malformed run lengths
            image = decode_record_image(jpeg, record)
        except BadSample as error:
            SkipLog.record("bad_sample", key, str(error))
            continue
        gt_records.append({"image": record["image"], "annotations": record["annotations"]})
        # keep only what the score needs: the generator's records may hold full-size binary masks
        masks = generator.generate(image)
        predictions.append([{"segmentation": m["segmentation"], "predicted_iou": m["predicted_iou"]} for m in masks])
        bar.update(1)
        report.update(1)
        if max_images is not None and len(gt_records) >= max_images:
            break
    bar.close()
    report.close()
    skipped.update(SkipLog.take())
    return {
        "stats": coco_mask_ap(gt_records, predictions, max_dets=max_dets),
        "max_dets": list(max_dets),
        "images": len(gt_records),
        "images_skipped": dict(skipped),
        "gt_masks": sum(len(r["annotations"]) for r in gt_records),
        "predicted_masks": sum(len(p) for p in predictions),
    }
