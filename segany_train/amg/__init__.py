"""Building blocks of the automatic mask generator: point grids and crops, mask and box operations,
run-length encoding, and small-region removal. Pure functions, typed, with shapes in their docstrings."""

from segany_train.amg.grids import crop_boxes, layer_point_grids, point_grid
from segany_train.amg.mask_ops import (
    box_area,
    box_near_crop_edge,
    box_nms,
    box_xyxy_to_xywh,
    masks_to_boxes,
    stability_score,
)
from segany_train.amg.regions import label_components, remove_small_regions
from segany_train.amg.rle import (
    coco_rle,
    column_runs,
    crop_masks_to_rle_counts,
    mask_to_rle_counts,
    masks_to_rle_counts,
    rle_area,
    rle_box,
    rle_counts_from_column_runs,
    rle_counts_to_mask,
    uncompressed_rle,
)

__all__ = [
    "box_area",
    "box_near_crop_edge",
    "box_nms",
    "box_xyxy_to_xywh",
    "coco_rle",
    "column_runs",
    "crop_boxes",
    "crop_masks_to_rle_counts",
    "label_components",
    "layer_point_grids",
    "mask_to_rle_counts",
    "masks_to_boxes",
    "masks_to_rle_counts",
    "point_grid",
    "remove_small_regions",
    "rle_area",
    "rle_box",
    "rle_counts_from_column_runs",
    "rle_counts_to_mask",
    "stability_score",
    "uncompressed_rle",
]
