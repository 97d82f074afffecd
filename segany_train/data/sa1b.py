"""The SA-1B sample schema, in one place: what a shard holds and how a record is checked.

A shard is a tar of `sa_<id>.jpg` + `sa_<id>.json` pairs, which is exactly a webdataset shard (key
`sa_<id>`, fields `jpg` and `json`). The JSON is
`{"image": {image_id, width, height, file_name}, "annotations": [{id, segmentation: COCO RLE
{size: [h, w], counts: str}, bbox: [x, y, w, h], area, predicted_iou, stability_score,
crop_box: [x, y, w, h], point_coords: [[x, y]]}]}`.
`encode_sample` (writer side) and `decode_sample` (reader side) mirror each other.
"""

import json
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from segany_train.data.rle import parse_rles, pycocotools_rle

IMAGE_FIELD = "jpg"
RECORD_FIELD = "json"
SHARD_SUFFIX = ".tar"


class BadSample(ValueError):
    """A sample that cannot be used; the message says why (the reader counts and skips these)."""


def annotation_from_mask(mask: np.ndarray, *, annotation_id: int, **metadata: Any) -> dict[str, Any]:
    """An SA-1B annotation for an HxW boolean mask; `metadata` as for `annotation_from_rle`."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return annotation_from_rle(rle, annotation_id=annotation_id, **metadata)


def annotation_from_rle(
    rle: dict[str, Any],
    *,
    annotation_id: int,
    predicted_iou: float | None = None,
    stability_score: float | None = None,
    crop_box: list[float] | None = None,
    point_coords: list[list[float]] | None = None,
) -> dict[str, Any]:
    """An SA-1B annotation for a compressed COCO RLE; bbox and area come from the RLE itself."""
    coco_rle = pycocotools_rle(rle)  # bytes counts, what pycocotools' area and toBbox take
    h, w = coco_rle["size"]
    return {
        "id": int(annotation_id),
        "segmentation": {"size": [h, w], "counts": coco_rle["counts"].decode("ascii")},  # SA-1B: text
        "bbox": [float(v) for v in mask_utils.toBbox(coco_rle)],
        "area": int(mask_utils.area(coco_rle)),
        "predicted_iou": None if predicted_iou is None else float(predicted_iou),
        "stability_score": None if stability_score is None else float(stability_score),
        "crop_box": [0.0, 0.0, float(w), float(h)] if crop_box is None else [float(v) for v in crop_box],
        "point_coords": [] if point_coords is None else [[float(x), float(y)] for x, y in point_coords],
    }


def make_record(
    *, image_id: int, width: int, height: int, file_name: str, annotations: list[dict[str, Any]]
) -> dict[str, Any]:
    """The JSON record of one image."""
    return {
        "image": {"image_id": int(image_id), "width": int(width), "height": int(height), "file_name": file_name},
        "annotations": annotations,
    }


def sample_key(image_id: int) -> str:
    """The SA-1B key of an image id (webdataset keys must not contain dots)."""
    return f"sa_{int(image_id)}"


def validate_record(record: Any) -> None:
    """Raises BadSample naming the first problem of an SA-1B JSON record."""
    if not isinstance(record, dict) or not isinstance(record.get("image"), dict):
        raise BadSample("record has no 'image' object")
    image = record["image"]
    for field in ("width", "height"):
        if not isinstance(image.get(field), int) or image[field] <= 0:
            raise BadSample(f"image.{field} must be a positive integer, got {image.get(field)!r}")
    annotations = record.get("annotations")
    if not isinstance(annotations, list):
        raise BadSample("record has no 'annotations' list")
    for i, ann in enumerate(annotations):
        seg = ann.get("segmentation") if isinstance(ann, dict) else None
        if not isinstance(seg, dict) or not isinstance(seg.get("counts"), str) or not isinstance(seg.get("size"), list):
            raise BadSample(f"annotation {i}: segmentation must be a COCO RLE with string counts and a size")
        if [int(v) for v in seg["size"]] != [image["height"], image["width"]]:
            raise BadSample(
                f"annotation {i}: RLE size {seg['size']} does not match the image ({image['height']}x{image['width']})"
            )


def check_masks(record: dict[str, Any]) -> None:
    """BadSample unless every mask of a valid record (`validate_record`) is a well-formed RLE, its runs
    covering the image exactly, and every `area` present is a finite number. For consumers that hand
    masks to pycocotools whole (COCOeval, COCO export), which may loop or mislead on such input."""
    rles = [ann["segmentation"] for ann in record["annotations"]]
    try:
        if rles:
            parse_rles(rles)
    except (ValueError, KeyError, TypeError) as error:
        raise BadSample(f"malformed RLE ({error})") from None
    for i, ann in enumerate(record["annotations"]):
        area = ann.get("area", 0)
        if isinstance(area, bool) or not isinstance(area, (int, float)) or not np.isfinite(area) or area < 0:
            raise BadSample(f"annotation {i}: malformed area {area!r}")


def encode_sample(key: str, jpeg: bytes, record: dict[str, Any]) -> dict[str, Any]:
    """A webdataset sample (as TarWriter takes it) for one image."""
    if "." in key:
        raise ValueError(f"sample key {key!r} must not contain dots (webdataset splits fields at dots)")
    validate_record(record)
    return {"__key__": key, IMAGE_FIELD: jpeg, RECORD_FIELD: json.dumps(record, separators=(",", ":")).encode("utf-8")}


def decode_sample(sample: dict[str, Any]) -> tuple[str, bytes, dict[str, Any]]:
    """(key, JPEG bytes, record) of a raw webdataset sample; BadSample if a field is missing or bad."""
    key = sample.get("__key__", "?")
    if IMAGE_FIELD not in sample or RECORD_FIELD not in sample:
        present = sorted(k for k in sample if not k.startswith("__"))
        raise BadSample(f"needs fields {IMAGE_FIELD} and {RECORD_FIELD}, has {present}")
    try:
        record = json.loads(sample[RECORD_FIELD])
    except (ValueError, UnicodeDecodeError) as error:
        raise BadSample(f"unreadable JSON: {error}") from None
    validate_record(record)
    return key, sample[IMAGE_FIELD], record
