"""Low-rank adaptation (LoRA) of linear layers, and merging it back into plain weights."""

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / rank) * x A^T B^T, with the base frozen. B starts at zero: no change at start."""

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float = 1.0) -> None:
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        # a buffer, so that a checkpoint of the adapted model says how to merge it (read_state_dict)
        self.register_buffer("scale", torch.tensor(float(alpha) / rank))
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight (what `merged` will hold)."""
        return self.base.weight + self.scale * self.lora_b @ self.lora_a

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale

    def merged(self) -> nn.Linear:
        """A plain Linear with the adaptation folded into its weight."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None)
        linear = linear.to(self.base.weight.device, self.base.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.base.bias is not None:
                linear.bias.copy_(self.base.bias)
        return linear


def add_lora_to_encoder_attention(image_encoder: nn.Module, *, rank: int, alpha: float = 1.0) -> int:
    """Wraps every encoder block's qkv projection in LoRA; returns how many were wrapped."""
    count = 0
    for block in image_encoder.blocks:
        if not isinstance(block.attn.qkv, LoRALinear):
            block.attn.qkv = LoRALinear(block.attn.qkv, rank=rank, alpha=alpha)
            count += 1
    return count


def merge_lora(module: nn.Module) -> int:
    """Replaces every LoRALinear inside `module` by its merged Linear; returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, LoRALinear):
            setattr(module, name, child.merged())
            count += 1
        else:
            count += merge_lora(child)
    return count
