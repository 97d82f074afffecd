"""Where the training stream's randomness comes from: (seed, rank, worker, start step, pass).

A requeued or resumed run must not replay the samples it already trained on, ranks and DataLoader
workers must draw apart, and two runs with one seed must draw alike. So every random choice of the
stream (which shards, in which order, the shuffle buffer, masks chosen and augmentations) is drawn
from a generator seeded by the run's seed, the global rank, the worker, the step training (re)starts
at and the pass over the data. No process-local state (pid, clock, a counter that a restart resets
to the same value) enters it.

A pass is one invocation of the pipeline: webdataset invokes every stage anew at each epoch (and at
each repeat of `split_repeat`), and each stage counts its own invocations, so in one worker they stay
in step.
"""

import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds

# one independent stream per purpose, so adding draws to one never shifts another
SHARD_ORDER, SHUFFLE, SAMPLES = range(3)


def worker_slot() -> tuple[int, int]:
    """(this DataLoader worker's id, the number of workers); (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


@dataclass(frozen=True)
class StreamSeed:
    """What a training stream is a function of, besides the worker and the pass."""

    seed: int = 0
    rank: int = 0  # global rank (the trainer's; RANK is set by neither Lightning's launcher nor srun)
    world_size: int = 1
    start_step: int = 0  # the global step training starts or resumes at

    def entropy(self, purpose: int, epoch: int) -> list[int]:
        return [self.seed, self.rank, worker_slot()[0], self.start_step, epoch, purpose]

    def generator(self, purpose: int, epoch: int) -> np.random.Generator:
        return np.random.default_rng(self.entropy(purpose, epoch))


def shard_source(urls: list[str], mode: str, stream: StreamSeed) -> Callable[[], Iterator[dict[str, str]]]:
    """The first stage: {"url": ...} of the shards this rank and worker read in one pass.

    "resampled": drawn with replacement from every shard, without end; "split_repeat": this rank's
    and worker's disjoint share (every world_size-th shard, then every num_workers-th), in a new
    order each pass, so an epoch shorter than the share does not always start at the same shards;
    "once": that share in order.
    """
    passes = itertools.count()

    def source() -> Iterator[dict[str, str]]:
        rng = stream.generator(SHARD_ORDER, next(passes))
        if mode == "resampled":
            while True:
                yield {"url": urls[int(rng.integers(len(urls)))]}
        worker, workers = worker_slot()
        share = urls[stream.rank :: stream.world_size][worker::workers]
        order = rng.permutation(len(share)) if mode == "split_repeat" else range(len(share))
        for index in order:
            yield {"url": share[index]}

    return source


def seeded_shuffle(buffer: int, stream: StreamSeed) -> Callable[[Iterator[Any]], Iterator[Any]]:
    """webdataset's shuffle buffer, with a generator per pass from the stream's seed (its default
    one is seeded from the pid and the clock)."""
    passes = itertools.count()

    def stage(samples: Iterator[Any]) -> Iterator[Any]:
        state = np.random.SeedSequence(stream.entropy(SHUFFLE, next(passes))).generate_state(1)[0]
        return wds.shuffle(buffer, initial=min(buffer, 100), rng=random.Random(int(state)))(samples)

    return stage
