"""Hugging Face `transformers` SamModel checkpoints (the `facebook/sam-vit-*` layout) in and out.

The two layouts hold the same tensors under other names (plus one duplicate: the random-Fourier
matrix is both `shared_image_embedding.positional_embedding` and
`prompt_encoder.shared_embedding.positional_embedding`). `hf_to_official` and `official_to_hf`
rename between them; loading then goes through the one official-layout loader
(`checkpoint.load_checkpoint_file` recognises a Hugging Face file or folder and hands it here), so
every command that takes `--checkpoint` or `model.checkpoint` also takes a Hugging Face checkpoint.

Renames (official -> Hugging Face): image_encoder -> vision_encoder, blocks -> layers,
patch_embed.proj -> patch_embed.projection, norm<i> -> layer_norm<i>, neck.{0,1,2,3} ->
neck.{conv1,layer_norm1,conv2,layer_norm2}, pe_layer.positional_encoding_gaussian_matrix ->
shared_image_embedding.positional_embedding, point_embeddings -> point_embed,
mask_downscaling.{0,1,3,4,6} -> mask_embed.{conv1,layer_norm1,conv2,layer_norm2,conv3},
output_upscaling.{0,1,3} -> upscale_conv1, upscale_layer_norm, upscale_conv2, and an MLP's
layers.{0, 1..n-2, n-1} -> proj_in, layers.{0..n-3}, proj_out.
"""

import json
import re
from copy import deepcopy
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segany_train.atomic_files import write_bytes_atomically, write_json_atomically
from segany_train.model.sam_config import SamConfig

HF_CONFIG_NAME = "config.json"
HF_SAFETENSORS_NAME = "model.safetensors"
HF_PREPROCESSOR_NAME = "preprocessor_config.json"  # what SamProcessor.from_pretrained reads beside the model
HF_SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
HF_BIN_NAME = "pytorch_model.bin"
HF_MODULES = ("vision_encoder.", "prompt_encoder.", "mask_decoder.", "shared_image_embedding.")
PE_OFFICIAL = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
PE_HF = ("shared_image_embedding.positional_embedding", "prompt_encoder.shared_embedding.positional_embedding")
MLP_PREFIXES = (r"mask_decoder\.output_hypernetworks_mlps\.\d+\.", r"mask_decoder\.iou_prediction_head\.")

# (official key prefix, Hugging Face key prefix), {i} and {j} standing for indices; the first match
# renames a key, in either direction. MLPs and the positional matrix are handled apart.
_PREFIX_RENAMES: tuple[tuple[str, str], ...] = (
    ("image_encoder.patch_embed.proj.", "vision_encoder.patch_embed.projection."),
    ("image_encoder.blocks.{i}.norm{j}.", "vision_encoder.layers.{i}.layer_norm{j}."),
    ("image_encoder.blocks.{i}.", "vision_encoder.layers.{i}."),
    ("image_encoder.neck.0.", "vision_encoder.neck.conv1."),
    ("image_encoder.neck.1.", "vision_encoder.neck.layer_norm1."),
    ("image_encoder.neck.2.", "vision_encoder.neck.conv2."),
    ("image_encoder.neck.3.", "vision_encoder.neck.layer_norm2."),
    ("image_encoder.", "vision_encoder."),
    ("prompt_encoder.point_embeddings.{i}.", "prompt_encoder.point_embed.{i}."),
    ("prompt_encoder.mask_downscaling.0.", "prompt_encoder.mask_embed.conv1."),
    ("prompt_encoder.mask_downscaling.1.", "prompt_encoder.mask_embed.layer_norm1."),
    ("prompt_encoder.mask_downscaling.3.", "prompt_encoder.mask_embed.conv2."),
    ("prompt_encoder.mask_downscaling.4.", "prompt_encoder.mask_embed.layer_norm2."),
    ("prompt_encoder.mask_downscaling.6.", "prompt_encoder.mask_embed.conv3."),
    ("mask_decoder.transformer.layers.{i}.norm{j}.", "mask_decoder.transformer.layers.{i}.layer_norm{j}."),
    ("mask_decoder.transformer.norm_final_attn.", "mask_decoder.transformer.layer_norm_final_attn."),
    ("mask_decoder.output_upscaling.0.", "mask_decoder.upscale_conv1."),
    ("mask_decoder.output_upscaling.1.", "mask_decoder.upscale_layer_norm."),
    ("mask_decoder.output_upscaling.3.", "mask_decoder.upscale_conv2."),
)


