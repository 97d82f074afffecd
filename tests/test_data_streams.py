"""The training stream is a function of (seed, rank, worker, the step training resumes at), with a real
Lightning Trainer resuming from a real checkpoint: a resumed run draws new samples, equal seeds draw
equal ones, and split_repeat visits its shards in a new seeded order every epoch."""

import warnings

import lightning as L
import pytest
import torch

from segany_train.data.datamodule import SA1BDataModule
from segany_train.data.pipeline import sam_sample_pipeline
from segany_train.data.sam_sample import SamSampleConfig
from tests.shards import write_shards

AUGMENTED = SamSampleConfig(image_size=128, mask_size=32, max_masks=2, large_scale_jitter=True, horizontal_flip=True)


class DrawRecorder(L.LightningModule):
    """One trained parameter; records what every training batch drew (keys, chosen masks, pixels)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.draws: list[tuple] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.draws.append((tuple(batch["keys"]), tuple(batch["annotation_ids"].tolist()), int(batch["image"].sum())))
        return (self.weight**2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("shards")
    write_shards(directory, num_images=16, per_shard=2)
    return str(directory / "sa_*.tar")


def _fit(shards: str, root, *, max_steps: int, seed: int = 0, shuffle_buffer: int = 0, ckpt_path=None) -> list[tuple]:
    """Draws of the training steps this fit runs; the checkpoint goes to root/last.ckpt."""
    module = DrawRecorder()
    data = SA1BDataModule(train_shards=shards, sample=AUGMENTED, batch_size=2, shuffle_buffer=shuffle_buffer, seed=seed)
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and logging
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    trainer.save_checkpoint(root / "last.ckpt")
    return module.draws


def test_a_resumed_run_draws_new_samples_and_equal_seeds_draw_equal_ones(shards, tmp_path):
    first = _fit(shards, tmp_path / "a", max_steps=3)
    resumed = _fit(shards, tmp_path / "a", max_steps=6, ckpt_path=tmp_path / "a" / "last.ckpt")
    assert len(first) == len(resumed) == 3
    assert resumed != first  # not a replay of what the first run saw
    # the same seed, resumed at the same step: the same samples and augmentations
    assert _fit(shards, tmp_path / "b", max_steps=3) == first
    assert _fit(shards, tmp_path / "b", max_steps=6, ckpt_path=tmp_path / "b" / "last.ckpt") == resumed
    assert _fit(shards, tmp_path / "c", max_steps=3, seed=1) != first


def test_the_shuffle_buffer_is_seeded(shards, tmp_path):
    assert _fit(shards, tmp_path / "a", max_steps=4, shuffle_buffer=8) == _fit(shards, tmp_path / "b", max_steps=4, shuffle_buffer=8)


def _epochs(shards_pattern: str, seed: int, epochs: int) -> list[list[str]]:
    from segany_train.data.pipeline import expand_shard_patterns

    dataset = sam_sample_pipeline(
        expand_shard_patterns(shards_pattern), AUGMENTED, mode="split_repeat", samples_per_worker=16, seed=seed
    )
    return [[sample["key"] for sample in dataset] for _ in range(epochs)]


def test_split_repeat_visits_the_shards_in_a_new_seeded_order_each_epoch(shards):
    epochs = _epochs(shards, seed=0, epochs=3)
    assert all(sorted(keys) == sorted(f"sa_{i}" for i in range(16)) for keys in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert _epochs(shards, seed=0, epochs=3) == epochs
