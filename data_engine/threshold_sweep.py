"""Thresholds from a model's measured behaviour: sweeps over predicted IoU and stability.

Stage 2's pre-fill and stage 3's automatic masks keep a mask when the IoU head's prediction and the
mask's stability pass their thresholds. Which values keep good masks depends on how well the model's
IoU head ranks them, and that moves with every retrain, so the engine measures them again on the
model each stage starts from, on images already annotated (never on held-out ones), and records the
sweep in engine.json. For each pair of thresholds:

- stage 3 (`sweep_automatic`): masks per image, the share of kept masks with IoU > 0.75 and > 0.9 to
  their best annotated object, and the annotated objects recalled at IoU > 0.5;
- stage 2 (`sweep_prefill`): pre-filled masks per image and their precision (the share that the
  annotator would accept: IoU with an annotated object at the target IoU).

`choose_thresholds` then takes the pair with the most masks (recall, or pre-fills per image) among
those whose quality reaches a minimum. Each image is processed once, at the loosest pair; the stricter
pairs filter its candidates and repeat the box NMS. That equals running the generator at each pair
except where a mask was suppressed at the loosest pair by one that a stricter pair drops.

    python -m data_engine.threshold_sweep --checkpoint segany_train/model/seed/engine_seed.pt \\
        --shards 'data/engine_pool/sa_{000011..000017}.tar' --images 30
"""

import argparse
import itertools
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from data_engine.automatic_step import image_quality, summarize_quality
from data_engine.corpus import LabelledImage, read_labelled_images
from segany_train.amg.generator_settings import GeneratorSettings
from segany_train.amg.mask_ops import box_nms
from segany_train.box_detection.prefill import BoxPrefill, confident_masks
from segany_train.data.mask_iou import encode_masks, rle_iou_matrix
from segany_train.data.pipeline import expand_shard_patterns
from segany_train.inference.automatic_mask_generator import SamAutomaticMaskGenerator
from segany_train.model import Sam, build_sam_from_checkpoint

PRED_IOU = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.88)
STABILITY = (0.6, 0.7, 0.8, 0.9, 0.95)


def _pairs(pred_iou: Sequence[float], stability: Sequence[float]) -> list[tuple[float, float]]:
    if not pred_iou or not stability:
        raise ValueError("a threshold sweep needs at least one predicted-IoU and one stability threshold")
    return list(itertools.product(pred_iou, stability))


