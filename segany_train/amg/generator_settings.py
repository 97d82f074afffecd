"""The automatic mask generator's settings, written once: the Python API's defaults, segany-amg's and
segany-eval's flags and the engine's `stage3.generator` config are all built from this dataclass."""

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class GeneratorSettings:
    """Defaults: the official `SamAutomaticMaskGenerator`'s keyword arguments, plus
    `max_mask_area_fraction` (off; the SAM paper drops masks covering >= 95% of the image)."""

    points_per_side: int | None = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0
    max_mask_area_fraction: float | None = None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, where: str) -> "GeneratorSettings":
        """Settings from a config mapping (defaults for what it leaves out); an unknown key is one
        ValueError naming `where` (e.g. "stage3.generator") and the known keys."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown generator setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
        return cls(**values)

    def as_kwargs(self) -> dict[str, Any]:
        """The generator's keyword arguments."""
        return asdict(self)


# The SAM paper's fully automatic stage (section 4 and appendix B): a 32x32 grid on the image, 2x2
# crops with 16x16 grids and 4x4 crops with 8x8 grids, masks covering 95% of the image or more
# dropped, islands and holes under 100 px removed; thresholds as the official defaults.
PAPER_STAGE3 = GeneratorSettings(
    crop_n_layers=2, crop_n_points_downscale_factor=2, min_mask_region_area=100, max_mask_area_fraction=0.95
)
