"""experiment=finetune_folder through the real Hydra config and Lightning Trainer, shrunk: a folder of
label-map PNGs converted once, the shipped seed scored before and after, the report written, and a
rerun resuming with the conversion and the "before" figures reused."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from segany_train.finetune_folder import CHECKPOINT_EVERY, MODES, FinetuneConfigError, apply_finetune_mode, finetune_folder, folder_source
from segany_train.inference.overlay_panels import GAP, TITLE_HEIGHT
from segany_train.config_paths import CONFIG_DIR
from segany_train.training.run import build_model
from segany_train.data.synthetic import generate_label_map
from segany_train.model import build_sam_from_checkpoint
from segany_train.model.checkpoint import load_checkpoint_file


def _write_folder(root: Path, count: int = 8) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(count):
        image, labels = generate_label_map(i, seed=3, size=96, min_objects=2, max_objects=3, min_radius=0.15, max_radius=0.3, style="fluorescent")
        Image.fromarray(image).save(root / "images" / f"cell{i}.png")
        Image.fromarray(labels).save(root / "labels" / f"cell{i}.png")
    return root


def _compose(folder: Path, run_dir: Path, *extra: str):
    overrides = [
        "experiment=finetune_folder",
        f"data.folder={folder}",
        f"run_dir={run_dir}",
        "data.val_fraction=0.25",
        "data.batch_size=2",
        "data.max_masks=2",
        "data.num_workers=0",
        "prompting.num_iterations=2",
        "prompting.num_correction_clicks=1",
        "callbacks.progress_bar=false",
        "callbacks.checkpoint_every_n_steps=1",
        "logger.log_images_every_n_steps=0",
        "finetune.eval_max_images=2",
        "finetune.overlays=1",
        *extra,
    ]
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        return compose("train", overrides=overrides)


def test_modes_set_what_trains(tmp_path: Path) -> None:
    counts = {}
    for mode in MODES:
        cfg = _compose(tmp_path, tmp_path / "run", f"finetune.mode={mode}", "model.checkpoint=null")
        apply_finetune_mode(cfg)
        sam = build_model(cfg.model)
        trainable = {name.split(".")[0] for name, p in sam.named_parameters() if p.requires_grad}
        counts[mode] = sum(p.numel() for p in sam.parameters() if p.requires_grad)
        if mode == "decoder":
            assert trainable == {"mask_decoder"}
        elif mode == "lora":
            lora = {name for name, p in sam.image_encoder.named_parameters() if p.requires_grad}
            assert lora and all("lora_" in name for name in lora) and trainable == {"image_encoder", "mask_decoder"}
        else:
            assert trainable == {"image_encoder", "prompt_encoder", "mask_decoder"}
    assert counts["decoder"] < counts["lora"] < counts["full"]
    cfg = _compose(tmp_path, tmp_path / "run", "finetune.mode=half")
    with pytest.raises(FinetuneConfigError, match="finetune.mode must be one of"):
        apply_finetune_mode(cfg)


def test_layout_is_detected_or_named(tmp_path: Path) -> None:
    folder = _write_folder(tmp_path / "data", count=1)
    assert folder_source(_compose(folder, tmp_path / "run").data).layout == "label-maps"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FinetuneConfigError, match="cannot tell the layout"):
        folder_source(_compose(tmp_path / "empty", tmp_path / "run").data)


def test_finetune_folder_runs_reports_and_resumes(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    folder = _write_folder(tmp_path / "data")
    run_dir = tmp_path / "run"
    summary = finetune_folder(_compose(folder, run_dir, "finetune.mode=lora", "trainer.max_steps=2"))
    report_dir = run_dir / "finetune"
    assert summary["steps"] == 2 and summary["mode"] == "lora"
    assert summary["start_checkpoint"].endswith("engine_seed.pt")
    for key in ("before", "after"):
        assert 0.0 <= summary[key]["miou_1"] <= 1.0 and len(summary[key]["miou_1_ci"]) == 2
        assert summary[key]["eval_images"] == 2
    assert 0 < summary["trainable_parameters"] < summary["total_parameters"]
    report = (report_dir / "report.md").read_text()
    assert "| before (start) |" in report and "| after (fine-tuned) |" in report and "mIoU@1" in report
    # GT | before | after, titled, each 96-px image enlarged 4x
    assert len(summary["overlays"]) == 1 and Image.open(summary["overlays"][0]).size == (3 * 384 + 2 * GAP, TITLE_HEIGHT + 384)
    assert sorted(p.name for p in (run_dir / "data").iterdir()) == ["conversion.json", "train", "val"]
    # the fine-tuned weights differ from the seed's only where training reached (LoRA merged: the encoder's qkv, and the decoder)
    seed = build_sam_from_checkpoint(load_checkpoint_file(Path(summary["start_checkpoint"]))).state_dict()
    tuned = build_sam_from_checkpoint(load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")).state_dict()
    changed = {k for k in seed if not torch.equal(seed[k], tuned[k])}
    assert changed and all(k.startswith("mask_decoder.") or k.endswith("attn.qkv.weight") for k in changed)
    assert any(k.endswith("attn.qkv.weight") for k in changed)
    before_mtime = (report_dir / "before.json").stat().st_mtime_ns
    converted_mtime = (run_dir / "data" / "conversion.json").stat().st_mtime_ns
    again = finetune_folder(_compose(folder, run_dir, "finetune.mode=lora", "trainer.max_steps=3"))
    assert again["steps"] == 3  # resumed from step 2
    assert (report_dir / "before.json").stat().st_mtime_ns == before_mtime
    assert (run_dir / "data" / "conversion.json").stat().st_mtime_ns == converted_mtime
    assert again["before"] == summary["before"]
    assert np.isfinite(again["after"]["miou_5"])


def test_segany_train_entry_refuses_a_missing_folder_in_one_line(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "segany_train.train", "experiment=finetune_folder", f"data.folder={tmp_path / 'nowhere'}", f"run_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == f"segany-train: error: data.folder not found: {tmp_path / 'nowhere'}"


def test_segany_finetune_wrapper_prints_the_report(tmp_path: Path, capsys) -> None:
    from segany_train.finetune_folder import main

    torch.set_num_threads(1)
    folder = _write_folder(tmp_path / "data", count=4)
    shrink = ["data.val_fraction=0.25", "data.batch_size=2", "data.max_masks=2", "data.num_workers=0", "prompting.num_iterations=2",
              "prompting.num_correction_clicks=1", "callbacks.progress_bar=false", "logger.log_images_every_n_steps=0",
              "finetune.overlays=0"]
    main([str(folder), "--mode", "decoder", "--run-dir", str(tmp_path / "run"), "--max-steps", "1", "--max-time", "00:00:30:00", *shrink])
    printed = capsys.readouterr().out
    assert "Mode **decoder**" in printed and "| after (fine-tuned) |" in printed
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    trainer = OmegaConf.load(tmp_path / "run" / "config.yaml").trainer
    assert trainer.max_steps == 1 and trainer.max_time == "00:00:30:00"  # what the Trainer was given


def test_segany_finetune_help_offers_a_step_and_a_time_limit(capsys) -> None:
    from segany_train.finetune_folder import main

    with pytest.raises(SystemExit):
        main(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--max-steps MAX_STEPS" in shown and "(default 300," in shown
    assert "--max-time DD:HH:MM:SS" in shown and "00:00:10:00 is 10 minutes" in shown
    assert f"(every {CHECKPOINT_EVERY} steps)" in shown
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("train", overrides=["experiment=finetune_folder"])
    assert cfg.trainer.max_steps == 300 and cfg.callbacks.checkpoint_every_n_steps == CHECKPOINT_EVERY  # the help's figures
    for bad in ("10:00", "00:25:00:00", "00:00:00:00", "1d"):
        with pytest.raises(SystemExit):
            main(["folder", "--max-time", bad])
        assert "DD:HH:MM:SS" in capsys.readouterr().err or bad == "00:00:00:00"


def test_a_folder_without_usable_images_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "labels").mkdir()
    with pytest.raises(FinetuneConfigError, match="no image"):
        finetune_folder(_compose(tmp_path / "data", tmp_path / "run"))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "data" / "images" / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "data" / "labels" / "a.png")  # empty
    with pytest.warns(UserWarning), pytest.raises(FinetuneConfigError, match="no usable image.*empty=1"):
        finetune_folder(_compose(tmp_path / "data", tmp_path / "run2"))


def test_one_image_is_too_few_and_says_how_many_are_needed(tmp_path: Path) -> None:
    folder = _write_folder(tmp_path / "data", count=1)
    with pytest.raises(FinetuneConfigError, match=r"too few images: 1 usable, 1 to train on and 0 held out .*at least 2 usable images"):
        finetune_folder(_compose(folder, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()
    folder = _write_folder(tmp_path / "more", count=3)  # enough images, none held out
    with pytest.raises(FinetuneConfigError, match=r"3 to train on and 0 held out .*data.val_fraction above 0 \(it is 0.0\)"):
        finetune_folder(_compose(folder, tmp_path / "run2", "data.val_fraction=0.0"))
