"""Checkpoint files: one full copy per save, `last.ckpt` a link to it (a vit_h checkpoint with AdamW's
moments is ~7.6 GB), the GPU recipes saving every 1000 steps or more, and SLURM's warning signal long
enough for one vit_h save (sized from `benchmarks/checkpoint_save.py`'s measured vit_b save)."""

import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from segany_train.config_paths import CONFIG_DIR
from segany_train.data.synthetic import write_synthetic_corpus
from segany_train.training.run import train
from tests.conftest import tiny_training_overrides

ROOT = Path(__file__).resolve().parents[1]


def _compose(overrides: list[str]):
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        return compose("train", overrides=overrides)


def test_last_ckpt_is_a_link_to_the_one_full_checkpoint(tmp_path):
    corpus = tmp_path / "corpus"
    write_synthetic_corpus(corpus, num_images=16, size=128, images_per_shard=2, min_objects=3, max_objects=8, progress=False)
    overrides = [*tiny_training_overrides(corpus), "prompting.num_iterations=2", "trainer.limit_val_batches=0"]
    overrides += ["trainer.max_steps=4", "callbacks.checkpoint_every_n_steps=2", f"run_dir={tmp_path / 'run'}"]
    train(_compose(overrides))
    directory = tmp_path / "run" / "checkpoints"
    full = [p for p in directory.iterdir() if not p.is_symlink()]
    assert len(full) == 1, f"{len(full)} full checkpoint files: {sorted(p.name for p in full)}"
    last = directory / "last.ckpt"
    assert last.is_symlink() and last.resolve() == full[0].resolve()
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4


@pytest.mark.parametrize("experiment", ["sam_vit_b_sa1b", "sam_vit_h_sa1b"])
def test_gpu_recipes_save_every_1000_steps_or_more_and_link_last(experiment, tmp_path):
    cfg = _compose([f"experiment={experiment}", f"run_dir={tmp_path}"])
    assert cfg.callbacks.checkpoint_every_n_steps >= 1000
    assert cfg.callbacks.save_last == "link"


def test_the_slurm_warning_signal_leaves_time_for_one_vit_h_save():
    # measured: a 1.13 GB vit_b checkpoint reached a local disk in 3.4 s (332 MB/s); vit_h's 7.7 GB
    # are ~23 s at that rate. The signal covers ten times that, plus a step.
    sbatch = (ROOT / "slurm" / "train.sbatch").read_text()
    seconds = int(re.search(r"^#SBATCH --signal=SIGUSR1@(\d+)$", sbatch, re.MULTILINE).group(1))
    assert seconds >= 10 * 23 + 30
