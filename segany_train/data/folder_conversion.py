"""`segany-convert`: a user's folder of images and masks -> SA-1B shards split into train/ and val/.

    segany-convert label-maps   --images imgs/ --labels labels/ --out data/mine
    segany-convert mask-folders --images imgs/ --masks masks/ --out data/mine
    segany-convert mask-pattern --images imgs/ --masks masks/ --pattern '{name}_*.png' --out data/mine
    segany-convert csv          --csv pairs.csv --out data/mine [--csv-masks label-map]

The layouts are `dataset_layouts`'s. Images are normalised by `image_loading.load_image` (16-bit and
float grey stretched from their own range, alpha dropped), the function segany-amg reads images
with, so a model sees the same pixels in training and at inference. Items are split by a draw
seeded by `--seed` over the sorted image names (`--val-fraction` of them to val/), so a split never
depends on the machine or the file system's order. Each split is written by the project's shard
writer (`SA1BShardWriter`: atomic shards, `manifest.json`) and resumes like `segany-coco to-shards`
(its settings in `OUT/<split>/folder_conversion.json`, complete shards kept). Bad items (an
unreadable image or mask, a mask of another size than its image, no mask file, only empty masks)
are skipped, counted by reason and named; empty mask files beside others are counted and left out.
`OUT/conversion.json` holds the settings and the report once both splits are complete: a rerun with
the same settings returns it without reading any file again.
"""

import argparse
import json
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from segany_train.data.coco import ConversionReport, claim_conversion_output
from segany_train.data.dataset_layouts import (
    LAYOUTS,
    DatasetItem,
    ItemError,
    csv_items,
    label_map_items,
    mask_folder_items,
    mask_pattern_items,
    read_item_rles,
)
from segany_train.data.image_loading import ImageFileError, load_image_file, shard_jpeg
from segany_train.data.sa1b import annotation_from_rle, make_record, sample_key
from segany_train.atomic_files import write_json_atomically
from segany_train.data.shard_writer import SA1BShardWriter
from segany_train.os_errors import describe_os_error

SPLITS = ("train", "val")
SPLIT_SETTINGS = "folder_conversion.json"  # a split directory's settings, checked on resume
REPORT_NAME = "conversion.json"  # the whole conversion's settings and report, once complete
MASKS_PER_IMAGE_ID = 1_000_000  # annotation id = image id * MASKS_PER_IMAGE_ID + k


class FolderConversionWarning(UserWarning):
    """An item or a mask file was skipped; the message names it and says why."""


