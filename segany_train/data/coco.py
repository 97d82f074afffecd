"""Conversion between COCO instance annotations and SA-1B-format webdataset shards.

`coco_to_shards` turns a COCO instances dataset into SA-1B shards (class-agnostic masks, for
fine-tuning on a new domain); `shards_to_coco` turns shards back into a COCO instances dict whose
annotations carry a `score`, so one export serves both as COCOeval ground truth and as results.
Command line: `python -m segany_train.data.coco {to-shards,to-coco} --help`.
"""

import argparse
import json
import math
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from pycocotools import mask as mask_utils
from tqdm import tqdm

from segany_train.data.image_loading import ImageFileError, load_image_file, shard_jpeg
from segany_train.data.pipeline import expand_shard_patterns
from segany_train.data.rle import pycocotools_rle
from segany_train.data.sa1b import (
    SHARD_SUFFIX,
    BadSample,
    annotation_from_rle,
    check_masks,
    decode_sample,
    make_record,
    sample_key,
)
from segany_train.atomic_files import write_json_atomically
from segany_train.data.shard_writer import SA1BShardWriter, read_manifest
from segany_train.os_errors import describe_os_error

CONVERSION_SETTINGS = "coco_conversion.json"  # to-shards' settings in its output, checked on resume


class CocoConversionWarning(UserWarning):
    """An image, annotation or sample was skipped; the message names it and says why."""


class _Skip(Exception):
    """Internal: the item at hand is skipped for `reason` (a report key); the message details it."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass
class ConversionReport:
    """What `coco_to_shards` wrote, and what it skipped (reason -> count of images or annotations)."""

    images_written: int = 0
    masks_written: int = 0
    images_resumed: int = 0  # already in the shards of an interrupted run with the same settings
    masks_resumed: int = 0  # the masks of those images
    shards: list[Path] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for a log: counts written and every skip reason with its count."""
        text = f"wrote {self.images_written} images, {self.masks_written} masks, {len(self.shards)} shard(s)"
        if self.images_resumed:
            text += f" after {self.images_resumed} images ({self.masks_resumed} masks) written before"
        if self.skipped:
            text += "; skipped: " + ", ".join(f"{reason}={n}" for reason, n in sorted(self.skipped.items()))
        return text


def _image_entry(image: dict[str, Any]) -> tuple[int, int, str]:
    """(width, height, file_name) of a COCO image entry."""
    try:
        return int(image["width"]), int(image["height"]), str(image["file_name"])
    except (KeyError, TypeError, ValueError) as error:
        raise _Skip("malformed_image_entry", f"bad image entry: {error!r}") from None


def _read_jpeg(path: Path, width: int, height: int) -> bytes:
    """The image as JPEG bytes: a JPEG file's own bytes (no re-encode, no loss), else RGB at quality 95."""
    try:
        loaded, data = load_image_file(path)
    except ImageFileError as error:
        raise _Skip(error.reason, str(error)) from None
    size = (loaded.pixels.shape[1], loaded.pixels.shape[0])
    if size != (width, height):  # the masks would not line up with the pixels
        raise _Skip("image_size_mismatch", f"image {path} is {size[0]}x{size[1]}, COCO says {width}x{height}")
    return shard_jpeg(loaded, data)


def _polygons_rle(polygons: list[Any], height: int, width: int) -> dict[str, Any]:
    """The union of polygons as a compressed RLE; pycocotools accepts degenerate ones, so check first."""
    for poly in polygons:
        if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
            raise _Skip("malformed_segmentation", "polygons must be lists of at least 3 (x, y) points")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in poly):
            raise _Skip("malformed_segmentation", "polygon coordinates must be finite numbers")
    if not polygons:
        raise _Skip("malformed_segmentation", "empty polygon list")
    return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))


def _dict_rle(rle: dict[str, Any], height: int, width: int) -> dict[str, Any]:
    """A COCO RLE (compressed or not) for an image of this size, compressed; checked by decoding it."""
    try:
        rle = pycocotools_rle(rle, size=(height, width))
    except ValueError as error:
        raise _Skip("malformed_segmentation", str(error)) from None
    try:
        mask_utils.decode(rle)  # pycocotools rejects runs past the image end only when decoding
    except Exception as error:
        raise _Skip("malformed_segmentation", f"undecodable RLE: {error}") from None
    return rle


