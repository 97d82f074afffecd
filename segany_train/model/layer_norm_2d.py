"""Channel-wise LayerNorm for NCHW feature maps (the official SAM neck and decoder use it)."""

import torch
from torch import nn
from torch.nn import functional as F


class LayerNorm2d(nn.Module):
    """Normalises each pixel over channels: BxCxHxW -> BxCxHxW."""

    def __init__(self, num_channels: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.layer_norm over a channels-last view is one fused kernel instead of five elementwise passes.
        x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)
