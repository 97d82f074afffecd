"""Baselines for the benchmarks: the official algorithm's order of work, on our modules' weights.

Written from the published architecture, not copied. It does what the official code does:
the image embedding copied per prompt, every projection of the image tokens computed per prompt,
the relative-position bias materialised next to the full attention matrix, windows padded before the
qkv projection. The benchmarks time it in the same process as our model and check that both agree.
"""

import torch
from torch.nn import functional as F

from segany_train.model import Sam
from segany_train.model.attention import Attention
from segany_train.model.vit_attention import relative_position_index


def _attention(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    q, k, v = attn.split_heads(attn.q_proj(q)), attn.split_heads(attn.k_proj(k)), attn.split_heads(attn.v_proj(v))
    weights = (q @ k.transpose(-2, -1) / attn.head_dim**0.5).softmax(dim=-1)
    return attn.out_proj(attn.merge_heads(weights @ v))


def decode(sam: Sam, embedding: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor, multimask: bool):
    """1xCxhxw embedding, NxTxC sparse, NxCxhxw dense -> (NxMx4hx4w logits, NxM IoU)."""
    dec = sam.mask_decoder
    n = sparse.shape[0]
    tokens = torch.cat([torch.cat([dec.iou_token.weight, dec.mask_tokens.weight])[None].expand(n, -1, -1), sparse], 1)
    src = torch.repeat_interleave(embedding, n, dim=0) + dense
    pos = torch.repeat_interleave(sam.prompt_encoder.get_dense_pe(), n, dim=0)
    b, c, h, w = src.shape
    keys, key_pe = src.flatten(2).permute(0, 2, 1), pos.flatten(2).permute(0, 2, 1)
    queries = tokens
    for i, layer in enumerate(dec.transformer.layers):
        if i == 0:
            queries = layer.norm1(_attention(layer.self_attn, queries, queries, queries))
        else:
            q = queries + tokens
            queries = layer.norm1(queries + _attention(layer.self_attn, q, q, queries))
        q, k = queries + tokens, keys + key_pe
        queries = layer.norm2(queries + _attention(layer.cross_attn_token_to_image, q, k, keys))
        queries = layer.norm3(queries + layer.mlp(queries))
        q, k = queries + tokens, keys + key_pe
        keys = layer.norm4(keys + _attention(layer.cross_attn_image_to_token, k, q, queries))
    final = dec.transformer.final_attn_token_to_image
    queries = dec.transformer.norm_final_attn(queries + _attention(final, queries + tokens, keys + key_pe, keys))
    upscaled = dec.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))
    hyper = torch.stack([mlp(queries[:, 1 + i]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1)
    masks = (hyper @ upscaled.flatten(2)).view(b, -1, *upscaled.shape[-2:])
    iou = dec.iou_prediction_head(queries[:, 0])
    keep = slice(1, None) if multimask else slice(0, 1)
    return masks[:, keep], iou[:, keep]


def _vit_attention(attn, x: torch.Tensor) -> torch.Tensor:
    b, h, w, _ = x.shape
    qkv = attn.qkv(x).reshape(b, h * w, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, b * attn.num_heads, h * w, -1).unbind(0)
    scores = (q * attn.head_dim**-0.5) @ k.transpose(-2, -1)
    table_h = attn.rel_pos_h[relative_position_index(h)]
    table_w = attn.rel_pos_w[relative_position_index(w)]
    r_q = q.reshape(-1, h, w, attn.head_dim)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, table_h)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, table_w)
    scores = (scores.view(-1, h, w, h, w) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).view(-1, h * w, h * w)
    out = (scores.softmax(dim=-1) @ v).view(b, attn.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return attn.proj(out)


def encode(sam: Sam, image: torch.Tensor) -> torch.Tensor:
    """Bx3xSxS preprocessed image -> embedding, the official way."""
    enc = sam.image_encoder
    x = enc.patch_embed(image) + enc.pos_embed
    for block in enc.blocks:
        shortcut, y = x, block.norm1(x)
        ws = block.window_size
        if ws > 0:
            b, h, w, c = y.shape
            ph, pw = (ws - h % ws) % ws, (ws - w % ws) % ws
            y = F.pad(y, (0, 0, 0, pw, 0, ph))
            hp, wp = h + ph, w + pw
            y = y.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, c)
            y = _vit_attention(block.attn, y)
            y = y.view(b, hp // ws, wp // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)[:, :h, :w]
        else:
            y = _vit_attention(block.attn, y)
        x = shortcut + y
        x = x + block.mlp(block.norm2(x))
    return enc.neck(x.permute(0, 3, 1, 2))
