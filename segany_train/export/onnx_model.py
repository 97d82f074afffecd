"""SamOnnxModel: prompt encoder, mask decoder and mask postprocessing as one module to export to ONNX."""

import torch
from torch import nn
from torch.nn import functional as F

from segany_train.model.sam import Sam

# Added to token 0's score for every prompt point beyond 2.5 when one mask is returned: 1 point + the
# "not a point" pad (or a box's 2 corners) keeps the best multimask output, 3 or more points pick token 0.
SINGLE_MASK_SCORE_WEIGHT = 1000.0


class SamOnnxModel(nn.Module):
    """The official ONNX model's inputs, outputs and behaviour, computed with this project's modules.

    Inputs (all float32, official names and order):
      image_embeddings 1xCxhxw; point_coords 1xNx2 pixels (x, y) in the resized input frame;
      point_labels 1xN (1 foreground, 0 background, 2/3 box corners, -1 "not a point": the official
      app appends one such point at (0, 0) when there is no box); mask_input 1x1x4hx4w low-res
      logits; has_mask_input 1 (1: mask_input is the mask prompt, 0: the "no mask" embedding);
      orig_im_size 2 (H, W) of the original image.
    Outputs: masks 1xMxHxW logits at orig_im_size, iou_predictions 1xM, low_res_masks 1xMx4hx4w, where
    M is every mask token (token 0 the single-mask output, 1.. the ambiguity masks), or 1 with
    `return_single_mask` (chosen from the number of points, see `select_single_mask`).

    The decoder runs its reference path, `MaskDecoder.predict_masks` (the official algorithm): the
    fast path's prompt chunking and shared image keys are Python control flow on tensor values and
    shapes that a trace would freeze.
    """

    def __init__(self, model: Sam, *, return_single_mask: bool, use_stability_score: bool = False) -> None:
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        self.img_size = model.img_size
        self.mask_threshold = model.mask_threshold
        self.return_single_mask = return_single_mask
        self.use_stability_score = use_stability_score
        self.stability_score_offset = 1.0

    def embed_dense(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        """1x1x4hx4w mask logits, has_mask_input 1 -> 1xCxhxw: the mask prompt's embedding blended with
        the "no mask" embedding by has_mask_input (arithmetic instead of control flow, as officially)."""
        has = has_mask_input.reshape(-1, 1, 1, 1)
        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return has * self.prompt_encoder.embed_masks(mask_input) + (1 - has) * no_mask

    def stability_score(self, masks: torch.Tensor) -> torch.Tensor:
        """IoU between the masks thresholded at threshold +/- offset: BxMxHxW -> BxM."""
        high = (masks > self.mask_threshold + self.stability_score_offset).float().sum((-2, -1))
        low = (masks > self.mask_threshold - self.stability_score_offset).float().sum((-2, -1))
        return high / low

    @staticmethod
    def select_single_mask(
        masks: torch.Tensor, scores: torch.Tensor, num_points: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """BxMxHxW masks, BxM scores -> the chosen mask Bx1xHxW and its score Bx1.

        With more than 2 points (a point and its pad, or a box, count 2) token 0, else the best
        scored ambiguity mask. A score offset instead of an `if` keeps the number of points a
        runtime value of the graph.
        """
        weight = torch.zeros_like(scores[:1])
        weight[:, 0] = SINGLE_MASK_SCORE_WEIGHT
        best = torch.argmax(scores + (num_points - 2.5) * weight, dim=1, keepdim=True)  # B x 1
        picked = torch.gather(masks, 1, best[:, :, None, None].expand(-1, -1, *masks.shape[-2:]))
        return picked, torch.gather(scores, 1, best)

    def upscale_masks(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        """BxMx4hx4w logits -> BxMxHxW at orig_im_size (H, W): up to the padded input, padding cropped,
        then to the original size, as `Sam.postprocess_masks`; the sizes stay runtime values."""
        masks = F.interpolate(masks, (self.img_size, self.img_size), mode="bilinear", align_corners=False)
        size = orig_im_size.to(torch.float32)
        input_size = torch.floor(size * (self.img_size / size.max()) + 0.5).to(torch.int64)
        masks = masks[..., : input_size[0], : input_size[1]]
        out = orig_im_size.to(torch.int64)
        return F.interpolate(masks, size=(out[0], out[1]), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sparse = self.prompt_encoder.embed_labelled_points(point_coords, point_labels)
        dense = self.embed_dense(mask_input, has_mask_input)
        image_pe = self.prompt_encoder.get_dense_pe()
        low_res, scores = self.mask_decoder.predict_masks(image_embeddings, image_pe, sparse, dense)
        if self.use_stability_score:
            scores = self.stability_score(low_res)
        if self.return_single_mask:
            low_res, scores = self.select_single_mask(low_res, scores, point_coords.shape[1])
        return self.upscale_masks(low_res, orig_im_size), scores, low_res
