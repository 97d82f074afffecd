"""Stage 3: the automatic mask generator over the pool, written as SA-1B shards, and its quality check.

One output shard per input shard, each complete before it enters the manifest (which marks it done),
so the stage resumes per shard. The quality check compares every automatic mask with the pool's GT
(seen here only to measure, as the paper's professional annotators did on a sample).
"""

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_engine.corpus import read_labelled_images
from segany_train.automatic_mask_generator import SamAutomaticMaskGenerator, sa1b_record_from_masks
from segany_train.data.shard_writer import SA1BShardWriter, read_manifest


def iou_matrix(masks: list[np.ndarray], gt_masks: list[np.ndarray]) -> np.ndarray:
    """MxG IoU between two lists of HxW bool masks (one matrix product, no per-pair loop)."""
    if not masks or not gt_masks:
        return np.zeros((len(masks), len(gt_masks)))
    a = np.stack(masks).reshape(len(masks), -1).astype(np.float32)
    b = np.stack(gt_masks).reshape(len(gt_masks), -1).astype(np.float32)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return inter / np.maximum(union, 1)


def _image_quality(masks: list[np.ndarray], gt_masks: list[np.ndarray]) -> dict[str, Any]:
    ious = iou_matrix(masks, gt_masks)
    return {
        "masks": len(masks),
        "gt_objects": len(gt_masks),
        "best_iou": ious.max(axis=1).tolist() if gt_masks else [0.0] * len(masks),  # per automatic mask
        "gt_recalled_50": int((ious.max(axis=0) > 0.5).sum()) if masks else 0,
        "gt_recalled_75": int((ious.max(axis=0) > 0.75).sum()) if masks else 0,
    }


def generate_shards(
    generator: SamAutomaticMaskGenerator,
    input_shards: list[str],
    out_dir: str | Path,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Automatic masks for every image of `input_shards`; input shard k becomes `automatic-<k>.tar`.

    Returns {"shards": [paths], "images": [per-image quality dicts]}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[str] = []
    images: list[dict[str, Any]] = []
    for index, url in enumerate(input_shards):
        name = f"automatic-{index:06d}.tar"
        stats_path = out_dir / f"automatic-{index:06d}.stats.json"
        if stats_path.exists():
            stats = json.loads(stats_path.read_text())
            if stats["shard"] is None or stats["shard"] in read_manifest(out_dir)["shards"]:
                shards += [str(out_dir / stats["shard"])] if stats["shard"] else []
                images += stats["images"]
                continue
        shard_images = []
        with SA1BShardWriter(out_dir, prefix="automatic-", start_index=index, max_samples_per_shard=2**31) as writer:
            for item in tqdm(list(read_labelled_images([url])), desc=f"automatic {Path(url).name}", disable=not progress):
                records = generator.generate(item.image)
                masks = [r["segmentation"] for r in records]
                quality = _image_quality(masks, item.gt_masks)
                shard_images.append({"key": item.key, **quality})
                if records:
                    info = item.record["image"]
                    record = sa1b_record_from_masks(
                        info["image_id"], info["width"], info["height"], info.get("file_name", f"{item.key}.jpg"), records
                    )
                    writer.write(item.key, item.jpeg, record)
            wrote = any(i["masks"] for i in shard_images)
            tmp = stats_path.with_name(stats_path.name + ".tmp")
            tmp.write_text(json.dumps({"shard": name if wrote else None, "images": shard_images}))
            os.replace(tmp, stats_path)
        if wrote:
            shards.append(str(out_dir / name))
        images += shard_images
    return {"shards": shards, "images": images}


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
