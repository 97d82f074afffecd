"""segany-amg: automatic masks for an image, a folder of images or SA-1B shards.

    segany-amg photos/ --checkpoint sam_vit_h_4b8939.pth --out masks/
    segany-amg 'shards/sa_{000000..000009}.tar' --checkpoint run.ckpt --out masks/ --shards-out new_shards/

Per image, OUT/<stem>.json is its SA-1B record (masks as COCO RLE with predicted_iou,
stability_score, point_coords and crop_box) and OUT/<stem>.png the image with the masks drawn over
it. <stem> is the file name without its extension, or the sample key for shards. An image whose JSON
exists is skipped (rerun to resume; --overwrite redoes it); unreadable images are skipped with a
warning and counted. With --shards-out, every image with a JSON in OUT (done now or before) is also
written to SA-1B shards. Pixels are used as stored (EXIF orientation is not applied), so the JSON
matches the image bytes.
"""

import argparse
import hashlib
import json
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from segany_train.data.datamodule import count_samples
from segany_train.data.directory_lock import LOCK_NAME, DirectoryLocked, lock_directory
from segany_train.data.image_decoding import decode_record_image
from segany_train.data.image_loading import load_image
from segany_train.data.pipeline import SkipLog, expand_shard_patterns, read_records
from segany_train.data.rle import pycocotools_rle
from segany_train.data.sa1b import BadSample, sample_key
from segany_train.atomic_files import write_bytes_atomically, write_json_atomically
from segany_train.data.shard_writer import SA1BShardWriter, keep_only_shards
from segany_train.inference.automatic_mask_generator import SamAutomaticMaskGenerator, sa1b_record_from_masks
from segany_train.inference.cli_options import (
    add_generator_arguments,
    add_model_arguments,
    generator_settings,
    load_model,
    prepare_output_directory,
)
from segany_train.inference.mask_overlay import render_overlay
from segany_train.os_errors import describe_os_error

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
JPEG_QUALITY = 95  # re-encoding non-JPEG inputs for --shards-out


@dataclass
class InputImage:
    """One image to process; `pixels`/`jpeg` stay None until loaded (a file is read only when needed)."""

    stem: str
    image_id: int
    file_name: str
    path: Path | None = None  # a file input
    record: dict[str, Any] | None = None  # a shard input: its SA-1B record (the image size to check)
    jpeg: bytes | None = None
    pixels: np.ndarray | None = None  # HxWx3 uint8


def image_id_for(stem: str) -> int:
    """SA-1B stems `sa_<n>` keep their id; others get a stable 48-bit id hashed from the stem, so a
    rerun or a run over a larger folder gives an image the same id (and shard key)."""
    match = re.fullmatch(r"sa_(\d+)", stem)
    if match:
        return int(match.group(1))
    return int.from_bytes(hashlib.blake2b(stem.encode("utf-8"), digest_size=6).digest(), "big")


