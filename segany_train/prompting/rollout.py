"""Simulated interactive prompting: SAM's 11-iteration training rollout and the evaluation protocol.

Plain torch over a batch of N masks at once (no loop over masks). Iteration 0 gives each mask its
first prompt (a point or a noisy box, or in SAM 2 the GT mask itself); then correction clicks are
added one per iteration from the error between the previous prediction and the GT; some iterations
add no click and only refine with the fed-back mask. The previous iteration's low-res logits (of the
output with the highest predicted IoU) are the next mask prompt, detached: no gradient flows
between iterations.

What depends only on the prompts' structure is decided on the host, from a numpy generator seeded
by the torch generator's seed: each mask's first-prompt kind, where the refinement iterations go,
and so which prompts get 3 outputs. The device is then never read back (no host sync) for them.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
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


def iteration_schedule(cfg: RolloutConfig, rng: np.random.Generator | None = None) -> list[bool]:
    """For each iteration after the first: does it add a click?

    The iterations without a click go one at a random place among the click iterations and the
    rest at the end (SAM: 8 clicks, 2 refinements -> one random, one last). Drawn on the host.
    """
    refinements = cfg.num_iterations - 1 - cfg.num_correction_clicks
    schedule = [True] * cfg.num_correction_clicks
    if refinements > 0:
        position = int((rng if rng is not None else np.random.default_rng()).integers(0, cfg.num_correction_clicks + 1))
        schedule.insert(position, False)
        schedule += [False] * (refinements - 1)
    return schedule


def host_generator(generator: torch.Generator | None) -> np.random.Generator:
    """The rollout's host-side generator: seeded by the torch generator's seed (read on the host, no
    sync), so that one torch generator keys both; fresh entropy without one."""
    return np.random.default_rng(None if generator is None else generator.initial_seed())


@dataclass
class OutputGroup:
    """Prompts of one iteration decoded alike: K of the N prompts with M outputs each (3 for a single
    point, 1 for anything more)."""

    rows: torch.Tensor | None  # K indices into the N prompts (on the device); None: all N, in order
    logits: torch.Tensor  # K x M x S x S float32 logits at the GT masks' resolution
    iou_pred: torch.Tensor  # K x M float32 predicted IoU


def scatter_rows(n: int, parts: Sequence[tuple[torch.Tensor | None, torch.Tensor]]) -> torch.Tensor:
    """Per-group values (rows, K x ...) -> N x ... in prompt order (differentiable)."""
    if len(parts) == 1 and parts[0][0] is None:
        return parts[0][1]
    first = parts[0][1]
    out = first.new_zeros((n, *first.shape[1:]))
    for rows, values in parts:
        out = out.index_copy(0, rows, values)
    return out


@dataclass
class IterationOutput:
    """One decoder iteration: its output groups (the loss takes each group's own outputs), the output
    shown to a user, the iteration index, and the interactions so far (the first prompt plus the
    correction clicks)."""

    groups: list[OutputGroup]
    shown: torch.Tensor  # N x S x S float32 logits (detached) of each prompt's output of highest predicted IoU
    shown_iou_pred: torch.Tensor  # N: the IoU head's prediction for it
    step: int
    interactions: int
    point_coords: torch.Tensor  # NxPx2 prompt points in input pixels (box corners included)
    point_labels: torch.Tensor  # NxP labels (IGNORE_LABEL where padded)

    def expanded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """N x 3 x S x S logits and N x 3 predicted IoU in prompt order, a single-output prompt's one
        output repeated so that all rows stack: for evaluation (the best of the outputs) and inspection.
        The loss takes the groups instead: it never needs the copies."""
        n = self.point_coords.shape[0]
        logits = scatter_rows(n, [(g.rows, g.logits.expand(-1, 3, -1, -1)) for g in self.groups])
        iou = scatter_rows(n, [(g.rows, g.iou_pred.expand(-1, 3)) for g in self.groups])
        return logits, iou


def _bernoulli(n: int, p: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """N bool draws with probability p, drawn on the generator's device and returned on `device`."""
    draw_on = generator.device if generator is not None else device
    return (torch.rand(n, generator=generator, device=draw_on) < p).to(device)


def _to_device(values: np.ndarray, device: torch.device) -> torch.Tensor:
    # non_blocking: a host-to-device copy that does not wait on the device (a blocking one syncs)
    return torch.from_numpy(values).to(device, non_blocking=True)


def _at(logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """K x M x h x w float32 -> K x M x S x S, bilinear (high-resolution supervision) when S differs."""
    if logits.shape[-2:] == size:
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


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
    host_image_index: np.ndarray | None = None,
) -> None:
    """Runs the rollout for N GT masks (NxMxM bool) on B embeddings.

    M is the decoder's low-res size, or larger for high-resolution supervision (`data.mask_size`):
    the logits are then upsampled bilinearly to MxM for the loss and the clicks (in float32, after
    the output shown is chosen at low resolution), while the low-res logits are what is fed back
    as the next mask prompt.

    `on_iteration` receives each iteration's outputs (with gradients) as soon as they exist, so a
    caller can compute and backpropagate the loss before the next iteration builds its graph.
    `valid` (NxMxM bool, optional) is the part of each mask's frame that holds the image: the
    prediction a click corrects is cleared outside it, since a user never sees the padding (the
    predictor crops it away), so no click lands there. `host_image_index` (N, numpy, optional) is
    `image_index` on the host: the decoder then groups prompts by image without reading the device.
    """
    n, device = gt.shape[0], gt.device
    scale = sam.image_encoder.img_size / gt.shape[-1]  # low-res mask pixel -> input pixels
    host = host_generator(generator)
    # SAM 2: the GT-mask prompt replaces points and boxes; the rest get a box or a point
    use_gt_mask = host.random(n) < cfg.gt_mask_prompt_probability  # N bool, host
    use_box = (host.random(n) < cfg.box_probability) & ~use_gt_mask
    gt_mask_rows, box_rows = _to_device(use_gt_mask, device), _to_device(use_box, device)
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
    has_mask = use_gt_mask.copy()  # N bool, host: which prompts carry a mask prompt
    if use_gt_mask.any():
        mask_input = (gt.to(embeddings.dtype) * 2 - 1)[:, None] * 10.0  # a confident mask prompt
        if mask_input.shape[-2:] != sam.prompt_encoder.mask_input_size:  # high-resolution GT
            mask_input = F.interpolate(mask_input, size=sam.prompt_encoder.mask_input_size, mode="bilinear", align_corners=False)
    previous_mask = torch.zeros_like(gt)  # the prediction the next click corrects
    schedule = [True] + iteration_schedule(cfg, host)
    for step, adds_click in enumerate(schedule):
        if step > 0 and adds_click:
            new, labels = _next_click(previous_mask, gt, cfg, generator, scale)
            clicks = torch.cat([clicks, new[:, None]], dim=1)
            click_labels = torch.cat([click_labels, labels[:, None]], dim=1)
        coords, labels = _prompt_tokens(points, box_rows, gt_mask_rows, corner_coords, corner_labels, clicks, click_labels)
        # a single point is ambiguous: 3 outputs; anything more decides the object: 1 output. Counted
        # from the prompts' structure, as SAM 2 counts points: a click slot counts even where it is
        # padding (the previous mask had no error left to click on)
        points_so_far = np.where(use_gt_mask | use_box, 0, 1) + clicks.shape[1]
        single_point = ~use_box & (points_so_far == 1)
        # IGNORE_LABEL tokens exist in mask-started prompts and, once there are clicks, where one is padding
        may_pad = use_gt_mask | (clicks.shape[1] > 0)
        groups, shown_low, shown_iou = _decode(
            sam, embeddings, image_index, coords, labels, mask_input, single_point, has_mask, may_pad, host_image_index
        )
        groups = [OutputGroup(g.rows, _at(g.logits, gt.shape[-2:]), g.iou_pred) for g in groups]
        shown = _at(shown_low[:, None], gt.shape[-2:])[:, 0]  # N x S x S, upsampled after the choice
        on_iteration(IterationOutput(groups, shown, shown_iou, step, 1 + clicks.shape[1], coords, labels))
        previous_mask = shown > sam.mask_threshold  # N x S x S
        if valid is not None:
            previous_mask &= valid
        if cfg.mask_feedback:
            # in the embeddings' dtype, as the GT-mask prompt: the decoder's outputs may be bf16
            # (autocast) while the prompt encoder's weights are fp32
            mask_input, has_mask = shown_low[:, None].to(embeddings.dtype), np.ones(n, dtype=bool)


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
        logits, iou_pred = out.expanded()
        if measure is not None:
            per_output = measure(logits)  # N x 3
        else:
            logits = logits if valid is None else logits.masked_fill(~valid[:, None], float("-inf"))
            per_output = dense_mask_iou(logits > sam.mask_threshold, gt)  # N x 3
        best = iou_pred.argmax(dim=1)
        predicted = iou_pred.gather(1, best[:, None])[:, 0]
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


def _decode(sam, embeddings, image_index, coords, labels, mask_input, multimask, has_mask, may_pad, host_image_index):
    """Decodes the N prompts in groups that the host tells apart (multimask, has_mask, may_pad: N
    bool numpy): 3 outputs or 1, with or without a mask prompt.

    Returns the groups (low-res float32 logits: SAM 2 takes the logits to fp32 before upsampling and
    the loss), and per prompt the low-res logits (N x h x w, detached) and predicted IoU (N) of the
    output of highest predicted IoU, chosen before anything is upsampled.
    """
    n, device = coords.shape[0], coords.device
    groups, shown, shown_iou = [], [], []
    for flag in (True, False):
        for with_mask in (False, True):
            selected = (multimask == flag) & (has_mask == with_mask)
            if not selected.any():
                continue
            rows = None if selected.all() else _to_device(np.flatnonzero(selected), device)

            def pick(t: torch.Tensor) -> torch.Tensor:
                return t if rows is None else t[rows]

            low, pred = sam.decode(
                embeddings,
                image_index=pick(image_index),
                point_coords=pick(coords),
                point_labels=pick(labels),
                multimask_output=flag,
                mask_inputs=pick(mask_input) if with_mask else None,
                host_image_index=None if host_image_index is None else host_image_index[selected],
                mask_padding=bool(may_pad[selected].any()),
            )
            low, pred = low.float(), pred.float()
            groups.append(OutputGroup(rows, low, pred))
            best = pred.detach().argmax(dim=1)
            k = torch.arange(low.shape[0], device=device)
            shown.append((rows, low.detach()[k, best]))
            shown_iou.append((rows, pred.detach()[k, best]))
    return groups, scatter_rows(n, shown), scatter_rows(n, shown_iou)
