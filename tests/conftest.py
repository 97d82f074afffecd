"""Shared test fixtures: the official-implementation reference data and small SAM configs."""

from pathlib import Path

import pytest
import torch

from segany_train.model import SamConfig, build_sam

FIXTURES = Path(__file__).parent / "fixtures"


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: where there is none they are skipped, and the skip says why."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

# Small enough to build and run in milliseconds, with every architectural feature present: windowed
# attention with padding (window 3 does not divide the 8x8 grid), global attention, several heads,
# a down-sampled decoder attention and 3 multimask outputs.
TINY = SamConfig(
    image_size=128,
    encoder_embed_dim=32,
    encoder_depth=2,
    encoder_num_heads=2,
    encoder_window_size=3,
    encoder_global_attn_indexes=(1,),
    prompt_embed_dim=32,
    decoder_mlp_dim=64,
    decoder_num_heads=4,
    iou_head_hidden_dim=32,
)


@pytest.fixture(scope="session")
def parity() -> dict:
    """The official model's weights, image and predictor outputs (see fixtures/REFERENCE_README.md)."""
    return torch.load(FIXTURES / "parity_shared.pt", weights_only=False)


def parity_config(parity: dict) -> SamConfig:
    c = parity["config"]
    return SamConfig(
        image_size=c["img"],
        encoder_embed_dim=c["dim"],
        encoder_depth=c["depth"],
        encoder_num_heads=c["heads"],
        encoder_window_size=c["window"],
        encoder_global_attn_indexes=tuple(c["glob"]),
        prompt_embed_dim=c["pdim"],
        decoder_mlp_dim=c["mlp"],
        decoder_num_heads=c["dheads"],
        iou_head_hidden_dim=c["iou_hidden"],
    )


@pytest.fixture
def parity_sam(parity):
    return build_sam(parity_config(parity), checkpoint=parity["state_dict"]).eval()


def randomized(sam: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter set to random values (fresh init leaves many at 0/1, which hides bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sam.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return sam


@pytest.fixture
def tiny_sam():
    torch.manual_seed(0)
    return randomized(build_sam(TINY)).eval()


def tiny_training_overrides(corpus: Path) -> list[str]:
    """segany-train overrides: tiny_synthetic_cpu on a 16-image, 128-px corpus in `corpus` (written on
    first use, as the training entry does), shrunk to seconds per run."""
    return [
        "experiment=tiny_synthetic_cpu",
        f"data.synthetic.directory={corpus}",
        "data.synthetic.num_images=16",
        "data.synthetic.size=128",
        "data.synthetic.images_per_shard=2",
        "data.synthetic.min_objects=3",
        "data.synthetic.max_objects=8",
        "data.num_workers=0",
        "data.max_masks=4",
        "prompting.num_correction_clicks=1",
        "callbacks.progress_bar=false",
    ]
