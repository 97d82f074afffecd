"""LightningDataModule over SA-1B-format shards, safe for multi-node training."""

import math
import os
import tarfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from webdataset.tariterators import base_plus_ext

from segany_train.data.pipeline import collate_sam_samples, expand_shard_patterns, sam_sample_pipeline
from segany_train.data.sam_sample import SamSampleConfig
from segany_train.data.shard_writer import read_manifest
from segany_train.data.synthetic import write_configured_corpus


def count_tar_samples(path: str | Path) -> int:
    """Samples in a local tar, from its member headers alone: tarfile seeks past each member's data,
    so nothing is read or decoded beyond the index. Members group into samples by key, as webdataset
    groups them. ValueError naming the file when it is not a whole tar (a truncated download)."""
    try:
        with tarfile.open(path, "r:") as tar:
            return len({base_plus_ext(member.name)[0] for member in tar if member.isfile()} - {None})
    except tarfile.TarError as error:
        raise ValueError(f"{path} is not a readable tar shard ({error}); download it again or leave it out") from None


def shard_sample_counts(urls: list[str]) -> list[int] | None:
    """Samples in each shard: its directory's manifest entry, else (SA-1B as released has no manifest)
    the tar index; None if a shard is neither listed nor a local file."""
    counts: list[int] = []
    manifests: dict[Path, dict] = {}
    for url in urls:
        path = Path(url)
        if path.parent not in manifests:
            manifests[path.parent] = read_manifest(path.parent)["shards"] if os.path.isdir(path.parent) else {}
        entry = manifests[path.parent].get(path.name)
        if entry is not None:
            counts.append(entry["samples"])
        elif path.is_file():
            counts.append(count_tar_samples(path))
        else:
            return None
    return counts


def count_samples(urls: list[str]) -> int | None:
    """Samples in the shards (see `shard_sample_counts`); None if a shard is neither listed nor local."""
    counts = shard_sample_counts(urls)
    return None if counts is None else sum(counts)


class SA1BDataModule(L.LightningDataModule):
    """Train/val loaders of SA-1B shards.

    Training uses `train_mode` ("resampled" by default) with a fixed epoch length per rank, so every
    rank yields the same number of batches. The epoch length is `samples_per_epoch` (per rank) or, by
    default, the shards' sample count (manifest, else tar index) divided by the world size. Validation
    reads every sample once, split by sample over the ranks and their workers (`sample_split`), so any
    number of ranks works with any number of validation shards.

    `synthetic` (a config's `synthetic` section) names a synthetic corpus that `prepare_data` writes
    (resumably) before any rank reads it: Lightning calls that in one process per node, then a barrier,
    and the writer's directory lock makes the nodes of a shared filesystem take turns.
    """

    def __init__(
        self,
        *,
        train_shards: str | list[str],
        val_shards: str | list[str] | None = None,
        sample: SamSampleConfig = SamSampleConfig(),
        batch_size: int = 1,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        train_mode: str = "resampled",
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 100,
        seed: int = 0,
        synthetic: Mapping[str, Any] | None = None,
        max_consecutive_skips: int = 1000,
    ) -> None:
        super().__init__()
        self.max_consecutive_skips = max_consecutive_skips
        self.synthetic = synthetic
        self.train_patterns, self.val_patterns = train_shards, val_shards
        self.sample = sample
        self.batch_size, self.num_workers, self.prefetch_factor = batch_size, num_workers, prefetch_factor
        self.train_mode, self.samples_per_epoch = train_mode, samples_per_epoch
        self.shuffle_buffer, self.seed = shuffle_buffer, seed

    def _placement(self) -> tuple[int, int]:
        """(global rank, world size): the trainer's, else the initialised process group's, else (0, 1)."""
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def prepare_data(self) -> None:
        if self.synthetic:
            write_configured_corpus(self.synthetic)

    def setup(self, stage: str | None = None) -> None:
        # Resolve shard lists here so a bad pattern fails before training starts.
        self.train_urls = expand_shard_patterns(self.train_patterns)
        self.val_urls = expand_shard_patterns(self.val_patterns) if self.val_patterns else []
        world, workers = self._placement()[1], max(1, self.num_workers)
        if self.train_mode != "resampled" and len(self.train_urls) < world * workers:
            raise ValueError(
                f"train: {len(self.train_urls)} shards for {world} ranks x {workers} workers leaves loaders empty; "
                "use fewer workers, more shards, or train_mode=resampled"
            )
        # validation is split by sample (`sample_split`): any number of ranks works with any number of shards
        self.val_counts = shard_sample_counts(self.val_urls) if self.val_urls else []
        if self.val_counts is None:
            raise ValueError("val shards are neither in a manifest nor local tars: their samples cannot be split over the ranks")
        if self.val_urls and sum(self.val_counts) < world:
            raise ValueError(f"val: {sum(self.val_counts)} samples for {world} ranks leaves a rank without validation data")
        # every worker gets a sample: each rank has at least total // world
        self.val_workers = min(self.num_workers, sum(self.val_counts) // world)
        per_rank = self.samples_per_epoch
        if per_rank is None:
            total = count_samples(self.train_urls)
            if total is None:
                raise ValueError("train shards are neither in a manifest nor local tars: set samples_per_epoch (per rank)")
            per_rank = max(1, total // world)
        self.samples_per_worker = math.ceil(per_rank / workers)

    def _loader(self, dataset, samples_per_worker: int | None, num_workers: int) -> DataLoader:
        if samples_per_worker is not None:
            # len() for progress bars: each worker batches its own samples
            batches = max(1, num_workers) * math.ceil(samples_per_worker / self.batch_size)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # with_epoch above fixes the count; with_length only reports it
                dataset = dataset.with_length(batches * self.batch_size)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=num_workers,
            collate_fn=collate_sam_samples,
            prefetch_factor=self.prefetch_factor if num_workers > 0 else None,
            persistent_workers=num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        rank, world = self._placement()
        dataset = sam_sample_pipeline(
            self.train_urls,
            self.sample,
            mode=self.train_mode,
            samples_per_worker=self.samples_per_worker,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            rank=rank,
            world_size=world,
            # a resumed or requeued run continues with new samples instead of replaying its first ones
            start_step=self.trainer.global_step if self.trainer is not None else 0,
            max_consecutive_skips=self.max_consecutive_skips,
        )
        return self._loader(dataset, self.samples_per_worker, self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_urls:
            return []
        # validation sees every sample once; no augmentation
        plain = SamSampleConfig(
            image_size=self.sample.image_size,
            mask_size=self.sample.mask_size,
            max_masks=self.sample.max_masks,
            max_area_fraction=self.sample.max_area_fraction,
            min_mask_pixels=self.sample.min_mask_pixels,
        )
        rank, world = self._placement()
        dataset = sam_sample_pipeline(
            self.val_urls, plain, mode="once_by_sample", shard_counts=self.val_counts, seed=self.seed, rank=rank, world_size=world
        )
        return self._loader(dataset, None, self.val_workers)
