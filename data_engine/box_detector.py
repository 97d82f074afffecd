"""Stage 2's class-agnostic box detector: a `BoxHead` trained on the frozen SAM embeddings of the
images annotated so far, with every mask's box as one generic "object" class (SAM paper, section 4).

Centre-based, as CenterNet: each box is assigned to the embedding cell holding its centre, in the
size slot its size falls in (see box_head.py). Per slot, the objectness target is a Gaussian around
each centre (1 at the centre cell) trained with CenterNet's penalty-reduced focal loss; the box is
regressed at the centre cell and at neighbours where the Gaussian is high (weighted by it), so a
peak one cell off still carries a good box. Detection keeps the local maxima of each slot's
objectness above a threshold, then box NMS across slots removes an object found in two slots.

Boxes are XYXY in input pixels (the frame of the resized image, longest side = the encoder's
image size) unless a name says otherwise; SA-1B's `bbox` is XYWH in original image pixels.
"""

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from data_engine.box_head import BoxHead, BoxHeadConfig
from segany_train.amg.mask_ops import box_nms
from segany_train.data.pipeline import SkipLog, expand_shard_patterns, read_records
from segany_train.data.sa1b import BadSample
from segany_train.evaluation.automatic import decode_record_image
from segany_train.model import Sam
from segany_train.training.module import normalize_images
from segany_train.transforms import ResizeLongestSide

SIGMA_FRACTION = 1 / 6  # Gaussian sigma per axis as a fraction of the box side (CenterNet's diameter / 6)
MIN_SIGMA = 0.5  # cells: even a box smaller than a cell spreads some target onto its neighbours
REGRESSION_MIN_WEIGHT = 0.3  # cells whose Gaussian value is below this do not regress the box
ENCODE_BATCH = 8  # images per image-encoder call
SAVE_FORMAT = "segany-box-head-v1"


@dataclass(frozen=True)
class BoxTargets:
    """Training targets of one image for S size slots on an hxw grid.

    heat: Sxhxw objectness targets in [0, 1], exactly 1 at the cell of a box centre; params: Sxhxwx4
    (dx, dy, log w, log h) of the box each cell regresses; weight: Sxhxw regression weights (0: the
    cell regresses nothing)."""

    heat: torch.Tensor
    params: torch.Tensor
    weight: torch.Tensor


def box_slots(boxes: torch.Tensor, *, stride: float, scale_edges: Sequence[float]) -> torch.Tensor:
    """Kx4 XYXY boxes -> K int64 size slots: how many of `scale_edges` (cells) sqrt(w * h) reaches."""
    sizes = ((boxes[:, 2] - boxes[:, 0]).clamp(min=1.0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=1.0)).sqrt() / stride
    return torch.bucketize(sizes, torch.tensor(scale_edges, dtype=sizes.dtype, device=sizes.device), right=True)


