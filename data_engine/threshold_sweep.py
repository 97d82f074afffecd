"""Stage 3's thresholds from a model's measured behaviour: a sweep over predicted IoU and stability.

The automatic mask generator keeps a mask when the IoU head's prediction and the mask's stability
pass their thresholds. Which values keep good masks depends on how well a model's IoU head ranks
them, so the engine's defaults are read off this sweep on held-out images with GT, not lowered until
something passes. For each pair of thresholds it prints masks per image, the share of kept masks
with IoU > 0.75 and > 0.9 to their best GT object, and the GT objects recalled at IoU > 0.5:

    python -m data_engine.threshold_sweep --checkpoint data_engine/seed/engine_seed.pt \\
        --shards 'data/engine_pool/sa_{000011..000017}.tar' --images 30
"""

import argparse
import itertools
from typing import Any

from tqdm import tqdm

from data_engine.automatic_step import image_quality, summarize_quality
from data_engine.corpus import read_labelled_images
from segany_train.data.mask_iou import encode_masks
from segany_train.data.pipeline import expand_shard_patterns
from segany_train.inference.automatic_mask_generator import SamAutomaticMaskGenerator
from segany_train.model import build_sam_from_checkpoint


def sweep(
    checkpoint: str, shards: str, *, images: int, pred_iou: list[float], stability: list[float], generator: dict[str, Any], progress: bool = True
) -> list[dict[str, Any]]:
    """One row per (pred_iou_thresh, stability_score_thresh): the thresholds and `summarize_quality`'s figures."""
    sam = build_sam_from_checkpoint(checkpoint).eval()
    items = []
    for item in read_labelled_images(expand_shard_patterns(shards)):
        items.append(item)
        if len(items) >= images:
            break
    rows = []
    pairs = list(itertools.product(pred_iou, stability))
    for p, s in tqdm(pairs, desc="thresholds", disable=not progress):
        amg = SamAutomaticMaskGenerator(sam, pred_iou_thresh=p, stability_score_thresh=s, **generator)
        quality = [
            image_quality(encode_masks([r["segmentation"] for r in amg.generate(item.image)]), [a["segmentation"] for a in item.record["annotations"]])
            for item in items
        ]
        rows.append({"pred_iou_thresh": p, "stability_score_thresh": s, **summarize_quality(quality)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--shards", required=True, help="held-out shards with GT masks (brace patterns and globs)")
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--pred-iou", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.88])
    parser.add_argument("--stability", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    parser.add_argument("--points-per-side", type=int, default=16)
    parser.add_argument("--stability-score-offset", type=float, default=1.0)
    parser.add_argument("--min-mask-region-area", type=int, default=16)
    args = parser.parse_args(argv)
    generator = dict(
        points_per_side=args.points_per_side,
        stability_score_offset=args.stability_score_offset,
        min_mask_region_area=args.min_mask_region_area,
        max_mask_area_fraction=0.95,
    )
    rows = sweep(args.checkpoint, args.shards, images=args.images, pred_iou=args.pred_iou, stability=args.stability, generator=generator)
    print("| pred IoU >= | stability >= | masks/image | IoU > 0.75 | IoU > 0.9 | GT recall@0.5 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['pred_iou_thresh']:.2f} | {r['stability_score_thresh']:.2f} | {r['masks_per_image']:.2f} | "
            f"{r['share_iou_above_75']:.1%} | {r['share_iou_above_90']:.1%} | {r['gt_recall_50']:.1%} |"
        )


if __name__ == "__main__":
    main()
