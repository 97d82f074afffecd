"""Multi-head attention of the mask decoder, with projections to a (down-sampled) internal dim.

Besides the plain forward, two exact re-associations for the decoder's cross-attentions, where one
side has a handful of prompt tokens (T ~ 7) and the other the 4096 image tokens. A projection of the
image side costs HW*C*Ci MACs per prompt; folding it into the token side costs HW*C*(heads*T), which
is 2-3x less for SAM (Ci=128 vs heads*T=56). The maths is the same:
- softmax(q W_k x^T + q.b_k) = softmax((q W_k) x^T): the key bias adds a constant per query row;
- P (x W_v^T + b_v) = (P x) W_v^T + b_v: each row of P sums to one;
- out_proj(P V) = sum over heads of P_h (V_h W_o,h^T): the output projection distributes over heads.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F


class Attention(nn.Module):
    """Attention with q/k/v/out projections: q BxNqxC, k and v BxNkxC -> BxNqxC."""

    def __init__(self, *, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must divide the internal dim ({self.internal_dim})")
        self.head_dim = self.internal_dim // num_heads
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """BxNxCi -> Bx(heads)xNx(d)."""
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    @staticmethod
    def merge_heads(x: torch.Tensor) -> torch.Tensor:
        """Bx(heads)xNx(d) -> BxNxCi."""
        b, h, n, d = x.shape
        return x.transpose(1, 2).reshape(b, n, h * d)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Plain attention. key_mask: BxNk bool, False for keys to ignore (batch padding)."""
        q = self.split_heads(self.q_proj(q))
        k = self.split_heads(self.k_proj(k))
        v = self.split_heads(self.v_proj(v))
        mask = None if key_mask is None else key_mask[:, None, None, :]
        return self.out_proj(self.merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))

    def _per_head(self, weight: torch.Tensor) -> torch.Tensor:
        """A Ci x C projection weight as heads x d x C."""
        return weight.view(self.num_heads, self.head_dim, self.embedding_dim)

    def tokens_to_image(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Few queries against many keys, projections folded into the queries.

        q: NxTxC tokens; k, v: NxHWxC image tokens -> NxTxC. Equal to `forward(q, k, v)`.
        """
        n, t, _ = q.shape
        query = self.q_proj(q).view(n, t, self.num_heads, self.head_dim)
        scale = 1.0 / math.sqrt(self.head_dim)
        folded_q = torch.einsum("nthd,hdc->nhtc", query, self._per_head(self.k_proj.weight)) * scale
        scores = folded_q.reshape(n, self.num_heads * t, -1) @ k.transpose(1, 2)  # N x hT x HW
        mixed = scores.softmax(dim=-1) @ v  # N x hT x C: attention-weighted image tokens per head
        out = torch.einsum("nhtc,hdc->nthd", mixed.view(n, self.num_heads, t, -1), self._per_head(self.v_proj.weight))
        return self.out_proj(out.reshape(n, t, self.internal_dim) + self.v_proj.bias)

    def image_to_tokens(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Many queries against few keys, the query and output projections folded into the keys.

        q: NxHWxC image tokens; k, v: NxTxC tokens; key_mask NxT -> NxHWxC. Equal to `forward`.
        """
        n, t, _ = k.shape
        key = self.k_proj(k).view(n, t, self.num_heads, self.head_dim)
        value = self.v_proj(v).view(n, t, self.num_heads, self.head_dim)
        scale = 1.0 / math.sqrt(self.head_dim)
        folded_k = torch.einsum("nthd,hdc->nhtc", key, self._per_head(self.q_proj.weight)) * scale
        key_bias = torch.einsum("nthd,hd->nht", key, self.q_proj.bias.view(self.num_heads, self.head_dim)) * scale
        scores = torch.baddbmm(key_bias.reshape(n, 1, -1), q, folded_k.reshape(n, -1, q.shape[-1]).transpose(1, 2))
        probs = self._softmax_over_tokens(scores.view(n, -1, self.num_heads, t), key_mask)  # N x HW x h x T
        return self._project_mixed_values(probs, value)

    def _softmax_over_tokens(self, scores: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """Scores ...x(heads)xT, key_mask NxT -> probabilities over T with masked tokens at zero."""
        if key_mask is not None:
            shape = (key_mask.shape[0],) + (1,) * (scores.dim() - 2) + (key_mask.shape[1],)
            scores = scores.masked_fill(~key_mask.view(shape), float("-inf"))
        return scores.softmax(dim=-1)

    def _project_mixed_values(self, probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """probs NxHWx(heads)xT, value NxTx(heads)x(d) -> out_proj(probs @ value): NxHWxC."""
        n, hw, h, t = probs.shape
        out_w = self.out_proj.weight.view(self.embedding_dim, h, self.head_dim)
        value_out = torch.einsum("nthd,chd->nhtc", value, out_w).reshape(n, h * t, -1)  # N x hT x C
        return torch.baddbmm(self.out_proj.bias, probs.reshape(n, hw, h * t), value_out)

    def shared_image_to_tokens(
        self, q_image: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Image queries shared by N prompts: q_image HWxCi (already q-projected), k, v NxTxC -> NxHWxC.

        All prompts of one image attend in one matmul against the same projected image tokens.
        """
        n, t, _ = k.shape
        key = self.k_proj(k).view(n, t, self.num_heads, self.head_dim)
        value = self.v_proj(v).view(n, t, self.num_heads, self.head_dim)
        q_heads = q_image.view(-1, self.num_heads, self.head_dim).transpose(0, 1)  # h x HW x d
        keys_by_head = key.permute(2, 3, 0, 1).reshape(self.num_heads, self.head_dim, n * t)  # h x d x NT
        scores = (q_heads @ keys_by_head) / math.sqrt(self.head_dim)  # h x HW x NT
        scores = scores.view(self.num_heads, -1, n, t).permute(2, 1, 0, 3)  # N x HW x h x T
        return self._project_mixed_values(self._softmax_over_tokens(scores, key_mask), value)

    def tokens_to_shared_image(self, q: torch.Tensor, k_image: torch.Tensor, v_image: torch.Tensor) -> torch.Tensor:
        """Tokens of N prompts against one image: q NxTxC, k_image and v_image HWxCi (projected) -> NxTxC."""
        n, t, _ = q.shape
        query = self.split_heads(self.q_proj(q).reshape(1, n * t, -1))  # 1 x h x NT x d
        key = self.split_heads(k_image[None])
        value = self.split_heads(v_image[None])
        out = self.merge_heads(F.scaled_dot_product_attention(query, key, value))  # 1 x NT x Ci
        return self.out_proj(out.view(n, t, -1))
