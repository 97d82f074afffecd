"""Is the engine's pool a new domain for its seed model? The measurement behind the pool's choice.

The engine can only show its effect when the pool is something the seed has not learned: the seed
must score well below what training on the pool's own masks reaches, and training on the seed's own
data for as long must not close that gap. With the engine's config (the same overrides as
`segany-engine`), three models are scored on the held-out pool images, each in the engine's way
(`Engine.train_step`, `Engine.evaluate_step`, resumable in `run_dir`):

- `seed`: the seed model as the engine starts from it;
- `pool_gt`: the seed trained on the GT masks of every pool image (not held out) for the cycle's
  whole step budget and schedule, mixed with the seed split when the engine's retrains are
  (`training.keep_seed_data`): the best the cycle's retrains could do with perfect annotation;
- `control`: the seed trained as long on the seed split alone (the engine's control).

The pool is a new domain when `pool_gt` is at least `MIN_HEADROOM` above `seed` and `control` gains
less than `MAX_CONTROL_GAIN`:

    python -m data_engine.domain_gap                          # the engine's default pool
    python -m data_engine.domain_gap corpus.synthetic.style=tinted run_dir=outputs/domain_gap_tinted
"""

import json
import sys
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from data_engine.corpus import split_corpus
from data_engine.engine import Engine, prepare_corpus
from data_engine.engine_config_check import check_engine_config
from segany_train.config_paths import CONFIG_DIR
from segany_train.data.directory_lock import lock_directory

MIN_HEADROOM = 0.15  # pool_gt - seed, held-out mIoU@1
MAX_CONTROL_GAIN = 0.03  # control - seed
RESULT_FILE = "domain_gap.json"


def compose_engine_config(overrides: list[str]) -> DictConfig:
    """segany-engine's config with `overrides`; the run directory defaults to outputs/domain_gap."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name="engine/cycle", overrides=["run_dir=outputs/domain_gap", *overrides])
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def domain_verdict(seed: float, pool_gt: float, control: float) -> dict[str, Any]:
    """The two conditions on held-out mIoU@1 and whether each holds."""
    headroom, control_gain = pool_gt - seed, control - seed
    return {
        "headroom": headroom,
        "headroom_met": headroom >= MIN_HEADROOM,
        "control_gain": control_gain,
        "control_gain_met": control_gain < MAX_CONTROL_GAIN,
        "new_domain": headroom >= MIN_HEADROOM and control_gain < MAX_CONTROL_GAIN,
    }


def measure_domain_gap(cfg: DictConfig) -> dict[str, Any]:
    """Trains and scores `pool_gt` and `control` from the seed (resumable); returns
    {"steps", "models": {name: evaluate_holdout's figures}, "verdict"} and writes it to run_dir."""
    check_engine_config(cfg)
    with lock_directory(cfg.run_dir):
        prepare_corpus(cfg)
        engine = Engine(cfg)
        if engine.seed_weights is None:
            raise ValueError("the domain gap is measured from a given seed model: set seed_model.checkpoint (builtin or a path)")
        rounds = cfg.stage1.rounds + cfg.stage2.rounds
        split = split_corpus(cfg.corpus.shards, seed=cfg.seed_model.shards, holdout_shards=cfg.corpus.holdout_shards, rounds=rounds)
        seed = engine.seed_weights
        pool = split.pool + (split.seed if cfg.training.keep_seed_data else [])
        models = {
            "seed": engine.evaluate_step("seed/eval", seed, split.holdout),
            "pool_gt": engine.evaluate_step("pool_gt/eval", engine.train_step("pool_gt/train", pool, seed, engine.cycle_steps, split.holdout), split.holdout),
            "control": engine.evaluate_step("control/eval", engine.train_step("control/train", split.seed, seed, engine.cycle_steps, split.holdout), split.holdout),
        }
        result = {
            "steps": engine.cycle_steps,
            "models": models,
            "verdict": domain_verdict(*(models[name]["miou_1"] for name in ("seed", "pool_gt", "control"))),
        }
        (Path(cfg.run_dir) / RESULT_FILE).write_text(json.dumps(result, indent=1))
        return result


def format_result(result: dict[str, Any]) -> str:
    """A markdown table of the three models and the verdict."""
    lines = [
        f"Held-out pool images, every model trained for the cycle's {result['steps']} steps from the seed:",
        "",
        "| model | mIoU@1 [95%] | mIoU@5 | IoU-head Spearman |",
        "|---|---|---|---|",
    ]
    for name, m in result["models"].items():
        low, high = m["miou_1_ci"]
        spearman = "-" if m["iou_head_spearman"] is None else f"{m['iou_head_spearman']:.2f}"
        lines.append(f"| {name} | {m['miou_1']:.3f} [{low:.3f}-{high:.3f}] | {m['miou_5']:.3f} | {spearman} |")
    v = result["verdict"]
    lines += [
        "",
        f"pool_gt - seed = {v['headroom']:+.3f} (needs >= {MIN_HEADROOM}: {'yes' if v['headroom_met'] else 'no'}); "
        f"control - seed = {v['control_gain']:+.3f} (needs < {MAX_CONTROL_GAIN}: {'yes' if v['control_gain_met'] else 'no'})",
        f"new domain for the seed: {'yes' if v['new_domain'] else 'no'}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    cfg = compose_engine_config(sys.argv[1:] if argv is None else argv)
    print(format_result(measure_domain_gap(cfg)))


if __name__ == "__main__":
    main()
