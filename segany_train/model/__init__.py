"""SAM as plain PyTorch modules: no Lightning or Hydra here."""

from segany_train.model.build_sam import build_sam, build_sam_by_name, build_sam_from_checkpoint, sam_model_registry
from segany_train.model.checkpoint import SamCheckpointError, load_sam_checkpoint, read_state_dict
from segany_train.model.image_encoder import ImageEncoderViT
from segany_train.model.mask_decoder import MaskDecoder
from segany_train.model.prompt_encoder import IGNORE_LABEL, PromptEncoder
from segany_train.model.sam import Sam, pad_point_prompts
from segany_train.model.sam_config import SAM_CONFIGS, SamConfig
from segany_train.model.two_way_transformer import TwoWayTransformer

__all__ = [
    "IGNORE_LABEL",
    "SAM_CONFIGS",
    "ImageEncoderViT",
    "MaskDecoder",
    "PromptEncoder",
    "Sam",
    "SamCheckpointError",
    "SamConfig",
    "TwoWayTransformer",
    "build_sam",
    "build_sam_by_name",
    "build_sam_from_checkpoint",
    "load_sam_checkpoint",
    "pad_point_prompts",
    "read_state_dict",
    "sam_model_registry",
]
