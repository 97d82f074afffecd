"""The training entry point: real Hydra composition, real Lightning Trainer, resume after SIGKILL, DDP."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from segany_train.config_paths import CONFIG_DIR
from segany_train.data.synthetic import write_synthetic_corpus
from segany_train.prompting.rollout import RolloutConfig
from segany_train.training.optim import OptimConfig
from segany_train.training.run import _dataclass_from, build_datamodule, build_logger, build_model, train
from tests.conftest import tiny_training_overrides
from tests.shards import write_release_tars

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("synthetic")
    write_synthetic_corpus(
        directory, num_images=16, size=128, images_per_shard=2, min_objects=3, max_objects=8, progress=False
    )
    return directory


def _shrunk(corpus: Path, run_dir: Path) -> list[str]:
    """Overrides that shrink tiny_synthetic_cpu to seconds."""
    return [*tiny_training_overrides(corpus), "prompting.num_iterations=3", "trainer.limit_val_batches=1"]


def _compose(overrides: list[str]):
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_into_valid_settings(experiment, tmp_path):
    cfg = _compose([f"experiment={experiment}", f"run_dir={tmp_path}"])
    _dataclass_from(OptimConfig, cfg.optim)
    _dataclass_from(RolloutConfig, cfg.prompting)
    assert cfg.run_name == experiment
    if cfg.model.checkpoint is None:
        with torch.device("meta"):
            sam = build_model(cfg.model)
        assert sam.config.encoder_drop_path_rate == cfg.model.drop_path


def test_the_run_seed_reaches_the_data_stream(corpus, tmp_path):
    cfg = _compose(_shrunk(corpus, tmp_path) + ["seed=7", f"run_dir={tmp_path}"])
    with torch.device("meta"):
        sam = build_model(cfg.model)
    assert build_datamodule(cfg, sam).seed == 7


def test_the_synthetic_corpus_is_written_in_prepare_data_not_by_every_rank(tmp_path):
    cfg = _compose(_shrunk(tmp_path / "corpus", tmp_path) + [f"run_dir={tmp_path}"])
    with torch.device("meta"):
        datamodule = build_datamodule(cfg, build_model(cfg.model))
    assert not (tmp_path / "corpus").exists()  # building the DataModule happens in every rank
    datamodule.prepare_data()  # Lightning calls it in one process per node, then a barrier
    datamodule.setup("fit")
    assert len(datamodule.train_urls) == 6 and len(datamodule.val_urls) == 2


def test_fast_dev_run(corpus, tmp_path):
    cfg = _compose(_shrunk(corpus, tmp_path) + ["debug=fast", f"run_dir={tmp_path}"])
    metrics = train(cfg)
    assert "val/miou_1_clicks" in metrics and 0.0 <= metrics["val/miou_1_clicks"] <= 1.0
    assert (tmp_path / "config.yaml").exists()


def _last_step(checkpoint: Path) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"]


def test_a_run_killed_with_sigkill_resumes_with_the_same_command(corpus, tmp_path):
    command = [sys.executable, "-m", "segany_train.train", *_shrunk(corpus, tmp_path)]
    command += ["trainer.max_steps=12", "trainer.val_check_interval=1000", "callbacks.checkpoint_every_n_steps=2"]
    command += [f"hydra.run.dir={tmp_path / 'run'}"]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert last.exists(), first.stdout.read().decode()[-2000:]
    killed_at = _last_step(last)
    assert 0 < killed_at < 12
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Restoring states from the checkpoint path" in second.stdout + second.stderr
    assert _last_step(last) == 12


def test_ddp_with_two_cpu_processes(tmp_path):
    # a corpus not written yet: rank 0 writes it in prepare_data while rank 1 waits at the barrier
    command = [sys.executable, "-m", "segany_train.train", *_shrunk(tmp_path / "corpus", tmp_path)]
    command += ["trainer=ddp_cpu", "trainer.max_steps=3", "trainer.val_check_interval=3", "callbacks.checkpoint_every_n_steps=3"]
    command += [f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "GLOBAL_RANK: 1" in output and "MEMBER: 2/2" in output
    assert _last_step(tmp_path / "run" / "checkpoints" / "last.ckpt") == 3


def test_the_paper_recipe_starts_on_tars_as_released(tmp_path):
    # SA-1B as downloaded: no manifest, 2 validation shards for the recipe's 8 workers
    write_release_tars(tmp_path / "sa1b", [3, 3, 2, 2], height=96, width=144)
    command = [sys.executable, "-m", "segany_train.train", "experiment=sam_vit_b_sa1b", "model=vit_t_256", "trainer=cpu"]
    command += ["trainer.max_steps=3", "logger=csv", f"hydra.run.dir={tmp_path / 'run'}"]
    command += [f"data.train_shards='{tmp_path}/sa1b/sa_{{000000..000001}}.tar'"]
    command += [f"data.val_shards='{tmp_path}/sa1b/sa_{{000002..000003}}.tar'"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert _last_step(tmp_path / "run" / "checkpoints" / "last.ckpt") == 3


def test_wandb_logs_offline_without_a_login_and_keeps_its_run_id(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = _compose(["logger=wandb", f"run_dir={tmp_path}"])
    logger = build_logger(cfg, tmp_path)
    logger.log_metrics({"train/loss": 1.0}, step=0)
    run_id = logger.experiment.id
    logger.experiment.finish()
    assert (tmp_path / "wandb_id").read_text() == run_id
    assert any(p.name.startswith("offline-run-") for p in (tmp_path / "wandb").iterdir())
    again = build_logger(cfg, tmp_path)
    assert again.experiment.id == run_id
    again.experiment.finish()