def _prefix_pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)"))


_TO_HF = tuple((_prefix_pattern(official), hf) for official, hf in _PREFIX_RENAMES)
_TO_OFFICIAL = tuple((_prefix_pattern(hf), official) for official, hf in _PREFIX_RENAMES)


def _rename(key: str, table: tuple[tuple[re.Pattern[str], str], ...]) -> str:
    """`key` with its prefix renamed by the first matching entry of `table` (unchanged if none)."""
    for pattern, template in table:
        found = pattern.match(key)
        if found:
            return template.format(**found.groupdict()) + key[found.end():]
    return key


def _mlp_depths(keys: list[str], layer_pattern: str) -> dict[str, int]:
    """{MLP prefix: number of linear layers} of the official-layout keys."""
    depths: dict[str, int] = {}
    for key in keys:
        for prefix in MLP_PREFIXES:
            found = re.match(f"({prefix})" + layer_pattern, key)
            if found:
                depths[found.group(1)] = max(depths.get(found.group(1), 0), int(found.group(2)) + 1)
    return depths


def official_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official-layout SAM state dict in the Hugging Face SamModel layout (tensors shared, not copied,
    except the positional matrix, which is stored under both of its names)."""
    depths = _mlp_depths(list(state_dict), r"layers\.(\d+)\.")
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == PE_OFFICIAL:
            for name in PE_HF:
                out[name] = value.clone()
            continue
        mlp = next((m for p in MLP_PREFIXES if (m := re.match(f"({p})layers\\.(\\d+)\\.(.*)$", key))), None)
        if mlp:
            prefix, index, rest = mlp.group(1), int(mlp.group(2)), mlp.group(3)
            last = depths[prefix] - 1
            name = "proj_in" if index == 0 else "proj_out" if index == last else f"layers.{index - 1}"
            out[f"{prefix}{name}.{rest}"] = value
            continue
        out[_rename(key, _TO_HF)] = value
    return out


def hf_to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face SamModel state dict in the official layout (either name of the positional matrix
    suffices); keys outside SAM's modules are dropped."""
    hidden = {}
    for key in state_dict:
        found = next((m for p in MLP_PREFIXES if (m := re.match(f"({p})layers\\.(\\d+)\\.", key))), None)
        if found:
            hidden[found.group(1)] = max(hidden.get(found.group(1), 0), int(found.group(2)) + 1)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in PE_HF:
            out[PE_OFFICIAL] = value
            continue
        if not key.startswith(HF_MODULES):
            continue
        mlp = next((m for p in MLP_PREFIXES if (m := re.match(f"({p})(proj_in|proj_out|layers\\.(\\d+))\\.(.*)$", key))), None)
        if mlp:
            prefix, part, rest = mlp.group(1), mlp.group(2), mlp.group(4)
            index = 0 if part == "proj_in" else hidden.get(prefix, 0) + 1 if part == "proj_out" else int(mlp.group(3)) + 1
            out[f"{prefix}layers.{index}.{rest}"] = value
            continue
        out[_rename(key, _TO_OFFICIAL)] = value
    return out


def is_hf_state_dict(state_dict: dict[str, Any]) -> bool:
    """Whether a dict holds SamModel weights in the Hugging Face layout."""
    return any(isinstance(key, str) and key.startswith("vision_encoder.") for key in state_dict)


def hf_config_to_sam_config(config: dict[str, Any]) -> SamConfig:
    """Our SamConfig of a Hugging Face SamConfig (config.json) dict; ValueError (one line) for a
    config.json of another shape, so a hand-edited one is named rather than a traceback."""
    sections = ("vision_config", "prompt_encoder_config", "mask_decoder_config")
    if not isinstance(config, dict) or not all(isinstance(config.get(name, {}), dict) for name in sections):
        raise ValueError(f"{HF_CONFIG_NAME} is not a SamConfig (a JSON object whose {', '.join(sections)} are objects)")
    vision, prompt, decoder = (config.get(name, {}) for name in sections)
    try:
        return _sam_config(vision, prompt, decoder)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{HF_CONFIG_NAME} holds a value SamConfig cannot take ({error})") from None


