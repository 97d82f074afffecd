"""A class-agnostic box head on SAM's image embeddings (stage 2's "object" detector)."""

import torch
from torch import nn


class ObjectnessHead(nn.Module):
    """Per embedding cell: an objectness logit (an object's box centre lies in this cell) and the
    box as (dx, dy, log w, log h): the centre's offset from the cell centre and the size, in cells.

    Input Bx(C)x(h)x(w) image embeddings (frozen); output Bx5x(h)x(w).
    """

    def __init__(self, *, channels: int, hidden: int = 128, stride: float = 16.0) -> None:
        super().__init__()
        self.channels, self.hidden = channels, hidden
        self.stride = stride  # input pixels per embedding cell (SAM's patch size)
        self.trunk = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.GELU(),
        )
        self.out = nn.Conv2d(hidden, 5, 1)
        nn.init.constant_(self.out.bias[0], -4.0)  # few cells hold a centre: start near "no object"

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.out(self.trunk(embeddings))
