"""segany: train Segment Anything models around SAM's data engine."""

from segany_train.inference.automatic_mask_generator import SamAutomaticMaskGenerator
from segany_train.inference.predictor import SamPredictor
from segany_train.model import SamCheckpointError, build_sam, build_sam_from_checkpoint, sam_model_registry
from segany_train.model.transforms import ResizeLongestSide

__all__ = [
    "ResizeLongestSide",
    "SamAutomaticMaskGenerator",
    "SamCheckpointError",
    "SamPredictor",
    "build_sam",
    "build_sam_from_checkpoint",
    "sam_model_registry",
]
