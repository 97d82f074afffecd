"""Retraining between rounds: segany-train's own `train(cfg)` on the shards annotated so far.

Each retrain is an ordinary training run in its own directory, started from the previous round's
checkpoint, so a kill mid-training resumes from its last Lightning checkpoint (`ckpt_path=last`).
"""

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

from segany_train.train import CONFIG_DIR, train


def compose_training_config(overrides: list[str]) -> DictConfig:
    """The training config `segany-train <overrides>` would run (the engine's model and recipe)."""
    if GlobalHydra.instance().is_initialized():  # inside segany-engine's @hydra.main: same config dir
        return compose(config_name="train", overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name="train", overrides=list(overrides))


def retrain(
    base: DictConfig,
    *,
    run_dir: str | Path,
    train_shards: list[str],
    val_shards: list[str],
    steps: int,
    init_checkpoint: str | None,
    seed: int,
    lr: float | None = None,
    progress: bool = True,
) -> str:
    """Trains `steps` optimiser steps on `train_shards` from `init_checkpoint` (None: from scratch);
    returns the final checkpoint's path; `lr` replaces the recipe's peak learning rate (a fine-tuning
    round from a trained model wants a smaller one than training from scratch). No validation
    inside: the engine evaluates each round itself."""
    if not train_shards:
        raise ValueError("nothing to train on: the round produced no annotated shard")
    cfg = base.copy()
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
        cfg.seed = seed
        cfg.ckpt_path = "last"
        cfg.model.checkpoint = init_checkpoint
        cfg.data.synthetic = None
        cfg.data.train_shards = list(train_shards)
        cfg.data.val_shards = list(val_shards)
        cfg.trainer.max_steps = steps
        cfg.trainer.limit_val_batches = 0
        cfg.optim.total_steps = steps
        if lr is not None:
            cfg.optim.lr = lr
        cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, max(steps // 10, 1))
        if cfg.optim.schedule == "step":
            cfg.optim.milestones = [int(steps * 2 / 3), int(steps * 26 / 27)]
        cfg.logger = OmegaConf.merge(cfg.logger, {"kind": "csv", "log_images_every_n_steps": 0})
        cfg.callbacks.progress_bar = progress
    train(cfg)
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    if not last.exists():
        raise RuntimeError(f"training in {run_dir} finished without writing {last}")
    return str(last)