def list_inputs(source: str) -> tuple[Iterator[InputImage], int | None]:
    """The images `source` names (an image file, a folder of jpg/png/tif files, or an SA-1B shard
    pattern) in order, and their count when known. FileNotFoundError/ValueError on a bad source."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        stems = Counter(p.stem for p in files)
        twice = [s for s, n in stems.items() if n > 1]
        if twice:
            raise ValueError(f"{source}: several images share the stem {twice[0]!r} (their outputs would collide)")
        return (InputImage(p.stem, image_id_for(p.stem), p.name, path=p) for p in files), len(files)
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        return iter([InputImage(path.stem, image_id_for(path.stem), path.name, path=path)]), 1
    if path.is_file() and path.suffix.lower() != ".tar":
        raise ValueError(f"{source}: not a jpg/png/tif image, a folder or an SA-1B .tar shard")
    urls = expand_shard_patterns(source)
    return _shard_inputs(urls), count_samples(urls)


def input_directories(source: str) -> set[Path]:
    """The resolved directories holding the inputs `source` names (a folder, an image's folder, or
    the folders of the shards a pattern matches)."""
    path = Path(source)
    if path.is_dir():
        return {path.resolve()}
    if path.is_file():
        return {path.resolve().parent}
    return {Path(url).resolve().parent for url in expand_shard_patterns(source)}


def check_outputs_apart_from_inputs(source: str, out: Path, shards_out: Path | None) -> None:
    """ValueError when --out or --shards-out is a directory that holds the inputs: overlays named
    after the images would replace them, and new shards (sa_000000.tar, ...) the input shards."""
    inputs = input_directories(source)
    for option, directory in (("--out", out), ("--shards-out", shards_out)):
        if directory is not None and directory.resolve() in inputs:
            raise ValueError(f"{option} {directory} holds the input {source}; choose a directory without inputs")


def _shard_inputs(urls: list[str]) -> Iterator[InputImage]:
    for key, jpeg, record in read_records(urls):
        image = record["image"]
        image_id = int(image["image_id"]) if isinstance(image.get("image_id"), int) else image_id_for(key)
        yield InputImage(key, image_id, image.get("file_name") or f"{key}.jpg", record=record, jpeg=jpeg)


def load_pixels(item: InputImage) -> None:
    """Fills item.pixels (and item.jpeg for JPEG files); BadSample if the image is unreadable."""
    if item.pixels is not None:
        return
    if item.record is not None:
        item.pixels = decode_record_image(item.jpeg, item.record)
        return
    try:
        data = item.path.read_bytes()
    except OSError as error:
        raise BadSample(f"unreadable image: {error}") from None
    loaded = load_image(data)
    item.pixels, item.jpeg = loaded.pixels, data if loaded.format == "JPEG" else None


def jpeg_bytes(item: InputImage) -> bytes:
    """The image as JPEG: the file's own bytes when it is a JPEG, else re-encoded."""
    if item.jpeg is None:
        load_pixels(item)
    if item.jpeg is None:
        buffer = BytesIO()
        Image.fromarray(item.pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        item.jpeg = buffer.getvalue()
    return item.jpeg


class DecodedMasks(Sequence):
    """The masks of an SA-1B record, decoded from COCO RLE one at a time when accessed."""

    def __init__(self, annotations: list[dict[str, Any]]) -> None:
        self.annotations = annotations

    def __len__(self) -> int:
        return len(self.annotations)

    def __getitem__(self, index: int) -> np.ndarray:
        seg = self.annotations[index]["segmentation"]
        return mask_utils.decode(pycocotools_rle(seg)).astype(bool)


def process_image(item: InputImage, generator: SamAutomaticMaskGenerator, out: Path) -> dict[str, Any]:
    """Generates the masks of one image, writes <stem>.png then <stem>.json; returns the record."""
    height, width = item.pixels.shape[:2]
    records = generator.generate(item.pixels)
    record = sa1b_record_from_masks(item.image_id, width, height, item.file_name, records)
    overlay = render_overlay(item.pixels, DecodedMasks(record["annotations"]), areas=[a["area"] for a in record["annotations"]])
    buffer = BytesIO()
    Image.fromarray(overlay).save(buffer, format="PNG")
    write_bytes_atomically(out / f"{item.stem}.png", buffer.getvalue())
    # the JSON last: its presence marks the image done
    write_bytes_atomically(out / f"{item.stem}.json", json.dumps(record, separators=(",", ":")).encode("utf-8"))
    return record


MASKLESS_WARNINGS = 3  # images named in a warning when they get no mask; the summary counts the rest


def describe_masks(masks_per_image: list[int]) -> str:
    """The masks of the images done now, for the summary line."""
    if not masks_per_image:
        return "no image generated now"
    total = sum(masks_per_image)
    return f"{total} masks, {total / len(masks_per_image):.1f} per image (fewest {min(masks_per_image)}, most {max(masks_per_image)})"


def threshold_hint(args: argparse.Namespace) -> str:
    """What removes every candidate mask, with the values in use."""
    return (
        f"every candidate fell below --pred-iou-thresh {args.pred_iou_thresh:g} or --stability-score-thresh "
        f"{args.stability_score_thresh:g} (or was removed by --min-mask-region-area / --max-mask-area-fraction): lower "
        "them, 0.1-0.2 at a time (a small or little-trained model predicts low IoUs for every mask)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segany-amg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="an image file, a folder of jpg/png/tif images, or an SA-1B shard pattern")
    parser.add_argument("--out", type=Path, required=True, help="directory for <stem>.json and <stem>.png")
    parser.add_argument("--shards-out", type=Path, help="also write SA-1B shards (image + record) here")
    parser.add_argument("--images-per-shard", type=int, default=1000)
    parser.add_argument("--overwrite", action="store_true", help="redo images whose JSON already exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_arguments(parser)
    add_generator_arguments(parser)
    return parser


SETTINGS_FILE = ".segany-amg-settings"  # in --out and --shards-out (JSON; no .json suffix, so a glob for the records skips it)


def claim_output_settings(out: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Records the run's settings in --out; a rerun with other settings is refused unless it redoes
    every image (--overwrite), so --out never mixes masks made two ways."""
    path = out / SETTINGS_FILE
    if path.exists() and not overwrite:
        found = json.loads(path.read_text())
        # a setting missing from an older file is its default then, None (max_mask_area_fraction: off)
        changed = sorted(k for k in set(found) | set(settings) if found.get(k) != settings.get(k))
        if changed:
            raise ValueError(f"{out} holds masks made with other settings ({', '.join(changed)}); pass --overwrite to redo them, or use another --out")
    write_json_atomically(path, settings)


def refuse_foreign_shards_out(shards_out: Path, overwrite: bool) -> None:
    """ValueError when --shards-out holds files but not segany-amg's settings file: a run replaces
    the shards it finds there and removes those it did not write (what a longer run left), so another
    corpus in it would be lost. --overwrite accepts that."""
    if not shards_out.is_dir() or (shards_out / SETTINGS_FILE).exists() or overwrite:
        return
    foreign = sorted(p.name for p in shards_out.iterdir() if p.name != LOCK_NAME)  # the lock holds no data
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ValueError(f"--shards-out {shards_out} holds files segany-amg did not write ({len(foreign)}: {shown}); its shards would be replaced or removed. Use an empty directory, or pass --overwrite to replace them")


def generate_all(
    args: argparse.Namespace, items: Iterable[InputImage], total: int | None, generator: SamAutomaticMaskGenerator
) -> tuple[Counter, list[int]]:
    """Runs the generator over the inputs, writing --out (and --shards-out); returns the outcome
    counts and the number of masks of each image done now."""
    counts: Counter = Counter()
    masks_per_image: list[int] = []  # of the images done now
    SkipLog.take()  # forget skips of earlier readers in this process
    with ExitStack() as stack:
        # one segany-amg per --shards-out: two would number their shards alike and replace each
        # other's; in --out each image's files are whole (unique temporary names), whoever writes last
        if args.shards_out:
            try:
                stack.enter_context(lock_directory(args.shards_out))
            except DirectoryLocked as error:
                sys.exit(f"segany-amg: error: {error}")
        writer = None
        if args.shards_out:  # on an error the shard being written is dropped, completed ones stay
            writer = stack.enter_context(SA1BShardWriter(args.shards_out, max_samples_per_shard=args.images_per_shard))
        bar = stack.enter_context(tqdm(items, total=total, desc="segany-amg", unit="img", disable=args.no_progress))
        for item in bar:
            json_path = args.out / f"{item.stem}.json"
            try:
                if json_path.exists() and not args.overwrite:
                    outcome, record = "done before", json.loads(json_path.read_text()) if writer else None
                else:
                    load_pixels(item)
                    outcome, record = "done now", process_image(item, generator, args.out)
                    masks_per_image.append(len(record["annotations"]))
                    if not masks_per_image[-1] and masks_per_image.count(0) <= MASKLESS_WARNINGS:
                        tqdm.write(f"segany-amg: warning: no mask kept for {item.path or item.stem}; {threshold_hint(args)}", file=sys.stderr)
                if writer:
                    writer.write(sample_key(item.image_id), jpeg_bytes(item), record)
                counts[outcome] += 1
            except BadSample as error:
                counts["unreadable"] += 1
                tqdm.write(f"segany-amg: warning: skipped {item.path or item.stem}: {error}", file=sys.stderr)
    if writer:  # a shorter rerun: the shards of the longer one are not this run's output
        keep_only_shards(args.shards_out, writer.written)
    counts["unreadable"] += sum(SkipLog.take().values())  # samples the shard reader could not parse
    return counts, masks_per_image


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        items, total = list_inputs(args.input)
        if args.images_per_shard < 1:
            raise ValueError(f"--images-per-shard must be at least 1, got {args.images_per_shard}")
        if total == 0:
            raise ValueError(f"{args.input} holds no jpg/png/tif image")
        check_outputs_apart_from_inputs(args.input, args.out, args.shards_out)
        if args.shards_out:
            refuse_foreign_shards_out(args.shards_out, args.overwrite)
        generator = SamAutomaticMaskGenerator.from_settings(load_model(args), generator_settings(args), output_mode="coco_rle", precision=args.precision)
        # last: a value refused above leaves no directory behind
        if args.shards_out:
            prepare_output_directory(args.shards_out, "--shards-out")
        prepare_output_directory(args.out, "--out")
        checkpoint = str(Path(args.checkpoint).resolve()) if args.checkpoint else None
        settings = {"checkpoint": checkpoint, "model_type": args.model_type, **generator_settings(args).as_kwargs()}
        claim_output_settings(args.out, settings, args.overwrite)
        if args.shards_out:  # marks the directory as this command's (see refuse_foreign_shards_out)
            write_json_atomically(args.shards_out / SETTINGS_FILE, settings)
    except ValueError as error:
        sys.exit(f"segany-amg: error: {error}")
    except OSError as error:  # a missing input; a full disk (the settings file)
        sys.exit(f"segany-amg: error: {describe_os_error(error, rerun='nothing was done yet')}")
    try:
        counts, masks_per_image = generate_all(args, items, total, generator)
    except OSError as error:  # a full disk: finished images are kept, the shard being written is dropped
        sys.exit(f"segany-amg: error: {describe_os_error(error, rerun='images already done are not done again')}")
    summary = ", ".join(f"{counts[k]} {k}" for k in ("done now", "done before", "unreadable"))
    print(f"segany-amg: {sum(counts.values())} images: {summary}; {describe_masks(masks_per_image)}; outputs in {args.out}")
    if masks_per_image.count(0):
        print(f"segany-amg: {masks_per_image.count(0)} of {len(masks_per_image)} images got no mask; {threshold_hint(args)}", file=sys.stderr)


if __name__ == "__main__":
    main()
