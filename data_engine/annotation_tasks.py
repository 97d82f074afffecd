"""Stages 1 and 2 with a real annotation tool: tasks go out as COCO JSON, the tool's result comes back.

A round's chunk of the pool is exported as a task directory that CVAT, Label Studio and most other
tools import as a COCO instances dataset:

    <task_dir>/images/<key>.jpg    the images, byte for byte as in the shards
    <task_dir>/tasks.json          COCO: the images, one "object" category, and in stage 2 the
                                   pre-filled masks as RLE annotations to accept, fix or delete
    <task_dir>/task_index.json     which input shard each image came from, and its SA-1B image id

The annotators' work, exported from the tool as COCO JSON (polygons or RLE), is put at
`<task_dir>/annotations.json` and imported: one `annotated-<index>.tar` shard per input shard, the
same shards and statistics files the simulated annotators write (`annotation_step.py`), so the rest
of the engine does not know who annotated. Images are matched by file name, because tools renumber
image ids; images the result lacks and annotations that cannot be read are counted, never dropped
silently. Without a clock in COCO, seconds and clicks per mask are not known (recorded as NaN),
unless the tool's exporter gives an image's seconds as `annotation_seconds` (Label Studio's
`lead_time`, `label_studio_tasks.py`): then the image's new masks share them evenly.
"""

import json
import math
import warnings
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from data_engine.annotation_step import ANNOTATED_PREFIX, ImageStats, Prefill, best_iou_to_gt
from data_engine.corpus import gt_masks_of, read_labelled_images
from data_engine.shard_outputs import OutputImage, resume_outputs
from segany_train.data.coco import CocoConversionWarning, CocoImageConverter, images_with_annotations
from segany_train.data.rle import pycocotools_rle
from segany_train.data.sa1b import annotation_from_mask, make_record
from segany_train.atomic_files import write_json_atomically

TASKS_FILE = "tasks.json"
INDEX_FILE = "task_index.json"
RESULT_FILE = "annotations.json"
IMAGES_DIR = "images"
CATEGORY = {"id": 1, "name": "object"}


class AwaitingAnnotation(RuntimeError):
    """The tasks are exported and the tool's result is not there yet; the message says where to put it."""


