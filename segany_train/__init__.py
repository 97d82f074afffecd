"""segany: train Segment Anything models around SAM's data engine."""

from segany_train.model import SamCheckpointError, build_sam, sam_model_registry
from segany_train.predictor import SamPredictor
from segany_train.transforms import ResizeLongestSide

__all__ = ["ResizeLongestSide", "SamCheckpointError", "SamPredictor", "build_sam", "sam_model_registry"]
