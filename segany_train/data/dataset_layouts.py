"""The dataset layouts users hold, read as (image file, object masks) items for `segany-convert`.

- label maps: `images/<name>.<ext>` with `labels/<name>.{png,tif,tiff}`, an instance label map
  (0 = background, one integer id per object; 8- or 16-bit, or 32-bit integer TIFF), as
  microscopy and medical tools write them;
- mask folders: `images/<name>.<ext>` with `masks/<name>/*.{png,tif,tiff}`, one binary mask file
  per object (any non-zero pixel is the object);
- mask pattern: one binary mask file per object in one folder, named by a pattern of the image's
  name, e.g. `{name}_*.png` for `cell3_0.png`, `cell3_1.png` of `cell3.jpg`;
- CSV: rows of image path, mask path (relative to the CSV's folder; a header row naming `image`
  and `mask` is skipped); several rows of one image are its objects' binary masks, or, with
  `csv_masks="label_map"`, each mask file is a label map.

`<name>` is the image's path under the images folder without its suffix (sub-folders allowed).
Reading pixels and checking them is `read_item_rles`; a file that cannot be used raises
`ItemError` with a reason key (counted by the converter) and a message naming the file.
"""

import csv
import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
MASK_SUFFIXES = (".png", ".tif", ".tiff")
LAYOUTS = ("label-maps", "mask-folders", "mask-pattern", "csv")


class ItemError(ValueError):
    """An item that cannot be converted: `reason` is the key it is counted under, the message says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, kw_only=True)
class DatasetItem:
    """One image and the files its object masks come from.

    name: the image's stable name (its path under the images folder, or in the CSV, without suffix);
    label_maps: instance label map files (each non-zero id an object); binary_masks: one file per object.
    """

    name: str
    image: Path
    label_maps: tuple[Path, ...] = ()
    binary_masks: tuple[Path, ...] = ()


def _images(images_dir: Path) -> list[tuple[str, Path]]:
    """(name, path) of every image file under `images_dir`, sorted by name."""
    if not images_dir.is_dir():
        raise FileNotFoundError(f"images folder not found: {images_dir}")
    found = [
        (p.relative_to(images_dir).with_suffix("").as_posix(), p)
        for p in images_dir.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not found:
        raise ValueError(f"no image ({', '.join(IMAGE_SUFFIXES)}) under {images_dir}")
    return sorted(found)


def _mask_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in MASK_SUFFIXES) if directory.is_dir() else []


def label_map_items(images_dir: Path, labels_dir: Path) -> list[DatasetItem]:
    """Images with the label map of the same name in `labels_dir` (an image without one is kept, with
    no mask files, and counted as missing masks by the converter)."""
    if not labels_dir.is_dir():
        raise FileNotFoundError(f"label maps folder not found: {labels_dir}")
    items = []
    for name, image in _images(images_dir):
        candidates = [labels_dir / f"{name}{suffix}" for suffix in MASK_SUFFIXES]
        items.append(DatasetItem(name=name, image=image, label_maps=tuple(p for p in candidates if p.is_file())[:1]))
    return items


def mask_folder_items(images_dir: Path, masks_dir: Path) -> list[DatasetItem]:
    """Images with every mask file in `masks_dir/<name>/`."""
    if not masks_dir.is_dir():
        raise FileNotFoundError(f"masks folder not found: {masks_dir}")
    return [DatasetItem(name=name, image=image, binary_masks=tuple(_mask_files(masks_dir / name))) for name, image in _images(images_dir)]


def mask_pattern_items(images_dir: Path, masks_dir: Path, pattern: str) -> list[DatasetItem]:
    """Images with the mask files in `masks_dir` matching `pattern` with `{name}` replaced by the
    image's name (shell wildcards, e.g. `{name}_*.png`)."""
    if "{name}" not in pattern:
        raise ValueError(f"the mask pattern must contain {{name}}, got {pattern!r}")
    if not masks_dir.is_dir():
        raise FileNotFoundError(f"masks folder not found: {masks_dir}")
    files = sorted(p for p in masks_dir.rglob("*") if p.is_file() and p.suffix.lower() in MASK_SUFFIXES)
    relative = [p.relative_to(masks_dir).as_posix() for p in files]
    items = []
    for name, image in _images(images_dir):
        wanted = pattern.replace("{name}", _escape_glob(name))
        matched = tuple(f for f, r in zip(files, relative) if fnmatch.fnmatchcase(r, wanted))
        items.append(DatasetItem(name=name, image=image, binary_masks=matched))
    return items


