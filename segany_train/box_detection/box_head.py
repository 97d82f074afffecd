"""The class-agnostic box head of the data engine's stage 2: a small dense head on frozen SAM image
embeddings that predicts, per embedding cell and per box-size slot, whether an object's box centre
lies in the cell and where that box is.

Size slots exist because the coarse embedding grid (16 input pixels per cell) often puts the centres
of an object and of one of its parts in the same cell; a whole and its part differ in size, so with
one prediction per cell and size slot most such pairs no longer compete for one output.
"""

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class BoxHeadConfig:
    """channels: C of the image embeddings; stride: input pixels per embedding cell (image size over
    the embedding width); hidden, depth: width and number of the 3x3 convolutions; scale_edges: the
    box sizes sqrt(w * h), in cells, that separate the size slots (ascending; len + 1 slots)."""

    channels: int
    stride: float
    hidden: int = 64
    depth: int = 3
    scale_edges: tuple[float, ...] = (1.0, 2.5, 6.0)

    def __post_init__(self) -> None:
        if self.channels < 1 or self.hidden < 1 or self.depth < 1 or not self.stride > 0:
            raise ValueError(f"BoxHeadConfig needs positive channels, hidden, depth and stride, got {self}")
        edges = list(self.scale_edges)
        if any(not e > 0 for e in edges) or edges != sorted(set(edges)):
            raise ValueError(f"scale_edges must be positive and strictly ascending, got {self.scale_edges}")
        object.__setattr__(self, "scale_edges", tuple(float(e) for e in edges))  # lists from a saved dict

    @property
    def num_slots(self) -> int:
        return len(self.scale_edges) + 1

    def slot_reference_sizes(self) -> list[float]:
        """A typical box size (cells) per slot: the geometric middle of its edges, and beyond the
        outer edges the edge times (or over) the mean ratio between edges."""
        edges = self.scale_edges
        ratio = (edges[-1] / edges[0]) ** (1 / (len(edges) - 1)) if len(edges) > 1 else 2.0
        bounds = [edges[0] / ratio, *edges, edges[-1] * ratio]
        return [math.sqrt(lo * hi) for lo, hi in zip(bounds[:-1], bounds[1:])]

    def to_dict(self) -> dict:
        return asdict(self)


class BoxHead(nn.Module):
    """BxCxhxw image embeddings -> (objectness logits BxSxhxw, box parameters BxSx4xhxw) for S size
    slots. Box parameters per cell (i, j) are (dx, dy, log w, log h): the box centre's offset from the
    cell centre and the box size, all in cells (see `box_targets.decode_boxes`)."""

    def __init__(self, config: BoxHeadConfig) -> None:
        super().__init__()
        self.config = config
        # per-channel statistics of the training embeddings: a trained SAM's embeddings vary little
        # across an image around large per-channel offsets, and standardising them is what lets the
        # convolutions see the variation (set by `set_input_statistics`, saved with the weights)
        self.register_buffer("input_mean", torch.zeros(config.channels, 1, 1))
        self.register_buffer("input_std", torch.ones(config.channels, 1, 1))
        layers: list[nn.Module] = []
        width = config.channels
        for _ in range(config.depth):
            # GroupNorm: the engine trains on batches of a few images, too few for BatchNorm statistics
            groups = 8 if config.hidden % 8 == 0 else 1
            layers += [nn.Conv2d(width, config.hidden, 3, padding=1), nn.GroupNorm(groups, config.hidden), nn.GELU()]
            width = config.hidden
        self.trunk = nn.Sequential(*layers)
        self.objectness = nn.Conv2d(config.hidden, config.num_slots, 1)
        self.box = nn.Conv2d(config.hidden, 4 * config.num_slots, 1)
        with torch.no_grad():
            # focal-loss prior: almost no cell holds a centre, so start every cell at p = 0.01
            self.objectness.bias.fill_(-math.log(99.0))
            # start each slot's boxes at its typical size, centred on the cell
            self.box.weight.mul_(0.1)
            bias = self.box.bias.view(config.num_slots, 4)
            bias[:, :2] = 0.0
            bias[:, 2:] = torch.tensor([math.log(s) for s in config.slot_reference_sizes()])[:, None]

    @property
    def stride(self) -> float:
        return self.config.stride

    @torch.no_grad()
    def set_input_statistics(self, embeddings: torch.Tensor) -> None:
        """Sets the per-channel mean and standard deviation from NxCxhxw training embeddings."""
        self._check(embeddings)
        self.input_mean.copy_(embeddings.mean(dim=(0, 2, 3))[:, None, None])
        self.input_std.copy_(embeddings.std(dim=(0, 2, 3))[:, None, None].clamp(min=1e-6))

    def _check(self, embeddings: torch.Tensor) -> None:
        if embeddings.dim() != 4 or embeddings.shape[1] != self.config.channels:
            raise ValueError(f"BoxHead needs Bx{self.config.channels}xhxw embeddings, got shape {tuple(embeddings.shape)}")

    def forward(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(embeddings)
        features = self.trunk((embeddings - self.input_mean) / self.input_std)
        b, _, h, w = features.shape
        return self.objectness(features), self.box(features).view(b, self.config.num_slots, 4, h, w)
