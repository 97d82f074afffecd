"""Held-out evaluation of each round's model: the interactive protocol with 95% bootstrap intervals.

A round's mIoU moves by a few hundredths with the images it happens to be measured on, so every
figure comes with an interval: images are resampled with replacement (masks of one image move
together, since they share the image's difficulty) and the 2.5 and 97.5 percentiles of the mean
are reported. The IoU head's Spearman correlation with the true IoU of the first click's shown mask
says whether predicted IoU can rank masks, which stage 2's pre-fill and stage 3's thresholds assume.
"""

from typing import Any

import numpy as np

from segany_train.evaluation.interactive import InteractiveEvalConfig, evaluate_interactive
from segany_train.model import Sam

BOOTSTRAP_SAMPLES = 2000
CLICKS = (1, 5)


def bootstrap_interval(
    values: np.ndarray, groups: np.ndarray, *, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of the mean of `values` (N) when the groups (N ids, e.g. the image of
    each mask) are resampled with replacement."""
    ids, inverse = np.unique(groups, return_inverse=True)
    sums = np.bincount(inverse, weights=values, minlength=ids.size)
    counts = np.bincount(inverse, minlength=ids.size).astype(float)
    rng = np.random.default_rng(seed)
    # each row: how often each group is drawn in one resample (a multinomial over the groups)
    draws = rng.multinomial(ids.size, np.full(ids.size, 1.0 / ids.size), size=samples)  # samples x G
    means = (draws @ sums) / np.maximum(draws @ counts, 1.0)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def evaluate_holdout(
    sam: Sam,
    holdout: list[str],
    *,
    max_images: int | None,
    max_masks_per_image: int | None,
    batch_size: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """mIoU after 1 and 5 clicks with 95% intervals, the IoU head's Spearman, and the counts.

    Keys (stable, read by the report and by scripts): miou_1, miou_1_ci, miou_5, miou_5_ci,
    iou_head_spearman, eval_images, eval_masks. batch_size: images per encoder and decoder call (the
    figures do not depend on it; small models run faster with several images at once)."""
    report = evaluate_interactive(
        sam,
        holdout,
        InteractiveEvalConfig(max_clicks=max(CLICKS), max_masks_per_image=max_masks_per_image, batch_size=batch_size, seed=seed),
        max_images=max_images,
        progress=progress,
        per_mask=True,
    )
    shown = np.asarray(report["per_mask"]["shown"], dtype=float).reshape(-1, max(CLICKS))
    image = np.asarray(report["per_mask"]["image"])
    out: dict[str, Any] = {"eval_images": report["images"], "eval_masks": report["masks"], "iou_head_spearman": report["iou_head_spearman"]}
    for k in CLICKS:
        out[f"miou_{k}"] = report["miou"][str(k)]
        out[f"miou_{k}_ci"] = list(bootstrap_interval(shown[:, k - 1], image, seed=seed)) if len(shown) else None
    return out
