"""Loading SAM weights: official checkpoints, wrapped or prefixed ones, and other image sizes."""

import pickle
import re
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from segany_train.model.sam_config import SamConfig, describe_size
from segany_train.model.vit_attention import resize_relative_position_table

SAM_MODULES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")


class SamCheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model it was given to."""


def read_state_dict(checkpoint: str | Path | dict[str, Any]) -> dict[str, torch.Tensor]:
    """The SAM weights of a checkpoint file or dict, unwrapped and without prefixes.

    Accepts a bare state dict (official `.pth`), `{"model": sd}`, `{"state_dict": sd}` (Lightning; keys
    of non-SAM submodules are dropped), and keys prefixed by `module.` (DDP) or a submodule name.
    """
    source = checkpoint if isinstance(checkpoint, dict) else load_checkpoint_file(Path(checkpoint))
    for wrapper in ("state_dict", "model"):
        if isinstance(source.get(wrapper), dict):
            source = source[wrapper]
            break
    pattern = re.compile(r"^(.*?)(image_encoder|prompt_encoder|mask_decoder)\.")
    prefixes = {m.group(1) for key in source if (m := pattern.match(key))}
    if not prefixes:
        raise SamCheckpointError("checkpoint holds no SAM weights (no image_encoder./prompt_encoder./mask_decoder. keys)")
    if len(prefixes) > 1:
        raise SamCheckpointError(f"checkpoint holds SAM weights under several prefixes: {sorted(prefixes)}")
    prefix = prefixes.pop()
    weights = {key[len(prefix):]: value for key, value in source.items() if key.startswith(prefix) and key[len(prefix):].startswith(SAM_MODULES)}
    return _merge_lora_weights(weights)


def _merge_lora_weights(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Folds LoRA adapters (`X.base.weight`, `X.lora_a`, `X.lora_b`, `X.scale`) into plain `X.weight`,
    so that a checkpoint of a LoRA fine-tuning run loads like any other."""
    merged = dict(sd)
    for key in [k for k in sd if k.endswith(".lora_a")]:
        layer = key[: -len(".lora_a")]
        try:
            a, b, scale = sd[key], sd[f"{layer}.lora_b"], sd[f"{layer}.scale"]
            merged[f"{layer}.weight"] = sd[f"{layer}.base.weight"] + scale * b @ a
        except KeyError as missing:
            raise SamCheckpointError(f"incomplete LoRA adapter at {layer}: key {missing} is missing") from None
        if f"{layer}.base.bias" in sd:
            merged[f"{layer}.bias"] = sd[f"{layer}.base.bias"]
        for part in (".lora_a", ".lora_b", ".scale", ".base.weight", ".base.bias"):
            merged.pop(layer + part, None)
    return merged


TRUST_HINT = "pass --trust-checkpoint (+model.trust_checkpoint=true for segany-train) only if you trust whoever made it"


def load_checkpoint_file(path: Path, *, trust: bool = False) -> dict[str, Any]:
    """The dict a checkpoint file holds, on the CPU.

    Only tensors and plain containers are unpickled (`weights_only=True`): official `.pth` files and
    this project's Lightning checkpoints (hyper-parameters are plain dicts) need nothing else, and a
    pickle can run any code while it loads. `trust=True` unpickles everything, with a warning.
    SamCheckpointError (one line naming the file) for anything that is not a checkpoint dict.
    A Hugging Face SamModel checkpoint (a folder, a .safetensors file, or a .bin of that layout) is
    returned in the official layout (`hf_layout.hf_checkpoint_as_official`).
    """
    from segany_train.model.hf_layout import hf_checkpoint_as_official, is_hf_state_dict, read_hf_weights

    path = Path(path)
    if path.is_dir() or (path.is_file() and path.suffix == ".safetensors"):
        config = (path if path.is_dir() else path.parent) / "config.json"
        try:
            return hf_checkpoint_as_official(read_hf_weights(path), config)
        except (ValueError, FileNotFoundError, pickle.UnpicklingError, RuntimeError) as error:
            raise SamCheckpointError(f"{path} is not a readable SAM checkpoint ({_first_line(error)})") from None
    if not path.is_file():
        raise FileNotFoundError(f"SAM checkpoint not found: {path}")
    if trust:
        warnings.warn(f"{path}: trusted checkpoint, fully unpickled (it can run code)", UserWarning, stacklevel=2)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as error:
        # torch words it "GLOBAL x was not an allowed global" or "unsupported GLOBAL x whose module y is blocked"
        found = re.search(r"\bGLOBAL (\S+)", str(error))
        if found:
            raise SamCheckpointError(f"{path} is not a weights-only checkpoint (it pickles {found.group(1)}); {TRUST_HINT}") from None
        raise SamCheckpointError(f"{path} is not a readable SAM checkpoint ({_first_line(error)})") from None
    except (EOFError, RuntimeError, ValueError, KeyError, OSError, AttributeError, IndexError, TypeError) as error:
        # what torch.load raises for empty, truncated, random or text files says little on its own
        raise SamCheckpointError(f"{path} is not a readable SAM checkpoint ({_first_line(error)})") from None
    if not isinstance(loaded, dict):
        raise SamCheckpointError(f"{path} is not a SAM checkpoint (it holds a {type(loaded).__name__}, not a state dict)")
    if is_hf_state_dict(loaded):
        try:
            return hf_checkpoint_as_official(loaded, path.parent / "config.json")
        except ValueError as error:
            raise SamCheckpointError(f"{path} is not a readable SAM checkpoint ({_first_line(error)})") from None
    return loaded


