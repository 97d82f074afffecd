"""Stage 2's class-agnostic box detector: an `ObjectnessHead` trained on the frozen SAM embeddings of
the images annotated so far, with their masks' boxes as the only ("object") class.

Centre-based (one cell per box, CenterNet-like): the cell holding a box centre is a positive with a
Gaussian of soft targets around it; the box is regressed at that cell. Detections are the local
maxima of the objectness map above a threshold.
"""

import math
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from data_engine.corpus import read_labelled_images
from data_engine.objectness_head import ObjectnessHead
from segany_train.model import Sam
from segany_train.training.module import normalize_images
from segany_train.transforms import ResizeLongestSide


def encode_targets(boxes: torch.Tensor, grid: int, stride: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kx4 XYXY boxes (input pixels) -> heatmap GxG in [0, 1], box targets 4xGxG, positive mask GxG.

    The heatmap is the max over boxes of a Gaussian centred on the box centre (sigma a sixth of the
    box size in cells, at least half a cell); box targets live at each centre's cell (a larger box
    wins a shared cell, so small boxes are the ones lost when two centres collide).
    """
    heat = torch.zeros(grid, grid)
    target = torch.zeros(4, grid, grid)
    positive = torch.zeros(grid, grid, dtype=torch.bool)
    centres = torch.arange(grid, dtype=torch.float32) + 0.5
    for box in sorted(boxes.tolist(), key=lambda b: (b[2] - b[0]) * (b[3] - b[1])):  # large last: wins
        cx, cy = (box[0] + box[2]) / 2 / stride, (box[1] + box[3]) / 2 / stride
        w, h = max(box[2] - box[0], 1.0) / stride, max(box[3] - box[1], 1.0) / stride
        sx, sy = max(w / 6, 0.5), max(h / 6, 0.5)
        gauss = torch.exp(-((centres[None, :] - cx) ** 2) / (2 * sx**2) - ((centres[:, None] - cy) ** 2) / (2 * sy**2))
        heat = torch.maximum(heat, gauss)
        i, j = min(int(cy), grid - 1), min(int(cx), grid - 1)
        heat[i, j] = 1.0
        positive[i, j] = True
        target[:, i, j] = torch.tensor([cx - (j + 0.5), cy - (i + 0.5), math.log(w), math.log(h)])
    return heat, target, positive


def decode_boxes(out: torch.Tensor, stride: float) -> torch.Tensor:
    """Bx5xGxG head output -> BxGxGx4 XYXY boxes in input pixels (one per cell)."""
    g = out.shape[-1]
    centres = torch.arange(g, dtype=out.dtype, device=out.device) + 0.5
    cx = (centres[None, None, :] + out[:, 1]) * stride
    cy = (centres[None, :, None] + out[:, 2]) * stride
    w, h = out[:, 3].exp() * stride, out[:, 4].exp() * stride
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


@torch.no_grad()
def detect_boxes(
    head: ObjectnessHead, embeddings: torch.Tensor, *, score_threshold: float, max_detections: int, input_size: list[tuple[int, int]]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """BxCxGxG embeddings -> per image (Kx4 XYXY boxes clamped to the input size (h, w), K scores),
    the local maxima of the objectness above `score_threshold`, best first, at most `max_detections`."""
    out = head(embeddings)
    stride = head.stride
    scores = out[:, 0].sigmoid()
    peaks = scores == F.max_pool2d(scores[:, None], 3, stride=1, padding=1)[:, 0]
    boxes = decode_boxes(out, stride)
    results = []
    for b in range(out.shape[0]):
        keep = peaks[b] & (scores[b] >= score_threshold)
        s, order = scores[b][keep].sort(descending=True)
        kept = boxes[b][keep][order][:max_detections]
        h, w = input_size[b]
        kept = torch.stack([kept[:, 0].clamp(0, w), kept[:, 1].clamp(0, h), kept[:, 2].clamp(0, w), kept[:, 3].clamp(0, h)], -1)
        results.append((kept, s[:max_detections]))
    return results


@torch.no_grad()
def _encode_corpus(sam: Sam, shards: list[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Embeddings NxCxGxG of every image and its boxes (Kx4 XYXY, input pixels), encoded once."""
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    embeddings, boxes = [], []
    for item in read_labelled_images(shards):
        h, w = item.image.shape[:2]
        resized = torch.as_tensor(transform.apply_image(item.image)).permute(2, 0, 1)
        padded = F.pad(resized, (0, sam.image_encoder.img_size - resized.shape[2], 0, sam.image_encoder.img_size - resized.shape[1]))
        size = torch.tensor([resized.shape[1:]])
        embeddings.append(sam.image_encoder(normalize_images(sam, padded[None], size)))
        xywh = np.array([a["bbox"] for a in item.record["annotations"]], dtype=np.float32).reshape(-1, 4)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        boxes.append(torch.as_tensor(transform.apply_boxes(xyxy, (h, w)), dtype=torch.float32))
    if not embeddings:
        raise ValueError(f"no usable image in {len(shards)} shard(s) to train the box detector on")
    return torch.cat(embeddings), boxes


def train_box_detector(
    sam: Sam, shards: list[str], *, steps: int, lr: float, batch_size: int, seed: int, progress: bool = True
) -> ObjectnessHead:
    """Trains a head on the frozen embeddings of `sam` for the masks' boxes of `shards`."""
    sam = sam.eval()
    embeddings, boxes = _encode_corpus(sam, shards)
    grid = embeddings.shape[-1]
    stride = sam.image_encoder.img_size / grid
    targets = [encode_targets(b, grid, stride) for b in boxes]
    heat = torch.stack([t[0] for t in targets])
    box_target = torch.stack([t[1] for t in targets])
    positive = torch.stack([t[2] for t in targets])
    torch.manual_seed(seed)
    head = ObjectnessHead(channels=embeddings.shape[1], stride=stride)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="box detector", disable=not progress):
        idx = torch.randint(0, embeddings.shape[0], (min(batch_size, embeddings.shape[0]),), generator=generator)
        out = head(embeddings[idx])
        # soft-target focal-style weighting: centres matter, the many easy background cells do not
        prob = out[:, 0].sigmoid()
        weight = torch.where(heat[idx] >= 1.0, 1.0, (1 - heat[idx]) ** 4) * (prob - heat[idx]).abs() ** 2
        obj_loss = (F.binary_cross_entropy_with_logits(out[:, 0], heat[idx], reduction="none") * weight).sum()
        obj_loss = obj_loss / positive[idx].sum().clamp(min=1)
        pos = positive[idx]
        box_loss = (out[:, 1:].permute(0, 2, 3, 1)[pos] - box_target[idx].permute(0, 2, 3, 1)[pos]).abs().mean() if pos.any() else out.sum() * 0
        optimizer.zero_grad()
        (obj_loss + box_loss).backward()
        optimizer.step()
    return head.eval()


def save_box_head(head: ObjectnessHead, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"channels": head.channels, "hidden": head.hidden, "stride": head.stride, "state_dict": head.state_dict()}, path)
    return path


def load_box_head(path: str | Path) -> ObjectnessHead:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    head = ObjectnessHead(channels=saved["channels"], hidden=saved["hidden"], stride=saved["stride"])
    head.load_state_dict(saved["state_dict"])
    return head.eval()
