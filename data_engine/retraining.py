"""Retraining between rounds: segany-train's own `train(cfg)` on the shards annotated so far.

Each retrain is an ordinary training run in its own directory that continues the previous round's
training state, so a kill mid-training resumes from its own last Lightning checkpoint (`ckpt_path=last`).
"""

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

from segany_train.config_paths import CONFIG_DIR
from segany_train.training.lightning_warnings import continued_run_warnings_filtered
from segany_train.training.run import train


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
    seed: int,
    continue_from: str | None = None,
    weights: str | None = None,
    total_steps: int | None = None,
    progress: bool = True,
) -> str:
    """Trains `steps` optimiser steps on `train_shards`; returns the final checkpoint's path.

    continue_from: None trains a new model; a checkpoint of an earlier retrain continues that run's
    whole training state (weights, AdamW moments, lr schedule, step count) on the new shards. A
    round that restarted AdamW instead would take its first steps at full size in every direction
    (the moments start at zero), which on this scale undoes more than a short round teaches.
    total_steps: the length of the lr schedule; the engine gives every retrain the whole cycle's, so
    the schedule runs once over the cycle (default: this retrain's own `steps`).
    No validation inside: the engine evaluates each round itself."""
    if not train_shards:
        raise ValueError("nothing to train on: the round produced no annotated shard")
    own_last = Path(run_dir) / "checkpoints" / "last.ckpt"
    start = _global_step(continue_from) if continue_from else 0
    total = total_steps or start + steps
    if start + steps > total:
        raise ValueError(f"the lr schedule has {total} steps, but this retrain ends at step {start + steps}")
    cfg = base.copy()
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
        cfg.seed = seed
        # a killed retrain resumes from its own last checkpoint; a new one starts from the last round's
        cfg.ckpt_path = "last" if own_last.exists() or continue_from is None else str(continue_from)
        if continue_from is not None:  # the weights come with the training state
            cfg.model.checkpoint = None
        elif weights is not None:
            cfg.model.checkpoint = str(weights)
        cfg.data.synthetic = None
        cfg.data.train_shards = list(train_shards)
        cfg.data.val_shards = list(val_shards)
        cfg.trainer.max_steps = start + steps
        cfg.trainer.limit_val_batches = 0
        cfg.optim.total_steps = total
        cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, max(total // 10, 1))
        if cfg.optim.schedule == "step":
            cfg.optim.milestones = [int(total * 2 / 3), int(total * 26 / 27)]
        cfg.logger = OmegaConf.merge(cfg.logger, {"kind": "csv", "log_images_every_n_steps": 0})
        cfg.callbacks.progress_bar = progress
        cfg.trainer.enable_model_summary = False  # the same model every round: the engine's log says which
    with continued_run_warnings_filtered():  # one run continued round after round (lightning_warnings.py)
        train(cfg)
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    if not last.exists():
        raise RuntimeError(f"training in {run_dir} finished without writing {last}")
    return str(last)


def _global_step(checkpoint: str) -> int:
    """The optimiser steps a Lightning checkpoint has taken."""
    return int(torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"])