def encode_targets(
    boxes: torch.Tensor, grid_size: tuple[int, int], *, stride: float, scale_edges: Sequence[float]
) -> BoxTargets:
    """Kx4 XYXY boxes (input pixels) -> the `BoxTargets` of an image whose embedding grid is `grid_size`.

    A side under one pixel counts as one pixel (log sizes stay finite). Where two boxes of one slot
    want the same cell, the one with the higher Gaussian there regresses, and on a tie (two centres
    in one cell) the smaller box: the other is lost, as in any one-box-per-cell detector.
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be Kx4 XYXY, got shape {tuple(boxes.shape)}")
    h, w = grid_size
    num_slots = len(scale_edges) + 1
    boxes = boxes.to(torch.float32)
    # smallest first: argmax picks the first of equal values, which makes ties go to the smaller box
    areas = (boxes[:, 2] - boxes[:, 0]).clamp(min=1.0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=1.0)
    boxes = boxes[torch.sort(areas, stable=True).indices]
    k = boxes.shape[0]
    slots = box_slots(boxes, stride=stride, scale_edges=scale_edges)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2 / stride, (boxes[:, 1] + boxes[:, 3]) / 2 / stride  # K, in cells
    bw = (boxes[:, 2] - boxes[:, 0]).clamp(min=1.0) / stride
    bh = (boxes[:, 3] - boxes[:, 1]).clamp(min=1.0) / stride
    col = torch.arange(w, dtype=torch.float32) + 0.5
    row = torch.arange(h, dtype=torch.float32) + 0.5
    sx, sy = (bw * SIGMA_FRACTION).clamp(min=MIN_SIGMA), (bh * SIGMA_FRACTION).clamp(min=MIN_SIGMA)
    gauss = torch.exp(
        -((col[None, None, :] - cx[:, None, None]) ** 2) / (2 * sx[:, None, None] ** 2)
        - ((row[None, :, None] - cy[:, None, None]) ** 2) / (2 * sy[:, None, None] ** 2)
    )  # Kxhxw
    ci = cy.floor().long().clamp(0, h - 1)
    cj = cx.floor().long().clamp(0, w - 1)
    gauss[torch.arange(k), ci, cj] = 1.0  # the centre cell is a positive wherever in it the centre lies
    heat = torch.zeros(num_slots, h, w)
    params = torch.zeros(num_slots, h, w, 4)
    weight = torch.zeros(num_slots, h, w)
    for s in range(num_slots):
        members = torch.nonzero(slots == s).flatten()
        if members.numel() == 0:
            continue
        g = gauss[members]
        heat[s], owner = g.max(dim=0)
        chosen = members[owner]  # hxw: index of the box each cell regresses
        params[s] = torch.stack(
            [cx[chosen] - col[None, :], cy[chosen] - row[:, None], bw[chosen].log(), bh[chosen].log()], dim=-1
        )
        weight[s] = torch.where(heat[s] >= REGRESSION_MIN_WEIGHT, heat[s], 0.0)
    return BoxTargets(heat=heat, params=params, weight=weight)


def decode_boxes(params: torch.Tensor, stride: float) -> torch.Tensor:
    """...x4xhxw box parameters (dx, dy, log w, log h per cell) -> ...xhxwx4 XYXY boxes in input pixels."""
    h, w = params.shape[-2:]
    col = torch.arange(w, dtype=params.dtype, device=params.device) + 0.5
    row = torch.arange(h, dtype=params.dtype, device=params.device)[:, None] + 0.5
    p = params.movedim(-3, -1)  # ...xhxwx4
    return _params_to_boxes(p, col, row, stride)


def _params_to_boxes(p: torch.Tensor, col: torch.Tensor, row: torch.Tensor, stride: float) -> torch.Tensor:
    """...xhxwx4 (dx, dy, log w, log h) -> ...xhxwx4 XYXY pixels, for cell centres `col` (w) and `row` (hx1)."""
    cx, cy = (col + p[..., 0]) * stride, (row + p[..., 1]) * stride
    half_w, half_h = p[..., 2].exp() * (stride / 2), p[..., 3].exp() * (stride / 2)
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1)


def _generalized_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise GIoU of Nx4 XYXY boxes `a` and `b` -> N, in [-1, 1]."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    inter = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    hull = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).prod(-1)
    return inter / union - (hull - union) / hull


def _detector_loss(
    head: BoxHead, embeddings: torch.Tensor, heat: torch.Tensor, params: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """CenterNet focal loss on the objectness plus weighted L1 (box parameters) and GIoU (boxes)."""
    logits, predicted = head(embeddings)  # BxSxhxw, BxSx4xhxw
    positive = heat >= 1.0
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = logits.sigmoid()
    focal = torch.where(positive, -log_p * (1 - p) ** 2, -log_not_p * p**2 * (1 - heat) ** 4)
    focal = focal.sum() / positive.sum().clamp(min=1)
    regress = weight > 0
    if not regress.any():  # a batch of images without boxes: only the objectness learns
        return focal
    w = weight[regress]
    pred = predicted.movedim(2, -1)[regress]  # Nx4
    target = params[regress]
    l1 = ((pred - target).abs().sum(-1) * w).sum() / w.sum()
    h, wd = heat.shape[-2:]
    col = torch.arange(wd, dtype=pred.dtype, device=pred.device).expand(*heat.shape)[regress] + 0.5
    row = torch.arange(h, dtype=pred.dtype, device=pred.device)[:, None].expand(*heat.shape)[regress] + 0.5
    # the stride cancels out of the IoU, so boxes are compared in cells
    giou = _generalized_iou(_params_to_boxes(pred, col, row, 1.0), _params_to_boxes(target, col, row, 1.0))
    return focal + l1 + ((1 - giou) * w).sum() / w.sum()


def _check_image(image: Any) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}"
        raise ValueError(f"images must be HxWx3 uint8 numpy arrays, got {got}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image has no pixels: shape {image.shape}")


@torch.no_grad()
def encode_images(sam: Sam, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """HxWx3 uint8 images -> (BxCxhxw frozen image embeddings on `sam`'s device, the B input sizes (h, w)).

    The same preprocessing as `SamPredictor.set_image` (resize longest side, normalise, zero padding),
    so detections on a predictor's embedding see what training saw.
    """
    size = sam.image_encoder.img_size
    transform = ResizeLongestSide(size)
    device = sam.pixel_mean.device
    embeddings, input_sizes = [], []
    for start in range(0, len(images), ENCODE_BATCH):
        batch = images[start : start + ENCODE_BATCH]
        padded = torch.zeros(len(batch), 3, size, size, dtype=torch.uint8)
        sizes = []
        for i, image in enumerate(batch):
            _check_image(image)
            resized = torch.from_numpy(transform.apply_image(image)).permute(2, 0, 1)
            padded[i, :, : resized.shape[1], : resized.shape[2]] = resized
            sizes.append((resized.shape[1], resized.shape[2]))
        normalised = normalize_images(sam, padded.to(device), torch.tensor(sizes, device=device))
        embeddings.append(sam.image_encoder(normalised))
        input_sizes += sizes
    if not embeddings:
        raise ValueError("encode_images got no image")
    return torch.cat(embeddings), input_sizes


def xywh_to_input_xyxy(boxes_xywh: np.ndarray | torch.Tensor, original_size: tuple[int, int], image_size: int) -> torch.Tensor:
    """Kx4 XYWH boxes in original pixels (SA-1B `bbox`) -> Kx4 XYXY float32 in the resized input frame."""
    xywh = np.asarray(boxes_xywh, dtype=np.float64)
    if xywh.size == 0:
        return torch.zeros(0, 4)
    if xywh.ndim != 2 or xywh.shape[1] != 4 or not np.isfinite(xywh).all() or (xywh[:, 2:] < 0).any():
        raise ValueError(f"boxes must be Kx4 finite XYWH with non-negative sizes, got shape {xywh.shape}")
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    return torch.as_tensor(ResizeLongestSide(image_size).apply_boxes(xyxy, original_size), dtype=torch.float32)


def _shard_images(urls: list[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(HxWx3 uint8 image, Kx4 XYWH boxes of its annotations) per usable sample of the shards, in order;
    bad samples are skipped and counted in `SkipLog`. Only the boxes are read: no mask is decoded."""
    for key, jpeg, record in read_records(urls):
        try:
            image = decode_record_image(jpeg, record)
            boxes = np.array([ann["bbox"] for ann in record["annotations"]], dtype=np.float64).reshape(-1, 4)
        except BadSample as error:
            SkipLog.record("bad_sample", key, str(error))
            continue
        except (KeyError, TypeError, ValueError) as error:
            SkipLog.record("bad_sample", key, f"unreadable bbox ({error})")
            continue
        yield image, boxes


def _training_source(data: str | Path | Sequence[Any]) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """Shard patterns, or (image, XYWH boxes) pairs -> (image, boxes) pairs."""
    if isinstance(data, (str, Path)) or (len(data) > 0 and all(isinstance(d, (str, Path)) for d in data)):
        return _shard_images(expand_shard_patterns([str(d) for d in ([data] if isinstance(data, (str, Path)) else data)]))
    for item in data:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError("training data must be shard paths or (HxWx3 uint8 image, Kx4 XYWH boxes) pairs")
    return data


def _mirrored(image: np.ndarray, boxes_xywh: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The image flipped left-right, and its Kx4 XYWH boxes with it."""
    boxes = np.array(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    boxes[:, 0] = image.shape[1] - boxes[:, 0] - boxes[:, 2]
    return np.ascontiguousarray(image[:, ::-1]), boxes


@torch.no_grad()
def encode_training_data(
    sam: Sam, data: str | Path | Sequence[Any], *, horizontal_flip: bool = False
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Shards or (image, Kx4 XYWH boxes in image pixels) pairs -> (NxCxhxw embeddings, N Kx4 XYXY boxes
    in input pixels), each image encoded once by the frozen encoder, a batch of images at a time.

    With `horizontal_flip` every image is also encoded mirrored (with mirrored boxes), right after
    the original: the only augmentation a head on cached embeddings can have, and on a few hundred
    images it is worth the second encoder pass (held-out recall 0.26 -> 0.32 on synthetic scenes).
    """
    size = sam.image_encoder.img_size
    embeddings, boxes = [], []
    pending: list[tuple[np.ndarray, np.ndarray]] = []

    def flush() -> None:
        encoded, _ = encode_images(sam, [image for image, _ in pending])
        embeddings.append(encoded)
        boxes.extend(xywh_to_input_xyxy(b, image.shape[:2], size) for image, b in pending)
        pending.clear()

    for image, image_boxes in _training_source(data):
        _check_image(image)
        xywh_to_input_xyxy(image_boxes, image.shape[:2], size)  # fail on bad boxes before encoding
        pending.append((image, image_boxes))
        if horizontal_flip:
            pending.append(_mirrored(image, image_boxes))
        if len(pending) >= ENCODE_BATCH:
            flush()
    if pending:
        flush()
    if not embeddings:
        raise ValueError("no usable image to train the box detector on")
    return torch.cat(embeddings), boxes


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
    progress: bool = True,
) -> tuple[BoxHead, list[float]]:
    """Trains a new `BoxHead` on cached NxCxhxw embeddings and their N Kx4 XYXY boxes (input pixels;
    K may be 0) for `steps` AdamW steps (cosine learning rate after a short warm-up). Returns the head
    (eval mode, on the embeddings' device) and the loss of every step. Deterministic given `seed`."""
    if embeddings.dim() != 4 or embeddings.shape[0] != len(boxes) or embeddings.shape[0] == 0:
        raise ValueError(f"need NxCxhxw embeddings and N box tensors, got {tuple(embeddings.shape)} and {len(boxes)}")
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"steps and batch_size must be positive and lr > 0, got {steps}, {batch_size}, {lr}")
    config = BoxHeadConfig(
        channels=embeddings.shape[1], stride=float(stride), hidden=hidden, depth=depth, scale_edges=tuple(scale_edges)
    )
    grid = tuple(embeddings.shape[-2:])
    targets = [encode_targets(b.cpu(), grid, stride=config.stride, scale_edges=config.scale_edges) for b in boxes]
    device = embeddings.device
    heat = torch.stack([t.heat for t in targets]).to(device)
    params = torch.stack([t.params for t in targets]).to(device)
    weight = torch.stack([t.weight for t in targets]).to(device)
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's random state alone
        torch.manual_seed(seed)
        head = BoxHead(config).to(device)
    head.set_input_statistics(embeddings)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = min(20, steps // 10)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
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
            idx = order[cursor : cursor + take].to(device)
            cursor += take
            loss = _detector_loss(head, embeddings[idx], heat[idx], params[idx], weight[idx])
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
    """Trains a class-agnostic box head on the frozen image embeddings of `sam`.

    data: SA-1B shard paths or patterns (every annotation's `bbox` is an "object"), or a list of
    (HxWx3 uint8 image, Kx4 XYWH boxes in that image's pixels) pairs; images without boxes are
    negatives. Each image (and, with `horizontal_flip`, its mirror image) is encoded once and its
    embedding kept in memory (the engine's corpora are a few hundred images). head_options: hidden,
    depth, scale_edges, weight_decay (see `fit_box_head`).
    """
    sam = sam.eval()
    embeddings, boxes = encode_training_data(sam, data, horizontal_flip=horizontal_flip)
    stride = sam.image_encoder.img_size / embeddings.shape[-1]
    head, _ = fit_box_head(
        embeddings, boxes, stride=stride, steps=steps, lr=lr, batch_size=batch_size, seed=seed, progress=progress, **head_options
    )
    return head


def _input_sizes(input_size: Sequence[Any], count: int) -> list[tuple[int, int]]:
    """One (h, w) for every image, or a list of them -> `count` (h, w) pairs."""
    one_pair = len(input_size) == 2 and all(isinstance(v, (int, np.integer)) for v in input_size)
    sizes = [input_size] * count if one_pair else list(input_size)
    if len(sizes) != count or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise ValueError(f"input_size must be one (h, w) or {count} of them (one per image), got {input_size!r}")
    return [(int(s[0]), int(s[1])) for s in sizes]


@torch.no_grad()
def detect_boxes(
    head: BoxHead,
    embeddings: torch.Tensor,
    *,
    score_threshold: float,
    max_detections: int,
    input_size: Sequence[Any],
    nms_threshold: float = 0.7,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """BxCxhxw embeddings -> per image (Kx4 XYXY boxes in input pixels, K scores), best first.

    Keeps the cells that are a local maximum (3x3) of their slot's objectness and score at least
    `score_threshold`, clips their boxes to the image's input size (h, w) (one pair for all images or
    one per image), drops boxes left empty, removes boxes overlapping a better one by IoU above
    `nms_threshold`, and returns at most `max_detections`.
    """
    if not 0.0 <= score_threshold <= 1.0 or not 0.0 < nms_threshold <= 1.0:
        raise ValueError(f"score_threshold must be in [0, 1] and nms_threshold in (0, 1], got {score_threshold}, {nms_threshold}")
    if max_detections < 1:
        raise ValueError(f"max_detections must be positive, got {max_detections}")
    if embeddings.dim() != 4:
        raise ValueError(f"embeddings must be BxCxhxw, got shape {tuple(embeddings.shape)}")
    sizes = _input_sizes(input_size, embeddings.shape[0])
    logits, params = head.eval()(embeddings)
    scores = logits.sigmoid()  # BxSxhxw
    peaks = scores == F.max_pool2d(scores, 3, stride=1, padding=1)
    boxes = decode_boxes(params, head.stride)  # BxSxhxwx4
    results = []
    for b, (h, w) in enumerate(sizes):
        keep = peaks[b] & (scores[b] >= score_threshold)
        found, score = boxes[b][keep], scores[b][keep]
        limit = torch.tensor([w, h, w, h], dtype=found.dtype, device=found.device)
        found = torch.minimum(found.clamp(min=0), limit)
        nonempty = (found[:, 2] > found[:, 0]) & (found[:, 3] > found[:, 1])
        found, score = found[nonempty], score[nonempty]
        order = box_nms(found, score, nms_threshold)[:max_detections]
        results.append((found[order], score[order]))
    return results


def save_box_head(head: BoxHead, path: str | Path) -> Path:
    """Writes the head's config and weights (CPU tensors) to `path`, creating its directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in head.state_dict().items()}
    torch.save({"format": SAVE_FORMAT, "config": head.config.to_dict(), "state_dict": state}, path)
    return path


def load_box_head(path: str | Path, map_location: str | torch.device = "cpu") -> BoxHead:
    """The `BoxHead` `save_box_head` wrote, in eval mode."""
    saved = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != SAVE_FORMAT:
        raise ValueError(f"{path} is not a box head saved by save_box_head ({SAVE_FORMAT})")
    head = BoxHead(BoxHeadConfig(**saved["config"]))
    head.load_state_dict(saved["state_dict"])
    return head.to(map_location).eval()
