"""Label Studio's labeling config and regions as segany reads and writes them.

`LabelingSchema` finds, in a labeling config, the Image tag and the BrushLabels tag masks go to;
`Prompts` turns an interactive context (smart KeyPointLabels / RectangleLabels regions, in percent of
the image) into SAM prompts; `brush_region` writes a mask as a BrushLabels region (brush RLE).

Coordinates: Label Studio's percent positions are continuous (a click in the middle of pixel column
c is at (c + 0.5) / width * 100); SAM's are pixel indices (its prompt encoder adds the half pixel),
so a position maps to percent / 100 * width - 0.5.
"""

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any
from xml.etree import ElementTree

import numpy as np

from segany_train.data.brush_rle import mask_to_brush_rle


class BadRequest(ValueError):
    """A labeling config or region segany cannot use; the message (one line) says why."""


@dataclass(frozen=True)
class LabelingSchema:
    """The tags of a labeling config the backend reads and writes."""

    image_name: str  # the Image tag's name (the regions' to_name)
    image_field: str  # the task data field holding the image URL ($image -> image)
    brush_name: str  # the BrushLabels tag the masks go to
    brush_labels: tuple[str, ...]

    @classmethod
    def from_config(cls, label_config: str) -> "LabelingSchema":
        try:
            root = ElementTree.fromstring(label_config)
        except ElementTree.ParseError as error:
            raise BadRequest(f"the labeling config is not XML: {error}") from None
        brush = next(root.iter("BrushLabels"), None)
        if brush is None:
            raise BadRequest("the labeling config has no BrushLabels tag for the masks")
        images = {tag.get("name"): tag.get("value", "") for tag in root.iter("Image")}
        image_name = brush.get("toName")
        if image_name not in images or not images[image_name].startswith("$"):
            raise BadRequest(f"the BrushLabels tag points to {image_name!r}, not an Image tag with a $field value")
        labels = tuple(label.get("value") for label in brush.iter("Label"))
        return cls(image_name=image_name, image_field=images[image_name][1:], brush_name=brush.get("name"), brush_labels=labels)


@dataclass(frozen=True)
class Prompts:
    """SAM prompts from one interactive context, in original-image pixels (see the module doc)."""

    points: tuple[tuple[float, float, int], ...]  # (x, y, label 1 foreground / 0 background), in click order
    box: tuple[float, float, float, float] | None  # XYXY
    label: str | None  # the label the annotator chose on the smart tool, if any
    width: int
    height: int

    @classmethod
    def from_context(cls, context: dict[str, Any], *, max_points: int) -> "Prompts":
        """The context's prompts; BadRequest past `max_points` points (each costs decoder time under
        the model lock, which every annotator waits on)."""
        regions = context.get("result") if isinstance(context, dict) else None
        if not isinstance(regions, list) or not regions:
            raise BadRequest("the interactive context has no result regions")
        points, box, label, size = [], None, None, None
        for region in regions:
            if not isinstance(region, dict):
                raise BadRequest(f"a region is not a JSON object: {str(region)[:50]}")
            kind, value = region.get("type"), region.get("value") or {}
            if kind not in ("keypointlabels", "rectanglelabels"):
                continue  # other regions (the annotator's brush strokes, choices) are not prompts
            positive = region.get("is_positive", True)
            if kind == "keypointlabels" and not isinstance(positive, bool):  # "false" would be truthy
                raise BadRequest(f"a keypoint's is_positive must be true or false, got {str(positive)[:50]!r}")
            if kind == "keypointlabels" and len(points) == max_points:
                raise BadRequest(f"the click holds more than {max_points} points; segany-serve takes at most {max_points} (--max-points)")
            try:
                width, height = int(region["original_width"]), int(region["original_height"])
                if kind == "keypointlabels":
                    x, y = float(value["x"]) / 100 * width - 0.5, float(value["y"]) / 100 * height - 0.5
                    points.append((x, y, 1 if positive else 0))
                    label = (value.get("keypointlabels") or [label])[0]
                elif kind == "rectanglelabels":
                    x0, y0 = float(value["x"]) / 100 * width, float(value["y"]) / 100 * height
                    x1, y1 = x0 + float(value["width"]) / 100 * width, y0 + float(value["height"]) / 100 * height
                    box = (x0 - 0.5, y0 - 0.5, x1 - 0.5, y1 - 0.5)
                    label = (value.get("rectanglelabels") or [label])[0]
            except (AttributeError, KeyError, TypeError, ValueError) as error:
                raise BadRequest(f"a {kind} region lacks or mangles a field: {type(error).__name__}: {error}") from None
            if size not in (None, (width, height)):
                raise BadRequest(f"the regions disagree on the image size: {size} and {(width, height)}")
            size = (width, height)
        if not points and box is None:
            raise BadRequest("the interactive context has no keypoint or rectangle region")
        return cls(points=tuple(points), box=box, label=label, width=size[0], height=size[1])

    def key(self) -> Hashable:
        return (self.points, self.box)

    def without_last_point(self) -> "Prompts":
        return Prompts(points=self.points[:-1], box=self.box, label=self.label, width=self.width, height=self.height)


def brush_region(mask: np.ndarray, *, schema: LabelingSchema, label: str | None) -> dict[str, Any]:
    """A Label Studio BrushLabels region holding an HxW bool mask."""
    height, width = mask.shape
    return {
        "from_name": schema.brush_name,
        "to_name": schema.image_name,
        "type": "brushlabels",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": mask_to_brush_rle(np.asarray(mask, dtype=bool)), "brushlabels": [label] if label else []},
    }
