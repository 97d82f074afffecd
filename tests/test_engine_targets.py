"""The engine's measurements: the bootstrap interval of held-out mIoU, and its targets checked from the report's rows."""

import numpy as np
import pytest

from data_engine.targets import engine_summary, targets_table
from segany_train.evaluation.holdout import bootstrap_interval


def test_bootstrap_interval_against_a_brute_force_resampling():
    rng = np.random.default_rng(1)
    values = rng.random(30)
    groups = rng.integers(0, 8, 30)
    low, high = bootstrap_interval(values, groups, samples=4000, seed=3)
    # brute force: draw images with replacement, pool their masks, take the mean
    ids = np.unique(groups)
    draws = np.random.default_rng(7)
    means = []
    for _ in range(4000):
        picked = draws.choice(ids, size=ids.size, replace=True)
        means.append(np.concatenate([values[groups == g] for g in picked]).mean())
    ref_low, ref_high = np.percentile(means, [2.5, 97.5])
    assert low == pytest.approx(ref_low, abs=0.02) and high == pytest.approx(ref_high, abs=0.02)
    assert low < values.mean() < high


def test_targets_are_checked_from_the_rows():
    def evaluation(m, lo, hi, rho=0.7):
        return {"miou_1": m, "miou_1_ci": [lo, hi], "miou_5": m, "miou_5_ci": [lo, hi], "iou_head_spearman": rho}

    rows = [
        {"stage": "seed", "round": None, **evaluation(0.5, 0.45, 0.55)},
        *[{"stage": "stage1", "round": r, "images": 10, "masks_per_image": m, "seconds_per_mask": s} for r, m, s in [(1, 2, 30), (2, 2.5, 26), (3, 3, 20), (4, 3.5, 18)]],
        {"stage": "stage2", "round": 1, "images": 10, "masks_per_image": 4.0, "prefilled_per_image": 2.0, "prefilled_precision": 0.9},
        {"stage": "stage2", "round": 2, "images": 10, "masks_per_image": 4.0, "prefilled_per_image": 1.0, "prefilled_precision": 0.6},
        {"stage": "final", "round": None, **evaluation(0.65, 0.61, 0.69)},
        {"stage": "control", "round": None, **evaluation(0.58, 0.54, 0.62)},
    ]
    quality = {"share_iou_above_75": 0.8, "share_iou_above_90": 0.5, "gt_recall_50": 0.7}
    summary = engine_summary(rows, quality)
    met = {name: check["met"] for name, check in summary["targets"].items()}
    assert met["final_vs_seed"] and met["stage1_masks_rise"] and met["stage2_more_masks_than_stage1"]
    assert met["stage3_quality"] and met["iou_head_spearman"]
    assert not met["final_vs_control"]  # +0.07, but the intervals overlap (0.61 < 0.62)
    assert summary["stage1"]["seconds_ratio"] == pytest.approx(19 / 28) and met["stage1_seconds_fall"]
    # stage 2 pooled over rounds: 30 pre-filled on 20 images, 18 + 6 correct
    assert summary["stage2"]["prefilled_per_image"] == 1.5 and summary["stage2"]["prefilled_precision"] == pytest.approx(0.8)
    assert not met["stage2_prefill"]
    assert summary["targets_met"] == 6 and "| **all** | 6 of 8 | no |" in targets_table(summary)
