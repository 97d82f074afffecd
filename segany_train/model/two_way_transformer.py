"""The mask decoder's two-way transformer: prompt tokens and image tokens attend to each other."""

from dataclasses import dataclass

import torch
from torch import nn

from segany_train.model.attention import Attention
from segany_train.model.mlp import MLPBlock


def tokens_last(x: torch.Tensor) -> torch.Tensor:
    """BxCxHxW -> BxHWxC, contiguous.

    Image by image as 2-D transposes, which PyTorch copies in cache-sized blocks: a 3-D transposed
    copy measured 2x slower, and adding a transposed view to HWxC tokens 7x slower than a contiguous
    one (the later layers add the positional encoding to every prompt's image tokens).
    """
    b, c = x.shape[:2]
    out = x.new_empty(b, x[0, 0].numel(), c)
    for i in range(b):
        out[i].copy_(x[i].flatten(1).t())
    return out


@dataclass
class SharedImageKeys:
    """Prompt-independent work of the first layer for B images (all prompts without a mask prompt).

    keys: BxHWxC image tokens (embedding + dense prompt); key_pe: 1xHWxC or BxHWxC positional encoding;
    k_image, v_image: BxHWxCi token-to-image key/value projections; q_image: BxHWxCi image-to-token
    query projection. Valid for as long as the image embedding and the weights do not change.
    """

    keys: torch.Tensor
    key_pe: torch.Tensor
    k_image: torch.Tensor
    v_image: torch.Tensor
    q_image: torch.Tensor


