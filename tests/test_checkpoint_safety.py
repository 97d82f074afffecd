"""Checkpoints run no code unless trusted, and a file that is not a checkpoint fails in one line."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from segany_train.config_paths import CONFIG_DIR
from segany_train.evaluation import cli as evaluation_cli
from segany_train.inference import amg_cli
from segany_train.inference.cli_options import build_model
from segany_train.model import SamCheckpointError, build_sam, build_sam_from_checkpoint
from segany_train.model.checkpoint import load_checkpoint_file
from segany_train.training.run import train
from tests.conftest import TINY, tiny_training_overrides
from tests.shards import write_shards


class _Payload:
    """Unpickling this object creates the file `marker` (os.system would do anything else)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def malicious_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """A Lightning-looking checkpoint (real SAM weights) whose pickle also creates a marker file."""
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.ckpt"
    weights = {f"sam.{k}": v for k, v in build_sam(TINY).state_dict().items()}
    torch.save({"state_dict": weights, "hyper_parameters": _Payload(marker)}, path)
    assert not marker.exists()
    return path, marker


def test_malicious_checkpoint_is_refused_without_running_its_payload(tmp_path):
    path, marker = malicious_checkpoint(tmp_path)
    with pytest.raises(SamCheckpointError, match="trust"):
        build_sam_from_checkpoint(path)
    assert not marker.exists()


class _BlockedModuleCall:
    """Unpickling this calls os.getcwd: torch words the refusal of a blocked module differently."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_the_refusal_names_a_blocked_modules_global_and_the_trust_option(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weights": torch.zeros(1), "extra": _BlockedModuleCall()}, path)
    with pytest.raises(SamCheckpointError) as refused:
        build_sam_from_checkpoint(path)
    message = str(refused.value)
    assert f"it pickles {os.name}.getcwd" in message and "--trust-checkpoint" in message and "\n" not in message


@pytest.mark.parametrize("cli", ["segany_train.inference.amg_cli", "segany_train.export.onnx_export"])
def test_clis_refuse_malicious_checkpoint_in_one_line(tmp_path, cli):
    path, marker = malicious_checkpoint(tmp_path)
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photos / "a.png")
    args = [str(photos), "--out", str(tmp_path / "out")] if cli.endswith("amg_cli") else ["--output", str(tmp_path / "m.onnx")]
    run = subprocess.run(
        [sys.executable, "-m", cli, *args, "--checkpoint", str(path)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode != 0
    assert not marker.exists()
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "--trust-checkpoint" in lines[0], run.stderr


def test_trusted_checkpoint_is_unpickled(tmp_path):
    path, marker = malicious_checkpoint(tmp_path)
    with pytest.warns(UserWarning, match="trusted"):
        checkpoint = load_checkpoint_file(path, trust=True)
    assert marker.exists()
    assert build_sam_from_checkpoint(checkpoint).config.encoder_embed_dim == TINY.encoder_embed_dim


def bad_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.pth"
    torch.save(build_sam(TINY).state_dict(), good)
    files = {
        "empty": tmp_path / "empty.pth",
        "text": tmp_path / "text.pth",
        "random": tmp_path / "random.pth",
        "truncated": tmp_path / "truncated.pth",
        "tensor": tmp_path / "tensor.pth",
        "no_sam_keys": tmp_path / "other.pth",
    }
    files["empty"].write_bytes(b"")
    files["text"].write_text("model weights go here\n")
    files["random"].write_bytes(os.urandom(4096))
    files["truncated"].write_bytes(good.read_bytes()[:3000])
    torch.save(torch.zeros(3), files["tensor"])
    torch.save({"layer.weight": torch.zeros(2)}, files["no_sam_keys"])
    return files


def test_unreadable_checkpoints_give_one_error_naming_the_file(tmp_path):
    for kind, path in bad_files(tmp_path).items():
        with pytest.raises(SamCheckpointError) as error:
            build_model(path, None)
        assert str(path) in str(error.value), kind
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("kind", ["empty", "random", "truncated"])
def test_amg_and_eval_report_unreadable_checkpoint_in_one_line(tmp_path, kind):
    path = bad_files(tmp_path)[kind]
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    shards = str(write_shards(tmp_path / "shards", 1, 1)[0])
    for main, args in (
        (amg_cli.main, [str(tmp_path), "--out", str(tmp_path / "out")]),
        (evaluation_cli.main, ["--shards", shards, "--out", str(tmp_path / "eval")]),
    ):
        with pytest.raises(SystemExit) as exit_:
            main([*args, "--checkpoint", str(path)])
        message = str(exit_.value.code)
        assert str(path) in message and "\n" not in message


def test_a_lightning_checkpoint_of_this_project_loads_without_trust(tmp_path):
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose(
            "train",
            overrides=[
                *tiny_training_overrides(tmp_path / "corpus"),
                "prompting.num_iterations=2",
                "trainer.max_steps=2",
                "trainer.limit_val_batches=0",
                "callbacks.checkpoint_every_n_steps=2",
                "logger=csv",
                f"run_dir={tmp_path / 'run'}",
            ],
        )
    train(cfg)
    sam = build_sam_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert sam.config.image_size == 256


def test_segany_train_reports_unreadable_checkpoint_in_one_line(tmp_path):
    path = bad_files(tmp_path)["truncated"]
    run = subprocess.run(
        [sys.executable, "-m", "segany_train.train", *tiny_training_overrides(tmp_path / "corpus"),
         f"model.checkpoint={path}", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode != 0
    assert "Traceback" not in run.stderr and str(path) in run.stderr.strip().splitlines()[-1], run.stderr[-2000:]
