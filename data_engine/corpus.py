"""The engine's image pool: SA-1B shards split into a seed set, annotation chunks and a held-out set.

The ground-truth masks of the pool are what the simulated annotator sees (never the model); with a
real annotation tool the pool needs no masks at all.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from segany_train.data.image_decoding import decode_record_image
from segany_train.data.pipeline import SkipLog, expand_shard_patterns, read_records
from segany_train.data.rle import pycocotools_rle
from segany_train.data.sa1b import BadSample


@dataclass(frozen=True)
class CorpusSplit:
    """Shard URLs: `seed` (fully labelled, trains the first model), `chunks` (one list of pool shards
    per annotation round, in order), `holdout` (held-out evaluation) and `pool` (every pool shard)."""

    seed: list[str]
    chunks: list[list[str]]
    holdout: list[str]

    @property
    def pool(self) -> list[str]:
        return [url for chunk in self.chunks for url in chunk]


def split_corpus(shards: str | list[str], *, seed: str | list[str], holdout_shards: int, rounds: int) -> CorpusSplit:
    """The last `holdout_shards` of `shards` are held out, and the rest is dealt into `rounds` chunks
    of consecutive shards (the remainder goes to the last chunks); `seed` (the seed model's own data,
    the paper's public data) must share no shard with them."""
    urls = expand_shard_patterns(shards)
    seed_urls = expand_shard_patterns(seed)
    pool = urls[: len(urls) - holdout_shards]
    if holdout_shards < 1 or len(pool) < rounds:
        raise ValueError(
            f"{len(urls)} shards cannot give {holdout_shards} held-out shard(s) "
            f"and at least one pool shard for each of {rounds} annotation rounds"
        )
    shared = {str(Path(u).resolve()) for u in seed_urls} & {str(Path(u).resolve()) for u in urls}
    if shared:
        raise ValueError(f"the seed split and the pool share shards: {sorted(shared)[:3]}")
    base, extra = divmod(len(pool), rounds)
    sizes = [base + (1 if r >= rounds - extra else 0) for r in range(rounds)]
    starts = np.cumsum([0] + sizes)
    chunks = [pool[starts[r] : starts[r + 1]] for r in range(rounds)]
    return CorpusSplit(seed=seed_urls, chunks=chunks, holdout=urls[len(urls) - holdout_shards :])


@dataclass
class LabelledImage:
    """One pool image: its shard key, JPEG bytes, HxWx3 uint8 pixels, SA-1B record and GT masks."""

    key: str
    jpeg: bytes
    image: np.ndarray
    record: dict[str, Any]
    gt_masks: list[np.ndarray]


def gt_masks_of(record: dict[str, Any]) -> list[np.ndarray]:
    """The HxW bool masks of an SA-1B record's annotations (BadSample for a malformed RLE)."""
    masks = []
    for ann in record["annotations"]:
        seg = ann["segmentation"]
        try:
            masks.append(mask_utils.decode(pycocotools_rle(seg)).astype(bool))
        except (KeyError, TypeError, ValueError) as error:
            raise BadSample(f"annotation {ann.get('id')}: malformed RLE ({error})") from None
    return masks


def read_labelled_images(urls: list[str]) -> Iterator[LabelledImage]:
    """Every usable image of the shards, in order; bad samples are skipped and counted in SkipLog."""
    for key, jpeg, record in read_records(urls):
        try:
            image = decode_record_image(jpeg, record)
            masks = gt_masks_of(record)
        except BadSample as error:
            SkipLog.record("bad_sample", key, str(error))
            continue
        yield LabelledImage(key, jpeg, image, record, masks)
