"""Validation split by sample: with 2 validation shards (the sa1b recipe's), 1, 3 and 64 ranks (the
`--nodes=8` example) each read their own samples, and together every sample exactly once."""

from collections import Counter

import pytest
import torch

from segany_train.data.datamodule import shard_sample_counts
from segany_train.data.pipeline import collate_sam_samples, sam_sample_pipeline
from segany_train.data.sam_sample import SamSampleConfig
from segany_train.data.sample_split import slot_share
from tests.shards import write_release_tars

SMALL = SamSampleConfig(image_size=128, mask_size=32)


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory) -> list[str]:
    # as SA-1B is released: no manifest, so the counts come from the tars' indexes
    return [str(p) for p in write_release_tars(tmp_path_factory.mktemp("val"), [41, 30], height=48, width=64)]


def test_slot_shares_cover_every_sample_once_with_counts_one_apart():
    counts = [41, 30, 0, 7]
    for slots in (1, 3, 64, 78, 100):
        seen = Counter()
        sizes = []
        for slot in range(slots):
            pieces = slot_share(counts, slots, slot)
            sizes.append(sum(end - first for _, first, end in pieces))
            seen.update((shard, i) for shard, first, end in pieces for i in range(first, end))
        assert seen == Counter((s, i) for s, n in enumerate(counts) for i in range(n)), slots
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("world", [1, 3, 64])
def test_every_validation_sample_is_read_exactly_once_over_the_ranks(val_shards, world):
    counts = shard_sample_counts(val_shards)
    assert counts == [41, 30]
    keys: list[str] = []
    for rank in range(world):
        ranks_keys = [
            s["key"]
            for s in sam_sample_pipeline(val_shards, SMALL, mode="once_by_sample", shard_counts=counts, rank=rank, world_size=world)
        ]
        assert ranks_keys, f"rank {rank} of {world} has no validation sample"
        keys += ranks_keys
    assert sorted(keys) == sorted(f"sa_{i}" for i in range(1, 72))


def test_workers_of_a_rank_split_its_samples_too(val_shards):
    counts = shard_sample_counts(val_shards)
    keys: list[str] = []
    for rank in range(3):
        dataset = sam_sample_pipeline(val_shards, SMALL, mode="once_by_sample", shard_counts=counts, rank=rank, world_size=3)
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate_sam_samples)
        keys += [k for batch in loader for k in batch["keys"]]
    assert sorted(keys) == sorted(f"sa_{i}" for i in range(1, 72))
