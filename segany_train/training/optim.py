"""AdamW with layer-wise lr decay for the ViT, no weight decay on norms/biases/positions, warmup + decay."""

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 8e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.1
    layer_decay: float = 0.8  # lr multiplier per ViT block counted from the top
    warmup_steps: int = 250
    schedule: str = "step"  # "step" (SAM: x0.1 at milestones) or "cosine" (SAM 2)
    milestones: tuple[int, ...] = (60000, 86666)
    decay_factor: float = 0.1
    total_steps: int | None = None  # for cosine; the training entry fills in trainer.max_steps when None
    gradient_clip: float | None = None  # SAM 2: 0.1
    no_decay_names: tuple[str, ...] = field(default=("pos_embed", "rel_pos_h", "rel_pos_w"))

    def __post_init__(self) -> None:
        """ValueError naming the first value that cannot train (`optim.lr=nan` would otherwise fail
        inside Lightning, after the run directory is written, or train on silently)."""
        positive = {"layer_decay": self.layer_decay, "decay_factor": self.decay_factor}
        if self.gradient_clip is not None:
            positive["gradient_clip"] = self.gradient_clip
        for name, value in positive.items():
            if not _number(value) or not 0 < value < math.inf:
                raise ValueError(f"optim.{name} must be a positive number, got {value!r}")
        # lr 0 is allowed: a run that must leave the weights as loaded (tests, a dry run of the pipeline)
        if not _number(self.lr) or not 0 <= self.lr < math.inf:
            raise ValueError(f"optim.lr must be a number >= 0, got {self.lr!r}")
        if not _number(self.weight_decay) or not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"optim.weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(_number(b) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas!r}")
        if not _integer(self.warmup_steps) or self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not all(_integer(m) and m >= 0 for m in self.milestones):
            raise ValueError(f"optim.milestones must be integers >= 0, got {self.milestones!r}")
        if self.schedule not in ("step", "cosine"):
            raise ValueError(f"optim.schedule must be step or cosine, got {self.schedule!r}")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _layer_id(name: str, depth: int) -> int:
    """0 for the patch/position embedding, i+1 for encoder block i, depth+1 for everything after."""
    if name.startswith("image_encoder.") and ("patch_embed" in name or name.endswith("pos_embed")):
        return 0
    match = re.match(r"image_encoder\.blocks\.(\d+)\.", name)
    if match:
        return int(match.group(1)) + 1
    return depth + 1


def parameter_groups(model: nn.Module, cfg: OptimConfig, depth: int) -> list[dict]:
    """One group per (layer, decay?) pair, each with its `lr_scale` = layer_decay ** (depth + 1 - layer)."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        bare = name.split(".", 1)[1] if not name.startswith(("image_encoder", "prompt_encoder", "mask_decoder")) else name
        layer = _layer_id(bare, depth)
        no_decay = param.ndim <= 1 or bare.endswith(cfg.no_decay_names)
        group = groups.setdefault(
            (layer, no_decay),
            {"params": [], "weight_decay": 0.0 if no_decay else cfg.weight_decay, "lr_scale": cfg.layer_decay ** (depth + 1 - layer)},
        )
        group["params"].append(param)
    return list(groups.values())


def lr_factor(step: int, cfg: OptimConfig) -> float:
    """Multiplier of the base lr at `step`: linear warmup, then step decay or cosine."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "step":
        return cfg.decay_factor ** sum(step >= m for m in cfg.milestones)
    if cfg.schedule == "cosine":
        if cfg.total_steps is None:
            raise ValueError("the cosine schedule needs total_steps (segany-train derives it from trainer.max_steps)")
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"schedule must be 'step' or 'cosine', got {cfg.schedule!r}")


def build_optimizer(model: nn.Module, cfg: OptimConfig, depth: int):
    """AdamW and a per-step LambdaLR scheduler honouring each group's lr_scale."""
    groups = parameter_groups(model, cfg, depth)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    return optimizer, scheduler
