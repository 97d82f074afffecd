"""Multi-head attention of the mask decoder, with projections to a (down-sampled) internal dim.

`forward` is the reference: the official algorithm (project q, k and v, attend, project out). The
decoder's fast path uses two exact re-associations for its cross-attentions, where one side has a
handful of prompt tokens (T ~ 7) and the other the 4096 image tokens:
- the image side belongs to one prompt (`tokens_to_image`, `image_to_tokens`): a projection of the
  image tokens costs HW*C*Ci MACs per prompt; folding it into the token side costs HW*C*(heads*T),
  2-3x less for SAM (Ci=128 vs heads*T=56);
- the image side is shared by all prompts of an image (`attend` on the cached projections,
  `shared_image_to_tokens`): the image tokens are projected once per image, and each prompt pays
  only HW*Ci*T per product, 16x less than folding (C*heads vs Ci).
The maths is the same:
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
        return self.attend(self.q_proj(q), self.k_proj(k), self.v_proj(v), key_mask)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`forward` after the input projections: q BxNqxCi, k and v BxNkxCi -> BxNqxC.

        Split from `forward` so that image tokens projected once can serve many prompts' queries.
        """
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(self.split_heads(q), self.split_heads(k), self.split_heads(v), attn_mask=mask)
        return self.out_proj(self.merge_heads(out))

    def _per_head(self, weight: torch.Tensor) -> torch.Tensor:
        """A Ci x C projection weight as heads x d x C."""
        return weight.view(self.num_heads, self.head_dim, self.embedding_dim)

    def tokens_to_image(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Few queries against many keys, projections folded into the queries.

        q: NxTxC tokens; k, v: NxHWxC image tokens -> NxTxC. Equal to `forward(q, k, v)`.
        """
        n, t, _ = q.shape
        h, d = self.num_heads, self.head_dim
        query = self.q_proj(q).view(n, t, h, d).transpose(1, 2) * (1.0 / math.sqrt(d))  # N x h x T x d
        folded_q = query @ self._per_head(self.k_proj.weight)  # N x h x T x C
        scores = folded_q.reshape(n, h * t, -1) @ k.transpose(1, 2)  # N x hT x HW
        mixed = scores.softmax(dim=-1) @ v  # N x hT x C: attention-weighted image tokens per head
        out = mixed.view(n, h, t, -1) @ self._per_head(self.v_proj.weight).transpose(1, 2)  # N x h x T x d
        return self.out_proj(out.transpose(1, 2).reshape(n, t, self.internal_dim) + self.v_proj.bias)

    def image_to_tokens(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
        in_place: bool = False,
    ) -> torch.Tensor:
        """Many queries against few keys, the query and output projections folded into the keys.

        q: NxHWxC image tokens; k, v: NxTxC tokens; key_mask NxT -> NxHWxC, equal to
        `forward(q, k, v, key_mask)`, plus `residual` (NxHWxC) when given; in_place: accumulated into
        `residual`, which the caller no longer needs (inference only: autograd may have saved it).
        """
        n, t, _ = k.shape
        h, d = self.num_heads, self.head_dim
        key = self.k_proj(k).view(n, t, h, d).transpose(1, 2) * (1.0 / math.sqrt(d))  # N x h x T x d
        folded_k = key @ self._per_head(self.q_proj.weight)  # N x h x T x C
        key_bias = key @ self.q_proj.bias.view(h, d, 1)  # N x h x T x 1
        scores = torch.baddbmm(key_bias.reshape(n, -1, 1), folded_k.reshape(n, h * t, -1), q.transpose(1, 2))
        probs = self._softmax_over_tokens(scores.view(n, self.num_heads, t, -1), key_mask)  # N x h x T x HW
        return self._project_mixed_values(probs, self.v_proj(v), residual, in_place)

    def shared_image_to_tokens(
        self,
        q_image: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Image queries shared by N prompts: q_image HWxCi (already q-projected), k, v NxTxC -> NxHWxC.

        All prompts of one image are scored in one matmul against the same projected image tokens.
        `residual` (HWxC, the image tokens) is added to every prompt's output when given.
        """
        n, t, _ = k.shape
        key = self.k_proj(k) / math.sqrt(self.head_dim)
        key_by_head = key.view(n * t, self.num_heads, self.head_dim).transpose(0, 1)  # h x NT x d
        q_heads = q_image.view(-1, self.num_heads, self.head_dim).permute(1, 2, 0)  # h x d x HW
        scores = (key_by_head @ q_heads).view(self.num_heads, n, t, -1).transpose(0, 1)  # N x h x T x HW
        probs = self._softmax_over_tokens(scores, key_mask)
        return self._project_mixed_values(probs, self.v_proj(v), None if residual is None else residual[None])

    @staticmethod
    def _softmax_over_tokens(scores: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """Scores NxhxTxHW -> probabilities over T (dim 2), masked tokens at zero.

        T sits before the long HW axis so the reduction is vectorised along HW (a softmax over a
        trailing axis of 7 is ~10x slower).
        """
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, :, None], float("-inf"))
        return scores.softmax(dim=2)

    def _project_mixed_values(
        self, probs: torch.Tensor, value: torch.Tensor, residual: torch.Tensor | None, in_place: bool = False
    ) -> torch.Tensor:
        """probs NxhxTxHW, value NxTxCi -> out_proj(probs^T @ value) (+ residual): NxHWxC.

        in_place: accumulate into `residual` (NxHWxC, not needed afterwards) instead of a copy of it.
        """
        n, h, t, hw = probs.shape
        out_w = self.out_proj.weight.view(self.embedding_dim, h, self.head_dim).permute(1, 2, 0)  # h x d x C
        # each head's probabilities over the tokens sum to one at every pixel, so bias/h on every
        # (head, token) row adds the output bias once, without a pass over the HWxC result
        value_out = value.view(n, t, h, -1).transpose(1, 2) @ out_w + self.out_proj.bias / h  # N x h x T x C
        weights, value_out = probs.reshape(n, h * t, hw).transpose(1, 2), value_out.reshape(n, h * t, -1)
        if residual is None:
            return weights @ value_out
        if in_place:
            return residual.baddbmm_(weights, value_out)
        return torch.baddbmm(residual, weights, value_out)
