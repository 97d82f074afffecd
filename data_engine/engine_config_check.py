"""segany-engine's values checked before any work: a value that cannot work (negative rounds, a
target IoU outside (0, 1], no grid points, an unreadable stage-3 checkpoint) fails in one line at
start, not after the seed model has trained."""

import math
from pathlib import Path

from omegaconf import DictConfig

from segany_train.model import SamCheckpointError
from segany_train.model.checkpoint import load_checkpoint_file


class EngineConfigError(SystemExit):
    """A value segany-engine refuses. A SystemExit so that the Hydra entry prints its one line and
    exits with status 1 instead of a traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(f"segany-engine: error: {message}")


def check_engine_config(cfg: DictConfig) -> None:
    """EngineConfigError naming the first value of `cfg` that cannot work."""
    _at_least(cfg, "stage1.rounds", 0)
    _at_least(cfg, "stage2.rounds", 0)
    for key in ("stage1.train_steps", "stage2.train_steps", "stage3.generator.points_per_side"):
        _at_least(cfg, key, 1)
    _at_least(cfg, "stage3.train_steps", 0)  # 0: no final retrain
    _at_least(cfg, "eval.batch_size", 1)
    for key in ("eval.max_images", "eval.max_masks_per_image"):  # null: all of them
        if _select(cfg, key) is not None:
            _at_least(cfg, key, 1)
    if cfg.annotator.kind == "label_studio" and not cfg.annotator.label_studio.api_key:
        raise EngineConfigError("annotator.kind=label_studio needs annotator.label_studio.api_key (or LABEL_STUDIO_API_KEY in the environment)")
    target = cfg.annotator.target_iou
    if not (isinstance(target, (int, float)) and 0 < target <= 1):
        raise EngineConfigError(f"annotator.target_iou must be in (0, 1], got {target}")
    for key in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh"):
        value = cfg.stage3.generator[key]
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise EngineConfigError(f"stage3.generator.{key} must be a finite number, got {value}")
    sweep = cfg.get("threshold_sweep")
    if sweep is not None and sweep.enabled:
        _at_least(cfg, "threshold_sweep.images", 1)
        for key in ("pred_iou", "stability"):
            values = list(sweep[key] or [])
            if not values or not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in values):
                raise EngineConfigError(f"threshold_sweep.{key} must be a non-empty list of numbers in [0, 1], got {values}")
        for key in ("prefill_min_precision", "stage3_min_share_iou_75"):
            if not (isinstance(sweep[key], (int, float)) and 0 <= sweep[key] <= 1):
                raise EngineConfigError(f"threshold_sweep.{key} must be in [0, 1], got {sweep[key]}")
    for corpus in ("corpus.synthetic", "seed_model.corpus"):
        if _select(cfg, corpus) is not None:
            _at_least(cfg, f"{corpus}.num_images", 1)
            _at_least(cfg, f"{corpus}.images_per_shard", 1)
    checkpoints = [cfg.checkpoint] if cfg.only == "stage3" and cfg.checkpoint else []
    if cfg.seed_model.checkpoint not in (None, "builtin"):  # builtin: the shipped, hash-checked file
        checkpoints.append(cfg.seed_model.checkpoint)
    for checkpoint in checkpoints:
        try:
            load_checkpoint_file(Path(checkpoint))
        except (FileNotFoundError, SamCheckpointError) as error:
            raise EngineConfigError(str(error)) from None


def _select(cfg: DictConfig, key: str):
    node = cfg
    for part in key.split("."):
        node = node.get(part) if node is not None else None
    return node


def _at_least(cfg: DictConfig, key: str, minimum: int) -> None:
    value = _select(cfg, key)
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        raise EngineConfigError(f"{key} must be an integer >= {minimum}, got {value}")