def export_tasks(input_shards: list[str], task_dir: str | Path, *, prefill: Prefill | None = None, progress: bool = True) -> Path:
    """Writes the task directory for `input_shards` (pre-filled masks from `prefill`, if given);
    returns the path of tasks.json. Written last and atomically, so an interrupted export is redone."""
    task_dir = Path(task_dir)
    tasks_path = task_dir / TASKS_FILE
    if tasks_path.exists():
        return tasks_path
    (task_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    images, annotations, index = [], [], {}
    for position, url in enumerate(input_shards):
        for item in tqdm(list(read_labelled_images([url])), desc=f"export {Path(url).name}", disable=not progress):
            info = item.record["image"]
            file_name = f"{item.key}.jpg"
            (task_dir / IMAGES_DIR / file_name).write_bytes(item.jpeg)
            image_id = len(images) + 1
            images.append({"id": image_id, "file_name": file_name, "width": info["width"], "height": info["height"]})
            index[file_name] = {"shard": position, "image_id": info["image_id"], "key": item.key}
            for mask in prefill(item.image) if prefill is not None else []:
                ann = annotation_from_mask(mask, annotation_id=len(annotations) + 1)
                annotations.append(
                    {
                        "id": ann["id"],
                        "image_id": image_id,
                        "category_id": CATEGORY["id"],
                        "segmentation": ann["segmentation"],
                        "area": ann["area"],
                        "bbox": ann["bbox"],
                        "iscrowd": 0,
                        "attributes": {"prefilled": True},
                    }
                )
    write_json_atomically(task_dir / INDEX_FILE, {"shards": list(input_shards), "images": index})
    write_json_atomically(tasks_path, {"images": images, "annotations": annotations, "categories": [CATEGORY]})
    return tasks_path


def import_annotations(task_dir: str | Path, out_dir: str | Path, *, first_index: int = 0) -> dict[str, Any]:
    """The tool's `annotations.json` in `task_dir` as annotated shards in `out_dir` (input shard k of
    the task becomes `annotated-<first_index+k>.tar`, with its statistics file).

    Returns {"shards": [paths], "images": [ImageStats dicts], "skipped": {reason: count}}.
    Raises AwaitingAnnotation when the result file is not there yet.
    """
    task_dir, out_dir = Path(task_dir), Path(out_dir)
    result_path = task_dir / RESULT_FILE
    if not result_path.exists():
        raise AwaitingAnnotation(
            f"the annotation tasks are in {task_dir} ({TASKS_FILE} with the images in {IMAGES_DIR}/); "
            f"import them into the annotation tool, export the result as COCO JSON to {result_path}, "
            "then run the same command again"
        )
    try:
        result = json.loads(result_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{result_path} is not valid JSON: {error}") from None
    if not isinstance(result, dict) or not isinstance(result.get("images"), list):
        raise ValueError(f"{result_path} is not a COCO instances file (it needs an 'images' list)")
    task_index = json.loads((task_dir / INDEX_FILE).read_text())
    exported = json.loads((task_dir / TASKS_FILE).read_text())
    prefilled_per_file = exported_prefilled_masks(exported)
    gt_per_key = {item.key: item.gt_masks for item in read_labelled_images(task_index["shards"])}

    converter = CocoImageConverter(task_dir / IMAGES_DIR, skip_crowd=True)
    # input shard position -> (key, file name, (JPEG, record) or None when the image came back empty)
    by_shard: dict[int, list[tuple[str, str, tuple[bytes, dict[str, Any]] | None]]] = defaultdict(list)
    returned = set()
    seconds_per_file: dict[str, float] = {}
    for image, anns in images_with_annotations(result, converter):
        entry = task_index["images"].get(image.get("file_name"))
        if entry is None:
            converter.skip("images_not_in_task", f"image {image.get('file_name')}", "not one of the exported images", 1)
            continue
        returned.add(image["file_name"])
        seconds_per_file[image["file_name"]] = image.get("annotation_seconds", math.nan)
        # the tool's ids mean nothing to the corpus: the SA-1B image id and key come from the task
        sample = converter.convert({**image, "id": entry["image_id"]}, anns)
        by_shard[entry["shard"]].append((entry["key"], image["file_name"], sample[1:] if sample else None))
    missing = sorted(set(task_index["images"]) - returned)
    if missing:
        converter.skipped["images_missing_from_result"] += len(missing)
        warnings.warn(f"{len(missing)} exported image(s) are not in {result_path}, e.g. {missing[0]}", CocoConversionWarning, stacklevel=2)

    def images_of(position: int) -> Iterator[OutputImage]:
        for key, file_name, sample in by_shard.get(position, []):
            record = _renumbered(sample[1]) if sample is not None else None
            masks = gt_masks_of(record) if record is not None else []
            stats = _imported_stats(key, masks, prefilled_per_file.get(file_name, []), gt_per_key.get(key, []), seconds_per_file[file_name])
            yield stats, (key, sample[0], record) if record is not None else None

    out = resume_outputs(out_dir, ANNOTATED_PREFIX, len(task_index["shards"]), images_of, first_index=first_index)
    return {**out, "skipped": dict(converter.skipped)}


def _renumbered(record: dict[str, Any]) -> dict[str, Any]:
    """The record with annotation ids 0..N-1 within the image, as the simulated annotators write them."""
    annotations = [{**ann, "id": k} for k, ann in enumerate(record["annotations"])]
    info = record["image"]
    return make_record(
        image_id=info["image_id"], width=info["width"], height=info["height"], file_name=info["file_name"], annotations=annotations
    )


def exported_prefilled_masks(exported: dict[str, Any]) -> dict[str, list[np.ndarray]]:
    """file name -> the pre-filled masks exported with it (to tell accepted ones from new ones)."""
    names = {image["id"]: image["file_name"] for image in exported["images"]}
    masks: dict[str, list[np.ndarray]] = defaultdict(list)
    for ann in exported["annotations"]:
        masks[names[ann["image_id"]]].append(mask_utils.decode(pycocotools_rle(ann["segmentation"])).astype(bool))
    return masks


def _imported_stats(key: str, masks: list[np.ndarray], prefilled: list[np.ndarray], gt_masks: list[np.ndarray], seconds: float) -> dict[str, Any]:
    """ImageStats of one imported image with its returned `masks`: a mask identical to a pre-filled
    one (IoU > 0.99) counts as accepted; clicks are unknown (NaN), `seconds` are the tool's time on the
    image (NaN without one); IoU to GT only where the pool has GT."""
    accepted = sum(best_iou_to_gt(m, prefilled) > 0.99 for m in masks) if prefilled else 0
    new = [m for m in masks if not prefilled or best_iou_to_gt(m, prefilled) <= 0.99]
    stats = ImageStats(
        key=key,
        masks=len(masks),
        new_masks=len(new),
        prefilled=len(prefilled),
        prefilled_accepted=accepted,
        prefilled_correct=sum(best_iou_to_gt(m, gt_masks) > 0.75 for m in prefilled),
        gt_objects=len(gt_masks),
        seconds=seconds,
        clicks=math.nan,
        brush_masks=0,
        moved_on=False,
        mask_seconds=[seconds / len(new)] * len(new) if new else [],
        mask_clicks=[math.nan] * len(new),
        mask_ious=[best_iou_to_gt(m, gt_masks) if gt_masks else math.nan for m in new],
    )
    return asdict(stats)
