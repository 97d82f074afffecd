"""MAE-pre-trained ViT weights as the image encoder's initialisation (SAM paper: "MAE-initialised").

An MAE checkpoint (github.com/facebookresearch/mae, `{"model": state_dict}`) holds a plain ViT: a
class token, a position embedding over 1 + N tokens at the pre-training size (224 px: 14x14), blocks
whose MLP layers are `fc1`/`fc2`, a final norm, and (pre-training checkpoints) the MAE decoder. The
encoder here has the same patch embedding, norms, attention and MLP weights under other names; it
has no class token or final norm, a position embedding on its own grid, relative-position tables
and a neck, which MAE does not train.
"""

from typing import Any

import torch
from torch.nn import functional as F

from segany_train.model.image_encoder import ImageEncoderViT

# MAE keys with no counterpart here: the class token, the final norms and head, the MAE decoder
_DROPPED_PREFIXES = ("cls_token", "norm.", "fc_norm.", "head.", "mask_token", "decoder_")


def _encoder_key(mae_key: str) -> str:
    return mae_key.replace(".mlp.fc1.", ".mlp.lin1.").replace(".mlp.fc2.", ".mlp.lin2.")


def _resampled_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """MAE's 1x(1+N)xC position embedding -> 1 x grid x grid x C: the class token's entry dropped,
    the sqrt(N) x sqrt(N) grid resampled bicubically (as SAM resamples its own for another size)."""
    tokens = pos[:, 1:] if pos.shape[1] != round(pos.shape[1] ** 0.5) ** 2 else pos
    side = round(tokens.shape[1] ** 0.5)
    if side * side != tokens.shape[1]:
        raise ValueError(f"MAE pos_embed of {pos.shape[1]} tokens is not a class token plus a square grid")
    square = tokens.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    if side != grid:
        square = F.interpolate(square, size=(grid, grid), mode="bicubic", align_corners=False)
    return square.permute(0, 2, 3, 1).to(pos.dtype)


def load_mae_encoder(encoder: ImageEncoderViT, checkpoint: dict[str, Any]) -> list[str]:
    """Copies an MAE ViT's weights into `encoder` (in place); returns the encoder keys left at init.

    checkpoint: the MAE state dict or `{"model": state_dict}`. Every encoder weight MAE has must be
    there with the same shape (ValueError naming the key otherwise); the relative-position tables
    and the neck (absent from MAE) keep their initialisation.
    """
    sd = checkpoint.get("model", checkpoint)
    grid = encoder.img_size // encoder.patch_size
    mapped: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith(_DROPPED_PREFIXES):
            continue
        if key == "pos_embed":
            mapped[key] = _resampled_pos_embed(value, grid)
        else:
            mapped[_encoder_key(key)] = value
    target = encoder.state_dict()
    for key, value in mapped.items():
        if key not in target:
            raise ValueError(f"MAE checkpoint key {key!r} has no counterpart in the image encoder")
        if value.shape != target[key].shape:
            raise ValueError(f"MAE checkpoint {key}: shape {tuple(value.shape)}, the encoder's is {tuple(target[key].shape)}")
    left = sorted(set(target) - set(mapped))
    unexpected = [k for k in left if "rel_pos" not in k and not k.startswith("neck.")]
    if unexpected:
        raise ValueError(f"MAE checkpoint lacks encoder weights: {', '.join(unexpected[:5])}")
    encoder.load_state_dict(mapped, strict=False)
    return left
