"""Simulated interactive prompting: SAM's 11-iteration training rollout and the evaluation protocol.

Plain torch over a batch of N masks at once (no loop over masks). Iteration 0 gives each mask its
first prompt (a point or a noisy box, or in SAM 2 the GT mask itself); then correction clicks are
added one per iteration from the error between the previous prediction and the GT; some iterations
add no click and only refine with the fed-back mask. The previous iteration's low-res logits (of the
output with the highest predicted IoU) are the next mask prompt, detached: no gradient flows
between iterations.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.nn import functional as F

from segany_train.data.mask_iou import dense_mask_iou
from segany_train.model import IGNORE_LABEL, Sam
from segany_train.model.prompt_encoder import NOT_A_POINT
from segany_train.prompting import (
    box_to_points,
    boxes_from_masks,
    center_correction_clicks,
    noisy_boxes,
    sample_correction_clicks,
    sample_points_in_masks,
)


@dataclass(frozen=True)
class RolloutConfig:
    """The rollout's numbers. Defaults are the SAM paper's training schedule."""

    num_iterations: int = 11  # including the first prompt
    num_correction_clicks: int = 8
    box_probability: float = 0.5  # first prompt without a GT mask: a noisy GT box, else a point inside the mask
    gt_mask_prompt_probability: float = 0.0  # SAM 2: the GT mask itself as the first prompt
    gt_click_probability: float = 0.0  # SAM 2: a correction click drawn from the GT, not the error
    click_mode: str = "uniform"  # "uniform" (training) or "center" (evaluation protocol)
    box_noise_fraction: float = 0.1
    box_noise_max: float = 20.0
    mask_feedback: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.num_correction_clicks <= self.num_iterations - 1:
            raise ValueError("num_correction_clicks must fit in the iterations after the first")
        if self.click_mode not in ("uniform", "center"):
            raise ValueError(f"click_mode must be 'uniform' or 'center', got {self.click_mode!r}")


def iteration_schedule(cfg: RolloutConfig, generator: torch.Generator | None = None) -> list[bool]:
    """For each iteration after the first: does it add a click?

    The iterations without a click go one at a random place among the click iterations and the
    rest at the end (SAM: 8 clicks, 2 refinements -> one random, one last).
    """
    refinements = cfg.num_iterations - 1 - cfg.num_correction_clicks
    schedule = [True] * cfg.num_correction_clicks
    if refinements > 0:
        # drawn on the generator's device: a CUDA generator cannot draw a CPU tensor
        device = generator.device if generator is not None else None
        position = int(torch.randint(0, cfg.num_correction_clicks + 1, (1,), generator=generator, device=device))
        schedule.insert(position, False)
        schedule += [False] * (refinements - 1)
    return schedule


@dataclass
class IterationOutput:
    """One decoder iteration: logits Nx3xhxw and predicted IoU Nx3 (a single-output prompt's one
    output repeated, so all rows stack), the iteration index, and the interactions so far (the
    first prompt plus the correction clicks)."""

    logits: torch.Tensor
    iou_pred: torch.Tensor
    step: int
    interactions: int
    point_coords: torch.Tensor  # NxPx2 prompt points in input pixels (box corners included)
    point_labels: torch.Tensor  # NxP labels (IGNORE_LABEL where padded)


def _bernoulli(n: int, p: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """N bool draws with probability p, drawn on the generator's device and returned on `device`."""
    draw_on = generator.device if generator is not None else device
    return (torch.rand(n, generator=generator, device=draw_on) < p).to(device)


