"""Box prompts: tight boxes from masks, SAM's box jitter, and boxes as labelled corner points.

Boxes are Nx4 XYXY in pixel units of the frame `scale` times the mask frame, with pixel *edges* as
bounds: a mask covering columns c0..c1 gives x0 = c0 * scale, x1 = (c1 + 1) * scale (exclusive).
"""

import torch

from segany_train.model.prompt_encoder import BOX_BOTTOM_RIGHT, BOX_TOP_LEFT


def boxes_from_masks(masks: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Tight box around each mask.

    masks: NxHxW bool. Returns Nx4 float32 XYXY (x1, y1 exclusive, i.e. (max_col + 1) * scale).
    Empty masks give a NaN row (test with `masks.flatten(1).any(1)`).
    """
    n, h, w = masks.shape
    any_in_row = masks.any(dim=2)  # NxH
    any_in_col = masks.any(dim=1)  # NxW
    rows = torch.arange(h, device=masks.device)
    cols = torch.arange(w, device=masks.device)
    # Min/max of the occupied indices, with out-of-range fillers so empty rows/cols never win.
    y0 = torch.where(any_in_row, rows, h).amin(dim=1)
    y1 = torch.where(any_in_row, rows, -1).amax(dim=1) + 1
    x0 = torch.where(any_in_col, cols, w).amin(dim=1)
    x1 = torch.where(any_in_col, cols, -1).amax(dim=1) + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=1).to(torch.float32) * scale
    return boxes.masked_fill(~any_in_row.any(dim=1, keepdim=True), float("nan"))


def noisy_boxes(
    boxes: torch.Tensor,
    generator: torch.Generator | None = None,
    noise_std_fraction: float = 0.1,
    max_noise: float = 20.0,
    image_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """SAM's training-time box jitter (SAM paper, appendix A).

    boxes: Nx4 XYXY float. Each coordinate gets Gaussian noise with std = noise_std_fraction times
    the box side along its axis (x0/x1: width, y0/y1: height), each noise value clamped to
    [-max_noise, max_noise] pixels. Corners are then re-sorted so x0 <= x1 and y0 <= y1 (large
    noise on a thin box can swap them), and, if `image_size` = (h, w) is given, clipped to [0, w] x
    [0, h]. Returns Nx4 in the dtype/device of `boxes` (`generator` may live on another device).
    """
    side = torch.cat([boxes[:, 2:] - boxes[:, :2]] * 2, dim=1)  # (w, h, w, h), matching x0 y0 x1 y1
    draw_on = generator.device if generator is not None else boxes.device  # draws happen on the generator's device
    noise = torch.randn(boxes.shape, generator=generator, device=draw_on, dtype=boxes.dtype).to(boxes.device)
    noise = (noise * noise_std_fraction * side.abs()).clamp(-max_noise, max_noise)
    jittered = boxes + noise
    xs = jittered[:, 0::2].sort(dim=1).values
    ys = jittered[:, 1::2].sort(dim=1).values
    if image_size is not None:
        h, w = image_size
        # Clipping is monotonic, so it keeps the order established by the sort.
        xs = xs.clamp(0, w)
        ys = ys.clamp(0, h)
    return torch.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], dim=1)


def box_to_points(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nx4 XYXY boxes -> (Nx2x2 corner coords, Nx2 long labels).

    Labels follow SAM's token convention for box corners: 2 for the top-left (x0, y0) and 3 for the
    bottom-right (x1, y1) corner, so boxes can be concatenated with point prompts.
    """
    coords = boxes.reshape(-1, 2, 2)
    # filled in place, not copied from a host tensor (a host-to-device copy syncs on CUDA)
    labels = torch.empty(coords.shape[0], 2, dtype=torch.long, device=boxes.device)
    labels[:, 0], labels[:, 1] = BOX_TOP_LEFT, BOX_BOTTOM_RIGHT
    return coords, labels