@dataclass(frozen=True, kw_only=True)
class FolderSource:
    """Where a dataset is and in which layout (see `dataset_layouts`)."""

    layout: str
    images: Path | None = None
    labels: Path | None = None  # label-maps
    masks: Path | None = None  # mask-folders, mask-pattern
    pattern: str | None = None  # mask-pattern
    csv: Path | None = None  # csv
    csv_masks_are_label_maps: bool = False

    def items(self) -> list[DatasetItem]:
        """The dataset's items, in a fixed order; FileNotFoundError / ValueError naming what is wrong."""
        if self.layout == "label-maps":
            return label_map_items(_required(self.images, "--images"), _required(self.labels, "--labels"))
        if self.layout == "mask-folders":
            return mask_folder_items(_required(self.images, "--images"), _required(self.masks, "--masks"))
        if self.layout == "mask-pattern":
            return mask_pattern_items(_required(self.images, "--images"), _required(self.masks, "--masks"), _required(self.pattern, "--pattern"))
        if self.layout == "csv":
            return csv_items(_required(self.csv, "--csv"), masks_are_label_maps=self.csv_masks_are_label_maps)
        raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")

    def recorded(self) -> dict[str, Any]:
        """The settings as JSON values (resolved paths), compared on resume."""
        return {k: str(Path(v).resolve()) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def _required(value: Any, option: str) -> Any:
    if value is None:
        raise ValueError(f"this layout needs {option}")
    return value


@dataclass(kw_only=True)
class FolderConversionReport:
    """What a conversion wrote per split, what it skipped (reason -> count) and which items (name: why)."""

    splits: dict[str, ConversionReport] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_items: list[str] = field(default_factory=list)
    cached: bool = False  # read back from an earlier complete conversion with the same settings

    def shards(self, split: str) -> list[str]:
        return [str(p) for p in self.splits[split].shards]

    def summary(self) -> str:
        """One line: images and masks per split, every skip reason with its count."""
        parts = [f"{name}: {r.images_written + r.images_resumed} images, {r.masks_written + r.masks_resumed} masks" for name, r in self.splits.items()]
        text = "; ".join(parts) + (" (cached)" if self.cached else "")
        if self.skipped:
            text += "; skipped: " + ", ".join(f"{reason}={n}" for reason, n in sorted(self.skipped.items()))
        return text

    def to_json(self) -> dict[str, Any]:
        splits = {name: asdict(r) | {"shards": [str(p) for p in r.shards]} for name, r in self.splits.items()}
        return {"splits": splits, "skipped": self.skipped, "skipped_items": self.skipped_items}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> "FolderConversionReport":
        splits = {name: ConversionReport(**(r | {"shards": [Path(p) for p in r["shards"]]})) for name, r in value["splits"].items()}
        return cls(splits=splits, skipped=value["skipped"], skipped_items=value["skipped_items"], cached=True)


def split_items(items: list[DatasetItem], *, val_fraction: float, seed: int) -> dict[str, list[tuple[int, DatasetItem]]]:
    """{"train": [(image id, item)], "val": [...]}: image ids are positions in the name order, and
    round(val_fraction * N) items (at least one when val_fraction > 0 and N > 1) drawn by `seed` go to val."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ordered = sorted(items, key=lambda item: item.name)
    names = [item.name for item in ordered]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"two images have the name {duplicate!r} (same path without suffix)")
    n_val = round(val_fraction * len(ordered))
    if val_fraction > 0 and len(ordered) > 1:
        n_val = min(max(n_val, 1), len(ordered) - 1)
    val = set(np.random.default_rng(seed).permutation(len(ordered))[:n_val].tolist())
    return {
        "train": [(i, item) for i, item in enumerate(ordered) if i not in val],
        "val": [(i, item) for i, item in enumerate(ordered) if i in val],
    }


def convert_item(image_id: int, item: DatasetItem) -> tuple[str, bytes, dict[str, Any], int]:
    """(key, JPEG, SA-1B record, empty mask files left out) of one item; ItemError if it is unusable."""
    try:
        loaded, data = load_image_file(item.image)
    except ImageFileError as error:
        raise ItemError(error.reason, str(error)) from None
    height, width = loaded.pixels.shape[:2]
    rles, empty = read_item_rles(item, height, width)
    annotations = [annotation_from_rle(rle, annotation_id=image_id * MASKS_PER_IMAGE_ID + k) for k, rle in enumerate(rles)]
    record = make_record(image_id=image_id, width=width, height=height, file_name=item.image.name, annotations=annotations)
    record["image"]["source"] = item.name
    return sample_key(image_id), shard_jpeg(loaded, data), record, empty


def _settings(source: FolderSource, *, val_fraction: float, seed: int, images_per_shard: int) -> dict[str, Any]:
    return {"source": source.recorded(), "val_fraction": val_fraction, "seed": seed, "images_per_shard": images_per_shard}


def convert_folder(
    source: FolderSource,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    images_per_shard: int = 100,
    progress: bool = True,
) -> FolderConversionReport:
    """Converts `source` into `out_dir/train/` and `out_dir/val/` SA-1B shards; returns the report.

    Resumes an interrupted conversion with the same settings and returns a complete one's report
    without work (`report.cached`); FileExistsError for split directories holding other shards.
    """
    out_dir = Path(out_dir)
    if images_per_shard < 1:
        raise ValueError(f"images_per_shard must be at least 1, got {images_per_shard}")
    settings = _settings(source, val_fraction=val_fraction, seed=seed, images_per_shard=images_per_shard)
    done = out_dir / REPORT_NAME
    if done.is_file():
        recorded = json.loads(done.read_text())
        if recorded.get("settings") == settings:
            return FolderConversionReport.from_json(recorded["report"])
    split = split_items(source.items(), val_fraction=val_fraction, seed=seed)
    report = FolderConversionReport()
    skipped: Counter[str] = Counter()
    for name in SPLITS:
        directory = out_dir / name
        complete = claim_conversion_output(directory, settings | {"split": name}, settings_name=SPLIT_SETTINGS)
        to_skip = sum(entry["samples"] for entry in complete.values())
        split_report = ConversionReport()
        with SA1BShardWriter(directory, start_index=len(complete), max_samples_per_shard=images_per_shard) as writer:
            for image_id, item in tqdm(split[name], disable=not progress, unit="image", desc=f"segany-convert {name}"):
                try:
                    key, jpeg, record, empty = convert_item(image_id, item)
                except ItemError as error:
                    skipped[error.reason] += 1
                    report.skipped_items.append(f"{item.name}: {error.reason}: {error}")
                    warnings.warn(f"skipped {item.name}: {error}", FolderConversionWarning, stacklevel=2)
                    continue
                if empty:
                    skipped["empty_mask_files"] += empty
                    report.skipped_items.append(f"{item.name}: empty_mask_files: {empty} empty mask file(s) left out")
                if split_report.images_resumed < to_skip:  # deterministic: these are in the complete shards
                    split_report.images_resumed += 1
                    split_report.masks_resumed += len(record["annotations"])
                    continue
                writer.write(key, jpeg, record)
                split_report.images_written += 1
                split_report.masks_written += len(record["annotations"])
        split_report.shards = sorted(directory.glob("sa_*.tar"))
        report.splits[name] = split_report
    report.skipped = dict(skipped)
    write_json_atomically(done, {"settings": settings, "report": report.to_json()})
    return report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segany-convert", description=__doc__.split("\n")[0].strip("`: "))
    layouts = parser.add_subparsers(dest="layout", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, type=Path, help="output folder (train/ and val/ shard sets are written in it)")
    common.add_argument("--val-fraction", type=float, default=0.2, help="share of images in the val split (default 0.2)")
    common.add_argument("--seed", type=int, default=0, help="seed of the train/val draw")
    common.add_argument("--images-per-shard", type=int, default=100)
    common.add_argument("--no-progress", action="store_true")
    label_maps = layouts.add_parser("label-maps", parents=[common], help="images + instance label maps (0 = background)")
    label_maps.add_argument("--images", required=True, type=Path)
    label_maps.add_argument("--labels", required=True, type=Path, help="label maps named like the images (png/tif)")
    folders = layouts.add_parser("mask-folders", parents=[common], help="images + a folder of binary masks per image")
    folders.add_argument("--images", required=True, type=Path)
    folders.add_argument("--masks", required=True, type=Path, help="masks/<image name>/*.png, one file per object")
    pattern = layouts.add_parser("mask-pattern", parents=[common], help="images + binary mask files named by a pattern")
    pattern.add_argument("--images", required=True, type=Path)
    pattern.add_argument("--masks", required=True, type=Path)
    pattern.add_argument("--pattern", required=True, help="mask file names of an image, e.g. '{name}_*.png'")
    pairs = layouts.add_parser("csv", parents=[common], help="a CSV of image path, mask path rows")
    pairs.add_argument("--csv", required=True, type=Path)
    pairs.add_argument("--csv-masks", choices=("binary", "label-map"), default="binary", help="what each mask file holds")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    source = FolderSource(
        layout=args.layout,
        images=getattr(args, "images", None),
        labels=getattr(args, "labels", None),
        masks=getattr(args, "masks", None),
        pattern=getattr(args, "pattern", None),
        csv=getattr(args, "csv", None),
        csv_masks_are_label_maps=getattr(args, "csv_masks", "binary") == "label-map",
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FolderConversionWarning)  # named in the summary below instead
            report = convert_folder(
                source,
                args.out,
                val_fraction=args.val_fraction,
                seed=args.seed,
                images_per_shard=args.images_per_shard,
                progress=not args.no_progress,
            )
    except OSError as error:  # a full disk, a missing file
        parser.exit(2, f"{parser.prog}: error: {describe_os_error(error, rerun='the conversion resumes after the shards already written')}\n")
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    for line in report.skipped_items:
        print(f"skipped {line}")
    written = sum(r.images_written + r.images_resumed for r in report.splits.values())
    if written == 0:
        parser.exit(1, f"{parser.prog}: error: no image converted: {report.summary()}\n")
    print(report.summary())


if __name__ == "__main__":
    main()
