"""The domain-gap measurement behind the engine's pool: three models from the seed, scored on held-out pool images."""

import json
from pathlib import Path

import pytest
import torch

from data_engine.domain_gap import RESULT_FILE, domain_verdict, format_result, measure_domain_gap
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
    assert json.loads((tmp_path / "run" / RESULT_FILE).read_text()) == json.loads(json.dumps(result))
    assert "new domain for the seed:" in format_result(result)
    assert measure_domain_gap(cfg.copy()) == result  # a finished measurement is read back, not redone

    verdict = domain_verdict(0.40, 0.58, 0.41)
    assert verdict["headroom"] == pytest.approx(0.18) and verdict["new_domain"]
    assert not domain_verdict(0.40, 0.52, 0.41)["new_domain"]  # too little headroom
    assert not domain_verdict(0.40, 0.60, 0.45)["new_domain"]  # the seed split alone closes part of the gap
