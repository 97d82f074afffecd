"""segany-engine refuses values that cannot work before any training starts."""

import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from data_engine.engine import run_engine
from data_engine.engine_config_check import EngineConfigError
from segany_train.model.seed_model import BUILTIN_PATH
from segany_train.config_paths import CONFIG_DIR
from tests.full_disk import FullDirectory


def engine_overrides(tmp_path) -> list[str]:
    return [f"run_dir={tmp_path / 'run'}", "progress=false", f"corpus.synthetic.directory={tmp_path / 'pool'}",
            f"seed_model.corpus.directory={tmp_path / 'public'}"]


@pytest.mark.parametrize(
    "override, named",
    [
        ("stage1.rounds=-1", "stage1.rounds"),
        ("annotator.target_iou=1.5", "annotator.target_iou"),
        ("annotator.target_iou=0", "annotator.target_iou"),
        ("stage3.generator.points_per_side=0", "points_per_side"),
        ("stage3.generator.pred_iou_thresh=nan", "pred_iou_thresh"),
        ("corpus.synthetic.num_images=-5", "num_images"),
        ("corpus.synthetic.images_per_shard=0", "images_per_shard"),
        ("eval.batch_size=0", "eval.batch_size"),
        ("eval.max_images=0", "eval.max_images"),
    ],
)
def test_engine_refuses_values_that_cannot_work_before_any_work(tmp_path, override, named):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose("engine/cycle", overrides=[*engine_overrides(tmp_path), override])
    with pytest.raises(EngineConfigError, match=named):
        run_engine(cfg)
    assert not (tmp_path / "pool").exists() and not (tmp_path / "public").exists()


def test_the_engine_command_prints_one_line_for_a_refused_value(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "data_engine.engine", *engine_overrides(tmp_path), "stage1.rounds=-1"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    lines = run.stderr.strip().splitlines()
    assert run.returncode != 0 and len(lines) == 1 and "stage1.rounds" in lines[0], run.stderr[-2000:]
    assert not (tmp_path / "pool").exists()


@pytest.mark.parametrize("option", ["stage3", "seed"])
def test_engine_refuses_an_unreadable_checkpoint_in_one_line(tmp_path, option):
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(os.urandom(1000))
    chosen = ["only=stage3", f"checkpoint={checkpoint}"] if option == "stage3" else [f"seed_model.checkpoint={checkpoint}"]
    run = subprocess.run(
        [sys.executable, "-m", "data_engine.engine", f"run_dir={tmp_path / 'run'}", *chosen,
         f"corpus.synthetic.directory={tmp_path / 'pool'}", f"seed_model.corpus.directory={tmp_path / 'public'}"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    lines = run.stderr.strip().splitlines()
    assert run.returncode != 0 and len(lines) == 1 and str(checkpoint) in lines[0], run.stderr[-2000:]


def test_the_engine_on_a_full_disk_says_so_in_one_line(tmp_path, monkeypatch):
    from data_engine.engine import main

    (tmp_path / "run").mkdir()
    FullDirectory(tmp_path / "run", room=0, monkeypatch=monkeypatch)
    monkeypatch.setattr(sys, "argv", [
        "segany-engine", f"run_dir={tmp_path / 'run'}", "only=stage3", f"checkpoint={BUILTIN_PATH}", "corpus.synthetic=null",
        f"corpus.shards={tmp_path}/pool/sa_000000.tar", "progress=false", "hydra.output_subdir=null", "hydra/job_logging=stdout",
    ])  # fmt: skip
    with pytest.raises(SystemExit) as failed:
        main()
    message = str(failed.value.code)
    assert message.startswith(f"segany-engine: error: disk full writing {tmp_path / 'run' / 'engine_config.json'} "), message
    assert "\n" not in message and "resumes" in message, message
