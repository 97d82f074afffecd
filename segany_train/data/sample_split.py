"""Validation split by sample, not by shard: any number of ranks and workers over any number of shards.

The samples of all the shards, in order, are cut into as many contiguous runs as there are reading
slots (ranks x DataLoader workers); each slot reads its own run and nothing else, so every sample is
read exactly once however few shards there are (SA-1B's recipe validates on 2 shards with 64 ranks).
A run can start in the middle of a shard: a local tar is opened for random access, so the members
before the run are skipped by their headers (tarfile seeks past their data), not read.
"""

import tarfile
from collections.abc import Iterator

import webdataset as wds
from webdataset.tariterators import base_plus_ext

Piece = tuple[int, int, int]  # (shard index, first sample, end sample): samples first..end-1 of that shard


def slot_share(counts: list[int], slots: int, slot: int) -> list[Piece]:
    """The pieces of shards that reading slot `slot` of `slots` reads, given each shard's sample count.

    Slot k reads the samples k*N//slots .. (k+1)*N//slots - 1 of the N in all, counted across the
    shards in order: the slots' counts differ by at most one.
    """
    if not 0 <= slot < slots:
        raise ValueError(f"slot {slot} is not among {slots} slots")
    total = sum(counts)
    start, end = slot * total // slots, (slot + 1) * total // slots
    pieces: list[Piece] = []
    offset = 0
    for shard, count in enumerate(counts):
        first, last = max(start, offset), min(end, offset + count)
        if first < last:
            pieces.append((shard, first - offset, last - offset))
        offset += count
    return pieces


def read_piece(url: str, first: int, end: int) -> Iterator[dict]:
    """Raw samples first..end-1 of a tar shard ({"__key__", "__url__", and a field per member
    extension, as webdataset groups them}). A local file is read with random access (members before
    `first` are skipped by their headers); anything else is streamed. tarfile.TarError when the shard
    is not a readable tar."""
    local = "://" not in url and not url.startswith("pipe:")
    stream = None if local else wds.gopen(url)
    try:
        with tarfile.open(url, "r:") if local else tarfile.open(fileobj=stream, mode="r|*") as tar:
            index, key, sample = -1, None, None
            for member in tar:
                prefix, suffix = base_plus_ext(member.name) if member.isfile() else (None, None)
                if prefix is None:
                    continue
                if prefix != key:  # a new sample: members are grouped by key, as webdataset groups them
                    if sample is not None:
                        yield sample
                    index, key = index + 1, prefix
                    if index >= end:
                        return
                    sample = {"__key__": prefix, "__url__": url} if index >= first else None
                if sample is not None:
                    sample[suffix.lower()] = tar.extractfile(member).read()
            if sample is not None:
                yield sample
    finally:
        if stream is not None:
            stream.close()