def _sam_config(vision: dict[str, Any], prompt: dict[str, Any], decoder: dict[str, Any]) -> SamConfig:
    hidden = int(vision.get("hidden_size", 768))
    mlp_dim = vision.get("mlp_dim")
    return SamConfig(
        image_size=int(vision.get("image_size", 1024)),
        patch_size=int(vision.get("patch_size", 16)),
        encoder_embed_dim=hidden,
        encoder_depth=int(vision.get("num_hidden_layers", 12)),
        encoder_num_heads=int(vision.get("num_attention_heads", 12)),
        encoder_window_size=int(vision.get("window_size", 14)),
        encoder_global_attn_indexes=tuple(vision.get("global_attn_indexes", (2, 5, 8, 11))),
        encoder_mlp_ratio=float(mlp_dim) / hidden if mlp_dim else float(vision.get("mlp_ratio", 4.0)),
        prompt_embed_dim=int(vision.get("output_channels", 256)),
        mask_in_chans=int(prompt.get("mask_input_channels", 16)),
        decoder_depth=int(decoder.get("num_hidden_layers", 2)),
        decoder_mlp_dim=int(decoder.get("mlp_dim", 2048)),
        decoder_num_heads=int(decoder.get("num_attention_heads", 8)),
        decoder_attention_downsample_rate=int(decoder.get("attention_downsample_rate", 2)),
        num_multimask_outputs=int(decoder.get("num_multimask_outputs", 3)),
        iou_head_depth=int(decoder.get("iou_head_depth", 3)),
        iou_head_hidden_dim=int(decoder.get("iou_head_hidden_dim", 256)),
    )


