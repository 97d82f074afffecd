"""Resuming a run keeps its metric history; relaunching a run directory with an incompatible model
fails before anything in it is written."""

import csv
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import tiny_training_overrides


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
