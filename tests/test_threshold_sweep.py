"""Thresholds measured inside the cycle: the sweeps against running each setting for real, and the choice."""

import pytest

from data_engine.automatic_step import image_quality, summarize_quality
from data_engine.corpus import read_labelled_images
from data_engine.threshold_sweep import choose_thresholds, sweep_automatic
from segany_train.amg.generator_settings import GeneratorSettings
from segany_train.data.synthetic import write_synthetic_corpus
from segany_train.inference.automatic_mask_generator import SamAutomaticMaskGenerator
from segany_train.model import build_sam_from_checkpoint
from segany_train.model.seed_model import resolve_seed_checkpoint


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sweep_pool")
    scene = {"size": 256, "min_objects": 2, "max_objects": 4, "min_radius": 0.1, "max_radius": 0.35, "style": "fluorescent"}
    write_synthetic_corpus(directory, num_images=3, images_per_shard=3, progress=False, **scene)
    return list(read_labelled_images(sorted(str(p) for p in directory.glob("sa_*.tar"))))


def test_the_automatic_sweep_equals_the_generator_run_at_each_threshold(items):
    # with one stability threshold, a stricter predicted-IoU threshold never drops a mask that
    # suppressed another in NMS without dropping the suppressed one too: the sweep is exact
    sam = build_sam_from_checkpoint(str(resolve_seed_checkpoint("builtin", None))).eval()
    settings = GeneratorSettings(points_per_side=8, min_mask_region_area=0, max_mask_area_fraction=0.95)
    pred_iou = [0.2, 0.4, 0.6, 0.8]
    rows = sweep_automatic(sam, items, settings=settings, pred_iou=pred_iou, stability=[0.7], progress=False)
    assert [(r["pred_iou_thresh"], r["stability_score_thresh"]) for r in rows] == [(p, 0.7) for p in pred_iou]
    for row, p in zip(rows, pred_iou):
        at_p = GeneratorSettings(**{**settings.as_kwargs(), "pred_iou_thresh": p, "stability_score_thresh": 0.7})
        generator = SamAutomaticMaskGenerator.from_settings(sam, at_p, output_mode="coco_rle")
        gt = [[a["segmentation"] for a in item.record["annotations"]] for item in items]
        brute = summarize_quality([image_quality([r["segmentation"] for r in generator.generate(i.image)], g) for i, g in zip(items, gt)])
        assert row["masks"] == brute["masks"] and row["gt_recall_50"] == pytest.approx(brute["gt_recall_50"])
        assert row["share_iou_above_75"] == pytest.approx(brute["share_iou_above_75"])
    assert rows[0]["masks"] > rows[-1]["masks"]  # the thresholds do filter


def test_the_choice_takes_the_most_masks_at_the_quality_and_falls_back_to_the_best_quality():
    rows = [
        {"p": a, "quality": q, "amount": n}
        for a, (q, n) in enumerate([(0.95, 0.2), (0.85, 0.6), (0.81, 0.6), (0.6, 0.9), (0.85, 0.5)])
    ]
    assert choose_thresholds(rows, quality="quality", minimum=0.8, amount="amount")["p"] == 1  # 0.6 of amount, better quality than row 2
    assert choose_thresholds(rows, quality="quality", minimum=0.9, amount="amount")["p"] == 0
    assert choose_thresholds(rows, quality="quality", minimum=0.99, amount="amount")["p"] == 0  # none reaches it: best quality
    with pytest.raises(ValueError, match="no threshold sweep rows"):
        choose_thresholds([], quality="quality", minimum=0.5, amount="amount")
