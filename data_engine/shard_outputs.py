"""The engine's unit of work and of resumption: one input shard -> one output shard and its stats file.

Input shard `index` of a step (annotation, stage 3) becomes `<prefix><index>.tar`, the images that
kept a mask (no shard when none did), and `<prefix><index>.stats.json`: {"shard": that name or None,
"images": [one dict per image]}. The shard is renamed into place complete (`SA1BShardWriter`), then
the stats file is, and the stats file, written last, is what marks the input shard done:

- a run killed at any moment leaves each input shard either done or without a stats file, and one
  without is redone from its first image (a complete shard already renamed is written again);
- the mark is a file of its own, so writers side by side in one directory (stage 3's SLURM tasks,
  which may run on nodes where file locks do not reach each other) share no file to update;
- a shard deleted by hand since is noticed: its stats file names it and it is not there.

The directory's manifest (`shard_writer.py`) is only an index of sample counts, never read to decide
completion. Annotation directories written before this convention (stats file first, done once the
manifest listed the shard) read the same way: the stats file and the shard are there once the shard
was renamed, whether or not the manifest entry that followed was written; a shard whose manifest
entry is missing is counted from its tar index by the data loader.
"""

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from segany_train.atomic_files import write_json_atomically
from segany_train.data.shard_writer import SA1BShardWriter

# one image of an input shard: its statistics, and the (key, JPEG, SA-1B record) to write, or None
# when the image kept no mask (it is counted, not written)
OutputImage = tuple[dict[str, Any], tuple[str, bytes, dict[str, Any]] | None]


def _stats_path(out_dir: str | Path, prefix: str, index: int) -> Path:
    return Path(out_dir) / f"{prefix}{index:06d}.stats.json"


def completed_output(out_dir: str | Path, prefix: str, index: int) -> dict[str, Any] | None:
    """The stats of output `index` if it is complete (its stats file is there, and so is the shard
    the stats file names), else None."""
    path = _stats_path(out_dir, prefix, index)
    if not path.exists():
        return None
    stats = json.loads(path.read_text())
    if stats["shard"] is not None and not (Path(out_dir) / stats["shard"]).exists():
        return None
    return stats


def write_output(
    out_dir: str | Path, prefix: str, index: int, images: Iterable[OutputImage], *, record_manifest: bool = True
) -> dict[str, Any]:
    """Writes output `index` from its images, in order: the shard (when an image is to be written),
    then the stats file that marks it done. Returns the stats. `record_manifest=False` leaves the
    directory's manifest alone, for writers running side by side (their merge writes it)."""
    shard_images = []
    with SA1BShardWriter(
        out_dir, prefix=prefix, start_index=index, max_samples_per_shard=2**31, record_manifest=record_manifest
    ) as writer:
        for image_stats, sample in images:
            shard_images.append(image_stats)
            if sample is not None:
                writer.write(*sample)
    stats = {"shard": writer.written[0].name if writer.written else None, "images": shard_images}
    write_json_atomically(_stats_path(out_dir, prefix, index), stats)
    return stats


def resume_outputs(
    out_dir: str | Path, prefix: str, count: int, images_of: Callable[[int], Iterable[OutputImage]], *, first_index: int = 0
) -> dict[str, Any]:
    """The outputs of `count` input shards, input shard k becoming output `first_index + k`: those an
    earlier (killed) run completed as they are, the others written from `images_of(k)`, which is
    called only for those. Returns {"shards": [output shard paths], "images": [every image's stats]}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[str] = []
    images: list[dict[str, Any]] = []
    for position in range(count):
        index = first_index + position
        stats = completed_output(out_dir, prefix, index)
        if stats is None:
            stats = write_output(out_dir, prefix, index, images_of(position))
        if stats["shard"]:
            shards.append(str(out_dir / stats["shard"]))
        images += stats["images"]
    return {"shards": shards, "images": images}
