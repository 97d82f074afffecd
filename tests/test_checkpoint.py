"""State-dict compatibility with the official checkpoints, wrappers, wrong sizes and other image sizes."""

import json
from dataclasses import replace

import pytest
import torch

from segany_train.model import SamCheckpointError, build_sam, sam_model_registry
from segany_train.model.vit_attention import resize_relative_position_table
from tests.conftest import FIXTURES, TINY, randomized


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_state_dict_keys_and_shapes_equal_official(name):
    official = json.loads((FIXTURES / "sam_state_dict_shapes.json").read_text())[name]
    with torch.device("meta"):
        sam = sam_model_registry[name]()
    ours = {k: list(v.shape) for k, v in sam.state_dict().items()}
    assert ours == official


def test_default_is_vit_h():
    with torch.device("meta"):
        assert sam_model_registry["default"]().config == sam_model_registry["vit_h"]().config


def _tiny_state_dict():
    torch.manual_seed(1)
    return randomized(build_sam(TINY)).state_dict()


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"model": sd},
        lambda sd: {"state_dict": sd},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
        # a Lightning checkpoint: SAM under an attribute, other modules and entries beside it
        lambda sd: {
            "state_dict": {**{f"sam.{k}": v for k, v in sd.items()}, "loss.weight": torch.ones(1)},
            "epoch": 3,
        },
    ],
)
def test_wrapped_and_prefixed_checkpoints_load_strictly(tmp_path, wrap):
    sd = _tiny_state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(sd), path)
    sam = build_sam(TINY, checkpoint=path)
    loaded = sam.state_dict()
    assert loaded.keys() == sd.keys()
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_wrong_size_checkpoint_fails_with_one_line_naming_both_sizes():
    with torch.device("meta"):
        vit_l = sam_model_registry["vit_l"]().state_dict()
    # zero-stride tensors of vit_l's shapes: a vit_l checkpoint as far as sizes go, without 1.2 GB
    fake_vit_l = {k: torch.zeros(()).expand(v.shape) for k, v in vit_l.items()}
    with torch.device("meta"), pytest.raises(SamCheckpointError) as error:
        sam_model_registry["vit_b"](checkpoint=fake_vit_l)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("checkpoint is vit_l (") and "but the model is vit_b (" in message
    assert "1024" in message and "768" in message


def test_other_decoder_size_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(build_sam(replace(TINY, decoder_mlp_dim=128)).state_dict(), path)
    with pytest.raises(SamCheckpointError, match="build the model with the checkpoint's size"):
        build_sam(TINY, checkpoint=path)


def test_not_a_sam_checkpoint(tmp_path):
    path = tmp_path / "x.pth"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(SamCheckpointError, match="no SAM weights"):
        build_sam(TINY, checkpoint=path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_sam(TINY, checkpoint=tmp_path / "missing.pth")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_checkpoint_with_non_finite_weights_is_refused(tmp_path, value):
    sd = _tiny_state_dict()
    sd["mask_decoder.iou_prediction_head.layers.0.weight"].fill_(value)
    with pytest.raises(SamCheckpointError, match=r"NaN or infinite weights in 1 of \d+ tensors \(first: mask_decoder.iou_prediction_head.layers.0.weight\)"):
        build_sam(TINY, checkpoint=sd)


def test_loading_at_another_image_size_resamples_positions_and_keeps_the_rest():
    sd = _tiny_state_dict()  # made at 128 px: 8x8 grid
    sam = build_sam(replace(TINY, image_size=256), checkpoint=sd).eval()  # 16x16 grid
    loaded = sam.state_dict()
    assert loaded["image_encoder.pos_embed"].shape == (1, 16, 16, TINY.encoder_embed_dim)
    # the global block's tables follow the grid (2*16-1 rows); the windowed block's stay
    assert loaded["image_encoder.blocks.1.attn.rel_pos_h"].shape[0] == 31
    assert torch.equal(loaded["image_encoder.blocks.0.attn.rel_pos_h"], sd["image_encoder.blocks.0.attn.rel_pos_h"])
    for key in sd:
        if key.startswith(("mask_decoder.", "prompt_encoder.")):
            assert torch.equal(loaded[key], sd[key]), key
    # resampling a table to its own length is the identity
    table = sd["image_encoder.blocks.1.attn.rel_pos_h"]
    assert torch.equal(resize_relative_position_table(table, 8), table)
    with torch.no_grad():
        low_res, iou = sam.decode(
            sam.image_encoder(torch.randn(1, 3, 256, 256)),
            image_index=None,
            point_coords=torch.tensor([[[100.0, 60.0], [0.0, 0.0]]]),
            point_labels=torch.tensor([[1, -1]]),
            multimask_output=True,
        )
    assert low_res.shape == (1, 3, 64, 64) and torch.isfinite(low_res).all() and iou.shape == (1, 3)
