"""The webdataset pipeline from SA-1B shards to training batches, with counted skips of bad input.

Stages: shard list (resampled, or split by node and worker) -> tar members -> samples -> decoded
SAM samples (bad ones skipped and counted) -> optional shuffle buffer -> fixed-length epoch.
Every random draw is seeded as `seeded_stream` describes.
"""

import glob
import itertools
import os
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import braceexpand
import torch
import webdataset as wds

from segany_train.data.sa1b import BadSample, decode_sample
from segany_train.data.sam_sample import SamSampleConfig, build_sam_sample
from segany_train.data.sample_split import read_piece, slot_share
from segany_train.data.seeded_stream import SAMPLES, StreamSeed, seeded_shuffle, shard_source, worker_slot

SHARD_MODES = ("resampled", "split_repeat", "once", "once_by_sample")


class SkippedSampleWarning(UserWarning):
    """A sample or shard was skipped; the message names the shard and key."""


def expand_shard_patterns(patterns: str | list[str]) -> list[str]:
    """Brace patterns, globs and paths -> shard list. A pattern matching nothing fails, naming it; a
    path a brace range names that does not exist fails, listing the missing ones (a glob may match
    fewer files, a range names each of its files)."""
    urls: list[str] = []
    for pattern in [patterns] if isinstance(patterns, str) else list(patterns):
        matched: list[str] = []
        missing: list[str] = []
        for item in braceexpand.braceexpand(str(pattern)):
            if "://" in item or item.startswith("pipe:"):
                matched.append(item)
            elif any(ch in item for ch in "*?["):
                matched.extend(sorted(glob.glob(item)))
            elif os.path.exists(item):
                matched.append(item)
            else:
                missing.append(item)
        if not matched:
            raise FileNotFoundError(f"shard pattern {pattern!r} matches no file")
        if missing:
            listed = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise FileNotFoundError(f"shard pattern {pattern!r} names {len(missing)} missing files: {listed}")
        urls.extend(matched)
    return urls


class NoUsableSamples(RuntimeError):
    """A training loader read many samples in a row without a usable one (resampling would spin forever)."""


class SkipLog:
    """Skips seen by this process since they were last attached to a sample.

    Lives in each DataLoader worker; every delivered sample carries the skips that happened before it
    (`skipped`), so the counts reach the training process through the batches themselves. Between two
    delivered samples, the pending counts are the consecutive skips (`check_consecutive`).
    """

    pending: Counter = Counter()
    shards: Counter = Counter()  # where the pending skips happened

    @classmethod
    def record(cls, reason: str, where: str, detail: str) -> None:
        cls.pending[reason] += 1
        cls.shards[where.rsplit(".tar:", 1)[0] + ".tar" if ".tar:" in where else where] += 1
        warnings.warn(f"skipped {where}: {detail}", SkippedSampleWarning, stacklevel=2)

    @classmethod
    def take(cls) -> dict[str, int]:
        taken, cls.pending, cls.shards = dict(cls.pending), Counter(), Counter()
        return taken

    @classmethod
    def check_consecutive(cls, limit: int) -> None:
        """NoUsableSamples naming the shards and the counts once `limit` skips have come in a row."""
        if sum(cls.pending.values()) < limit:
            return
        counts = ", ".join(f"{n} {reason}" for reason, n in cls.pending.most_common())
        shards = ", ".join(f"{url} ({n})" for url, n in cls.shards.most_common(5))
        more = f" and {len(cls.shards) - 5} more" if len(cls.shards) > 5 else ""
        raise NoUsableSamples(
            f"no usable training sample in {limit} in a row ({counts}) from shards {shards}{more}; "
            "fix the shards or the data settings (max_masks, min_mask_pixels), or raise data.max_consecutive_skips"
        )


def _tar_error_handler(error: Exception) -> bool:
    """webdataset handler: count a corrupt or truncated shard member and go on (never crash, never hang)."""
    # webdataset appends the stream and the shard URL to the exception's args
    SkipLog.record("corrupt_shard", str(error.args[-1]) if error.args else "?", repr(error))
    return True


def _limited_tar_error_handler(max_consecutive_skips: int):
    """`_tar_error_handler` that also stops a training stream whose shards yield nothing usable."""

    def handler(error: Exception) -> bool:
        _tar_error_handler(error)
        SkipLog.check_consecutive(max_consecutive_skips)
        return True

    return handler


