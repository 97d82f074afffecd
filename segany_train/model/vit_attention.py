"""Multi-head self-attention with SAM's decomposed relative position bias (MViTv2 style)."""

import torch
from torch import nn
from torch.nn import functional as F

# Query rows per fused-attention call: the bias for one 4096-token global attention is 12x4096x4096
# floats (805 MB); slicing the queries keeps the bias in slices of about 100 MB and is no slower.
QUERY_CHUNK = 512


def relative_position_index(size: int, device: torch.device | None = None) -> torch.Tensor:
    """SxS table of (query - key + S - 1): the row of the relative-position table each pair uses."""
    coords = torch.arange(size, device=device)
    return coords[:, None] - coords[None, :] + (size - 1)


def resize_relative_position_table(table: torch.Tensor, size: int) -> torch.Tensor:
    """Linearly resamples a (2*S_old-1)xC relative-position table to (2*size-1)xC (official semantics)."""
    length = 2 * size - 1
    if table.shape[0] == length:
        return table
    resized = F.interpolate(table.T[None].float(), size=length, mode="linear")  # 1xCxL
    return resized[0].T.to(table.dtype)


class ViTAttention(nn.Module):
    """Self-attention over a square HxW grid of tokens with decomposed relative position bias.

    Input BxHxWxC, output BxHxWxC. `input_size` is the grid side the relative tables are made for
    (the window size for windowed blocks, the whole embedding grid for global ones).
    """

    def __init__(
        self, *, dim: int, num_heads: int, qkv_bias: bool = True, use_rel_pos: bool = True, input_size: int
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size - 1, self.head_dim))

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """Attention on already projected tokens: qkv Bx(H)x(W)x3C -> BxHxWxC, before `proj`.

        Split from `forward` so a windowed block can project its tokens before padding them.
        """
        b, h, w, _ = qkv.shape
        qkv = qkv.reshape(b, h * w, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each B x heads x HW x d
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            idx_h = relative_position_index(h, q.device)
            idx_w = relative_position_index(w, q.device)
            table_h = self.rel_pos_h[idx_h]  # H x H x d
            table_w = self.rel_pos_w[idx_w]  # W x W x d
            q_grid = q.reshape(b, self.num_heads, h, w, self.head_dim)
            # The bias uses the unscaled query, as in the official model.
            bias_h = torch.einsum("bnhwc,hkc->bnhwk", q_grid, table_h)  # B x heads x H x W x H
            bias_w = torch.einsum("bnhwc,wkc->bnhwk", q_grid, table_w)  # B x heads x H x W x W
            rows_per_chunk = max(1, QUERY_CHUNK // w)
            outs = []
            for r in range(0, h, rows_per_chunk):
                rows = slice(r, r + rows_per_chunk)
                bias = bias_h[:, :, rows, :, :, None] + bias_w[:, :, rows, :, None, :]  # B x n x r x W x H x W
                bias = bias.reshape(b, self.num_heads, -1, h * w)
                q_rows = q[:, :, r * w : (r + rows_per_chunk) * w]
                outs.append(F.scaled_dot_product_attention(q_rows, k, v, attn_mask=bias))
            out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
        return out.transpose(1, 2).reshape(b, h, w, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attend(self.qkv(x)))
