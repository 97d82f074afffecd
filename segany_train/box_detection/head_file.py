"""A trained box head on disk: its configuration and CPU weights in one torch file."""

from pathlib import Path

import torch

from segany_train.box_detection.box_head import BoxHead, BoxHeadConfig

SAVE_FORMAT = "segany-box-head-v1"


def save_box_head(head: BoxHead, path: str | Path) -> Path:
    """Writes the head's config and weights (CPU tensors) to `path`, creating its directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in head.state_dict().items()}
    torch.save({"format": SAVE_FORMAT, "config": head.config.to_dict(), "state_dict": state}, path)
    return path


def load_box_head(path: str | Path, map_location: str | torch.device = "cpu") -> BoxHead:
    """The `BoxHead` `save_box_head` wrote, in eval mode."""
    saved = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != SAVE_FORMAT:
        raise ValueError(f"{path} is not a box head saved by save_box_head ({SAVE_FORMAT})")
    head = BoxHead(BoxHeadConfig(**saved["config"]))
    head.load_state_dict(saved["state_dict"])
    return head.to(map_location).eval()
