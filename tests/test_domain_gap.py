"""The domain-gap measurement behind the engine's pool: three models from the seed, scored on held-out pool images."""

import json
from pathlib import Path

import pytest
import torch

from data_engine.domain_gap import RESULT_FILE, domain_verdict, format_result, measure_domain_gap
from segany_train.atomic_files import finite_or_null
from tests.test_engine import _engine_config


def test_the_domain_gap_trains_on_the_pools_gt_and_on_the_seed_split_for_the_cycles_budget(tmp_path):
    corpus = tmp_path / "corpus"
    cfg = _engine_config(tmp_path, corpus, ["training.keep_seed_data=false"])
    result = measure_domain_gap(cfg)
    ledger = json.loads((tmp_path / "run" / "engine.json").read_text())
    steps = ledger["steps"]
    # pool_gt: every pool shard but the held-out one; control: the seed split; both for the cycle's steps
    assert [Path(s).name for s in steps["pool_gt/train"]["train_shards"]] == [f"sa_{i:06d}.tar" for i in range(4)]
    assert all(Path(s).parent == Path(f"{corpus}_seed") for s in steps["control/train"]["train_shards"])
    cycle = 2 * 2 + 2 * 2 + 2
    assert result["steps"] == cycle
    for name in ("pool_gt", "control"):
        state = torch.load(tmp_path / "run" / steps[f"{name}/train"]["checkpoint"], map_location="cpu", weights_only=True)
        assert state["global_step"] == cycle
    m = {name: result["models"][name]["miou_1"] for name in ("seed", "pool_gt", "control")}
    assert result["verdict"] == domain_verdict(m["seed"], m["pool_gt"], m["control"])
    assert json.loads((tmp_path / "run" / RESULT_FILE).read_text()) == json.loads(json.dumps(finite_or_null(result)))  # NaN written as null
    # the ceilings: both models annotate the same two pool chunks and sweep stage 3 on their images
    ceilings = result["ceilings"]
    assert ceilings["annotated_shards"] == 2
    for name in ("seed", "pool_gt"):
        assert ceilings[name]["annotation"]["images"] == 4  # two shards of two images
        assert ceilings[name]["annotation"]["gt_objects_per_image"] == ceilings["seed"]["annotation"]["gt_objects_per_image"]
        rows = steps[f"{name}/stage3_sweep"]["rows"]
        assert steps[f"{name}/stage3_sweep"]["images"] == 4 and len(rows) == 7 * 5
        stage3 = ceilings[name]["stage3"]
        assert stage3["share_iou_above_90"] == max(r["share_iou_above_90"] for r in rows)
        recalled = [r["share_iou_above_75"] for r in rows if r["gt_recall_50"] >= 0.6]
        assert stage3["share_iou_above_75_at_recall"] == (max(recalled) if recalled else None)
    assert ceilings["seed"]["annotation"] != ceilings["pool_gt"]["annotation"]  # two models, two annotations
    same = ceilings["same_objects"]  # per image, the first masks both models made (largest objects first)
    images = {
        name: [i for k in range(2) for i in json.loads((tmp_path / "run" / name / "annotate" / f"annotated-{k:06d}.stats.json").read_text())["images"]]
        for name in ("seed", "pool_gt")
    }
    common = [min(len(a["mask_seconds"]), len(b["mask_seconds"])) for a, b in zip(images["seed"], images["pool_gt"])]
    assert same["masks"] == sum(common)
    for name in ("seed", "pool_gt"):
        seconds = sum(sum(i["mask_seconds"][:n]) for i, n in zip(images[name], common))
        assert same[name]["seconds_per_mask"] == pytest.approx(seconds / max(sum(common), 1))
    text = format_result(result)
    assert "new domain for the seed:" in text and "pool_gt / seed seconds per mask:" in text
    # a finished measurement is read back, not redone (a round without pre-fills has a NaN precision,
    # null in the files)
    assert measure_domain_gap(cfg.copy()) == json.loads(json.dumps(finite_or_null(result)))

    verdict = domain_verdict(0.40, 0.58, 0.41)
    assert verdict["headroom"] == pytest.approx(0.18) and verdict["new_domain"]
    assert not domain_verdict(0.40, 0.52, 0.41)["new_domain"]  # too little headroom
    assert not domain_verdict(0.40, 0.60, 0.45)["new_domain"]  # the seed split alone closes part of the gap
