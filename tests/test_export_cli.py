"""segany-export: a fine-tuning checkpoint (LoRA on the encoder, a frozen part) written as official
.pth, Hugging Face folder and ONNX, each loaded back: the official layout strictly, the Hugging Face
one by transformers' SamModel, the ONNX model through ONNX Runtime within 1e-3."""

import os
import stat
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from segany_train.export.cli import main
from segany_train.export.onnx_export import OUTPUT_NAMES, example_inputs, onnx_module
from segany_train.model import build_sam_by_name
from segany_train.model.lora import add_lora_to_encoder_attention
from segany_train.training.module import SamTrainingModule

SIZE_NAME = "vit_t_256_small_decoder"


def _lora_checkpoint(path: Path):
    """A Lightning checkpoint as segany-train writes it: LoRA adapters (not at zero) on the encoder's
    qkv, the prompt encoder frozen. Returns the model it holds."""
    torch.manual_seed(0)
    sam = build_sam_by_name(SIZE_NAME)
    add_lora_to_encoder_attention(sam.image_encoder, rank=4, alpha=2.0)
    sam.prompt_encoder.requires_grad_(False)
    with torch.no_grad():
        for block in sam.image_encoder.blocks:
            block.attn.qkv.lora_b.normal_(std=0.3)
    module = SamTrainingModule(sam)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return sam.eval()


UMASK = 0o022  # the umask segany-export runs under in the test


def test_export_writes_three_formats_that_load_back(tmp_path: Path, capsys, monkeypatch) -> None:
    torch.set_num_threads(1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # transformers reads the folder only
    sam = _lora_checkpoint(tmp_path / "run.ckpt")
    previous = os.umask(UMASK)
    try:
        main(["--checkpoint", str(tmp_path / "run.ckpt"), "--out", str(tmp_path / "out")])
    finally:
        os.umask(previous)
    printed = capsys.readouterr().out
    assert "official:" in printed and "hf:" in printed and "onnx:" in printed

    image = torch.rand(3, 256, 256) * 255
    record = {"image": image, "original_size": (256, 256), "point_coords": torch.tensor([[[60.0, 80.0], [200.0, 40.0]]]), "point_labels": torch.tensor([[1, 0]])}
    with torch.no_grad():
        want = sam([record], multimask_output=True)[0]

    # official layout: exactly the plain model's keys, loaded strictly, same outputs as the LoRA model
    official = torch.load(tmp_path / "out" / "sam_official.pth", weights_only=True)
    assert set(official) == set(build_sam_by_name(SIZE_NAME).state_dict())
    plain = build_sam_by_name(SIZE_NAME, checkpoint=tmp_path / "out" / "sam_official.pth").eval()
    with torch.no_grad():
        got = plain([record], multimask_output=True)[0]
    assert (got["low_res_logits"] - want["low_res_logits"]).abs().max() < 1e-4

    # Hugging Face layout, read by transformers itself
    transformers = pytest.importorskip("transformers")
    hf_model = transformers.SamModel.from_pretrained(tmp_path / "out" / "huggingface").eval()
    with torch.no_grad():
        hf = hf_model(
            pixel_values=sam.preprocess(image)[None],
            input_points=record["point_coords"][None],
            input_labels=record["point_labels"][None],
            multimask_output=True,
        )
    assert (hf.pred_masks[0] - want["low_res_logits"]).abs().max() < 1e-4
    assert (hf.iou_scores[0] - want["iou_predictions"]).abs().max() < 1e-4

    # transformers' own preprocessing from the folder (offline): the same pixels and prompt
    # coordinates as ours, so SamProcessor + SamModel give the exported model's masks
    processor = transformers.SamProcessor.from_pretrained(tmp_path / "out" / "huggingface", local_files_only=True)
    pixels = image.round().to(torch.uint8)
    inputs = processor(images=pixels.permute(1, 2, 0).numpy(), input_points=[[[[60.0, 80.0], [200.0, 40.0]]]], input_labels=[[[1, 0]]], return_tensors="pt")
    torch.testing.assert_close(inputs["pixel_values"][0], sam.preprocess(pixels.float()), rtol=0, atol=1e-5)
    with torch.no_grad():
        via_processor = hf_model(**{k: v for k, v in inputs.items() if k in ("pixel_values", "input_points", "input_labels")}, multimask_output=True)
        mine = sam([{**record, "image": pixels.float()}], multimask_output=True)[0]
    assert (via_processor.pred_masks[0] - mine["low_res_logits"]).abs().max() < 1e-4
    full = processor.image_processor.post_process_masks(via_processor.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])
    assert tuple(full[0].shape[-2:]) == (256, 256)
    wide = processor(images=np.zeros((128, 512, 3), np.uint8), input_points=[[[[400.0, 100.0]]]], return_tensors="pt")
    assert wide["pixel_values"].shape[-2:] == (256, 256) and wide["input_points"][0, 0, 0].tolist() == [200.0, 50.0]
    # every file with the permissions the umask gives (safetensors alone leaves model.safetensors 0600)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out" / "huggingface").iterdir()}
    assert modes == dict.fromkeys(["config.json", "model.safetensors", "preprocessor_config.json"], 0o666 & ~UMASK)

    # ONNX through ONNX Runtime, against the fine-tuned model's decoder in PyTorch
    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "sam_decoder.onnx"), providers=["CPUExecutionProvider"])
    reference = onnx_module(sam, return_single_mask=False)
    for num_points in (1, 4):
        inputs = example_inputs(sam, num_points=num_points, seed=num_points)
        outputs = session.run(list(OUTPUT_NAMES), {k: v.numpy() for k, v in inputs.items()})
        with torch.no_grad():
            expected = reference(**inputs)
        for got_array, want_tensor in zip(outputs, expected):
            assert np.abs(got_array - want_tensor.numpy()).max() < 1e-3


def test_export_refuses_unreadable_checkpoint_in_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "bad.ckpt").write_text("not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "bad.ckpt"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "bad.ckpt is not a readable SAM checkpoint" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_export_refuses_to_replace_an_earlier_export_unless_told(tmp_path: Path, capsys) -> None:
    torch.set_num_threads(1)
    _lora_checkpoint(tmp_path / "run.ckpt")
    export = ["--checkpoint", str(tmp_path / "run.ckpt"), "--out", str(tmp_path / "out"), "--formats", "official"]
    main(export)
    earlier = (tmp_path / "out" / "sam_official.pth").read_bytes()
    (tmp_path / "other.ckpt").write_text("not a checkpoint")  # refused before the checkpoint is read
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*export[:1], str(tmp_path / "other.ckpt"), *export[2:]])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err, err
    assert f"{tmp_path / 'out' / 'sam_official.pth'} already exist" in err and "--overwrite" in err, err
    assert (tmp_path / "out" / "sam_official.pth").read_bytes() == earlier
    main([*export, "--overwrite"])
    assert "official:" in capsys.readouterr().out
