"""Uniform point sampling inside batched binary masks.

Coordinate convention (shared by every function in `segany_train.prompting`): a point is returned as
(x, y) = ((col + 0.5) * scale, (row + 0.5) * scale), the centre of mask pixel (row, col) expressed in
the pixel units of a frame `scale` times larger (masks are usually SAM's 256x256 low-res frame and
prompts are needed in the 1024x1024 input frame, so scale=4). Note that SAM's prompt encoder adds
+0.5 to the coordinates it receives (it treats them as integer pixel indices), so with scale=1 a
point lands half a pixel right/below the sampled pixel's centre there; subtract 0.5 if you need the
encoder to see exactly this centre.

Invalid results (nothing to sample from) have NaN coordinates and `valid=False`: NaN makes a missed
`valid` check fail loudly, while a caller that masks the click out (e.g. with IGNORE_LABEL, whose
token the prompt encoder zeroes) never propagates it.
"""

import torch


def pixel_centres(flat_index: torch.Tensor, width: int, scale: float = 1.0) -> torch.Tensor:
    """N long indices into flattened HxW masks -> Nx2 float32 (x, y) pixel-centre coordinates * scale."""
    rows = torch.div(flat_index, width, rounding_mode="floor")
    cols = flat_index - rows * width
    return torch.stack([cols, rows], dim=-1).to(torch.float32).add_(0.5).mul_(scale)


def sample_flat_indices(
    masks: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One uniformly drawn True pixel per mask.

    masks: NxHxW bool. Returns (index N long into the flattened HxW mask, valid N bool). Empty masks
    get index 0 and valid=False.

    Uniform by construction: draw a rank k uniform in [0, count) and find the k-th True pixel with a
    cumulative sum + binary search. Unlike torch.multinomial this needs no special case for empty
    masks (multinomial rejects all-zero rows) and has no float-weight rounding.
    """
    n = masks.shape[0]
    flat = masks.reshape(n, -1)
    # int32 is plenty (counts <= H*W) and halves the memory of the NxHW cumulative sum.
    cumsum = flat.cumsum(dim=1, dtype=torch.int32)
    count = cumsum[:, -1] if flat.shape[1] > 0 else torch.zeros(n, dtype=torch.int32, device=masks.device)
    valid = count > 0
    # float64 so that the rank stays uniform for counts far beyond float32's 2^24 resolution.
    # drawn on the generator's device (a CUDA generator cannot draw a CPU tensor, nor the reverse)
    draw_on = generator.device if generator is not None else masks.device
    u = torch.rand(n, generator=generator, device=draw_on, dtype=torch.float64).to(masks.device)
    rank = (u * count).floor().to(torch.int32)
    rank = torch.minimum(rank, (count - 1).clamp(min=0))  # guard u*count rounding up to count
    # First position whose cumulative count exceeds the rank = the rank-th True pixel (0-based).
    index = torch.searchsorted(cumsum, (rank + 1).unsqueeze(1)).squeeze(1)
    index = torch.where(valid, index, torch.zeros_like(index))
    return index, valid


def sample_points_in_masks(
    masks: torch.Tensor, generator: torch.Generator | None = None, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A point sampled uniformly among the True pixels of each mask.

    masks: NxHxW bool (any device; `generator`, if given, may live on another: draws happen on it).
    Returns (coords Nx2 float32 (x, y) pixel centres * scale, valid N bool). Empty masks give
    valid=False and NaN coords.

    This is also SAM 2's "correction click sampled from the GT" option: call it on the GT masks and
    use label 1 (foreground).
    """
    index, valid = sample_flat_indices(masks, generator)
    coords = pixel_centres(index, masks.shape[-1], scale)
    coords = coords.masked_fill(~valid.unsqueeze(1), float("nan"))
    return coords, valid
