"""Sam: image encoder + prompt encoder + mask decoder, with the official pre/post-processing."""

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from segany_train.model.image_encoder import ImageEncoderViT
from segany_train.model.mask_decoder import MaskDecoder
from segany_train.model.prompt_encoder import BOX_BOTTOM_RIGHT, BOX_TOP_LEFT, IGNORE_LABEL, NOT_A_POINT, PromptEncoder
from segany_train.model.two_way_transformer import SharedImageKeys


class Sam(nn.Module):
    """Segment Anything. Differentiable end to end; batched over images and over prompts."""

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self,
        *,
        image_encoder: ImageEncoderViT,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53),
        pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375),
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def img_size(self) -> int:
        return self.image_encoder.img_size

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a (B)x3xHxW image (longest side already resized) and pad it to SxS."""
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.img_size - w, 0, self.img_size - h))

    def normalize_padded(self, images: torch.Tensor, input_size: torch.Tensor) -> torch.Tensor:
        """Bx3xSxS uint8 images already padded (a data batch), Bx2 (h, w) of each image inside its
        padding -> normalised, with zeros in the padding: what `preprocess` gives one image."""
        x = (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
        side = images.shape[-1]
        coords = torch.arange(side, device=images.device)
        inside = (coords[None, :, None] < input_size[:, 0, None, None]) & (coords[None, None, :] < input_size[:, 1, None, None])
        return x * inside[:, None]

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: tuple[int, ...], original_size: tuple[int, ...]
    ) -> torch.Tensor:
        """BxMx(4h)x(4w) low-res logits -> BxMxHxW logits at the original image size."""
        masks = F.interpolate(masks, (self.img_size, self.img_size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        original_size = tuple(int(s) for s in original_size)
        if masks.shape[-2:] == original_size:
            # a bilinear resize to the same size reproduces its input exactly: skip the pass
            return masks.contiguous()
        return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)

    def decode(
        self,
        image_embeddings: torch.Tensor,
        *,
        image_index: torch.Tensor | None,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        multimask_output: bool,
        mask_inputs: torch.Tensor | None = None,
        has_mask_input: torch.Tensor | None = None,
        shared_keys: SharedImageKeys | None = None,
        host_image_index: np.ndarray | None = None,
        mask_padding: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched prompt encoding and mask decoding, differentiable.

        image_embeddings: BxCxhxw. Prompt n lives on image image_index[n] and is the labelled point
        sequence point_coords[n] (NxPx2, input-frame pixels), point_labels[n] (NxP: 1 fg, 0 bg,
        2/3 box corners, -1 "not a point", IGNORE_LABEL padding that is masked out).
        mask_inputs: Nx1x4hx4w low-res logits, used where has_mask_input (N bool; all when omitted).
        Returns NxMx4hx4w low-res logits and NxM predicted IoU.

        Two hints spare reading device values back (a host sync each on CUDA): host_image_index, the
        image_index as a host array (see `MaskDecoder.forward`), and mask_padding, whether any label
        may be IGNORE_LABEL (None: look at the labels).
        """
        n = point_coords.shape[0]
        sparse = self.prompt_encoder.embed_labelled_points(point_coords, point_labels)
        token_mask = point_labels != IGNORE_LABEL
        if mask_padding is False or (mask_padding is None and bool(token_mask.all())):
            token_mask = None
        dense = self.prompt_encoder.no_mask_dense(n)
        if mask_inputs is not None:
            if has_mask_input is None:  # every prompt has one
                dense = self.prompt_encoder.embed_masks(mask_inputs)
            elif bool(has_mask_input.any()):
                dense = torch.where(has_mask_input.view(-1, 1, 1, 1), self.prompt_encoder.embed_masks(mask_inputs), dense)
        return self.mask_decoder(
            image_embeddings,
            self.prompt_encoder.get_dense_pe(),
            sparse,
            dense,
            multimask_output,
            image_index=image_index,
            token_mask=token_mask,
            shared_keys=shared_keys,
            host_image_index=host_image_index,
        )

    def forward(self, batched_input: list[dict[str, Any]], multimask_output: bool) -> list[dict[str, torch.Tensor]]:
        """Official interface: a list of per-image dicts -> a list of per-image outputs.

        Each dict: 'image' 3xHxW (longest side resized), 'original_size' (H, W), and at least one of
        'point_coords' BxNx2 with 'point_labels' BxN, 'boxes' Bx4, 'mask_inputs' Bx1x4hx4w (input
        frame). Unlike the official model, all images are encoded together and all prompts of all
        images are decoded in one batch, with gradients.
        """
        images = torch.stack([self.preprocess(x["image"].to(self.pixel_mean.dtype)) for x in batched_input])
        embeddings = self.image_encoder(images)
        coords, labels, counts, masks, has_mask = [], [], [], [], []
        for record in batched_input:
            c, lab = self._prompt_points(record)
            coords.append(c)
            labels.append(lab)
            counts.append(c.shape[0])
            m = record.get("mask_inputs")
            masks.append(m if m is not None else embeddings.new_zeros(c.shape[0], 1, *self.prompt_encoder.mask_input_size))
            has_mask.append(torch.full((c.shape[0],), m is not None, device=self.device))
        point_coords, point_labels = pad_point_prompts(coords, labels)
        image_index = torch.repeat_interleave(torch.arange(len(batched_input), device=self.device), torch.tensor(counts, device=self.device))
        any_mask = any(r.get("mask_inputs") is not None for r in batched_input)
        low_res, iou = self.decode(
            embeddings,
            image_index=image_index,
            point_coords=point_coords,
            point_labels=point_labels,
            multimask_output=multimask_output,
            mask_inputs=torch.cat(masks) if any_mask else None,
            has_mask_input=torch.cat(has_mask) if any_mask else None,
        )
        outputs = []
        for record, low, pred in zip(batched_input, low_res.split(counts), iou.split(counts)):
            masks_full = self.postprocess_masks(low, record["image"].shape[-2:], record["original_size"])
            outputs.append(
                {"masks": masks_full > self.mask_threshold, "iou_predictions": pred, "low_res_logits": low}
            )
        return outputs

    def _prompt_points(self, record: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's prompts as labelled point sequences, in the official token order."""
        parts_c, parts_l = [], []
        boxes = record.get("boxes")
        if record.get("point_coords") is not None:
            c = record["point_coords"].to(self.device, torch.float)
            lab = record["point_labels"].to(self.device)
            parts_c.append(c)
            parts_l.append(lab)
            if boxes is None:  # the official "not a point" pad token
                parts_c.append(c.new_zeros(c.shape[0], 1, 2))
                parts_l.append(lab.new_full((c.shape[0], 1), NOT_A_POINT))
        if boxes is not None:
            corners = boxes.to(self.device, torch.float).reshape(-1, 2, 2)
            parts_c.append(corners)
            parts_l.append(torch.tensor([BOX_TOP_LEFT, BOX_BOTTOM_RIGHT], device=self.device).expand(corners.shape[0], 2))
        if not parts_c:
            masks = record.get("mask_inputs")
            if masks is None:
                raise ValueError("each image needs point_coords/point_labels, boxes or mask_inputs")
            # mask-only prompts (the official model allows them): no sparse token at all, which the
            # batch's IGNORE_LABEL padding reproduces where other images have points
            return torch.zeros(masks.shape[0], 0, 2, device=self.device), torch.zeros(
                masks.shape[0], 0, dtype=torch.long, device=self.device
            )
        return torch.cat(parts_c, dim=1), torch.cat(parts_l, dim=1)


def pad_point_prompts(
    coords: list[torch.Tensor], labels: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate prompt groups (each BixPix2, BixPi) into NxPx2, NxP padded with IGNORE_LABEL."""
    length = max(c.shape[1] for c in coords)
    out_c, out_l = [], []
    for c, lab in zip(coords, labels):
        pad = length - c.shape[1]
        out_c.append(F.pad(c, (0, 0, 0, pad)))
        out_l.append(F.pad(lab.long(), (0, pad), value=IGNORE_LABEL))
    return torch.cat(out_c), torch.cat(out_l)