class TwoWayAttentionBlock(nn.Module):
    """Self-attention of tokens, token->image and image->token cross-attention, MLP on tokens."""

    def __init__(
        self,
        *,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim=embedding_dim, num_heads=num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(
            embedding_dim=embedding_dim, num_heads=num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim=embedding_dim, mlp_dim=mlp_dim, act=nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(
            embedding_dim=embedding_dim, num_heads=num_heads, downsample_rate=attention_downsample_rate
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def _token_self_attention(
        self, queries: torch.Tensor, query_pe: torch.Tensor, token_mask: torch.Tensor | None
    ) -> torch.Tensor:
        if self.skip_first_layer_pe:
            return self.norm1(self.self_attn(queries, queries, queries, token_mask))
        q = queries + query_pe
        return self.norm1(queries + self.self_attn(q, q, queries, token_mask))

    def _token_mlp(self, queries: torch.Tensor) -> torch.Tensor:
        return self.norm3(queries + self.mlp(queries))

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        *,
        reference: bool = False,
        keys_in_place: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries NxTxC, keys NxHWxC, query_pe NxTxC, key_pe (1 or N)xHWxC -> updated (queries, keys).

        reference: the cross-attentions as the official model computes them (`Attention.forward`),
        else re-associated (the fast path; the same maths). keys_in_place: the image->token update
        may overwrite `keys` (contiguous, the caller's own, and no autograd or autocast running).
        """
        queries = self._token_self_attention(queries, query_pe, token_mask)
        keys_pe = keys + key_pe
        q = queries + query_pe
        if reference:
            attn = self.cross_attn_token_to_image(q, keys_pe, keys)
        else:
            attn = self.cross_attn_token_to_image.tokens_to_image(q, keys_pe, keys)
        queries = self._token_mlp(self.norm2(queries + attn))
        q = queries + query_pe
        if reference:
            keys = keys + self.cross_attn_image_to_token(keys_pe, q, queries, token_mask)
        else:
            keys = self.cross_attn_image_to_token.image_to_tokens(
                keys_pe, q, queries, token_mask, residual=keys, in_place=keys_in_place
            )
        return queries, self.norm4(keys)

    def prepare_shared_keys(self, keys: torch.Tensor, key_pe: torch.Tensor) -> SharedImageKeys:
        """Everything of this block that depends on the image only: keys BxHWxC, key_pe 1xHWxC."""
        keys_pe = keys + key_pe
        return SharedImageKeys(
            keys=keys,
            key_pe=key_pe,
            k_image=self.cross_attn_token_to_image.k_proj(keys_pe),
            v_image=self.cross_attn_token_to_image.v_proj(keys),
            q_image=self.cross_attn_image_to_token.q_proj(keys_pe),
        )

    def forward_shared(
        self,
        queries: torch.Tensor,
        shared: SharedImageKeys,
        image: int,
        query_pe: torch.Tensor,
        token_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` for N prompts of one image whose keys are `shared`'s image `image`.

        The image tokens are read, never copied per prompt, until each prompt's image->token update.
        """
        queries = self._token_self_attention(queries, query_pe, token_mask)
        n, t, c = queries.shape
        to_image = self.cross_attn_token_to_image
        # every prompt's tokens as queries of one batch against the image's cached key/value projections
        q = to_image.q_proj(queries + query_pe).reshape(1, n * t, -1)
        attn = to_image.attend(q, shared.k_image[image][None], shared.v_image[image][None]).view(n, t, c)
        queries = self._token_mlp(self.norm2(queries + attn))
        q = queries + query_pe
        keys = self.cross_attn_image_to_token.shared_image_to_tokens(
            shared.q_image[image], q, queries, token_mask, residual=shared.keys[image]
        )
        return queries, self.norm4(keys)


class TwoWayTransformer(nn.Module):
    """Stack of two-way blocks and a final token->image attention.

    Returns the processed tokens NxTxC and image tokens NxHWxC.
    """

    def __init__(
        self, *, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int, attention_downsample_rate: int = 2
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim=embedding_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim=embedding_dim, num_heads=num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def _finish(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        point_embedding: torch.Tensor,
        key_pe: torch.Tensor,
        token_mask: torch.Tensor | None,
        first_layer: int,
        reference: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # after the first layer the keys are a layer norm's output that nothing else reads: without
        # autograd (which may have saved them) or autocast (whose products change dtype) the
        # image->token update accumulates into them rather than into a copy
        reuse_keys = not (reference or torch.is_grad_enabled() or torch.is_autocast_enabled(keys.device.type))
        for i, layer in enumerate(self.layers[first_layer:], start=first_layer):
            queries, keys = layer(
                queries, keys, point_embedding, key_pe, token_mask, reference=reference, keys_in_place=reuse_keys and i > 0
            )
        q, k = queries + point_embedding, keys + key_pe
        final = self.final_attn_token_to_image
        attn = final(q, k, keys) if reference else final.tokens_to_image(q, k, keys)
        return self.norm_final_attn(queries + attn), keys

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        point_embedding: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        *,
        reference: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embedding NxCxHxW, image_pe (1 or N)xCxHxW, point_embedding NxTxC, token_mask NxT.

        reference: every attention the official one (see `TwoWayAttentionBlock.forward`).
        """
        # N x HW x C; the fast path's copy makes every later pass over the keys contiguous
        keys = image_embedding.flatten(2).transpose(1, 2) if reference else tokens_last(image_embedding)
        key_pe = tokens_last(image_pe)
        return self._finish(point_embedding, keys, point_embedding, key_pe, token_mask, first_layer=0, reference=reference)

    def prepare_shared_keys(self, image_embedding: torch.Tensor, image_pe: torch.Tensor) -> SharedImageKeys:
        """The first layer's prompt-independent work for BxCxHxW image tokens (embedding + dense prompt)."""
        keys, key_pe = tokens_last(image_embedding), tokens_last(image_pe)
        return self.layers[0].prepare_shared_keys(keys, key_pe)

    def forward_shared(
        self,
        shared: SharedImageKeys,
        image: int,
        point_embedding: torch.Tensor,
        token_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` for N prompts on image `image` of `shared`: point_embedding NxTxC."""
        queries, keys = self.layers[0].forward_shared(point_embedding, shared, image, point_embedding, token_mask)
        return self._finish(queries, keys, point_embedding, shared.key_pe, token_mask, first_layer=1, reference=False)
