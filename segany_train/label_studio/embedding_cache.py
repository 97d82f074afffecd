"""Image embeddings kept per annotation task, so that a click costs one decoder pass.

An annotator clicks many times on one image and moves between a few images: the encoder (nearly all
of SAM's cost) runs once per image, and the least recently used images are dropped beyond a bound.
Each cached image also keeps the low-res logits the model answered with per prompt sequence, so the
next click on the same region can feed the previous mask back as SAM's mask prompt.
"""

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np

from segany_train.inference.predictor import SamPredictor
from segany_train.model.sam import Sam


@dataclass
class CachedImage:
    """One image's predictor (embedding set) and the logits answered per prompt sequence."""

    predictor: SamPredictor
    logits_by_prompts: dict[Hashable, np.ndarray] = field(default_factory=dict)


class EmbeddingCache:
    """At most `capacity` images' embeddings, least recently used dropped first."""

    def __init__(self, model: Sam, *, capacity: int, precision: str = "fp32") -> None:
        if capacity < 1:
            raise ValueError(f"the embedding cache needs a capacity >= 1, got {capacity}")
        self.model = model
        self.precision = precision
        self.capacity = capacity
        self._images: OrderedDict[Hashable, CachedImage] = OrderedDict()

    def __len__(self) -> int:
        return len(self._images)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._images

    def get(self, key: Hashable, pixels: np.ndarray | None) -> CachedImage | None:
        """The cached image for `key`, now the most recently used; on a miss the encoder runs on
        `pixels` (HxWx3 uint8 RGB) when given, else None: the caller fetches the image first, so a
        slow fetch does not happen under the lock that guards the model and this cache."""
        cached = self._images.get(key)
        if cached is not None:
            self._images.move_to_end(key)
            return cached
        if pixels is None:
            return None
        predictor = SamPredictor(self.model, precision=self.precision)
        predictor.set_image(pixels)
        cached = self._images[key] = CachedImage(predictor)
        while len(self._images) > self.capacity:
            self._images.popitem(last=False)
        return cached