def sweep_automatic(
    sam: Sam,
    items: Sequence[LabelledImage],
    *,
    settings: GeneratorSettings,
    pred_iou: Sequence[float] = PRED_IOU,
    stability: Sequence[float] = STABILITY,
    progress: bool = True,
    precision: str = "fp32",
) -> list[dict[str, Any]]:
    """One row per (pred_iou_thresh, stability_score_thresh): the pair and `summarize_quality`'s
    figures of the automatic masks against each image's annotated masks (the model run at
    `precision`, as the generator it chooses for)."""
    pairs = _pairs(pred_iou, stability)
    loosest = replace(settings, pred_iou_thresh=min(pred_iou), stability_score_thresh=min(stability))
    generator = SamAutomaticMaskGenerator.from_settings(sam, loosest, output_mode="coco_rle", precision=precision)
    per_pair: dict[tuple[float, float], list[dict[str, Any]]] = {pair: [] for pair in pairs}
    for item in tqdm(items, desc="stage 3 threshold sweep", disable=not progress):
        records = generator.generate(item.image)
        gt = [a["segmentation"] for a in item.record["annotations"]]
        iou = torch.tensor([r["predicted_iou"] for r in records], dtype=torch.float32)
        stab = torch.tensor([r["stability_score"] for r in records], dtype=torch.float32)
        boxes = torch.tensor([r["bbox"] for r in records], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # XYWH -> XYXY
        for p, s in pairs:
            index = ((iou >= p) & (stab >= s)).nonzero().squeeze(1)
            keep = index[box_nms(boxes[index], iou[index], settings.box_nms_thresh)] if index.numel() else index
            per_pair[(p, s)].append(image_quality([records[k]["segmentation"] for k in keep.tolist()], gt))
    return [{"pred_iou_thresh": p, "stability_score_thresh": s, **summarize_quality(per_pair[(p, s)])} for p, s in pairs]


def sweep_prefill(
    prefill: BoxPrefill,
    items: Sequence[LabelledImage],
    *,
    target_iou: float,
    pred_iou: Sequence[float] = PRED_IOU,
    stability: Sequence[float] = STABILITY,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One row per (pred_iou_thresh, stability_score_thresh): pre-filled masks per image and their
    precision (share with IoU >= target_iou to an annotated object of the image)."""
    pairs = _pairs(pred_iou, stability)
    kept = {pair: 0 for pair in pairs}
    correct = {pair: 0 for pair in pairs}
    for item in tqdm(items, desc="stage 2 threshold sweep", disable=not progress):
        logits, iou, stab = prefill.candidates(item.image)
        masks = logits > prefill.predictor.model.mask_threshold
        best = np.zeros(masks.shape[0])
        if masks.shape[0] and item.gt_masks:
            best = rle_iou_matrix(encode_masks(list(masks.cpu().numpy())), encode_masks(item.gt_masks)).max(axis=1)
        for p, s in pairs:
            keep = confident_masks(
                masks, iou, stab, pred_iou_thresh=p, stability_score_thresh=s, nms_thresh=prefill.settings.nms_thresh
            ).tolist()
            kept[(p, s)] += len(keep)
            correct[(p, s)] += int((best[keep] >= target_iou).sum())
    return [
        {
            "pred_iou_thresh": p,
            "stability_score_thresh": s,
            "prefilled_per_image": kept[(p, s)] / max(len(items), 1),
            "precision": correct[(p, s)] / kept[(p, s)] if kept[(p, s)] else 0.0,
        }
        for p, s in pairs
    ]


def choose_thresholds(rows: list[dict[str, Any]], *, quality: str, minimum: float, amount: str) -> dict[str, Any]:
    """The row with the most `amount` among those whose `quality` reaches `minimum` (ties: the better
    quality); when none does, the row of the best quality (ties: the most `amount`)."""
    if not rows:
        raise ValueError("no threshold sweep rows to choose from")
    passing = [r for r in rows if r[quality] >= minimum]
    if passing:
        return max(passing, key=lambda r: (r[amount], r[quality]))
    return max(rows, key=lambda r: (r[quality], r[amount]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--shards", required=True, help="shards with GT masks (brace patterns and globs)")
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--pred-iou", type=float, nargs="+", default=list(PRED_IOU))
    parser.add_argument("--stability", type=float, nargs="+", default=list(STABILITY))
    parser.add_argument("--points-per-side", type=int, default=16)
    parser.add_argument("--stability-score-offset", type=float, default=1.0)
    parser.add_argument("--min-mask-region-area", type=int, default=16)
    args = parser.parse_args(argv)
    settings = GeneratorSettings(
        points_per_side=args.points_per_side,
        stability_score_offset=args.stability_score_offset,
        min_mask_region_area=args.min_mask_region_area,
        max_mask_area_fraction=0.95,
    )
    items = list(itertools.islice(read_labelled_images(expand_shard_patterns(args.shards)), args.images))
    sam = build_sam_from_checkpoint(args.checkpoint).eval()
    rows = sweep_automatic(sam, items, settings=settings, pred_iou=args.pred_iou, stability=args.stability)
    print("| pred IoU >= | stability >= | masks/image | IoU > 0.75 | IoU > 0.9 | GT recall@0.5 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['pred_iou_thresh']:.2f} | {r['stability_score_thresh']:.2f} | {r['masks_per_image']:.2f} | "
            f"{r['share_iou_above_75']:.1%} | {r['share_iou_above_90']:.1%} | {r['gt_recall_50']:.1%} |"
        )


if __name__ == "__main__":
    main()
