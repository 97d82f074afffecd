"""SamAutomaticMaskGenerator: every mask of an image from a grid of point prompts (the data engine's stage 3)."""

import math
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from segany_train.amg.generator_settings import PAPER_STAGE3, GeneratorSettings
from segany_train.amg.grids import crop_boxes, layer_point_grids
from segany_train.amg.mask_ops import box_area, box_near_crop_edge, box_nms, box_xyxy_to_xywh, masks_to_boxes, stability_score
from segany_train.amg.regions import remove_small_regions
from segany_train.amg.rle import coco_rle, crop_masks_to_rle_counts, rle_area, rle_box, rle_counts_to_mask, uncompressed_rle
from segany_train.amg.sa1b_record import sa1b_record_from_masks
from segany_train.inference.predictor import SamPredictor
from segany_train.model.prompt_encoder import FOREGROUND, NOT_A_POINT
from segany_train.model.sam import Sam
from segany_train.model.two_way_transformer import SharedImageKeys

__all__ = ["PAPER_STAGE3_SETTINGS", "SamAutomaticMaskGenerator", "sa1b_record_from_masks"]

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")

PAPER_STAGE3_SETTINGS: dict[str, Any] = PAPER_STAGE3.as_kwargs()
_DEFAULT = GeneratorSettings()

# Upsampled logits are made this many pixels at a time (float32: 256 MiB), whatever the batch size.
_UPSAMPLE_PIXEL_BUDGET = 1 << 26


@dataclass
class _Candidates:
    """Masks kept so far, K of each: RLE counts in the full image, boxes Kx4 XYXY int64, predicted IoU
    and stability K float32, prompt points Kx2 float64 and crop boxes Kx4 int64 (CPU tensors)."""

    counts: list[np.ndarray]
    boxes: torch.Tensor
    iou: torch.Tensor
    stability: torch.Tensor
    points: torch.Tensor
    crop_boxes: torch.Tensor

    def select(self, index: torch.Tensor) -> "_Candidates":
        """The candidates at `index` (int64), in that order."""
        index = index.cpu()
        return _Candidates(
            [self.counts[i] for i in index.tolist()],
            self.boxes[index],
            self.iou[index],
            self.stability[index],
            self.points[index],
            self.crop_boxes[index],
        )

    @staticmethod
    def concat(parts: list["_Candidates"]) -> "_Candidates":
        return _Candidates(
            [c for part in parts for c in part.counts],
            torch.cat([p.boxes for p in parts]),
            torch.cat([p.iou for p in parts]),
            torch.cat([p.stability for p in parts]),
            torch.cat([p.points for p in parts]),
            torch.cat([p.crop_boxes for p in parts]),
        )

    @staticmethod
    def empty() -> "_Candidates":
        return _Candidates(
            [],
            torch.zeros(0, 4, dtype=torch.int64),
            torch.zeros(0),
            torch.zeros(0),
            torch.zeros(0, 2, dtype=torch.float64),
            torch.zeros(0, 4, dtype=torch.int64),
        )