def _first_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:200] or type(error).__name__


def infer_config(state_dict: dict[str, torch.Tensor], like: SamConfig) -> SamConfig:
    """The architecture numbers a state dict implies; numbers the shapes do not show come from `like`."""
    sd = state_dict
    try:
        embed_dim, _, patch, _ = sd["image_encoder.patch_embed.proj.weight"].shape
        depth = _count(sd, r"image_encoder\.blocks\.(\d+)\.norm1\.weight")
        table_sizes = [sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0] for i in range(depth)]
        head_dim = sd["image_encoder.blocks.0.attn.rel_pos_h"].shape[1]
        window = (min(table_sizes) + 1) // 2
        prompt_dim = sd["image_encoder.neck.0.weight"].shape[0]
        internal = sd["mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight"].shape[0]
        return replace(
            like,
            image_size=sd["image_encoder.pos_embed"].shape[1] * patch,
            patch_size=patch,
            encoder_embed_dim=embed_dim,
            encoder_depth=depth,
            encoder_num_heads=embed_dim // head_dim,
            encoder_window_size=window if len(set(table_sizes)) > 1 else like.encoder_window_size,
            encoder_global_attn_indexes=tuple(i for i, s in enumerate(table_sizes) if s != 2 * window - 1)
            if len(set(table_sizes)) > 1
            else like.encoder_global_attn_indexes,
            prompt_embed_dim=prompt_dim,
            mask_in_chans=sd["prompt_encoder.mask_downscaling.3.weight"].shape[0],
            decoder_depth=_count(sd, r"mask_decoder\.transformer\.layers\.(\d+)\.norm1\.weight"),
            decoder_mlp_dim=sd["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
            decoder_attention_downsample_rate=prompt_dim // internal,
            num_multimask_outputs=sd["mask_decoder.mask_tokens.weight"].shape[0] - 1,
            iou_head_depth=_count(sd, r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.weight"),
            iou_head_hidden_dim=sd["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
        )
    except KeyError as missing:
        raise SamCheckpointError(f"checkpoint is not a SAM state dict: key {missing} is missing") from None


def _count(sd: dict[str, torch.Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for key in sd if (m := regex.fullmatch(key))})


def adapt_to_image_size(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Resamples the position embedding and global relative-position tables to the model's grid.

    Windowed blocks keep their tables (the window does not change with the image size).
    """
    sd = dict(state_dict)
    target = model.state_dict()
    pos = sd["image_encoder.pos_embed"]
    grid = target["image_encoder.pos_embed"].shape[1]
    if pos.shape[1] != grid:
        resized = F.interpolate(pos.permute(0, 3, 1, 2).float(), size=(grid, grid), mode="bicubic", align_corners=False)
        sd["image_encoder.pos_embed"] = resized.permute(0, 2, 3, 1).to(pos.dtype)
    for key, value in target.items():
        if key.endswith(("attn.rel_pos_h", "attn.rel_pos_w")) and key in sd and sd[key].shape != value.shape:
            sd[key] = resize_relative_position_table(sd[key], (value.shape[0] + 1) // 2)
    return sd


def load_sam_checkpoint(model: nn.Module, checkpoint: str | Path | dict[str, Any]) -> None:
    """Loads SAM weights into `model` (a Sam with a `.config`) with strict key checking.

    A checkpoint of another architecture fails with one line naming both sizes; one made at another
    image size is resampled to the model's.
    """
    state_dict = read_state_dict(checkpoint)
    expected: SamConfig = model.config
    found = infer_config(state_dict, like=expected)
    if replace(found, image_size=expected.image_size) != expected:
        raise SamCheckpointError(
            f"checkpoint is {describe_size(found)} but the model is {describe_size(expected)}; "
            "build the model with the checkpoint's size"
        )
    # a diverged run's weights load fine and predict nothing: every mask empty, scores NaN, metrics 0
    broken = [k for k, v in state_dict.items() if v.is_floating_point() and v.device.type != "meta" and not bool(torch.isfinite(v).all())]
    if broken:
        raise SamCheckpointError(f"checkpoint holds NaN or infinite weights in {len(broken)} of {len(state_dict)} tensors (first: {broken[0]}); it cannot predict")
    state_dict = adapt_to_image_size(state_dict, model)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        details = " ".join(str(error).split())
        raise SamCheckpointError(f"checkpoint does not match the model: {details[:500]}") from None


def save_official_checkpoint(model: nn.Module, path: str | Path) -> Path:
    """Writes the weights as an official-format state dict (`sam_model_registry[...](checkpoint=path)`
    of this project and the official package both load it). LoRA adapters are merged first, on a copy."""
    from copy import deepcopy

    from segany_train.model.lora import merge_lora

    plain = deepcopy(model).cpu()
    merge_lora(plain)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in plain.state_dict().items()}, path)
    return path
