"""Training the box detector: a new `BoxHead` fitted to precomputed embeddings and their boxes."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from segany_train.box_detection.box_head import BoxHead, BoxHeadConfig
from segany_train.box_detection.box_targets import encode_targets
from segany_train.box_detection.detector_loss import detector_loss
from segany_train.box_detection.training_data import encode_training_data
from segany_train.model import Sam
from segany_train.training.optim import OptimConfig, lr_factor


def fit_box_head(
    embeddings: torch.Tensor,
    boxes: Sequence[torch.Tensor],
    *,
    stride: float,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
    hidden: int = 64,
    depth: int = 3,
    scale_edges: Sequence[float] = (1.0, 2.5, 6.0),
    weight_decay: float = 1e-4,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> tuple[BoxHead, list[float]]:
    """Trains a new `BoxHead` on NxCxhxw embeddings and their N Kx4 XYXY boxes (input pixels; K may
    be 0) for `steps` AdamW steps (cosine learning rate after a short warm-up). Returns the head
    (eval mode, on `device`, by default the embeddings') and the loss of every step. Deterministic
    given `seed`.

    Each step moves one batch of embeddings to `device` and encodes that batch's targets, so the
    embeddings may be a disk-mapped CPU tensor (`encode_training_data`'s) and nothing per image but
    its boxes stays in memory.
    """
    if embeddings.dim() != 4 or embeddings.shape[0] != len(boxes) or embeddings.shape[0] == 0:
        raise ValueError(f"need NxCxhxw embeddings and N box tensors, got {tuple(embeddings.shape)} and {len(boxes)}")
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"steps and batch_size must be positive and lr > 0, got {steps}, {batch_size}, {lr}")
    config = BoxHeadConfig(
        channels=embeddings.shape[1], stride=float(stride), hidden=hidden, depth=depth, scale_edges=tuple(scale_edges)
    )
    grid = tuple(embeddings.shape[-2:])
    device = embeddings.device if device is None else torch.device(device)
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's random state alone
        torch.manual_seed(seed)
        head = BoxHead(config).to(device)
    head.set_input_statistics(embeddings)
    optim = OptimConfig(lr=lr, weight_decay=weight_decay, schedule="cosine", warmup_steps=min(20, steps // 10), total_steps=steps)
    optimizer = torch.optim.AdamW(head.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, optim))
    generator = torch.Generator().manual_seed(seed)
    n = embeddings.shape[0]
    order, cursor = torch.randperm(n, generator=generator), 0
    losses = []
    head.train()
    with tqdm(range(steps), desc="box detector", disable=not progress) as bar:
        for _ in bar:
            take = min(batch_size, n)
            if cursor + take > n:  # a new pass over the images in a new order
                order, cursor = torch.randperm(n, generator=generator), 0
            idx = order[cursor : cursor + take]
            cursor += take
            targets = [encode_targets(boxes[i].cpu(), grid, stride=config.stride, scale_edges=config.scale_edges) for i in idx.tolist()]
            loss = detector_loss(
                head,
                embeddings[idx.to(embeddings.device)].to(device),
                torch.stack([t.heat for t in targets]).to(device),
                torch.stack([t.params for t in targets]).to(device),
                torch.stack([t.weight for t in targets]).to(device),
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    return head.eval(), losses


def train_box_detector(
    sam: Sam,
    data: str | Path | Sequence[Any],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
    horizontal_flip: bool = True,
    progress: bool = True,
    **head_options: Any,
) -> BoxHead:
    """Trains a class-agnostic box head on the frozen image embeddings of `sam`, on `sam`'s device.

    data: SA-1B shard paths or patterns (every annotation's `bbox` is an "object"), or a list of
    (HxWx3 uint8 image, Kx4 XYWH boxes in that image's pixels) pairs; images without boxes are
    negatives. Each image (and, with `horizontal_flip`, its mirror image) is encoded once and its
    embedding spooled to a temporary file (see `encode_training_data`). head_options: hidden, depth,
    scale_edges, weight_decay (see `fit_box_head`).
    """
    sam = sam.eval()
    embeddings, boxes = encode_training_data(sam, data, horizontal_flip=horizontal_flip)
    stride = sam.image_encoder.img_size / embeddings.shape[-1]
    head, _ = fit_box_head(
        embeddings,
        boxes,
        stride=stride,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        device=sam.pixel_mean.device,
        progress=progress,
        **head_options,
    )
    return head
