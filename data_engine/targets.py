"""The run's headline figures and the miniature's targets: does the engine show the paper's effect?

The targets are fixed here, not in the config, so that a run cannot pass by lowering them:
- held-out mIoU@1 of the final model >= seed + 0.10 and >= control + 0.05, 95% intervals apart;
- stage 1: seconds per mask of the last two rounds <= 0.7 x the first two; masks per image rising
  (the last two rounds' mean above the first two's);
- stage 2: >= 1 pre-filled mask per image at >= 85% precision; more masks per image than stage 1's
  last round;
- stage 3: >= 70% of automatic masks with IoU > 0.75 to a GT object, >= 40% above 0.9, GT recall at
  IoU 0.5 >= 60%;
- the final model's IoU head ranks its masks: Spearman >= 0.6.
`engine_summary` returns every figure under stable keys (engine.json's "summary").
"""

import math
from typing import Any

GAIN_OVER_SEED = 0.10
GAIN_OVER_CONTROL = 0.05
STAGE1_SECONDS_RATIO = 0.7
PREFILLED_PER_IMAGE = 1.0
PREFILLED_PRECISION = 0.85
STAGE3_SHARE_75 = 0.70
STAGE3_SHARE_90 = 0.40
STAGE3_RECALL_50 = 0.60
IOU_HEAD_SPEARMAN = 0.6


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


def _row(rows: list[dict[str, Any]], stage: str) -> dict[str, Any] | None:
    found = [r for r in rows if r["stage"] == stage]
    return found[-1] if found else None


