"""The architecture numbers of a SAM model and the registry of named sizes."""

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class SamConfig:
    """Every architecture number of a SAM model."""

    image_size: int = 1024
    patch_size: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_window_size: int = 14
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    encoder_mlp_ratio: float = 4.0
    encoder_drop_path_rate: float = 0.0
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    decoder_attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256

    def describe(self) -> str:
        """Short size description used in error messages."""
        return (
            f"image {self.image_size}, encoder dim {self.encoder_embed_dim} x depth {self.encoder_depth}, "
            f"prompt dim {self.prompt_embed_dim}"
        )


SAM_CONFIGS: dict[str, SamConfig] = {
    "vit_h": SamConfig(
        encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16, encoder_global_attn_indexes=(7, 15, 23, 31)
    ),
    "vit_l": SamConfig(
        encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16, encoder_global_attn_indexes=(5, 11, 17, 23)
    ),
    "vit_b": SamConfig(),
    # CPU sizes: a 256-px input (16x16 embedding, 64x64 low-res masks) with a small ViT ...
    "vit_t_256": SamConfig(
        image_size=256,
        encoder_embed_dim=192,
        encoder_depth=4,
        encoder_num_heads=3,
        encoder_window_size=8,
        encoder_global_attn_indexes=(1, 3),
    ),
    # ... and the same with a small decoder, for tests and minute-long runs.
    "vit_t_256_small_decoder": SamConfig(
        image_size=256,
        encoder_embed_dim=128,
        encoder_depth=4,
        encoder_num_heads=4,
        encoder_window_size=8,
        encoder_global_attn_indexes=(1, 3),
        prompt_embed_dim=128,
        decoder_mlp_dim=512,
        decoder_num_heads=4,
        iou_head_hidden_dim=128,
    ),
}
SAM_CONFIGS["default"] = SAM_CONFIGS["vit_h"]


def describe_size(config: SamConfig) -> str:
    """A config's registry name where it has one, plus its numbers."""
    names = [
        name
        for name, known in SAM_CONFIGS.items()
        if name != "default" and replace(known, image_size=config.image_size, encoder_drop_path_rate=config.encoder_drop_path_rate) == config
    ]
    return f"{names[0]} ({config.describe()})" if names else config.describe()
