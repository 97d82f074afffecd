"""SAM's interactive-prompt simulation as pure, batched tensor functions (no Lightning/Hydra).

Points, boxes and correction clicks for training (SAM appendix A) and the interactive evaluation
protocol (SAM section 7.1 / RITM). All functions take NxHxW masks on any device and return prompts
as (x, y) coordinates in a frame `scale` times the mask frame (see `points.py` for the convention).
`rollout.py` runs them through a `Sam` as the interactive loop that training and evaluation share
(imported from there: it needs the model, the functions here do not).
"""

from segany_train.prompting.boxes import box_to_points, boxes_from_masks, noisy_boxes
from segany_train.prompting.clicks import center_correction_clicks, error_regions, sample_correction_clicks
from segany_train.prompting.distance import distance_to_boundary, squared_distance_to_boundary
from segany_train.prompting.points import sample_points_in_masks

__all__ = [
    "box_to_points",
    "boxes_from_masks",
    "center_correction_clicks",
    "distance_to_boundary",
    "error_regions",
    "noisy_boxes",
    "sample_correction_clicks",
    "sample_points_in_masks",
    "squared_distance_to_boundary",
]