def _convert_annotation(ann: dict[str, Any], height: int, width: int, skip_crowd: bool) -> dict[str, Any]:
    """The SA-1B annotation of one COCO annotation; the COCO id is kept, the category dropped."""
    if skip_crowd and ann.get("iscrowd"):
        raise _Skip("crowd", "crowd annotation")
    if not isinstance(ann.get("id"), int):
        raise _Skip("missing_annotation_id", f"annotation id must be an integer, got {ann.get('id')!r}")
    segmentation = ann.get("segmentation")
    try:
        if isinstance(segmentation, list):
            rle = _polygons_rle(segmentation, height, width)
        elif isinstance(segmentation, dict):
            rle = _dict_rle(segmentation, height, width)
        else:
            raise _Skip("malformed_segmentation", f"segmentation is a {type(segmentation).__name__}")
    except (TypeError, ValueError, OverflowError) as error:  # junk inside an RLE, e.g. non-integer counts
        raise _Skip("malformed_segmentation", f"{type(error).__name__}: {error}") from None
    converted = annotation_from_rle(rle, annotation_id=ann["id"])
    if converted["area"] == 0:
        raise _Skip("zero_area", "mask is empty")
    return converted


class CocoImageConverter:
    """COCO images with their annotations -> SA-1B samples, counting (and warning about) what it skips."""

    def __init__(self, image_dir: Path, skip_crowd: bool) -> None:
        self.image_dir = image_dir
        self.skip_crowd = skip_crowd
        self.skipped: Counter[str] = Counter()

    def skip(self, reason: str, what: str, detail: str, count: int = 1) -> None:
        self.skipped[reason] += count
        if reason != "crowd":  # crowd skipping is the chosen policy, not bad input: counted, not warned
            warnings.warn(f"skipped {what}: {detail}", CocoConversionWarning, stacklevel=3)

    def convert(self, image: dict[str, Any], anns: list[dict[str, Any]]) -> tuple[str, bytes, dict[str, Any]] | None:
        """(key, JPEG, record) of one COCO image, or None when it is skipped (counted and warned)."""
        try:
            width, height, file_name = _image_entry(image)
            jpeg = _read_jpeg(self.image_dir / file_name, width, height)
        except _Skip as skip:
            self.skip(skip.reason, f"image {image.get('id')} ({image.get('file_name')})", str(skip))
            self.skipped["annotations_of_skipped_images"] += len(anns)
            return None
        converted = []
        for ann in anns:
            try:
                converted.append(_convert_annotation(ann, height, width, self.skip_crowd))
            except _Skip as skip:
                self.skip(skip.reason, f"annotation {ann.get('id')} of {file_name}", str(skip))
        if not converted:
            self.skip("images_without_masks", f"image {file_name}", "no usable annotation")
            return None
        record = make_record(
            image_id=image["id"], width=width, height=height, file_name=file_name, annotations=converted
        )
        return sample_key(image["id"]), jpeg, record


def images_with_annotations(dataset: dict[str, Any], converter: CocoImageConverter) -> list[tuple[dict, list[dict]]]:
    """(image, its annotations) pairs; duplicate image ids and annotations of unknown images are skipped."""
    by_image: dict[Any, list[dict]] = defaultdict(list)
    for ann in dataset.get("annotations", []):
        by_image[ann.get("image_id")].append(ann)
    pairs, seen = [], set()
    for image in dataset.get("images", []):
        if not isinstance(image.get("id"), int) or image["id"] in seen:
            what = f"image {image.get('file_name')}"
            converter.skip("bad_or_duplicate_image_id", what, f"image id {image.get('id')!r}")
            continue
        seen.add(image["id"])
        pairs.append((image, by_image.pop(image["id"], [])))
    for image_id, anns in by_image.items():
        what = f"{len(anns)} annotation(s)"
        converter.skip("annotations_of_unknown_images", what, f"no image has id {image_id!r}", len(anns))
    return pairs


