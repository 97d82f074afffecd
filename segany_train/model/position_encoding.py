"""Random Fourier feature positional encoding shared by the prompt encoder and the image grid."""

import math

import torch
from torch import nn


class PositionEmbeddingRandom(nn.Module):
    """Maps (x, y) in [0, 1] to 2*num_pos_feats sin/cos features through a fixed Gaussian matrix."""

    def __init__(self, *, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats)))
        self._grid_cache: tuple[tuple, torch.Tensor] | None = None

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """...x2 normalised coords -> ...x(2*num_pos_feats) float32.

        Always fp32, autocast or not: in bf16 the phase 2*pi*(x @ G) keeps 8 bits, which moves
        points by whole cells, and the grid encoding is cached and reused outside autocast.
        """
        with torch.autocast(coords.device.type, enabled=False):
            coords = 2 * coords.float() - 1
            coords = coords @ self.positional_encoding_gaussian_matrix.float()
            coords = 2 * math.pi * coords
            return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of every cell centre of an HxW grid: Cx H x W.

        Cached: it depends only on the grid size and the (never trained) Gaussian matrix, and the
        decoder asks for it on every prompt. The key includes the buffer's version counter, so loading
        a state dict (an in-place copy) invalidates it, and inference mode, whose tensors autograd
        refuses to save (Lightning validates under inference mode between training steps).
        """
        g = self.positional_encoding_gaussian_matrix
        key = (tuple(size), g.device, g.dtype, g.data_ptr(), g._version, torch.is_inference_mode_enabled())
        if self._grid_cache is not None and self._grid_cache[0] == key:
            return self._grid_cache[1]
        h, w = size
        grid = torch.ones((h, w), device=g.device, dtype=torch.float32)
        y_embed = (grid.cumsum(dim=0) - 0.5) / h
        x_embed = (grid.cumsum(dim=1) - 0.5) / w
        pe = self._pe_encoding(torch.stack([x_embed, y_embed], dim=-1)).permute(2, 0, 1)  # C x H x W
        self._grid_cache = (key, pe)
        return pe

    def forward_with_coords(self, coords_input: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """BxNx2 pixel coords (x, y) in an image of `image_size` (h, w) -> BxNxC."""
        coords = coords_input.clone()
        coords[..., 0] = coords[..., 0] / image_size[1]
        coords[..., 1] = coords[..., 1] / image_size[0]
        return self._pe_encoding(coords.to(torch.float))