def run_rollout(
    sam: Sam,
    embeddings: torch.Tensor,
    gt: torch.Tensor,
    image_index: torch.Tensor,
    cfg: RolloutConfig,
    on_iteration: Callable[[IterationOutput], None],
    generator: torch.Generator | None = None,
    *,
    valid: torch.Tensor | None = None,
) -> None:
    """Runs the rollout for N GT masks (NxMxM bool) on B embeddings.

    M is the decoder's low-res size, or larger for high-resolution supervision (`data.mask_size`):
    the logits are then upsampled bilinearly to MxM for the loss and the clicks, while the low-res
    logits are what is fed back as the next mask prompt.

    `on_iteration` receives each iteration's outputs (with gradients) as soon as they exist, so a
    caller can compute and backpropagate the loss before the next iteration builds its graph.
    `valid` (NxMxM bool, optional) is the part of each mask's frame that holds the image: the
    prediction a click corrects is cleared outside it, since a user never sees the padding (the
    predictor crops it away), so no click lands there.
    """
    n, device = gt.shape[0], gt.device
    scale = sam.image_encoder.img_size / gt.shape[-1]  # low-res mask pixel -> input pixels
    use_gt_mask = _bernoulli(n, cfg.gt_mask_prompt_probability, generator, device)
    # SAM 2: the GT-mask prompt replaces points and boxes; the rest get a box or a point
    use_box = _bernoulli(n, cfg.box_probability, generator, device) & ~use_gt_mask
    points, _ = sample_points_in_masks(gt, generator=generator, scale=scale)
    boxes = noisy_boxes(
        boxes_from_masks(gt, scale=scale),
        generator=generator,
        noise_std_fraction=cfg.box_noise_fraction,
        max_noise=cfg.box_noise_max,
        image_size=(sam.image_encoder.img_size, sam.image_encoder.img_size),
    )
    corner_coords, corner_labels = box_to_points(boxes)
    # prompting returns pixel centres as continuous coordinates ((col + 0.5) * scale); the prompt
    # encoder takes pixel indices and adds the half pixel itself
    points = points - 0.5
    if cfg.click_mode == "center":  # evaluation: the first click is the GT's most interior point
        points, _, _ = center_correction_clicks(torch.zeros_like(gt), gt, scale=scale)
        points = points - 0.5
    clicks = torch.empty(n, 0, 2, device=device)
    click_labels = torch.empty(n, 0, dtype=torch.long, device=device)
    mask_input: torch.Tensor | None = None
    if cfg.gt_mask_prompt_probability > 0:
        gt_logits = (gt.to(embeddings.dtype) * 2 - 1)[:, None] * 10.0  # a confident mask prompt
        if gt_logits.shape[-2:] != sam.prompt_encoder.mask_input_size:  # high-resolution GT
            gt_logits = F.interpolate(gt_logits, size=sam.prompt_encoder.mask_input_size, mode="bilinear", align_corners=False)
        mask_input = torch.where(use_gt_mask.view(-1, 1, 1, 1), gt_logits, torch.zeros_like(gt_logits))
    has_mask = use_gt_mask.clone()
    previous_mask = torch.zeros_like(gt)  # the prediction the next click corrects
    schedule = [True] + iteration_schedule(cfg, generator)
    for step, adds_click in enumerate(schedule):
        if step > 0 and adds_click:
            new, labels = _next_click(previous_mask, gt, cfg, generator, scale)
            clicks = torch.cat([clicks, new[:, None]], dim=1)
            click_labels = torch.cat([click_labels, labels[:, None]], dim=1)
        coords, labels = _prompt_tokens(points, use_box, use_gt_mask, corner_coords, corner_labels, clicks, click_labels)
        # a single point is ambiguous: 3 outputs; anything more decides the object: 1 output
        single_point = (labels >= 0).sum(1) == 1
        low_res, iou_pred = _decode(sam, embeddings, image_index, coords, labels, mask_input, has_mask, single_point)
        logits = low_res
        if gt.shape[-2:] != low_res.shape[-2:]:  # high-resolution supervision
            logits = F.interpolate(low_res, size=gt.shape[-2:], mode="bilinear", align_corners=False)
        on_iteration(IterationOutput(logits, iou_pred, step, 1 + clicks.shape[1], coords, labels))
        best = iou_pred.detach().argmax(dim=1)
        rows = torch.arange(n, device=device)
        previous_mask = logits.detach()[rows, best] > sam.mask_threshold  # N x M x M
        if valid is not None:
            previous_mask &= valid
        if cfg.mask_feedback:
            # in the embeddings' dtype, as the GT-mask prompt: the decoder's outputs may be bf16
            # (autocast) while the prompt encoder's weights are fp32
            chosen = low_res.detach()[rows, best, None]  # N x 1 x h x w
            mask_input, has_mask = chosen.to(embeddings.dtype), torch.ones(n, dtype=torch.bool, device=device)


class ClickIoU(NamedTuple):
    """IoU with the GT after one interaction, per mask (N each)."""

    shown: torch.Tensor  # the output with the highest predicted IoU: what a user is shown
    oracle: torch.Tensor  # the best output; equals `shown` where the prompt gives a single output
    predicted: torch.Tensor  # the IoU head's prediction for the shown output


