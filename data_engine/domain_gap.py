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
less than `MAX_CONTROL_GAIN`.

`pool_gt` also bounds what the cycle's other targets can read (`target_ceilings`): the simulated
annotator labels the first two pool chunks (the first two rounds' images) with `seed` and with
`pool_gt`, and the stage-3 threshold sweep runs with each over pool images against their GT. When
even `pool_gt` misses a target there, perfect annotation in every round would not reach it either:


    python -m data_engine.domain_gap                          # the engine's default pool
    python -m data_engine.domain_gap corpus.synthetic.style=tinted run_dir=outputs/domain_gap_tinted
"""

import itertools
import sys
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from data_engine.annotation_step import ANNOTATED_PREFIX
from data_engine.corpus import CorpusSplit, read_labelled_images, split_corpus
from data_engine.engine import Engine, prepare_corpus
from data_engine.engine_config_check import check_engine_config
from data_engine.shard_outputs import completed_output
from data_engine.threshold_sweep import sweep_automatic
from segany_train.atomic_files import write_json_atomically
from segany_train.amg.generator_settings import GeneratorSettings
from segany_train.config_paths import CONFIG_DIR
from segany_train.data.directory_lock import lock_directory
from segany_train.model import build_sam_from_checkpoint

MIN_HEADROOM = 0.15  # pool_gt - seed, held-out mIoU@1
MAX_CONTROL_GAIN = 0.03  # control - seed
RESULT_FILE = "domain_gap.json"
# the engine's stage-3 targets (data_engine/targets.py): share of masks above IoU 0.75 and GT recall
STAGE3_SHARE_75, STAGE3_RECALL_50 = 0.7, 0.6


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


def _best(rows: list[dict[str, Any]], key: str, where: str | None = None, minimum: float = 0.0) -> float | None:
    """The highest `key` over the sweep's rows whose `where` reaches `minimum` (None: no such row)."""
    values = [r[key] for r in rows if where is None or r[where] >= minimum]
    return max(values) if values else None


def target_ceilings(engine: Engine, split: CorpusSplit, checkpoints: dict[str, str]) -> dict[str, Any]:
    """Stage-1 annotation cost and stage-3 mask quality with each of `checkpoints` ({name: path}).

    Annotation: the simulated annotator on the first two pool chunks, the same images for every
    model. Stage 3: the in-cycle threshold sweep over the first `threshold_sweep.images` pool images
    against their GT, summarised by the best the sweep offers for each stage-3 target."""
    cfg = engine.cfg
    chunks = split.chunks[:2]
    images = [s for chunk in chunks for s in chunk]
    generator = GeneratorSettings.from_mapping(OmegaConf.to_container(cfg.stage3.generator, resolve=True), where="stage3.generator")
    out: dict[str, Any] = {"annotated_shards": len(images)}
    for name, checkpoint in checkpoints.items():

        def sweep() -> dict[str, Any]:
            items = list(itertools.islice(read_labelled_images(images), cfg.threshold_sweep.images))
            sam = build_sam_from_checkpoint(checkpoint).to(engine.device).eval()
            rows = sweep_automatic(
                sam, items, settings=generator, pred_iou=cfg.threshold_sweep.pred_iou, stability=cfg.threshold_sweep.stability, progress=cfg.progress
            )
            return {"rows": rows, "images": len(items)}

        rows = engine.ledger.run(f"{name}/stage3_sweep", sweep)["rows"]
        out[name] = {
            "annotation": engine.annotate_step(f"{name}/annotate", checkpoint, images, 0)["stats"],
            "stage3": {
                "share_iou_above_75_at_recall": _best(rows, "share_iou_above_75", "gt_recall_50", STAGE3_RECALL_50),
                "recall_at_share_iou_above_75": _best(rows, "gt_recall_50", "share_iou_above_75", STAGE3_SHARE_75),
                "share_iou_above_90": _best(rows, "share_iou_above_90"),
            },
        }
    out["same_objects"] = _same_objects(engine, list(checkpoints), len(images))
    return out


def _same_objects(engine: Engine, names: list[str], shards: int) -> dict[str, Any]:
    """Seconds and clicks per mask over the objects every model's annotation labelled. Objects are
    labelled largest first, so each image's first n masks are the same objects for every model; the
    30-second rule ends an image early, and a weaker model's s/mask then leaves out the small
    objects a stronger one goes on to label."""
    per_model = [
        [image for k in range(shards) for image in completed_output(engine.ledger.step_dir(f"{name}/annotate"), ANNOTATED_PREFIX, k)["images"]]
        for name in names
    ]
    common = [min(len(images[i]["mask_seconds"]) for images in per_model) for i in range(len(per_model[0]))]
    masks = sum(common)
    out: dict[str, Any] = {"masks": masks}
    for name, images in zip(names, per_model):
        out[name] = {
            "seconds_per_mask": sum(sum(image["mask_seconds"][:n]) for image, n in zip(images, common)) / max(masks, 1),
            "clicks_per_mask": sum(sum(image["mask_clicks"][:n]) for image, n in zip(images, common)) / max(masks, 1),
        }
    return out


def measure_domain_gap(cfg: DictConfig) -> dict[str, Any]:
    """Trains and scores `pool_gt` and `control` from the seed (resumable); returns
    {"steps", "models": {name: evaluate_holdout's figures}, "verdict", "ceilings": target_ceilings's
    figures for seed and pool_gt} and writes it to run_dir."""
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
        models = {"seed": engine.evaluate_step("seed/eval", seed, split.holdout)}  # step order seeds each retrain: kept
        pool_gt = engine.train_step("pool_gt/train", pool, seed, engine.cycle_steps, split.holdout)
        models |= {
            "pool_gt": engine.evaluate_step("pool_gt/eval", pool_gt, split.holdout),
            "control": engine.evaluate_step("control/eval", engine.train_step("control/train", split.seed, seed, engine.cycle_steps, split.holdout), split.holdout),
        }
        result = {
            "steps": engine.cycle_steps,
            "models": models,
            "verdict": domain_verdict(*(models[name]["miou_1"] for name in ("seed", "pool_gt", "control"))),
            "ceilings": target_ceilings(engine, split, {"seed": seed, "pool_gt": pool_gt}),
        }
        write_json_atomically(Path(cfg.run_dir) / RESULT_FILE, result)  # valid JSON: NaN as null
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
        "",
        f"Stage 1 (the simulated annotator on {result['ceilings']['annotated_shards']} pool shards) and stage 3 (the threshold sweep on pool",
        "images against their GT) with the seed and with pool_gt: the best the cycle's targets could read with perfect annotation:",
        "",
        f"| model | s/mask | clicks/mask | brush rate | masks/image | stage 3: IoU > 0.75 share at recall >= {STAGE3_RECALL_50:.0%} "
        f"| recall at IoU > 0.75 share >= {STAGE3_SHARE_75:.0%} | best IoU > 0.9 share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("seed", "pool_gt"):
        a, q = result["ceilings"][name]["annotation"], result["ceilings"][name]["stage3"]
        shown = {k: "none" if v is None else f"{v:.0%}" for k, v in q.items()}
        lines.append(
            f"| {name} | {a['seconds_per_mask']:.1f} | {a['clicks_per_mask']:.2f} | {a['brush_rate']:.2f} | {a['masks_per_image']:.2f} "
            f"| {shown['share_iou_above_75_at_recall']} | {shown['recall_at_share_iou_above_75']} | {shown['share_iou_above_90']} |"
        )
    ceilings, same = result["ceilings"], result["ceilings"]["same_objects"]
    ratio = ceilings["pool_gt"]["annotation"]["seconds_per_mask"] / max(ceilings["seed"]["annotation"]["seconds_per_mask"], 1e-9)
    same_ratio = same["pool_gt"]["seconds_per_mask"] / max(same["seed"]["seconds_per_mask"], 1e-9)
    lines += [
        "",
        f"pool_gt / seed seconds per mask: {ratio:.2f}; on the {same['masks']} objects both labelled: {same_ratio:.2f} "
        f"({same['seed']['seconds_per_mask']:.1f} -> {same['pool_gt']['seconds_per_mask']:.1f} s, "
        f"{same['seed']['clicks_per_mask']:.2f} -> {same['pool_gt']['clicks_per_mask']:.2f} clicks); "
        "stage 1's target: the last rounds <= 0.7 x the first",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    cfg = compose_engine_config(sys.argv[1:] if argv is None else argv)
    print(format_result(measure_domain_gap(cfg)))


if __name__ == "__main__":
    main()
