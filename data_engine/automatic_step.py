"""Stage 3: the automatic mask generator over the pool, written as SA-1B shards, and its quality check.

One output shard per input shard, then its stats file, each renamed into place when complete (the
stats file, written last, marks the shard done: `shard_outputs.py`), so the stage resumes per shard
and input shards can be processed by independent jobs (`data_engine/distributed_stage3.py`). The
quality check compares every automatic mask with the pool's GT (seen here only to measure, as the
paper's professional annotators did on a sample).

A shard is streamed image by image (a decoded SA-1B image is 10 MB, its masks at full resolution
hundreds), and masks are compared as RLEs: the GT as the record holds it, the automatic masks as they
are written, so no GT mask is ever decoded.
"""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_engine.shard_outputs import OutputImage, completed_output, resume_outputs, write_output
from segany_train.data.image_decoding import decode_record_image
from segany_train.data.mask_iou import rle_iou_matrix
from segany_train.data.pipeline import SkipLog, read_records
from segany_train.data.rle import parse_rles
from segany_train.data.sa1b import BadSample
from segany_train.inference.automatic_mask_generator import SamAutomaticMaskGenerator, sa1b_record_from_masks


def image_quality(rles: list[dict[str, Any]], gt_rles: list[dict[str, Any]]) -> dict[str, Any]:
    ious = rle_iou_matrix(rles, gt_rles)
    return {
        "masks": len(rles),
        "gt_objects": len(gt_rles),
        "best_iou": ious.max(axis=1).tolist() if gt_rles else [0.0] * len(rles),  # per automatic mask
        "gt_recalled_50": int((ious.max(axis=0) > 0.5).sum()) if rles else 0,
        "gt_recalled_75": int((ious.max(axis=0) > 0.75).sum()) if rles else 0,
    }


AUTOMATIC_PREFIX = "automatic-"  # input shard i becomes automatic-<i>.tar and automatic-<i>.stats.json


def completed_shard(out_dir: str | Path, index: int) -> dict[str, Any] | None:
    """The stats of input shard `index` if its output is complete, else None (`completed_output`)."""
    return completed_output(out_dir, AUTOMATIC_PREFIX, index)


def _automatic_images(generator: SamAutomaticMaskGenerator, url: str, progress: bool) -> Iterator[OutputImage]:
    """(quality dict, sample to write or None) per usable image of one input shard."""
    for key, jpeg, pool_record in tqdm(read_records([url]), desc=f"automatic {Path(url).name}", disable=not progress):
        gt_rles = [ann["segmentation"] for ann in pool_record["annotations"]]
        try:
            if gt_rles:
                parse_rles(gt_rles)  # a malformed GT RLE makes the image unusable, as a bad JPEG does
            image = decode_record_image(jpeg, pool_record)
        except (BadSample, ValueError) as error:
            SkipLog.record("bad_sample", key, str(error))
            continue
        records = generator.generate(image)
        # dropped here rather than when the next image rebinds them, so two never coexist
        del image
        info = pool_record["image"]
        record = sa1b_record_from_masks(info["image_id"], info["width"], info["height"], info.get("file_name", f"{key}.jpg"), records)
        del records  # the full-resolution masks, now encoded in the record
        quality = image_quality([ann["segmentation"] for ann in record["annotations"]], gt_rles)
        yield {"key": key, **quality}, (key, jpeg, record) if record["annotations"] else None


def generate_one_shard(
    generator: SamAutomaticMaskGenerator,
    url: str,
    index: int,
    out_dir: str | Path,
    *,
    record_manifest: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Automatic masks for every image of one input shard, written as `automatic-<index>.tar` and
    `automatic-<index>.stats.json`, each under a temporary name renamed when complete.

    Returns the stats: {"shard": name or None when no image kept a mask, "images": [quality dicts]}.
    `record_manifest=False` leaves the directory's manifest alone, for writers running side by side.
    """
    return write_output(out_dir, AUTOMATIC_PREFIX, index, _automatic_images(generator, url, progress), record_manifest=record_manifest)


def generate_shards(
    generator: SamAutomaticMaskGenerator,
    input_shards: list[str],
    out_dir: str | Path,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Automatic masks for every image of `input_shards`; input shard k becomes `automatic-<k>.tar`.
    Shards completed by an earlier (killed) run are kept as they are.

    Returns {"shards": [paths], "images": [per-image quality dicts]}.
    """
    return resume_outputs(out_dir, AUTOMATIC_PREFIX, len(input_shards), lambda k: _automatic_images(generator, input_shards[k], progress))


def summarize_quality(images: list[dict[str, Any]]) -> dict[str, float]:
    """Share of automatic masks with IoU > 0.9 / > 0.75 to their best GT match (the paper: 94% > 0.9
    against professional corrections), recall of GT objects, masks per image."""
    best = np.array([v for i in images for v in i["best_iou"]], dtype=float)
    gt = sum(i["gt_objects"] for i in images)
    return {
        "images": len(images),
        "masks": int(best.size),
        "masks_per_image": best.size / max(len(images), 1),
        "share_iou_above_90": float((best > 0.9).mean()) if best.size else 0.0,
        "share_iou_above_75": float((best > 0.75).mean()) if best.size else 0.0,
        "gt_recall_50": sum(i["gt_recalled_50"] for i in images) / max(gt, 1),
        "gt_recall_75": sum(i["gt_recalled_75"] for i in images) / max(gt, 1),
    }