class SamAutomaticMaskGenerator:
    """Drop-in replacement for the official `SamAutomaticMaskGenerator`.

    Same arguments, defaults, records and masks: prompts a point grid on the image (and on zoomed-in
    crops when crop_n_layers > 0), keeps the masks whose predicted IoU exceeds `pred_iou_thresh` and
    whose stability score (IoU of the mask binarised at +-`stability_score_offset` around the mask
    threshold) reaches `stability_score_thresh`, drops masks touching an inner crop edge, removes
    duplicates by box NMS within each crop (`box_nms_thresh`, higher predicted IoU wins) and across
    crops (`crop_nms_thresh`, smaller crop wins), then optionally removes islands and fills holes
    under `min_mask_region_area` pixels (and NMS again, untouched masks winning).

    Differences from the official code: each crop is decoded with the decoder's shared image keys and
    only masks that pass the IoU filter are upsampled to full size; everything runs in torch and
    numpy on the model's device (no torchvision, no OpenCV); ties in NMS scores keep candidate order
    (the official order among ties comes from torch's unstable sort and depends on the platform);
    bad arguments raise ValueError. Extra, off by default: `max_mask_area_fraction` drops masks
    covering at least that fraction of the image (the paper uses 0.95); `paper_stage3` builds a
    generator with the paper's stage-3 settings (`PAPER_STAGE3`); `precision="bf16"` runs the model
    under bfloat16 autocast (`precision.py`).
    """

    def __init__(
        self,
        model: Sam,
        points_per_side: int | None = _DEFAULT.points_per_side,
        points_per_batch: int = _DEFAULT.points_per_batch,
        pred_iou_thresh: float = _DEFAULT.pred_iou_thresh,
        stability_score_thresh: float = _DEFAULT.stability_score_thresh,
        stability_score_offset: float = _DEFAULT.stability_score_offset,
        box_nms_thresh: float = _DEFAULT.box_nms_thresh,
        crop_n_layers: int = _DEFAULT.crop_n_layers,
        crop_nms_thresh: float = _DEFAULT.crop_nms_thresh,
        crop_overlap_ratio: float = _DEFAULT.crop_overlap_ratio,
        crop_n_points_downscale_factor: int = _DEFAULT.crop_n_points_downscale_factor,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = _DEFAULT.min_mask_region_area,
        output_mode: str = "binary_mask",
        *,
        max_mask_area_fraction: float | None = _DEFAULT.max_mask_area_fraction,
        precision: str = "fp32",
    ) -> None:
        if not isinstance(model, Sam):
            raise TypeError(f"model must be a segany_train Sam, got {type(model).__name__}")
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("give exactly one of points_per_side or point_grids")
        if not isinstance(crop_n_layers, Integral) or crop_n_layers < 0:
            raise ValueError(f"crop_n_layers must be a non-negative integer, got {crop_n_layers!r}")
        if points_per_side is not None:
            if not isinstance(points_per_side, Integral) or points_per_side < 1:
                raise ValueError(f"points_per_side must be a positive integer, got {points_per_side!r}")
            if not isinstance(crop_n_points_downscale_factor, Integral) or crop_n_points_downscale_factor < 1:
                raise ValueError(f"crop_n_points_downscale_factor must be an integer >= 1, got {crop_n_points_downscale_factor!r}")
            self.point_grids = layer_point_grids(points_per_side, crop_n_layers, crop_n_points_downscale_factor)
        else:
            self.point_grids = [self._checked_grid(g, i) for i, g in enumerate(point_grids)]
            if len(self.point_grids) < crop_n_layers + 1:
                raise ValueError(
                    f"point_grids has {len(self.point_grids)} grids, crop_n_layers={crop_n_layers} needs {crop_n_layers + 1}"
                )
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {', '.join(OUTPUT_MODES)}, got {output_mode!r}")
        thresholds = {
            "pred_iou_thresh": pred_iou_thresh,
            "stability_score_thresh": stability_score_thresh,
            "stability_score_offset": stability_score_offset,
            "box_nms_thresh": box_nms_thresh,
            "crop_nms_thresh": crop_nms_thresh,
        }
        for name, value in thresholds.items():
            if not math.isfinite(value):  # NaN compares false to everything: every mask would be dropped
                raise ValueError(f"{name} must be a finite number, got {value}")
        if not isinstance(points_per_batch, Integral) or points_per_batch < 1:
            raise ValueError(f"points_per_batch must be a positive integer, got {points_per_batch!r}")
        if not 0 <= crop_overlap_ratio < 1:
            raise ValueError(f"crop_overlap_ratio must be in [0, 1), got {crop_overlap_ratio}")
        if min_mask_region_area < 0:
            raise ValueError(f"min_mask_region_area must be >= 0, got {min_mask_region_area}")
        if max_mask_area_fraction is not None and not 0 < max_mask_area_fraction <= 1:
            raise ValueError(f"max_mask_area_fraction must be in (0, 1] or None, got {max_mask_area_fraction}")
        self.predictor = SamPredictor(model, precision=precision)
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        self.max_mask_area_fraction = max_mask_area_fraction

    @classmethod
    def from_settings(
        cls, model: Sam, settings: GeneratorSettings, *, output_mode: str = "binary_mask", precision: str = "fp32"
    ) -> "SamAutomaticMaskGenerator":
        """A generator with `settings` (see `segany_train.amg.generator_settings`)."""
        return cls(model, output_mode=output_mode, precision=precision, **settings.as_kwargs())

    @classmethod
    def paper_stage3(cls, model: Sam, **overrides: Any) -> "SamAutomaticMaskGenerator":
        """A generator with the SAM paper's stage-3 settings (`PAPER_STAGE3`), updated by `overrides`."""
        return cls(model, **{**PAPER_STAGE3.as_kwargs(), **overrides})

    @staticmethod
    def _checked_grid(grid: np.ndarray, layer: int) -> np.ndarray:
        grid = np.asarray(grid, dtype=np.float64)
        if grid.ndim != 2 or grid.shape[1] != 2 or grid.shape[0] == 0:
            raise ValueError(f"point_grids[{layer}] must be Nx2 (x, y) with N >= 1, got shape {grid.shape}")
        if grid.min() < 0 or grid.max() > 1:
            raise ValueError(f"point_grids[{layer}] must be normalised to [0, 1], got values in [{grid.min()}, {grid.max()}]")
        return grid

    @property
    def model(self) -> Sam:
        return self.predictor.model

    @torch.inference_mode()
    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Masks of an HxWx3 uint8 RGB image, as a list of records (one per mask).

        Each record: `segmentation` (HxW bool array, or an RLE dict per `output_mode`), `area` (int
        pixels), `bbox` (XYWH, ints), `predicted_iou`, `point_coords` ([[x, y]], the prompt),
        `stability_score`, `crop_box` (XYWH of the crop the mask came from).
        """
        if not isinstance(image, np.ndarray):
            raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"image must be HxWx3 (RGB), got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"image must be uint8, got {image.dtype}")
        height, width = image.shape[:2]
        masks = self._generate_masks(image)
        if self.min_mask_region_area > 0:
            masks = self._remove_small_regions(masks, height, width)
        return [self._record(masks, i, height, width) for i in range(len(masks.counts))]

    def _record(self, masks: _Candidates, i: int, height: int, width: int) -> dict[str, Any]:
        counts = masks.counts[i]
        if self.output_mode == "binary_mask":
            segmentation: Any = rle_counts_to_mask(counts, height, width)
        elif self.output_mode == "uncompressed_rle":
            segmentation = uncompressed_rle(counts, height, width)
        else:
            segmentation = coco_rle(counts, height, width)
        return {
            "segmentation": segmentation,
            "area": rle_area(counts),
            "bbox": box_xyxy_to_xywh(masks.boxes[i]).tolist(),
            "predicted_iou": masks.iou[i].item(),
            "point_coords": [masks.points[i].tolist()],
            "stability_score": masks.stability[i].item(),
            "crop_box": box_xyxy_to_xywh(masks.crop_boxes[i]).tolist(),
        }

    def _generate_masks(self, image: np.ndarray) -> _Candidates:
        image_size = image.shape[:2]
        boxes, layers = crop_boxes(image_size, self.crop_n_layers, self.crop_overlap_ratio)
        masks = _Candidates.concat([self._process_crop(image, box, layer) for box, layer in zip(boxes, layers)])
        if len(boxes) > 1:
            # the same object found in several crops: keep the mask from the smallest crop
            keep = box_nms(masks.boxes.float(), 1 / box_area(masks.crop_boxes), self.crop_nms_thresh)
            masks = masks.select(keep)
        return masks

    def _process_crop(self, image: np.ndarray, crop_box: list[int], layer: int) -> _Candidates:
        x0, y0, x1, y1 = crop_box
        crop_size = (y1 - y0, x1 - x0)
        self.predictor.set_image(image[y0:y1, x0:x1, :])
        sam = self.model
        with self.predictor.autocast():
            shared_keys = sam.mask_decoder.prepare_shared_keys(
                self.predictor.features, sam.prompt_encoder.get_dense_pe(), sam.prompt_encoder.no_mask_dense(1)[:, :, :1, :1]
            )
        points = self.point_grids[layer] * np.array(crop_size)[None, ::-1]  # (x, y) pixels of the crop
        parts = [_Candidates.empty()]
        for start in range(0, len(points), self.points_per_batch):
            parts.append(
                self._process_batch(points[start : start + self.points_per_batch], crop_box, image.shape[:2], shared_keys)
            )
        masks = _Candidates.concat(parts)
        self.predictor.reset_image()
        keep = box_nms(masks.boxes.float(), masks.iou, self.box_nms_thresh)
        masks = masks.select(keep)
        offset = torch.tensor([x0, y0, x0, y0])
        masks.boxes = masks.boxes + offset
        masks.points = masks.points + offset[:2]
        masks.crop_boxes = torch.tensor(crop_box, dtype=torch.int64).expand(len(masks.counts), 4).clone()
        return masks

    def _process_batch(
        self, points: np.ndarray, crop_box: list[int], image_size: tuple[int, int], shared_keys: SharedImageKeys
    ) -> _Candidates:
        """Masks of B prompt points (Bx2 crop pixels) that pass the filters, in the image frame
        (boxes stay in the crop frame until the crop's NMS)."""
        sam, device = self.model, self.predictor.device
        x0, y0, x1, y1 = crop_box
        crop_size = (y1 - y0, x1 - x0)
        image_h, image_w = image_size
        # float64 like the official prompts; the prompt encoder goes to float32 after normalising
        coords = torch.as_tensor(self.predictor.transform.apply_coords(points, crop_size), device=device)
        b = coords.shape[0]
        point_coords = torch.stack([coords, torch.zeros_like(coords)], dim=1)  # + the "not a point" token
        point_labels = torch.tensor([FOREGROUND, NOT_A_POINT], device=device).expand(b, 2)
        with self.predictor.autocast():
            low_res, iou = sam.decode(
                self.predictor.features,
                image_index=None,
                point_coords=point_coords,
                point_labels=point_labels,
                multimask_output=True,
                shared_keys=shared_keys,
            )
        low_res, iou = low_res.float(), iou.float()  # thresholds and upsampling in float32
        per_point = low_res.shape[1]
        low_res, iou = low_res.flatten(0, 1), iou.flatten(0, 1)
        candidates = torch.arange(low_res.shape[0], device=device)
        if self.pred_iou_thresh > 0.0:
            candidates = candidates[iou > self.pred_iou_thresh]
        img = sam.image_encoder.img_size
        chunk = max(1, _UPSAMPLE_PIXEL_BUDGET // (img * img + crop_size[0] * crop_size[1]))
        kept, stability, boxes, counts = [], [], [], []
        for start in range(0, candidates.numel(), chunk):
            index = candidates[start : start + chunk]
            logits = self._upscale(low_res[index], crop_size)
            score = stability_score(logits, sam.mask_threshold, self.stability_score_offset).to(device)
            if self.stability_score_thresh > 0.0:
                stable = score >= self.stability_score_thresh
                index, score, logits = index[stable], score[stable], logits[stable]
            masks = logits > sam.mask_threshold
            del logits
            box = masks_to_boxes(masks)
            inside = ~box_near_crop_edge(box, crop_box, [0, 0, image_w, image_h])
            index, score, masks, box = index[inside], score[inside], masks[inside], box[inside]
            kept.append(index.cpu())
            stability.append(score.cpu())
            boxes.append(box.cpu())
            counts.extend(crop_masks_to_rle_counts(masks, box, (x0, y0), image_size))
        kept_index = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.int64)
        masks = _Candidates(
            counts,
            torch.cat(boxes) if boxes else torch.zeros(0, 4, dtype=torch.int64),
            iou.cpu()[kept_index],
            torch.cat(stability) if stability else torch.zeros(0),
            torch.as_tensor(points)[kept_index // per_point],
            torch.zeros(len(counts), 4, dtype=torch.int64),
        )
        if self.max_mask_area_fraction is not None:
            areas = torch.tensor([rle_area(c) for c in counts], dtype=torch.float64)
            masks = masks.select(torch.nonzero(areas < self.max_mask_area_fraction * image_h * image_w).flatten())
        return masks

    def _upscale(self, low_res: torch.Tensor, crop_size: tuple[int, int]) -> torch.Tensor:
        """Kx4hx4w low-res logits -> KxHxW logits of the crop: `Sam.postprocess_masks`, except that the
        second resize is skipped when it would not change the size (it is then an exact identity,
        and as costly as the first)."""
        img = self.model.image_encoder.img_size
        input_h, input_w = self.predictor.input_size
        logits = F.interpolate(low_res[:, None], (img, img), mode="bilinear", align_corners=False)
        logits = logits[..., :input_h, :input_w]
        if (input_h, input_w) != tuple(crop_size):
            logits = F.interpolate(logits, tuple(crop_size), mode="bilinear", align_corners=False)
        return logits[:, 0]

    def _remove_small_regions(self, masks: _Candidates, height: int, width: int) -> _Candidates:
        """Fills holes and drops islands under `min_mask_region_area` px, then box NMS again (untouched
        masks win ties), so that masks made equal by the cleaning do not appear twice."""
        if not masks.counts:
            return masks
        cleaned, unchanged = [], []
        for counts in masks.counts:
            counts_, filled = remove_small_regions(counts, height, width, self.min_mask_region_area, "holes")
            counts_, dropped = remove_small_regions(counts_, height, width, self.min_mask_region_area, "islands")
            cleaned.append(counts_)
            unchanged.append(not (filled or dropped))
        boxes = torch.as_tensor(np.stack([rle_box(c, height) for c in cleaned]))
        scores = torch.tensor(unchanged, dtype=torch.float32)
        keep = box_nms(boxes.float(), scores, max(self.box_nms_thresh, self.crop_nms_thresh))
        for i in keep.tolist():
            if not unchanged[i]:
                masks.counts[i] = cleaned[i]
                masks.boxes[i] = boxes[i]
        return masks.select(keep)
