"""What `segany-engine` shows while it runs: a progress line per step, a summary per round, engine.log,
and no Lightning warning (segany_train/training/lightning_warnings.py)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from data_engine.progress import CycleProgress, PlannedStep, describe_step
from tests.test_engine import engine_overrides

ROOT = Path(__file__).resolve().parents[1]
SMALL_CYCLE = ["stage1.rounds=1", "stage2.rounds=1", "control.enabled=false", "threshold_sweep.enabled=false"]


def _engine(tmp_path: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "data_engine.engine", *engine_overrides(tmp_path, tmp_path / "corpus", SMALL_CYCLE)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, subprocess.CompletedProcess]:
    tmp_path = tmp_path_factory.mktemp("engine_console")
    first = _engine(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    again = _engine(tmp_path)  # a finished run: only the report is written again
    assert again.returncode == 0, again.stderr[-3000:]
    return tmp_path / "run", first, again


def test_no_lightning_warning_reaches_the_console(engine_run):
    _, first, _ = engine_run
    output = first.stdout + first.stderr
    # Python prints a warning as "<file>.py:<line>: <message>", here a file of Lightning's (or of
    # torch's, for its deprecation of what Lightning calls); Lightning's tips name litlogger. The
    # project's own warnings (a sample skipped, with why) stay.
    assert not re.search(r"/(lightning|lightning_fabric|pytorch_lightning|torch)/\S+\.py:\d+: ", output), output[:3000]
    assert "litlogger" not in output
    assert "Total params" not in output  # no model summary per retrain either


def test_every_step_gets_a_progress_line_and_every_round_a_summary(engine_run):
    run_dir, first, again = engine_run
    steps = re.findall(r"\[step (\d+)/(\d+), \d+%\] (.*?) \| .* elapsed, ETA", first.stdout)
    assert [int(k) for k, _, _ in steps] == list(range(1, 12)) and {n for _, n, _ in steps} == {"11"}
    assert steps[2][2] == "stage1 round 1/1: train (2 steps)" and steps[-1][2] == "stage3: eval"
    assert "ETA ~" in first.stdout
    assert re.search(r"stage1 round 1/1 done: 4 images, [\d.]+ masks/image, .*held-out mIoU@1 [\d.]+ \[[\d.]+-[\d.]+\] \(seed [\d.]+", first.stdout)
    assert re.search(r"final done: held-out mIoU@1", first.stdout)
    # the engine's log holds the same lines, and a rerun says what was done before
    log = (run_dir / "engine.log").read_text()
    assert "[step 11/11, 90%] stage3: eval" in log and "stage2 round 1/1 done:" in log
    assert "resuming: 11 of 11 steps were done before" in again.stdout and "[step" not in again.stdout


def test_the_time_left_is_estimated_per_kind_of_step_and_training_per_optimiser_step():
    plan = [PlannedStep("seed/eval"), PlannedStep("stage1/round1/train", 10), PlannedStep("stage1/round1/eval"), PlannedStep("control/train", 40)]
    progress = CycleProgress(plan, {}, set(), {"stage1": 1})
    assert progress.remaining_seconds(plan) is None  # nothing measured yet
    progress.wall_seconds.update({"seed/eval": 4.0, "stage1/round1/train": 20.0})
    # eval: 4 s each; training: 2 s per optimiser step
    assert progress.remaining_seconds(plan[2:]) == pytest.approx(4.0 + 40 * 2.0)
    assert describe_step("stage2/round3/detector", {"stage2": 5}) == "stage2 round 3/5: detector"
    assert describe_step("stage3/generate", {}) == "stage3: generate"


def test_label_studio_requests_are_not_logged_one_line_each():
    from hydra import compose, initialize_config_dir

    from segany_train.config_paths import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("engine/cycle", return_hydra_config=True)
    # httpx logs every request at INFO; segany-engine's log (Hydra's job logging) keeps its warnings only
    assert cfg.hydra.job_logging.loggers.httpx.level == "WARNING"
    assert cfg.hydra.job_logging.root.handlers == ["console", "file"]  # the console and run_dir/engine.log
