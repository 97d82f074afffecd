"""Resuming a run keeps its metric history; relaunching a run directory with an incompatible model, or
over a checkpoint that is not one, fails before anything in it is written; a full disk leaves no
truncated checkpoint and is said in one line."""

import csv
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_training_overrides
from tests.full_disk import FullDirectory


def run_training(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "segany_train.train", *tiny_training_overrides(tmp_path / "corpus")]
    command += ["prompting.num_iterations=2", "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1"]
    command += ["callbacks.checkpoint_every_n_steps=1", "logger=csv", f"hydra.run.dir={tmp_path / 'run'}", *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def logged_steps(run_dir: Path) -> set[int]:
    steps = set()
    for path in run_dir.glob("csv/*/metrics.csv"):
        with path.open() as file:
            steps |= {int(row["step"]) for row in csv.DictReader(file) if row.get("train/loss")}
    return steps


def test_resuming_keeps_the_metric_history_and_another_model_size_writes_nothing(tmp_path):
    first = run_training(tmp_path, "trainer.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    before = logged_steps(tmp_path / "run")
    assert len(before) == 2
    resumed = run_training(tmp_path, "trainer.max_steps=4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert before < logged_steps(tmp_path / "run") and len(logged_steps(tmp_path / "run")) == 4

    config = (tmp_path / "run" / "config.yaml").read_bytes()
    other = run_training(tmp_path, "trainer.max_steps=6", "model=vit_t_256")
    assert other.returncode != 0
    assert "Traceback" not in other.stderr and "vit_t_256" in other.stderr.strip().splitlines()[-1], other.stderr[-3000:]
    assert (tmp_path / "run" / "config.yaml").read_bytes() == config


def test_a_garbage_last_checkpoint_is_refused_in_one_line_naming_it(tmp_path):
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"PK\x03\x04 not a checkpoint, cut short by a crash" * 10)
    refused = run_training(tmp_path, "trainer.max_steps=2")
    assert refused.returncode != 0
    assert "Traceback" not in refused.stderr, refused.stderr[-3000:]
    message = refused.stderr.strip().splitlines()[-1]
    assert str(last) in message and "move it out of the run directory (or delete it)" in message, message
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before anything was written


def run_training_here(tmp_path: Path, monkeypatch, *overrides: str) -> None:
    """segany-train's entry in this process (so that the file system can be made full)."""
    from segany_train.train import main

    arguments = [*tiny_training_overrides(tmp_path / "corpus"), "prompting.num_iterations=2", "trainer.limit_val_batches=0"]
    arguments += ["callbacks.checkpoint_every_n_steps=1", "logger=csv", f"hydra.run.dir={tmp_path / 'run'}", *overrides]
    monkeypatch.setattr(sys, "argv", ["segany-train", *arguments])
    main()


def test_a_full_disk_leaves_no_truncated_checkpoint_and_says_so_in_one_line(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    with monkeypatch.context() as first:
        run_training_here(tmp_path, first, "trainer.max_steps=1")
    checkpoints = tmp_path / "run" / "checkpoints"
    last = (checkpoints / "last.ckpt").read_bytes()
    # the system temp directory on another file system than the run (a tmpfs /tmp, a container's)
    system_temp = Path(tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(system_temp))
    FullDirectory(checkpoints, room=4096, monkeypatch=monkeypatch)
    try:
        with pytest.raises(SystemExit) as failed:
            run_training_here(tmp_path, monkeypatch, "trainer.max_steps=2")
    finally:
        monkeypatch.undo()
        shutil.rmtree(system_temp)
    assert (checkpoints / "last.ckpt").read_bytes() == last  # the earlier checkpoint is intact
    for path in checkpoints.iterdir():  # whatever carries a checkpoint's name is a whole checkpoint
        assert path.suffix == ".ckpt", path
        torch.load(path, map_location="cpu", weights_only=True)
    message = str(failed.value.code)
    assert message.startswith("segany-train: error: disk full writing ") and "\n" not in message, message
    assert str(checkpoints / "epoch=0-step=2.ckpt") in message and "free space and rerun" in message, message