def _decode_stage(cfg: SamSampleConfig, stream: StreamSeed, max_consecutive_skips: int):
    passes = itertools.count()  # a new random stream on each pass (epoch) over the data

    def stage(samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        rng = stream.generator(SAMPLES, next(passes))
        for raw in samples:
            where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
            try:
                key, jpeg, record = decode_sample(raw)
                sample = build_sam_sample(key, jpeg, record, cfg, rng)
            except BadSample as error:
                SkipLog.record("bad_sample", where, str(error))
                SkipLog.check_consecutive(max_consecutive_skips)
                continue
            sample["skipped"] = SkipLog.take()
            yield sample

    return stage


def _sample_split_source(urls: list[str], counts: list[int], stream: StreamSeed) -> Callable[[], Iterator[dict[str, Any]]]:
    """The raw samples of this rank's and worker's run of the samples (`sample_split.slot_share`); a shard
    that is not a readable tar is counted as a corrupt_shard skip and the rest of its piece left out."""

    def source() -> Iterator[dict[str, Any]]:
        worker, workers = worker_slot()
        for shard, first, end in slot_share(counts, stream.world_size * workers, stream.rank * workers + worker):
            try:
                yield from read_piece(urls[shard], first, end)
            except (tarfile.TarError, OSError) as error:
                SkipLog.record("corrupt_shard", urls[shard], repr(error))

    return source


def read_records(urls: list[str]) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """(key, JPEG bytes, record) of every sample of the shards, in order, in this process.

    For inference and evaluation at full resolution. Bad samples and corrupt shard members are
    skipped and counted in `SkipLog` (read the counts with `SkipLog.take()`).
    """
    for raw in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=_tar_error_handler)):
        try:
            yield decode_sample(raw)
        except BadSample as error:
            SkipLog.record("bad_sample", f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}", str(error))


def sam_sample_pipeline(
    urls: list[str],
    cfg: SamSampleConfig,
    *,
    mode: str = "resampled",
    samples_per_worker: int | None = None,
    shuffle_buffer: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    max_consecutive_skips: int = 1000,
    shard_counts: list[int] | None = None,
) -> wds.DataPipeline:
    """An IterableDataset of SAM samples (`sam_sample.build_sam_sample`), for training or evaluation.

    mode "resampled": each rank and worker draws shards at random, so no loader runs dry;
    "split_repeat": disjoint shards per rank and worker, cycled in a new order each pass; "once":
    disjoint shards, each read once (evaluation); "once_by_sample": every sample once, split by sample
    over the ranks and workers (`sample_split`, validation; needs `shard_counts`, each shard's sample
    count, so any number of ranks works with any number of shards). With `samples_per_worker`, every worker yields
    exactly that many samples, so all ranks see the same number of batches (unequal counts hang DDP).

    Every draw (shards, order, shuffle, masks chosen, augmentation) is a function of `seed`, `rank`
    (this process's global rank: pass the trainer's, as `SA1BDataModule` does), the DataLoader worker,
    `start_step` (the step training starts or resumes at, so a resumed run draws new samples) and the
    pass. `world_size` and `rank` also split the shards in the split modes. A worker that skips
    `max_consecutive_skips` samples or shard members in a row raises NoUsableSamples.
    """
    if max_consecutive_skips < 1:
        raise ValueError(f"max_consecutive_skips must be at least 1, got {max_consecutive_skips}")
    if mode not in SHARD_MODES:
        raise ValueError(f"mode must be one of {SHARD_MODES}, got {mode!r}")
    if mode == "once_by_sample" and (shard_counts is None or len(shard_counts) != len(urls)):
        raise ValueError("mode once_by_sample needs shard_counts: one sample count per shard")
    stream = StreamSeed(seed=seed, rank=rank, world_size=world_size, start_step=start_step)
    if mode == "once_by_sample":
        stages = [_sample_split_source(urls, shard_counts, stream)]
    else:
        stages = [shard_source(urls, mode, stream), wds.tarfile_to_samples(handler=_limited_tar_error_handler(max_consecutive_skips))]
    stages.append(_decode_stage(cfg, stream, max_consecutive_skips))
    if shuffle_buffer > 1:
        stages.append(seeded_shuffle(shuffle_buffer, stream))
    pipeline = wds.DataPipeline(*stages)
    if mode == "split_repeat":
        pipeline = pipeline.repeat()
    if samples_per_worker is not None:
        pipeline = pipeline.with_epoch(samples_per_worker)
    return pipeline


def collate_sam_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Images stacked (Bx3xSxS uint8); masks of all images concatenated with the image each belongs to.

    masks NxMxM bool, boxes Nx4, image_index N: the layout `Sam.decode` takes. `skipped` sums the
    skips reported by the samples of this batch. Samples carrying `segmentations` give N RLE dicts.
    """
    counts = [s["masks"].shape[0] for s in samples]
    skipped: Counter = Counter()
    for s in samples:
        skipped.update(s["skipped"])
    batch = {
        "keys": [s["key"] for s in samples],
        "image": torch.stack([s["image"] for s in samples]),
        "masks": torch.cat([s["masks"] for s in samples]),
        "boxes": torch.cat([s["boxes"] for s in samples]),
        "annotation_ids": torch.cat([s["annotation_ids"] for s in samples]),
        "image_index": torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(counts)),
        "masks_per_image": counts,  # image_index's run lengths on the host (a list, not moved to the device)
        "input_size": torch.tensor([s["input_size"] for s in samples]),
        "valid_size": torch.tensor([s["valid_size"] for s in samples]),
        "original_size": torch.tensor([s["original_size"] for s in samples]),
        "num_annotations": torch.tensor([s["num_annotations"] for s in samples]),
        "skipped": dict(skipped),
    }
    if samples and "segmentations" in samples[0]:
        batch["segmentations"] = [rle for s in samples for rle in s["segmentations"]]
    return batch