def read_coco_json(path: Path) -> dict[str, Any]:
    """A COCO instances file's dict; FileNotFoundError / ValueError naming the file when it is missing,
    not JSON, or holds no "images" and "annotations" lists."""
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    try:
        dataset = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not JSON ({error})") from None
    if not isinstance(dataset, dict) or not all(isinstance(dataset.get(k), list) for k in ("images", "annotations")):
        raise ValueError(f'{path} is not a COCO instances file (it needs "images" and "annotations" lists)')
    return dataset


def claim_conversion_output(
    out_dir: Path, settings: dict[str, Any], *, settings_name: str = CONVERSION_SETTINGS
) -> dict[str, dict[str, int]]:
    """The complete shards (manifest entries) an interrupted conversion with the same settings left in
    `out_dir`, to resume after; {} for a new or empty directory, whose settings are recorded (in
    `out_dir/settings_name`; segany-coco's and segany-convert's conversions share this).
    FileExistsError for a directory holding shards made any other way (numbering from 0, the writer
    would replace some and leave others behind)."""
    path = out_dir / settings_name
    if path.exists() and json.loads(path.read_text()) == settings:
        return read_manifest(out_dir)["shards"]
    if out_dir.is_dir() and any(out_dir.glob(f"*{SHARD_SUFFIX}")):
        raise FileExistsError(f"{out_dir} already holds shards made otherwise; convert into an empty directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomically(path, settings)
    return {}


def coco_to_shards(
    annotation_file: str | Path,
    image_dir: str | Path,
    out_dir: str | Path,
    *,
    images_per_shard: int = 1000,
    skip_crowd: bool = True,
    progress: bool = True,
) -> ConversionReport:
    """Writes a COCO instances dataset as SA-1B shards `out_dir/sa_000000.tar`, ...; returns the report.

    Keys are `sample_key(coco image id)`; annotation ids are the COCO ids; categories are dropped (SA-1B
    is class-agnostic). Bad input never stops the conversion: a missing, undecodable or wrongly sized
    image, a malformed segmentation, an empty mask each are skipped, counted in `report.skipped` and
    warned about (CocoConversionWarning). Crowd annotations are skipped by default (counted, not
    warned). Images left with no usable mask are not written, counted as "images_without_masks":
    training samples masks, so such an image contributes nothing.
    """
    out_dir = Path(out_dir)
    if not Path(image_dir).is_dir():
        raise FileNotFoundError(f"images directory not found: {image_dir}")
    dataset = read_coco_json(Path(annotation_file))
    settings = {
        "annotations": str(Path(annotation_file).resolve()),
        "images": str(Path(image_dir).resolve()),
        "images_per_shard": images_per_shard,
        "skip_crowd": skip_crowd,
    }
    complete = claim_conversion_output(out_dir, settings)
    to_skip = sum(entry["samples"] for entry in complete.values())
    converter = CocoImageConverter(Path(image_dir), skip_crowd)
    report = ConversionReport()
    writer = SA1BShardWriter(out_dir, start_index=len(complete), max_samples_per_shard=images_per_shard)
    with writer:
        pairs = images_with_annotations(dataset, converter)
        for image, anns in tqdm(pairs, disable=not progress, unit="image"):
            sample = converter.convert(image, anns)
            if sample is None:
                continue
            if report.images_resumed < to_skip:  # the conversion is deterministic: these are in the shards
                report.images_resumed += 1
                report.masks_resumed += len(sample[2]["annotations"])
                continue
            writer.write(*sample)
            report.images_written += 1
            report.masks_written += len(sample[2]["annotations"])
    report.shards = writer.written
    report.skipped = dict(converter.skipped)
    return report


def _coco_annotation(ann: dict[str, Any], image_id: int, category_id: int) -> dict[str, Any]:
    """A COCO annotation (also valid as a COCO result) of an SA-1B annotation."""
    out = {
        "id": ann.get("id"),
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": ann["segmentation"],
        "area": ann["area"],
        "bbox": ann["bbox"],
        "iscrowd": 0,
    }
    if ann.get("predicted_iou") is not None:
        out["score"] = ann["predicted_iou"]
    return out


def _unique_annotation_ids(annotations: list[dict[str, Any]]) -> None:
    """Keeps the SA-1B ids when they are unique integers, else renumbers all 1..N (COCO needs unique ids)."""
    ids = [ann["id"] for ann in annotations]
    if all(isinstance(i, int) for i in ids) and len(set(ids)) == len(ids):
        return
    warnings.warn("annotation ids are not unique across the shards; renumbering them 1..N", CocoConversionWarning)
    for number, ann in enumerate(annotations, start=1):
        ann["id"] = number


def shards_to_coco(
    shard_paths: str | Path | Sequence[str | Path],
    out_file: str | Path | None = None,
    *,
    category_id: int = 1,
    category_name: str = "object",
) -> dict[str, Any]:
    """A COCO instances dict of SA-1B shards (paths, globs or brace patterns, see `expand_shard_patterns`).

    Every mask gets the one category; `score` is the predicted IoU where the shards have one. Images
    are not decoded. Bad samples are skipped with a warning; a repeated image id is an error, since
    COCO cannot hold it. The dict is also written to `out_file` as JSON when given.
    """
    single = isinstance(shard_paths, (str, Path))
    shards = expand_shard_patterns([str(p) for p in ([shard_paths] if single else shard_paths)])
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    seen: dict[int, str] = {}
    for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
        try:
            key, _, record = decode_sample(sample)
            check_masks(record)  # COCO tools take the RLEs and areas as they are
        except BadSample as error:
            where = f"{sample.get('__key__')} of {sample.get('__url__')}"
            warnings.warn(f"skipped sample {where}: {error}", CocoConversionWarning)
            continue
        image_id = record["image"]["image_id"]
        if image_id in seen:
            raise ValueError(f"image id {image_id} appears twice (samples {seen[image_id]} and {key})")
        seen[image_id] = key
        images.append({k: record["image"][k] for k in ("width", "height", "file_name")} | {"id": image_id})
        annotations.extend(_coco_annotation(a, image_id, category_id) for a in record["annotations"])
    _unique_annotation_ids(annotations)
    coco = {"images": images, "annotations": annotations, "categories": [{"id": category_id, "name": category_name}]}
    if out_file is not None:
        Path(out_file).parent.mkdir(parents=True, exist_ok=True)
        Path(out_file).write_text(json.dumps(coco))
    return coco


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m segany_train.data.coco", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_shards = commands.add_parser("to-shards", help="COCO instances JSON + images -> SA-1B shards")
    to_shards.add_argument("--annotations", required=True, help="COCO instances JSON")
    to_shards.add_argument("--images", required=True, help="directory the images' file_name is relative to")
    to_shards.add_argument("--out", required=True, help="output directory for the shards (empty or new)")
    to_shards.add_argument("--images-per-shard", type=int, default=1000)
    to_shards.add_argument("--keep-crowd", action="store_true", help="convert crowd annotations too")
    to_shards.add_argument("--no-progress", action="store_true")
    to_coco = commands.add_parser("to-coco", help="SA-1B shards -> COCO instances JSON (also usable as results)")
    to_coco.add_argument("--shards", required=True, nargs="+", help="shard paths, globs or brace patterns")
    to_coco.add_argument("--out", required=True, help="output JSON file")
    to_coco.add_argument("--category-id", type=int, default=1)
    to_coco.add_argument("--category-name", default="object")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """The command line; errors in the arguments (such as a pattern matching no shard) exit with a message."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "to-shards":
        try:
            report = coco_to_shards(
                args.annotations,
                args.images,
                args.out,
                images_per_shard=args.images_per_shard,
                skip_crowd=not args.keep_crowd,
                progress=not args.no_progress,
            )
        except OSError as error:  # a full disk, a missing file
            parser.exit(2, f"{parser.prog}: error: {describe_os_error(error, rerun='the conversion resumes after the images its shards hold')}\n")
        except ValueError as error:
            parser.exit(2, f"{parser.prog}: error: {error}\n")
        if report.images_written + report.images_resumed == 0:  # the input was not what was asked: say so, and fail
            parser.exit(1, f"{parser.prog}: error: no image converted from {args.annotations}: {report.summary()}\n")
        print(report.summary())
        return
    try:
        shards = expand_shard_patterns(args.shards)
    except FileNotFoundError as error:
        parser.error(str(error))
    coco = shards_to_coco(shards, args.out, category_id=args.category_id, category_name=args.category_name)
    print(f"wrote {len(coco['images'])} images and {len(coco['annotations'])} annotations to {args.out}")


if __name__ == "__main__":
    main()
