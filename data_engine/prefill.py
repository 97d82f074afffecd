"""Stage 2's pre-filled masks: detector boxes prompt SAM; confident masks are shown to the annotator.

The SAM paper trained a box detector on the stage-1 masks with one generic "object" class and kept
the confident masks it led to; annotators then labelled only what was missing.
"""

from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_engine.box_detection.detection import detect_boxes
from data_engine.box_detection.head_file import load_box_head, save_box_head
from data_engine.box_detection.training import train_box_detector
from segany_train.amg.mask_ops import box_nms, masks_to_boxes, stability_score
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
    def __call__(self, image: np.ndarray) -> list[np.ndarray]:
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
            return []
        logits, iou, _ = self.predictor.predict_torch(None, None, boxes=boxes, multimask_output=False, return_logits=True)
        logits, iou = logits[:, 0], iou[:, 0]  # K x H x W, K
        keep = (iou >= s.pred_iou_thresh) & (stability_score(logits, sam.mask_threshold, s.stability_score_offset) >= s.stability_score_thresh)
        masks = logits[keep] > sam.mask_threshold
        masks = masks[masks.flatten(1).any(1)]
        if masks.shape[0] == 0:
            return []
        order = box_nms(masks_to_boxes(masks).float(), iou[keep][masks.flatten(1).any(1)], s.nms_thresh)
        return [m.cpu().numpy() for m in masks[order]]
