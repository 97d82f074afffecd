"""Writing SA-1B-format shards atomically, with a manifest of per-shard sample counts.

Crash safety: every file is written under a temporary name, flushed to disk (fsync) and only then
renamed into place, and the rename itself is made durable by syncing the directory, so after a crash
a final name holds either the old or the new complete content. Concurrency: temporary names are
unique per writer, and manifest updates (read, modify, write) hold a lock.
"""

import fcntl
import json
import os
import uuid
from contextlib import suppress
from pathlib import Path
from typing import Any

import webdataset as wds

from segany_train.data.directory_lock import directory_mutex
from segany_train.atomic_files import write_json_atomically
from segany_train.data.sa1b import SHARD_SUFFIX, encode_sample
from segany_train.os_errors import naming_the_file

MANIFEST_NAME = "manifest.json"


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a shard directory: {"shards": {name: {"samples": n, "masks": m}}}; empty if none."""
    path = Path(directory) / MANIFEST_NAME
    if not path.exists():
        return {"shards": {}}
    return json.loads(path.read_text())


def _sync_directory(directory: Path) -> None:
    """Makes the renames in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: str | Path, shards: dict[str, dict[str, int]]) -> None:
    """Writes the directory's manifest from {name: {"samples": n, "masks": m}}, atomically."""
    manifest = {"shards": shards, "total_samples": sum(s["samples"] for s in shards.values())}
    write_json_atomically(Path(directory) / MANIFEST_NAME, manifest)


def record_shard(directory: str | Path, shard_name: str, samples: int, masks: int) -> None:
    """Adds (or replaces) one shard's entry in the directory's manifest, atomically, under a lock, so
    that writers side by side lose no entry."""
    with directory_mutex(directory):
        shards = read_manifest(directory)["shards"]
        shards[shard_name] = {"samples": samples, "masks": masks}
        write_manifest(directory, shards)


def keep_only_shards(directory: str | Path, keep: list[Path]) -> None:
    """Removes the shards the directory's manifest lists but `keep` does not name, files and entries,
    under the manifest lock: what a shorter rerun into the same directory leaves behind."""
    names = {Path(p).name for p in keep}
    with directory_mutex(directory):
        shards = read_manifest(directory)["shards"]
        stale = [name for name in shards if name not in names]
        if not stale:
            return
        for name in stale:
            (Path(directory) / name).unlink(missing_ok=True)
            del shards[name]
        write_manifest(directory, shards)


def _remove_orphaned_temporaries(directory: Path, shard_name: str) -> None:
    """Deletes the temporary files of `shard_name` that no live writer holds (a killed writer's),
    leaving those another writer is still writing: each writer holds a lock on its own."""
    for path in directory.glob(f"{shard_name}.*.tmp"):
        try:
            with open(path, "rb") as stream:
                fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                path.unlink()
        except (BlockingIOError, FileNotFoundError):
            continue


class SA1BShardWriter:
    """Writes samples into `prefix000000.tar`, `prefix000001.tar`, ... in `directory`.

    Each shard is written as `<name>.tar.<unique>.tmp` and renamed when complete, so a killed job never leaves a
    partial shard under a shard name; then its counts go into `manifest.json`, unless
    `record_manifest=False`: writers running side by side in one directory would race on that file, so
    they leave it to whoever merges their output. Use as a context manager.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        prefix: str = "sa_",
        start_index: int = 0,
        max_samples_per_shard: int = 1000,
        record_manifest: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.record_manifest = record_manifest
        self.index = start_index
        self.max_samples = max_samples_per_shard
        self.written: list[Path] = []
        self._tar: wds.TarWriter | None = None
        self._count = self._masks = 0

    def _shard_name(self) -> str:
        return f"{self.prefix}{self.index:06d}{SHARD_SUFFIX}"

    def _open(self) -> None:
        _remove_orphaned_temporaries(self.directory, self._shard_name())
        # unique: another writer of the same shard name must not write into (or rename away) this file
        self._tmp = self.directory / f"{self._shard_name()}.{uuid.uuid4().hex}.tmp"
        self._stream = open(self._tmp, "wb")
        fcntl.flock(self._stream.fileno(), fcntl.LOCK_EX)  # marks the file live until closed (or killed)
        self._tar = wds.TarWriter(self._stream, encoder=False)
        self._count = self._masks = 0

    def _finish(self) -> None:
        if self._tar is None:
            return
        final = self.directory / self._shard_name()
        try:
            self._tar.close()
            self._stream.flush()
            os.fsync(self._stream.fileno())  # the data on disk before the name says the shard is complete
            self._stream.close()
        except OSError as error:  # a full disk: say which shard
            raise naming_the_file(error, final) from None
        os.replace(self._tmp, final)
        _sync_directory(self.directory)
        if self.record_manifest:
            record_shard(self.directory, final.name, self._count, self._masks)
        self.written.append(final)
        self._tar = None
        self.index += 1

    def write(self, key: str, jpeg: bytes, record: dict[str, Any]) -> None:
        """Adds one image; starts a new shard when the current one is full."""
        sample = encode_sample(key, jpeg, record)
        if self._tar is None:
            self._open()
        try:
            self._tar.write(sample)
        except OSError as error:  # a full disk: say which shard
            raise naming_the_file(error, self.directory / self._shard_name()) from None
        self._count += 1
        self._masks += len(record["annotations"])
        if self._count >= self.max_samples:
            self._finish()

    def close(self) -> list[Path]:
        """Completes the open shard; returns every shard this writer completed."""
        self._finish()
        return self.written

    def abandon(self) -> None:
        """Drops the shard being written (on an error), leaving completed shards as they are."""
        if self._tar is not None:
            with suppress(OSError):  # on a full disk closing fails too (buffered bytes); the file goes all the same
                self._tar.close()
            with suppress(OSError):
                self._stream.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None

    def __enter__(self) -> "SA1BShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()
