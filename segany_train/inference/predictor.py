"""SamPredictor: the official interactive-prediction API (set an image once, prompt it many times)."""

import warnings

import numpy as np
import torch

from segany_train.inference.cpu_allocator import retain_freed_memory
from segany_train.inference.precision import check_precision, inference_autocast
from segany_train.model.prompt_encoder import BACKGROUND, BOX_BOTTOM_RIGHT, BOX_TOP_LEFT, FOREGROUND, NOT_A_POINT
from segany_train.model.sam import Sam
from segany_train.model.transforms import ResizeLongestSide
from segany_train.model.two_way_transformer import SharedImageKeys

_POINT_LABELS = (NOT_A_POINT, BACKGROUND, FOREGROUND, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT)


def _check_finite(values: np.ndarray, name: str) -> None:
    """A NaN or infinite prompt value would give NaN scores without a word: one line naming it."""
    if not np.isfinite(values).all():
        raise ValueError(f"{name} must be finite, got NaN or infinity in {values.size} values")


class SamPredictor:
    """Drop-in replacement for the official `SamPredictor`.

    Same methods, arguments, coordinate conventions (XY pixels of the original image) and returns.
    Differences: the decoder's prompt-independent work is done once per image (in `set_image`) and
    reused by every prompt; malformed prompts (wrong shapes, NaN values, unknown point labels) raise
    a ValueError that says what is wrong, and points or boxes outside the image are used as given
    with a warning; on CPU it keeps freed memory for reuse (`cpu_allocator.retain_freed_memory`).
    Extra, keyword-only: `precision="bf16"` runs the encoder and decoder under bfloat16 autocast
    (`precision.py`); embeddings, logits and IoU predictions still come back as float32.
    """

    def __init__(self, sam_model: Sam, *, precision: str = "fp32") -> None:
        if sam_model.device.type == "cpu":
            retain_freed_memory()
        self.model = sam_model
        self.precision = check_precision(precision)
        self.transform = ResizeLongestSide(sam_model.image_encoder.img_size)
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Computes the embedding of an HxWx3 uint8 image."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be HxWx3, got shape {image.shape}")
        if image_format != self.model.image_format:
            image = image[..., ::-1]
        input_image = self.transform.apply_image(np.ascontiguousarray(image))
        input_image_torch = torch.as_tensor(input_image, device=self.device).permute(2, 0, 1).contiguous()[None]
        self.set_torch_image(input_image_torch, image.shape[:2])

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]) -> None:
        """Computes the embedding of a 1x3xHxW image already resized by `transform`."""
        if (
            transformed_image.dim() != 4
            or transformed_image.shape[1] != 3
            or max(transformed_image.shape[2:]) != self.model.image_encoder.img_size
        ):
            raise ValueError(
                f"set_torch_image needs a Bx3xHxW image whose longest side is {self.model.image_encoder.img_size}, "
                f"got {tuple(transformed_image.shape)}"
            )
        self.reset_image()
        self.original_size = tuple(original_image_size)
        self.input_size = tuple(transformed_image.shape[-2:])
        self.orig_h, self.orig_w = self.original_size  # the official predictor's attributes
        self.input_h, self.input_w = self.input_size
        input_image = self.model.preprocess(transformed_image.to(self.model.pixel_mean.dtype))
        with self.autocast():
            self.features = self.model.image_encoder(input_image).float()  # 1xCxhxw
            # the decoder's prompt-independent work, done with the image (a few ms beside the
            # encoder's seconds) so that the first prompt is as fast as the next ones
            self._shared_keys(self.model.prompt_encoder.get_dense_pe())
        self.is_image_set = True

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks CxHxW, IoU predictions C, low-res logits Cx(4h)x(4w) for one prompt (C = 3 or 1)."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        coords_torch = labels_torch = box_torch = mask_input_torch = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be supplied if point_coords is supplied.")
            point_coords, point_labels = np.asarray(point_coords), np.asarray(point_labels)
            if point_coords.ndim != 2 or point_coords.shape[1] != 2 or point_labels.shape != point_coords.shape[:1]:
                raise ValueError(
                    f"point_coords must be Nx2 and point_labels N, got {point_coords.shape} and {point_labels.shape}"
                )
            _check_finite(point_coords, "point_coords")
            if not np.isin(point_labels, _POINT_LABELS).all():
                raise ValueError(f"point_labels must be in {{-1, 0, 1, 2, 3}}, got {np.unique(point_labels).tolist()}")
            self._warn_outside_image(point_coords, "point")
            point_coords = self.transform.apply_coords(point_coords, self.original_size)
            coords_torch = torch.as_tensor(point_coords, dtype=torch.float, device=self.device)[None]
            labels_torch = torch.as_tensor(point_labels, dtype=torch.int, device=self.device)[None]
        if box is not None:
            box = np.asarray(box, dtype=float)
            if box.size != 4:
                raise ValueError(f"box must be 4 numbers XYXY, got shape {box.shape}")
            _check_finite(box, "box")
            if box.reshape(4)[2] < box.reshape(4)[0] or box.reshape(4)[3] < box.reshape(4)[1]:
                raise ValueError(f"box must be XYXY with x1 >= x0 and y1 >= y0, got {box.reshape(4).tolist()}")
            self._warn_outside_image(box.reshape(2, 2), "box corner")
            box_torch = torch.as_tensor(self.transform.apply_boxes(box, self.original_size), dtype=torch.float, device=self.device)
        if mask_input is not None:
            _check_finite(np.asarray(mask_input, dtype=float), "mask_input")
            mask_input_torch = torch.as_tensor(mask_input, dtype=torch.float, device=self.device)[None]
        masks, iou_predictions, low_res_masks = self.predict_torch(
            coords_torch, labels_torch, box_torch, mask_input_torch, multimask_output, return_logits=return_logits
        )
        return masks[0].cpu().numpy(), iou_predictions[0].cpu().numpy(), low_res_masks[0].cpu().numpy()

    def _warn_outside_image(self, points: np.ndarray, what: str) -> None:
        """The official predictor uses such points as given (often a slip of the caller's frame)."""
        h, w = self.original_size
        inside = (points[:, 0] >= 0) & (points[:, 0] <= w) & (points[:, 1] >= 0) & (points[:, 1] <= h)
        if not inside.all():
            bad = points[~inside][0].tolist()
            warnings.warn(f"{what} {bad} lies outside the {w}x{h} (WxH) image; used as given", stacklevel=3)

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched prompts already in the resized frame: BxNx2, BxN, Bx4, Bx1x(4h)x(4w).

        Returns masks BxCxHxW (original size), IoU BxC and low-res logits BxCx(4h)x(4w).
        """
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        points = (point_coords, point_labels) if point_coords is not None else None
        with self.autocast():
            sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
            image_pe = self.model.prompt_encoder.get_dense_pe()
            low_res_masks, iou_predictions = self.model.mask_decoder(
                image_embeddings=self.features,
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
                shared_keys=self._shared_keys(image_pe) if mask_input is None else None,
            )
        # upsampling and thresholding in float32: a bfloat16 logit near 0 would flip pixels
        low_res_masks, iou_predictions = low_res_masks.float(), iou_predictions.float()
        masks = self.model.postprocess_masks(low_res_masks, self.input_size, self.original_size)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, iou_predictions, low_res_masks

    def autocast(self):
        """The context the model runs in at this predictor's precision."""
        return inference_autocast(self.device, self.precision)

    def _shared_keys(self, image_pe: torch.Tensor) -> SharedImageKeys:
        """The decoder's prompt-independent first-layer work for this image, computed once."""
        if self._shared is None:
            no_mask = self.model.prompt_encoder.no_mask_dense(1)[:, :, :1, :1]
            self._shared = self.model.mask_decoder.prepare_shared_keys(self.features, image_pe, no_mask)
        return self._shared

    def get_image_embedding(self) -> torch.Tensor:
        """The current image's embedding, 1xCxhxw."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) to generate an embedding.")
        return self.features

    def reset_image(self) -> None:
        """Forgets the current image."""
        self.is_image_set = False
        self.features = None
        self._shared: SharedImageKeys | None = None
        self.orig_h = self.orig_w = self.input_h = self.input_w = None
        self.original_size = self.input_size = None
