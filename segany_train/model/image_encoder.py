"""SAM's image encoder: a ViT with windowed and global attention and a neck down to the prompt dim."""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from segany_train.model.layer_norm_2d import LayerNorm2d
from segany_train.model.vit_block import ViTBlock


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: Bx3xHxW -> Bx(H/p)x(W/p)xC."""

    def __init__(self, *, patch_size: int, in_chans: int = 3, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class ImageEncoderViT(nn.Module):
    """Bx3xSxS normalised, padded image -> Bx(out_chans)x(S/p)x(S/p) embedding."""

    def __init__(
        self,
        *,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11),
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        # Recompute each block's activations in backward instead of keeping them (a memory/compute
        # trade for training at 1024 px); a runtime switch, not part of the architecture.
        self.activation_checkpointing = False
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim)) if use_abs_pos else None
        self.blocks = nn.ModuleList(
            ViTBlock(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                use_rel_pos=use_rel_pos,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=grid,
                # stochastic depth grows linearly with depth, as in ViTDet/MAE fine-tuning
                drop_path=drop_path_rate * i / max(depth - 1, 1),
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def drop_path_scales(
        self, batch: int, *, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """Stochastic depth for one forward pass: depth x 2 x B factors for each block's attention and
        MLP branch per sample (0 where dropped, 1/keep where kept), or None outside training or when
        no block drops anything.

        All decisions are drawn here, up front, from `generator` (the global RNG when None) on the
        generator's device: a caller keys it on (seed, step, rank) so that ranks draw apart and a
        resumed run continues the draws, and activation checkpointing's recomputation reuses the
        same factors (they are arguments of each block's call, not draws inside it).
        """
        rates = [block.drop_path for block in self.blocks]
        if not self.training or not any(rates):
            return None
        draw_on = generator.device if generator is not None else device
        keep = 1.0 - torch.tensor(rates, device=draw_on)[:, None, None]  # depth x 1 x 1
        uniform = torch.rand(len(rates), 2, batch, generator=generator, device=draw_on)  # depth x 2 x B
        return ((uniform < keep) / keep).to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Bx3xSxS -> Bx(out_chans)x(S/p)x(S/p); `generator` draws the stochastic depth while training."""
        x = self.patch_embed(x)  # B x h x w x C
        if self.pos_embed is not None:
            x = x + self.pos_embed
        scales = self.drop_path_scales(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
        for i, block in enumerate(self.blocks):
            scale = None if scales is None else scales[i]  # 2 x B
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, scale, use_reentrant=False)
            else:
                x = block(x, scale)
        return self.neck(x.permute(0, 3, 1, 2))  # B x out_chans x h x w
