"""Stage 2's pre-filled masks: detector boxes prompt SAM; confident masks are shown to the annotator.

The SAM paper trained a box detector on the stage-1 masks with one generic "object" class and kept
the confident masks it led to; annotators then labelled only what was missing.
"""

from pathlib import Path
from typing import Any

import numpy as np
import torch

from segany_train.amg.mask_ops import box_nms, masks_to_boxes, stability_score
from segany_train.box_detection.detection import detect_boxes
from segany_train.box_detection.head_file import load_box_head, save_box_head
from segany_train.box_detection.training import train_box_detector
from segany_train.inference.predictor import SamPredictor
from segany_train.model import Sam


def train_prefill_detector(sam: Sam, shards: list[str], out_dir: Path, *, settings: Any, seed: int, progress: bool = True) -> Path:
    """Trains the class-agnostic box head on the frozen embeddings of `sam` over the annotated shards."""
    head = train_box_detector(
        sam, shards, steps=settings.steps, lr=settings.lr, batch_size=settings.batch_size, seed=seed, progress=progress
    )
    return save_box_head(head, Path(out_dir) / "box_head.pt")


class BoxPrefill:
    """image -> masks to pre-fill: detected boxes as SAM box prompts, kept when SAM's predicted IoU and
    the mask's stability pass their thresholds, de-duplicated by box NMS (highest predicted IoU wins)."""

    def __init__(self, head: torch.nn.Module, predictor: SamPredictor, *, settings: Any) -> None:
        self.head = head.eval()
        self.predictor = predictor
        self.settings = settings

    @classmethod
    def from_files(cls, head_path: str | Path, predictor: SamPredictor, *, settings: Any) -> "BoxPrefill":
        return cls(load_box_head(head_path), predictor, settings=settings)

    @torch.no_grad()
    def candidates(self, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every detected box's mask before any threshold: (logits KxHxW, predicted IoU K, stability K)."""
        s, sam = self.settings, self.predictor.model
        self.predictor.set_image(image)
        boxes, _ = detect_boxes(
            self.head,
            self.predictor.get_image_embedding(),
            score_threshold=s.score_threshold,
            max_detections=s.max_detections,
            input_size=[self.predictor.input_size],
        )[0]
        if boxes.shape[0] == 0:
            empty = torch.zeros(0, *image.shape[:2])
            return empty, torch.zeros(0), torch.zeros(0)
        logits, iou, _ = self.predictor.predict_torch(None, None, boxes=boxes, multimask_output=False, return_logits=True)
        logits, iou = logits[:, 0], iou[:, 0]  # K x H x W, K
        return logits, iou, stability_score(logits, sam.mask_threshold, s.stability_score_offset)

    def __call__(self, image: np.ndarray) -> list[np.ndarray]:
        logits, iou, stability = self.candidates(image)
        masks = logits > self.predictor.model.mask_threshold
        s = self.settings
        keep = confident_masks(
            masks, iou, stability, pred_iou_thresh=s.pred_iou_thresh, stability_score_thresh=s.stability_score_thresh, nms_thresh=s.nms_thresh
        )
        return [masks[k].cpu().numpy() for k in keep.tolist()]


def confident_masks(
    masks: torch.Tensor, iou: torch.Tensor, stability: torch.Tensor, *, pred_iou_thresh: float, stability_score_thresh: float, nms_thresh: float
) -> torch.Tensor:
    """Indices of the KxHxW bool masks to pre-fill: non-empty, predicted IoU and stability at their
    thresholds, de-duplicated by box NMS (highest predicted IoU first)."""
    passed = (iou >= pred_iou_thresh) & (stability >= stability_score_thresh) & masks.flatten(1).any(1)
    index = passed.nonzero().squeeze(1)
    if index.numel() == 0:
        return index
    return index[box_nms(masks_to_boxes(masks[index]).float(), iou[index], nms_thresh)]
