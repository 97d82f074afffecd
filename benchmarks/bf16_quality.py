"""How far bf16 inference (`precision="bf16"`) moves the masks from fp32, on trained models.

For each checkpoint (default: the shipped engine seed), one click at the innermost pixel of every
GT mask and one box around it, on synthetic held-out images of the engine's two styles (the seed's
textured scenes and the pool's fluorescent ones): IoU between the fp32 and bf16 masks (all three
multimask outputs and the single-output box mask), predicted-IoU differences, and how often the
output with the highest predicted IoU changes. Then the automatic mask generator (16x16 points, the
thresholds lowered to predicted IoU 0.5 and stability 0.7: the miniature models score below the
official 0.88, which keeps no mask) on a few images: bf16 masks matched one-to-one to fp32 masks (IoU > 0.5, greedy by IoU).

    python benchmarks/bf16_quality.py [--checkpoint A.ckpt --checkpoint B.pth] [--prompts 500]
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from segany_train.data.synthetic import generate_image
from segany_train.inference.automatic_mask_generator import SamAutomaticMaskGenerator
from segany_train.inference.cli_options import build_model
from segany_train.inference.predictor import SamPredictor
from segany_train.model.seed_model import BUILTIN, resolve_seed_checkpoint

STYLES = {  # the engine's seed split and pool (conf/engine/cycle.yaml), images past the corpus's own
    "textured": dict(size=256, min_objects=2, max_objects=4, min_radius=0.1, max_radius=0.35, style="textured"),
    "fluorescent": dict(
        size=256, min_objects=5, max_objects=10, min_radius=0.06, max_radius=0.2, style="fluorescent", part_masks=False
    ),
}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def innermost_pixel(mask: np.ndarray) -> np.ndarray:
    """(x, y) of the mask pixel farthest from its boundary (the evaluation protocol's first click)."""
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(np.argmax(distance), mask.shape)
    return np.array([[x, y]], dtype=np.float64)


def prompt_parity(model: torch.nn.Module, prompts: int) -> dict[str, float]:
    fp32, bf16 = SamPredictor(model), SamPredictor(model, precision="bf16")
    mask_ious, box_ious, iou_deltas, choice_changed = [], [], [], 0
    index, done = 100_000, 0
    while done < prompts:
        for scene in STYLES.values():
            image, masks = generate_image(index, seed=7, **scene)
            fp32.set_image(image)
            bf16.set_image(image)
            for gt in masks:
                if gt.sum() < 16 or done >= prompts:
                    continue
                click = dict(point_coords=innermost_pixel(gt), point_labels=np.array([1]))
                m32, s32, _ = fp32.predict(**click)
                m16, s16, _ = bf16.predict(**click)
                mask_ious += [iou(a, b) for a, b in zip(m32, m16)]
                iou_deltas += np.abs(s32 - s16).tolist()
                choice_changed += int(np.argmax(s32) != np.argmax(s16))
                ys, xs = np.nonzero(gt)
                box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64)
                b32 = fp32.predict(box=box, multimask_output=False)[0][0]
                b16 = bf16.predict(box=box, multimask_output=False)[0][0]
                box_ious.append(iou(b32, b16))
                done += 1
        index += 1
    mask_ious, box_ious, iou_deltas = np.array(mask_ious), np.array(box_ious), np.array(iou_deltas)
    return {
        "prompts": done,
        "click masks mean IoU": mask_ious.mean(),
        "click masks IoU < 0.99": (mask_ious < 0.99).mean(),
        "click masks min IoU": mask_ious.min(),
        "box masks mean IoU": box_ious.mean(),
        "box masks min IoU": box_ious.min(),
        "predicted IoU mean |diff|": iou_deltas.mean(),
        "predicted IoU max |diff|": iou_deltas.max(),
        "best output changed": choice_changed / done,
    }


def matched_masks(records_a: list[dict], records_b: list[dict]) -> list[float]:
    """IoUs of a greedy one-to-one matching (highest IoU first, only pairs above 0.5)."""
    pairs = sorted(
        ((iou(a["segmentation"], b["segmentation"]), i, j) for i, a in enumerate(records_a) for j, b in enumerate(records_b)),
        reverse=True,
    )
    used_a, used_b, matched = set(), set(), []
    for value, i, j in pairs:
        if value <= 0.5:
            break
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            matched.append(value)
    return matched


def generator_parity(model: torch.nn.Module, images: int) -> dict[str, float]:
    settings = dict(points_per_side=16, pred_iou_thresh=0.5, stability_score_thresh=0.7)
    fp32 = SamAutomaticMaskGenerator(model, **settings)
    bf16 = SamAutomaticMaskGenerator(model, **settings, precision="bf16")
    count32 = count16 = 0
    matched: list[float] = []
    for k in range(images):
        scene = list(STYLES.values())[k % len(STYLES)]
        image, _ = generate_image(200_000 + k, seed=7, **scene)
        a, b = fp32.generate(image), bf16.generate(image)
        count32, count16 = count32 + len(a), count16 + len(b)
        matched += matched_masks(a, b)
    return {
        "images": images,
        "fp32 masks": count32,
        "bf16 masks": count16,
        "matched one-to-one": len(matched),
        "matched mean IoU": float(np.mean(matched)) if matched else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", help="SAM checkpoints to compare on (default: the shipped seed)")
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--amg-images", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for checkpoint in args.checkpoint or [str(resolve_seed_checkpoint(BUILTIN))]:
        model = build_model(Path(checkpoint), None).eval()
        print(f"== {checkpoint}")
        for name, value in {**prompt_parity(model, args.prompts), **generator_parity(model, args.amg_images)}.items():
            print(f"{name:28s} {value:.4f}" if isinstance(value, float) else f"{name:28s} {value}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
