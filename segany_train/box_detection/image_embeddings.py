"""Images -> the frozen SAM image embeddings the box head reads, computed as the predictor does."""

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from segany_train.model import Sam
from segany_train.model.transforms import ResizeLongestSide

ENCODE_BATCH = 8  # images per image-encoder call


def check_image(image: Any) -> None:
    """Raises a ValueError unless `image` is a non-empty HxWx3 uint8 numpy array."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}"
        raise ValueError(f"images must be HxWx3 uint8 numpy arrays, got {got}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image has no pixels: shape {image.shape}")


@torch.no_grad()
def encode_images(sam: Sam, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """HxWx3 uint8 images -> (BxCxhxw frozen image embeddings on `sam`'s device, the B input sizes (h, w)).

    The same preprocessing as `SamPredictor.set_image` (resize longest side, normalise, zero padding),
    so detections on a predictor's embedding see what training saw.
    """
    size = sam.image_encoder.img_size
    transform = ResizeLongestSide(size)
    device = sam.pixel_mean.device
    embeddings, input_sizes = [], []
    for start in range(0, len(images), ENCODE_BATCH):
        batch = images[start : start + ENCODE_BATCH]
        padded = torch.zeros(len(batch), 3, size, size, dtype=torch.uint8)
        sizes = []
        for i, image in enumerate(batch):
            check_image(image)
            resized = torch.from_numpy(transform.apply_image(image)).permute(2, 0, 1)
            padded[i, :, : resized.shape[1], : resized.shape[2]] = resized
            sizes.append((resized.shape[1], resized.shape[2]))
        normalised = sam.normalize_padded(padded.to(device), torch.tensor(sizes, device=device))
        embeddings.append(sam.image_encoder(normalised))
        input_sizes += sizes
    if not embeddings:
        raise ValueError("encode_images got no image")
    return torch.cat(embeddings), input_sizes
