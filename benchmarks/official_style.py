"""The image encoder benchmark's baseline: the official algorithm's order of work, on our modules' weights.

Written from the published architecture, not copied. It does what the official code does: the
relative-position bias materialised next to the full attention matrix, windows padded before the qkv
projection. The benchmark times it in the same process as our model and checks that both agree. (The
decoder's baseline is the model's own reference path, `MaskDecoder.predict_masks`.)
"""

import torch
from torch.nn import functional as F

from segany_train.model import Sam
from segany_train.model.vit_attention import relative_position_index


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
