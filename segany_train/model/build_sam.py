"""SAM sizes as configs of the same classes, a builder, and the official-style registry."""

from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from segany_train.model.checkpoint import infer_config, load_checkpoint_file, load_sam_checkpoint, read_state_dict
from segany_train.model.image_encoder import ImageEncoderViT
from segany_train.model.mask_decoder import MaskDecoder
from segany_train.model.prompt_encoder import PromptEncoder
from segany_train.model.sam import Sam
from segany_train.model.sam_config import SAM_CONFIGS, SamConfig
from segany_train.model.two_way_transformer import TwoWayTransformer


def build_sam(config: SamConfig, checkpoint: str | Path | dict[str, Any] | None = None) -> Sam:
    """Builds a Sam for `config`; loads `checkpoint` (a path or a state dict) when given."""
    embedding = config.image_size // config.patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=config.image_size,
            patch_size=config.patch_size,
            embed_dim=config.encoder_embed_dim,
            depth=config.encoder_depth,
            num_heads=config.encoder_num_heads,
            mlp_ratio=config.encoder_mlp_ratio,
            out_chans=config.prompt_embed_dim,
            window_size=config.encoder_window_size,
            global_attn_indexes=tuple(config.encoder_global_attn_indexes),
            drop_path_rate=config.encoder_drop_path_rate,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=config.prompt_embed_dim,
            image_embedding_size=(embedding, embedding),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=config.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=config.prompt_embed_dim,
            transformer=TwoWayTransformer(
                depth=config.decoder_depth,
                embedding_dim=config.prompt_embed_dim,
                num_heads=config.decoder_num_heads,
                mlp_dim=config.decoder_mlp_dim,
                attention_downsample_rate=config.decoder_attention_downsample_rate,
            ),
            num_multimask_outputs=config.num_multimask_outputs,
            iou_head_depth=config.iou_head_depth,
            iou_head_hidden_dim=config.iou_head_hidden_dim,
        ),
    )
    sam.config = config
    if checkpoint is not None:
        load_sam_checkpoint(sam, checkpoint)
    return sam


def build_sam_by_name(name: str, checkpoint: str | Path | dict[str, Any] | None = None, **overrides: Any) -> Sam:
    """Builds a registry size, optionally with config overrides (for example image_size=512)."""
    if name not in SAM_CONFIGS:
        raise KeyError(f"unknown SAM size {name!r}; known: {', '.join(SAM_CONFIGS)}")
    return build_sam(replace(SAM_CONFIGS[name], **overrides), checkpoint)


def build_sam_from_checkpoint(checkpoint: str | Path | dict[str, Any]) -> Sam:
    """Builds the Sam a checkpoint holds (official `.pth`, or a segany-train `.ckpt` with any LoRA
    merged). The size comes from the training run's saved config when there is one, else from the
    weights' shapes; numbers shapes do not show (decoder heads) from the registry size they match."""
    source = checkpoint if isinstance(checkpoint, dict) else load_checkpoint_file(Path(checkpoint))
    state_dict = read_state_dict(source)
    saved = (source.get("hyper_parameters") or {}).get("sam")
    if saved:
        config = SamConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
        return build_sam(replace(config, encoder_drop_path_rate=0.0), state_dict)
    config = infer_config(state_dict, like=SAM_CONFIGS["vit_b"])
    for known in SAM_CONFIGS.values():
        candidate = infer_config(state_dict, like=known)
        if candidate == replace(known, image_size=candidate.image_size):
            config = candidate
            break
    return build_sam(config, state_dict)


# Official-style registry: sam_model_registry["vit_b"](checkpoint="sam_vit_b_01ec64.pth").
sam_model_registry = {name: partial(build_sam_by_name, name) for name in SAM_CONFIGS}
