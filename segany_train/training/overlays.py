"""Mask overlays for the training logs: image, prompts, predicted and GT masks side by side."""

from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.nn import functional as F

from segany_train.inference.mask_overlay import render_overlay


def render_training_panels(
    image: torch.Tensor,
    gt: torch.Tensor,
    pred: torch.Tensor,
    point_coords: torch.Tensor,
    point_labels: torch.Tensor,
) -> np.ndarray:
    """Two panels, GT | prediction, each `mask_overlay.render_overlay` of the masks over the image,
    with the prompt points on the prediction (green foreground, red background, blue box corners).

    image: 3xSxS uint8 (the model input); gt, pred: KxMxM bool, upsampled to SxS; point_coords: KxPx2
    in input pixels, point_labels: KxP. Returns Sx2Sx3 uint8.
    """
    base = np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy().astype(np.uint8))
    size = base.shape[0]
    panels = []
    for masks in (gt, pred):
        up = F.interpolate(masks[:, None].float().cpu(), size=(size, size), mode="nearest")[:, 0].numpy() > 0
        panels.append(Image.fromarray(render_overlay(base, list(up), outline=False, alpha=0.55)))
    draw = ImageDraw.Draw(panels[1])
    colours = {0: (255, 0, 0), 1: (0, 255, 0), 2: (0, 0, 255), 3: (0, 0, 255)}
    for coords, labels in zip(point_coords.cpu().tolist(), point_labels.cpu().tolist()):
        for (x, y), label in zip(coords, labels):
            if label in colours:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colours[label], outline=(255, 255, 255))
    return np.concatenate([np.asarray(p) for p in panels], axis=1)


class MaskOverlayCallback(L.Callback):
    """Every `every_n_steps` training steps, logs the overlay the module kept for its first image.

    wandb gets an image, TensorBoard an image summary; any other logger (CSV) a PNG in the run
    directory's `overlays/`.
    """

    def __init__(self, every_n_steps: int, directory: str | Path) -> None:
        self.every_n_steps = every_n_steps
        self.directory = Path(directory)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        visual = getattr(pl_module, "last_visual", None)
        if visual is None or trainer.global_rank != 0:
            return
        pl_module.last_visual = None
        picture = render_training_panels(**visual)
        step = trainer.global_step
        logger = trainer.logger
        name = type(logger).__name__ if logger is not None else ""
        if name == "WandbLogger":
            logger.log_image(key="train/overlay", images=[picture], step=step)
        elif name == "TensorBoardLogger":
            logger.experiment.add_image("train/overlay", picture, step, dataformats="HWC")
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            Image.fromarray(picture).save(self.directory / f"step_{step:07d}.png")