def _evaluation(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    keys = ("miou_1", "miou_1_ci", "miou_5", "miou_5_ci", "iou_head_spearman", "eval_images", "eval_masks")
    return {k: row.get(k) for k in keys}


def _gain(better: dict[str, Any] | None, worse: dict[str, Any] | None, margin: float) -> dict[str, Any]:
    """better's mIoU@1 >= worse's + margin, and better's interval wholly above worse's."""
    if better is None or worse is None or better["miou_1"] is None or worse["miou_1"] is None:
        return {"value": None, "met": False}
    gain = better["miou_1"] - worse["miou_1"]
    apart = better["miou_1_ci"] is not None and worse["miou_1_ci"] is not None and better["miou_1_ci"][0] > worse["miou_1_ci"][1]
    return {"value": gain, "intervals_apart": apart, "met": gain >= margin and apart}


def engine_summary(rows: list[dict[str, Any]], quality: dict[str, float] | None) -> dict[str, Any]:
    seed, final, control = (_evaluation(_row(rows, s)) for s in ("seed", "final", "control"))
    stage1 = [r for r in rows if r["stage"] == "stage1"]
    stage2 = [r for r in rows if r["stage"] == "stage2"]
    s1_masks = [r.get("masks_per_image") for r in stage1]
    s1_first = _mean([r.get("seconds_per_mask") for r in stage1[:2]])
    s1_last = _mean([r.get("seconds_per_mask") for r in stage1[-2:]])
    s2_images = sum(r.get("images", 0) for r in stage2)
    s2_prefilled = sum(r.get("prefilled_per_image", 0) * r.get("images", 0) for r in stage2)
    s2_correct = sum(
        (r.get("prefilled_precision") or 0) * r.get("prefilled_per_image", 0) * r.get("images", 0)
        for r in stage2
        if r.get("prefilled_precision") is not None and not math.isnan(r["prefilled_precision"])
    )
    summary: dict[str, Any] = {
        "seed": seed,
        "final": final,
        "control": control,
        "stage1": {
            "masks_per_image": s1_masks,
            "seconds_per_mask": [r.get("seconds_per_mask") for r in stage1],
            "seconds_per_mask_first_two": s1_first,
            "seconds_per_mask_last_two": s1_last,
            "seconds_ratio": s1_last / s1_first if s1_first and s1_last is not None else None,
        },
        "stage2": {
            "masks_per_image": _mean([r.get("masks_per_image") for r in stage2]),
            "prefilled_per_image": s2_prefilled / s2_images if s2_images else None,
            "prefilled_precision": s2_correct / s2_prefilled if s2_prefilled else None,
        },
        "stage3": dict(quality) if quality else None,
    }
    s1, s2, s3 = summary["stage1"], summary["stage2"], summary["stage3"] or {}
    masks_first, masks_last = _mean(s1_masks[:2]), _mean(s1_masks[-2:])
    checks = {
        "final_vs_seed": _gain(final, seed, GAIN_OVER_SEED),
        "final_vs_control": _gain(final, control, GAIN_OVER_CONTROL),
        "stage1_seconds_fall": {"value": s1["seconds_ratio"], "met": s1["seconds_ratio"] is not None and s1["seconds_ratio"] <= STAGE1_SECONDS_RATIO},
        "stage1_masks_rise": {
            "value": [masks_first, masks_last],
            "met": masks_first is not None and masks_last is not None and masks_last > masks_first,
        },
        "stage2_prefill": {
            "value": [s2["prefilled_per_image"], s2["prefilled_precision"]],
            "met": (s2["prefilled_per_image"] or 0) >= PREFILLED_PER_IMAGE and (s2["prefilled_precision"] or 0) >= PREFILLED_PRECISION,
        },
        "stage2_more_masks_than_stage1": {
            "value": [s1_masks[-1] if s1_masks else None, s2["masks_per_image"]],
            "met": bool(s1_masks) and s2["masks_per_image"] is not None and s2["masks_per_image"] > s1_masks[-1],
        },
        "stage3_quality": {
            "value": [s3.get("share_iou_above_75"), s3.get("share_iou_above_90"), s3.get("gt_recall_50")],
            "met": s3.get("share_iou_above_75", 0) >= STAGE3_SHARE_75
            and s3.get("share_iou_above_90", 0) >= STAGE3_SHARE_90
            and s3.get("gt_recall_50", 0) >= STAGE3_RECALL_50,
        },
        "iou_head_spearman": {
            "value": final["iou_head_spearman"] if final else None,
            "met": bool(final) and (final["iou_head_spearman"] or 0) >= IOU_HEAD_SPEARMAN,
        },
    }
    summary["targets"] = checks
    summary["targets_met"] = sum(c["met"] for c in checks.values())
    summary["targets_total"] = len(checks)
    return summary


TARGET_TEXT = {
    "final_vs_seed": f"final mIoU@1 >= seed + {GAIN_OVER_SEED:.2f}, intervals apart",
    "final_vs_control": f"final mIoU@1 >= control + {GAIN_OVER_CONTROL:.2f}, intervals apart",
    "stage1_seconds_fall": f"stage 1 s/mask, last two rounds <= {STAGE1_SECONDS_RATIO} x first two",
    "stage1_masks_rise": "stage 1 masks/image, last two rounds above the first two",
    "stage2_prefill": f">= {PREFILLED_PER_IMAGE:.0f} pre-filled mask/image at >= {PREFILLED_PRECISION:.0%} precision",
    "stage2_more_masks_than_stage1": "stage 2 masks/image above stage 1's last round",
    "stage3_quality": f"stage 3: >= {STAGE3_SHARE_75:.0%} masks IoU > 0.75, >= {STAGE3_SHARE_90:.0%} > 0.9, GT recall@0.5 >= {STAGE3_RECALL_50:.0%}",
    "iou_head_spearman": f"final IoU-head Spearman >= {IOU_HEAD_SPEARMAN}",
}


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list):
        return " / ".join(_format(v) for v in value)
    return str(value)


def targets_table(summary: dict[str, Any]) -> str:
    lines = ["| target | measured | met |", "|---|---|---|"]
    for name, check in summary["targets"].items():
        lines.append(f"| {TARGET_TEXT[name]} | {_format(check['value'])} | {'yes' if check['met'] else 'no'} |")
    lines.append(f"| **all** | {summary['targets_met']} of {summary['targets_total']} | {'yes' if summary['targets_met'] == summary['targets_total'] else 'no'} |")
    return "\n".join(lines)