def sam_config_to_hf_config(config: SamConfig) -> dict[str, Any]:
    """The Hugging Face SamConfig (config.json) dict of our SamConfig; `SamModel.from_pretrained` reads it."""
    return {
        "model_type": "sam",
        "architectures": ["SamModel"],
        "initializer_range": 0.02,
        "vision_config": {
            "model_type": "sam_vision_model",
            "hidden_size": config.encoder_embed_dim,
            "output_channels": config.prompt_embed_dim,
            "num_hidden_layers": config.encoder_depth,
            "num_attention_heads": config.encoder_num_heads,
            "num_channels": 3,
            "image_size": config.image_size,
            "patch_size": config.patch_size,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-6,
            "qkv_bias": True,
            "mlp_ratio": config.encoder_mlp_ratio,
            "mlp_dim": int(config.encoder_embed_dim * config.encoder_mlp_ratio),
            "use_abs_pos": True,
            "use_rel_pos": True,
            "window_size": config.encoder_window_size,
            "global_attn_indexes": list(config.encoder_global_attn_indexes),
            "num_pos_feats": config.prompt_embed_dim // 2,
        },
        "prompt_encoder_config": {
            "hidden_size": config.prompt_embed_dim,
            "image_size": config.image_size,
            "patch_size": config.patch_size,
            "mask_input_channels": config.mask_in_chans,
            "num_point_embeddings": 4,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-6,
        },
        "mask_decoder_config": {
            "hidden_size": config.prompt_embed_dim,
            "hidden_act": "relu",
            "mlp_dim": config.decoder_mlp_dim,
            "num_hidden_layers": config.decoder_depth,
            "num_attention_heads": config.decoder_num_heads,
            "attention_downsample_rate": config.decoder_attention_downsample_rate,
            "num_multimask_outputs": config.num_multimask_outputs,
            "iou_head_depth": config.iou_head_depth,
            "iou_head_hidden_dim": config.iou_head_hidden_dim,
            "layer_norm_eps": 1e-6,
        },
    }


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ImportError(f"reading {path} needs safetensors: pip install safetensors (or segany[hf])") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path} is not a readable safetensors file ({' '.join(str(error).split())[:200]})") from None


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a Hugging Face checkpoint: a folder (model.safetensors, a sharded safetensors
    index, or pytorch_model.bin) or a .safetensors file. .bin files are read weights-only."""
    if path.is_file() and path.suffix == ".safetensors":
        return _read_safetensors(path)
    if (path / HF_SAFETENSORS_NAME).is_file():
        return _read_safetensors(path / HF_SAFETENSORS_NAME)
    if (path / HF_SAFETENSORS_INDEX_NAME).is_file():
        index = json.loads((path / HF_SAFETENSORS_INDEX_NAME).read_text())
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
            raise ValueError(f"{HF_SAFETENSORS_INDEX_NAME} has no weight_map of tensor names to shard files")
        shards = sorted(set(weight_map.values()))
        return {k: v for shard in shards for k, v in _read_safetensors(path / shard).items()}
    if (path / HF_BIN_NAME).is_file():
        loaded = torch.load(path / HF_BIN_NAME, map_location="cpu", weights_only=True)
        return loaded.get("state_dict", loaded) if isinstance(loaded, dict) else {}
    raise FileNotFoundError(f"{path} holds no Hugging Face weights ({HF_SAFETENSORS_NAME}, {HF_SAFETENSORS_INDEX_NAME} or {HF_BIN_NAME})")


def hf_checkpoint_as_official(weights: dict[str, torch.Tensor], config_file: Path | None) -> dict[str, Any]:
    """A checkpoint dict our loaders take (`{"state_dict": official layout}`, plus the architecture as
    `hyper_parameters.sam` when a config.json is given: numbers the weights do not show, such as the
    decoder's heads, come from it)."""
    checkpoint: dict[str, Any] = {"state_dict": hf_to_official(weights)}
    if config_file is not None and config_file.is_file():
        config = hf_config_to_sam_config(json.loads(config_file.read_text()))
        checkpoint["hyper_parameters"] = {"sam": asdict(config)}
    return checkpoint


def hf_preprocessor_config(model: nn.Module) -> dict[str, Any]:
    """`transformers.SamImageProcessor`'s settings for `model`: its input side (resize the longest
    side to it, pad to a square), its low-res mask side for segmentation maps, and its pixel mean and
    std as fractions of 255 (the processor rescales by 1/255 before normalising)."""
    side = model.config.image_size
    mask_side = 4 * (side // model.config.patch_size)  # the decoder's low-res logits
    return {
        "image_processor_type": "SamImageProcessor",
        "processor_class": "SamProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"longest_edge": side},
        "resample": 2,  # bilinear
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [v / 255 for v in model.pixel_mean.flatten().tolist()],
        "image_std": [v / 255 for v in model.pixel_std.flatten().tolist()],
        "do_pad": True,
        "pad_size": {"height": side, "width": side},
        "mask_size": {"longest_edge": mask_side},
        "mask_pad_size": {"height": mask_side, "width": mask_side},
    }


def save_hf_checkpoint(model: nn.Module, directory: str | Path) -> Path:
    """Writes `model` (a Sam with a `.config`) as a Hugging Face SamModel folder: config.json,
    model.safetensors and preprocessor_config.json (`SamModel.from_pretrained(directory)` and
    `SamProcessor.from_pretrained(directory)` load it). LoRA is merged first, on a copy. Files are
    written whole (a temporary name, then renamed) with the umask's permissions, as other outputs."""
    from segany_train.model.lora import merge_lora

    try:
        from safetensors.torch import save
    except ImportError:
        raise ImportError("writing the Hugging Face layout needs safetensors: pip install safetensors (or segany[hf])") from None

    plain = deepcopy(model).cpu()
    merge_lora(plain)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in official_to_hf(plain.state_dict()).items()}
    # safetensors' save_file leaves the file 0600 whatever the umask: the bytes are written here instead
    write_bytes_atomically(directory / HF_SAFETENSORS_NAME, save(tensors, metadata={"format": "pt"}))
    write_json_atomically(directory / HF_CONFIG_NAME, sam_config_to_hf_config(model.config))
    write_json_atomically(directory / HF_PREPROCESSOR_NAME, hf_preprocessor_config(plain))
    return directory