@torch.no_grad()
def interactive_ious(
    sam: Sam,
    embeddings: torch.Tensor,
    gt: torch.Tensor,
    image_index: torch.Tensor,
    cfg: RolloutConfig,
    *,
    valid: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    measure: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[int, ClickIoU]:
    """Per-mask IoU after k interactions, {k: ClickIoU}, for N GT masks (NxMxM bool, low-res).

    With `valid` (NxMxM bool), predictions outside it (the padding) are cleared before the IoU and
    before a click is placed. Without refinement iterations (the evaluation protocol) k runs over
    1..num_iterations; otherwise an interaction count's last iteration is the one kept.
    `measure` (Nx3xMxM logits -> Nx3 IoU) replaces the IoU against `gt`, e.g. to measure at the
    images' own resolution; the clicks are still placed from `gt`.
    """
    ious: dict[int, ClickIoU] = {}

    def on_iteration(out: IterationOutput) -> None:
        if measure is not None:
            per_output = measure(out.logits)  # N x 3
        else:
            logits = out.logits if valid is None else out.logits.masked_fill(~valid[:, None], float("-inf"))
            per_output = dense_mask_iou(logits > sam.mask_threshold, gt)  # N x 3
        best = out.iou_pred.argmax(dim=1)
        predicted = out.iou_pred.gather(1, best[:, None])[:, 0]
        ious[out.interactions] = ClickIoU(per_output.gather(1, best[:, None])[:, 0], per_output.amax(dim=1), predicted)

    run_rollout(sam, embeddings, gt, image_index, cfg, on_iteration, generator, valid=valid)
    return ious


def _next_click(previous_mask, gt, cfg, generator, scale):
    """Nx2 click coordinates (pixel indices of the input frame) and N labels."""
    if cfg.click_mode == "center":
        coords, labels, valid = center_correction_clicks(previous_mask, gt, scale=scale)
        return coords - 0.5, torch.where(valid, labels, torch.full_like(labels, IGNORE_LABEL))
    coords, labels, valid = sample_correction_clicks(previous_mask, gt, generator=generator, scale=scale)
    if cfg.gt_click_probability > 0:
        from_gt = _bernoulli(gt.shape[0], cfg.gt_click_probability, generator, gt.device)
        gt_points, _ = sample_points_in_masks(gt, generator=generator, scale=scale)
        coords = torch.where(from_gt[:, None], gt_points, coords)
        labels = torch.where(from_gt, torch.ones_like(labels), labels)
        valid = valid | from_gt
    # a perfect mask has no error to click on: the slot is padding, masked out of attention
    return coords - 0.5, torch.where(valid, labels, torch.full_like(labels, IGNORE_LABEL))


def _prompt_tokens(points, use_box, use_gt_mask, corner_coords, corner_labels, clicks, click_labels):
    """NxPx2 coords and NxP labels in the official token order.

    Point-started: [first point, clicks..., "not a point" pad]; box-started: [clicks..., box corners];
    mask-started: [clicks..., pad] (the official model pads whenever there is no box).
    """
    n = points.shape[0]
    pad_c, pad_l = torch.zeros_like(points)[:, None], torch.full((n, 1), NOT_A_POINT, device=points.device)
    point_start = torch.cat([points[:, None], clicks, pad_c], 1), torch.cat(
        [torch.ones(n, 1, dtype=torch.long, device=points.device), click_labels, pad_l], 1
    )
    box_start = torch.cat([clicks, corner_coords], 1), torch.cat([click_labels, corner_labels.long()], 1)
    mask_start = torch.cat([clicks, pad_c, pad_c], 1), torch.cat([click_labels, pad_l, torch.full_like(pad_l, IGNORE_LABEL)], 1)
    coords = torch.where(use_box[:, None, None], box_start[0], torch.where(use_gt_mask[:, None, None], mask_start[0], point_start[0]))
    labels = torch.where(use_box[:, None], box_start[1], torch.where(use_gt_mask[:, None], mask_start[1], point_start[1]))
    return coords, labels


def _decode(sam, embeddings, image_index, coords, labels, mask_input, has_mask, multimask):
    """Decodes single-point prompts with 3 outputs and the rest with 1; returns N x 3 outputs.

    Single-output rows are repeated to 3 with their IoU prediction so both kinds stack; the loss's
    min over outputs and the argmax over predicted IoU then see one distinct output.
    """
    parts_logits, parts_iou, rows_all = [], [], []
    for flag in (True, False):
        rows = (multimask == flag).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        low, pred = sam.decode(
            embeddings,
            image_index=image_index[rows],
            point_coords=coords[rows],
            point_labels=labels[rows],
            multimask_output=flag,
            mask_inputs=None if mask_input is None else mask_input[rows],
            has_mask_input=None if mask_input is None else has_mask[rows],
        )
        parts_logits.append(low.expand(-1, 3, -1, -1) if not flag else low)
        parts_iou.append(pred.expand(-1, 3) if not flag else pred)
        rows_all.append(rows)
    # concatenated in the decoder's dtype and put back in prompt order by the inverse permutation:
    # under CUDA autocast the outputs are bf16 while the embeddings are fp32, and CUDA autocast does
    # not promote a copy into an fp32 buffer (CPU autocast does)
    order = torch.cat(rows_all)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    logits = torch.cat(parts_logits)[inverse]
    iou = torch.cat(parts_iou)[inverse]
    return logits, iou