def _escape_glob(text: str) -> str:
    """`text` with fnmatch's special characters made literal."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in text)


def csv_items(csv_path: Path, *, masks_are_label_maps: bool = False) -> list[DatasetItem]:
    """Items from a CSV of image path, mask path rows (paths relative to the CSV's folder), in the
    order images first appear; several rows of one image are its objects."""
    if not csv_path.is_file():
        raise FileNotFoundError(f"CSV file not found: {csv_path}")
    rows: dict[Path, list[Path]] = {}
    with open(csv_path, newline="") as stream:
        for line_number, row in enumerate(csv.reader(stream), start=1):
            if not row or all(not cell.strip() for cell in row):
                continue
            if line_number == 1 and [c.strip().lower() for c in row[:2]] == ["image", "mask"]:
                continue
            if len(row) < 2:
                raise ValueError(f"{csv_path}:{line_number}: expected image path, mask path; got {row!r}")
            image, mask = (csv_path.parent / row[0].strip(), csv_path.parent / row[1].strip())
            rows.setdefault(image, []).append(mask)
    if not rows:
        raise ValueError(f"{csv_path} lists no image, mask pair")
    items = []
    for image, masks in rows.items():
        name = image.relative_to(csv_path.parent).with_suffix("").as_posix() if image.is_relative_to(csv_path.parent) else image.with_suffix("").as_posix()
        key = "label_maps" if masks_are_label_maps else "binary_masks"
        items.append(DatasetItem(name=name, image=image, **{key: tuple(masks)}))
    return items


def _read_mask_file(path: Path) -> np.ndarray:
    """HxW integer array of a single-channel mask file; RGB(A) files count as their first channel
    unless the channels differ (then ItemError: a colour-coded mask is not a label map)."""
    try:
        with Image.open(path) as img:
            values = np.asarray(img)
    except FileNotFoundError:
        raise ItemError("missing_mask_file", f"mask file not found: {path}") from None
    except Exception as error:  # PIL raises many types for corrupt data
        raise ItemError("unreadable_mask", f"cannot read mask {path}: {type(error).__name__}: {error}") from None
    if values.ndim == 3:
        if values.shape[2] >= 3 and not (np.array_equal(values[..., 0], values[..., 1]) and np.array_equal(values[..., 0], values[..., 2])):
            raise ItemError("colour_mask", f"{path} is a colour image; masks must be single-channel (label ids or 0/non-zero)")
        values = values[..., 0]
    if values.ndim != 2 or not np.issubdtype(values.dtype, np.integer) and values.dtype != bool:
        raise ItemError("unreadable_mask", f"{path} is not an integer single-channel mask ({values.dtype}, shape {values.shape})")
    return values


def read_item_rles(item: DatasetItem, height: int, width: int) -> tuple[list[dict[str, Any]], int]:
    """(the compressed COCO RLE of each of the item's objects, how many empty binary mask files were
    left out).

    Label-map objects are ordered by id; binary masks by file. ItemError for a missing or unreadable
    file, a mask of another size than the image (height x width), or an item with no object at all.
    Each file is encoded as it is read, so memory holds one file's pixels, never a mask per object.
    """
    if not item.label_maps and not item.binary_masks:
        raise ItemError("missing_masks", f"{item.image}: no mask file found")
    rles: list[dict[str, Any]] = []
    empty = 0
    for path in (*item.label_maps, *item.binary_masks):
        values = _read_mask_file(path)
        if values.shape != (height, width):
            raise ItemError(
                "size_mismatch", f"{path} is {values.shape[1]}x{values.shape[0]}, its image {item.image} is {width}x{height}"
            )
        if path in item.label_maps:
            rles.extend(label_map_rles(values))
        elif values.any():
            rles.append(mask_utils.encode(np.asfortranarray((values != 0).astype(np.uint8))))
        else:
            empty += 1
    if not rles:
        raise ItemError("empty", f"{item.image}: its masks hold no object (every pixel is 0)")
    return rles, empty


def label_map_rles(values: np.ndarray) -> list[dict[str, Any]]:
    """The compressed COCO RLE of each non-zero id of an HxW label map, in id order.

    Memory grows with the pixels, not with pixels x ids (a 200x200 map of 40 000 ids took 1.85 GB as
    one boolean mask per id): one stable sort of the column-major pixels (COCO's order) by id lists
    each id's pixel positions in ascending order, and the runs of consecutive positions are its RLE.
    """
    height, width = values.shape
    flat = values.ravel(order="F")
    order = np.argsort(flat, kind="stable")
    ids = flat[order]
    order, ids = order[ids != 0], ids[ids != 0]
    if not order.size:
        return []
    # a run of an id's pixels starts where the id changes or a position is not the previous one + 1
    first = np.flatnonzero(np.r_[True, (ids[1:] != ids[:-1]) | (order[1:] != order[:-1] + 1)])
    run_start, run_length, run_id = order[first], np.diff(np.r_[first, order.size]), ids[first]
    new_id = np.r_[True, run_id[1:] != run_id[:-1]]
    zeros_before = run_start - np.where(new_id, 0, np.r_[0, run_start[:-1] + run_length[:-1]])
    bounds = np.r_[np.flatnonzero(new_id), run_id.size]
    rles = []
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        counts = np.empty(2 * (b - a) + 1, dtype=np.int64)  # zeros, ones, ..., zeros after the last run
        counts[0:-1:2], counts[1::2] = zeros_before[a:b], run_length[a:b]
        counts[-1] = height * width - run_start[b - 1] - run_length[b - 1]
        counts = counts[:-1] if counts[-1] == 0 else counts  # as pycocotools encodes a mask ending in the object
        rles.append(mask_utils.frPyObjects({"size": [height, width], "counts": counts.tolist()}, height, width))
    return rles
