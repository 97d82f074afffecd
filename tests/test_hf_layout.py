"""Hugging Face SamModel checkpoints: loaded into our Sam, outputs equal to transformers' SamModel
(random weights, a small SamConfig, no hub access) for points, boxes and mask prompts; our weights
exported to that layout load back into SamModel and into our model."""

import json
from pathlib import Path

import pytest
import torch

from segany_train.inference.cli_options import build_model
from segany_train.model import build_sam, build_sam_by_name
from segany_train.model.checkpoint import SamCheckpointError
from segany_train.model.hf_layout import hf_to_official, official_to_hf, save_hf_checkpoint
from tests.conftest import TINY

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

SIZE = 128  # input side: a 8x8 embedding, 32x32 low-res masks
TOLERANCE = 1e-4


def _hf_model(seed: int = 0):
    """A SamModel of a small config with every weight perturbed randomly (HF initialises some at ~0)."""
    config = transformers.SamConfig(
        vision_config=transformers.SamVisionConfig(
            hidden_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=SIZE, window_size=4,
            global_attn_indexes=[1], output_channels=32, num_pos_feats=16, mlp_dim=128,
        ),
        prompt_encoder_config=transformers.SamPromptEncoderConfig(hidden_size=32, image_size=SIZE, mask_input_channels=8),
        mask_decoder_config=transformers.SamMaskDecoderConfig(hidden_size=32, mlp_dim=64, num_attention_heads=4, iou_head_hidden_dim=48),
    )
    torch.manual_seed(seed)
    model = transformers.SamModel(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
        # the tied copy must hold the same matrix
        model.prompt_encoder.shared_embedding.positional_embedding.copy_(model.shared_image_embedding.positional_embedding)
    return model


PROMPTS = {
    "points": {"points": [[[20.0, 30.0], [90.0, 64.0]]], "labels": [[1, 0]], "multimask": True},
    "single point": {"points": [[[70.0, 50.0]]], "labels": [[1]], "multimask": True},
    "box": {"box": [10.0, 20.0, 100.0, 90.0], "multimask": False},
    "box and point": {"box": [10.0, 20.0, 100.0, 90.0], "points": [[[50.0, 60.0]]], "labels": [[0]], "multimask": False},
    "points and mask": {"points": [[[40.0, 40.0]]], "labels": [[1]], "mask": True, "multimask": True},
}


def _compare(ours, hf_model, prompt: dict, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(3, SIZE, SIZE, generator=gen) * 255
    mask = torch.randn(1, 1, SIZE // 4, SIZE // 4, generator=gen) * 3
    record = {"image": image, "original_size": (SIZE, SIZE)}
    hf_inputs = {"pixel_values": ours.preprocess(image)[None]}
    if "points" in prompt:
        record["point_coords"] = torch.tensor(prompt["points"])
        record["point_labels"] = torch.tensor(prompt["labels"])
        hf_inputs["input_points"] = torch.tensor(prompt["points"])[None]
        hf_inputs["input_labels"] = torch.tensor(prompt["labels"])[None]
    if "box" in prompt:
        record["boxes"] = torch.tensor([prompt["box"]])
        hf_inputs["input_boxes"] = torch.tensor([[prompt["box"]]])
    if prompt.get("mask"):
        record["mask_inputs"] = mask
        hf_inputs["input_masks"] = mask
    with torch.no_grad():
        got = ours([record], multimask_output=prompt["multimask"])[0]
        want = hf_model(**hf_inputs, multimask_output=prompt["multimask"])
    want_masks, want_iou = want.pred_masks[0], want.iou_scores[0]  # prompts x masks x h x w, prompts x masks
    assert got["low_res_logits"].shape == want_masks.shape
    assert (got["low_res_logits"] - want_masks).abs().max() < TOLERANCE
    assert (got["iou_predictions"] - want_iou).abs().max() < TOLERANCE
    assert want_masks.abs().max() > 0.1  # not a comparison of zeros


@pytest.mark.parametrize("file_format", ["safetensors", "bin"])
def test_hf_checkpoint_loads_with_parity_for_points_boxes_and_masks(tmp_path: Path, file_format: str) -> None:
    torch.set_num_threads(1)
    hf_model = _hf_model()
    if file_format == "safetensors":
        hf_model.save_pretrained(tmp_path / "hf")
        checkpoint = tmp_path / "hf"
    else:  # a pytorch_model.bin beside its config.json, as older hub snapshots have it
        (tmp_path / "hf").mkdir()
        torch.save(hf_model.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
        hf_model.config.to_json_file(tmp_path / "hf" / "config.json")
        checkpoint = tmp_path / "hf" / "pytorch_model.bin"
    ours = build_model(checkpoint, None).eval()
    assert ours.config.decoder_num_heads == 4 and ours.config.encoder_global_attn_indexes == (1,)
    for prompt in PROMPTS.values():
        _compare(ours, hf_model, prompt)


def test_our_weights_export_to_hf_and_back(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    hf_model = _hf_model(seed=1)
    hf_model.save_pretrained(tmp_path / "hf")
    ours = build_model(tmp_path / "hf", None).eval()
    save_hf_checkpoint(ours, tmp_path / "exported")
    reloaded_hf = transformers.SamModel.from_pretrained(tmp_path / "exported").eval()
    for name, value in hf_model.state_dict().items():
        torch.testing.assert_close(reloaded_hf.state_dict()[name], value, rtol=0, atol=0, msg=name)
    for prompt in PROMPTS.values():
        _compare(ours, reloaded_hf, prompt)
    again = build_model(tmp_path / "exported", None)
    for name, value in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name


def test_key_mapping_round_trips_every_registry_size() -> None:
    for name in ("vit_b", "vit_t_256_small_decoder"):
        official = {k: torch.empty(0) for k in build_sam_by_name(name).state_dict()}
        hf = official_to_hf(official)
        assert len(hf) == len(official) + 1  # the positional matrix under both of its names
        assert sorted(hf_to_official(hf)) == sorted(official)


def test_hf_layout_matches_transformers_key_names_for_vit_b() -> None:
    """The vit_b layout written is exactly facebook/sam-vit-base's (transformers' default SamConfig)."""
    with torch.device("meta"):
        expected = set(transformers.SamModel(transformers.SamConfig()).state_dict())
    official = {k: torch.empty(0) for k in build_sam_by_name("vit_b").state_dict()}
    assert set(official_to_hf(official)) == expected


def test_unreadable_hf_checkpoints_fail_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SamCheckpointError, match="holds no Hugging Face weights"):
        build_model(tmp_path / "empty", None)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SamCheckpointError, match="bad.safetensors is not a readable SAM checkpoint"):
        build_model(tmp_path / "bad.safetensors", None)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"model_type": "sam"}))
    with pytest.raises(SamCheckpointError):
        build_model(tmp_path / "cfg", None)


def test_a_malformed_config_or_index_fails_in_one_line(tmp_path: Path) -> None:
    folder = save_hf_checkpoint(build_sam(TINY), tmp_path / "hf")
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(SamCheckpointError, match=r"not a readable SAM checkpoint \(config.json is not a SamConfig"):
        build_model(folder, None)
    (folder / "config.json").write_text(json.dumps({"vision_config": {"hidden_size": [768]}}))
    with pytest.raises(SamCheckpointError, match="config.json holds a value SamConfig cannot take"):
        build_model(folder, None)
    (folder / "config.json").unlink()
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(SamCheckpointError, match="model.safetensors.index.json has no weight_map"):
        build_model(folder, None)
    torch.save(official_to_hf(build_sam(TINY).state_dict()), tmp_path / "pytorch_model.bin")  # a .bin beside a bad config
    (tmp_path / "config.json").write_text('"sam"')
    with pytest.raises(SamCheckpointError, match="pytorch_model.bin is not a readable SAM checkpoint"):
        build_model(tmp_path / "pytorch_model.bin", None)
