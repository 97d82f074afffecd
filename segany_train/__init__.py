"""segany: train Segment Anything models around SAM's data engine."""

from segany_train.automatic_mask_generator import SamAutomaticMaskGenerator
from segany_train.model import SamCheckpointError, build_sam, build_sam_from_checkpoint, sam_model_registry
from segany_train.predictor import SamPredictor
from segany_train.transforms import ResizeLongestSide

__all__ = [
    "ResizeLongestSide",
    "SamAutomaticMaskGenerator",
    "SamCheckpointError",
    "SamPredictor",
    "build_sam",
    "build_sam_from_checkpoint",
    "sam_model_registry",
]
