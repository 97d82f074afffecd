"""Inputs that once made a loader or an evaluation spin forever now fail or are skipped; every test
runs under an alarm, so a hang fails the test instead of stalling the suite."""

import json
import os
import signal
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import pytest

from segany_train.data.pipeline import NoUsableSamples, sam_sample_pipeline
from segany_train.data.sa1b import sample_key
from segany_train.data.sam_sample import SamSampleConfig
from segany_train.data.shard_writer import SA1BShardWriter
from segany_train.evaluation.automatic import evaluate_automatic_masks
from segany_train.inference.automatic_mask_generator import SamAutomaticMaskGenerator
from tests.conftest import tiny_training_overrides
from tests.shards import jpeg_bytes, make_image, record_for, write_shards

SMALL = SamSampleConfig(image_size=64, mask_size=16)


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fails the test (TimeoutError) when the block runs longer than `seconds`."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: it hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def bad_jpeg_shard(path: Path, count: int = 3) -> Path:
    """A shard whose samples all have a valid record and bytes that are not a JPEG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            image, masks = make_image(i)
            for name, data in ((f"sa_{i}.jpg", b"not a jpeg"), (f"sa_{i}.json", json.dumps(record_for(i, image, masks)).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, BytesIO(data))
    return path


def test_a_training_stream_of_only_bad_samples_fails_naming_the_shards(tmp_path):
    shard = bad_jpeg_shard(tmp_path / "bad" / "sa_000000.tar")
    stream = sam_sample_pipeline([str(shard)], SMALL, samples_per_worker=4, max_consecutive_skips=50)
    with deadline(20), pytest.raises(NoUsableSamples, match=r"50 in a row \(50 bad_sample\).*sa_000000\.tar"):
        next(iter(stream))


def test_a_corrupt_shard_stream_fails_instead_of_spinning(tmp_path):
    shard = tmp_path / "sa_000000.tar"
    shard.write_bytes(b"\x00garbage" * 200)
    stream = sam_sample_pipeline([str(shard)], SMALL, samples_per_worker=4, max_consecutive_skips=20)
    with deadline(20), pytest.raises(NoUsableSamples, match="corrupt_shard"):
        next(iter(stream))


def test_good_samples_between_bad_ones_keep_the_stream_going(tmp_path):
    good = write_shards(tmp_path / "good", 2, 2)
    bad = bad_jpeg_shard(tmp_path / "bad" / "sa_000000.tar", count=2)
    stream = sam_sample_pipeline([str(good[0]), str(bad)], SMALL, samples_per_worker=20, max_consecutive_skips=30)
    with deadline(30):
        assert len(list(stream)) == 20


def test_max_masks_zero_is_refused_at_start():
    with pytest.raises(ValueError, match="max_masks"):
        SamSampleConfig(image_size=64, mask_size=16, max_masks=0)


def test_amg_evaluation_skips_and_counts_a_malformed_rle_instead_of_hanging(tmp_path, tiny_sam):
    with SA1BShardWriter(tmp_path, max_samples_per_shard=10) as writer:
        for i in range(2):
            image, masks = make_image(i)
            record = record_for(i, image, masks)
            if i == 0:  # run lengths pycocotools' COCOeval loops on forever
                record["annotations"][0]["segmentation"]["counts"] = "zzzz"
            writer.write(sample_key(i), jpeg_bytes(image), record)
    generator = SamAutomaticMaskGenerator(tiny_sam, points_per_side=2, pred_iou_thresh=0, stability_score_thresh=0)
    with deadline(60):
        result = evaluate_automatic_masks(generator, [str(p) for p in writer.written], progress=False)
    assert result["images"] == 1 and result["images_skipped"] == {"bad_sample": 1}


def test_segany_train_on_only_bad_shards_fails_in_one_line(tmp_path):
    bad = bad_jpeg_shard(tmp_path / "bad" / "sa_000000.tar")
    command = [sys.executable, "-m", "segany_train.train", *tiny_training_overrides(tmp_path / "corpus"), "data.synthetic=null",
               f"data.train_shards={bad}", "data.val_shards=null", "data.samples_per_epoch=4", "data.num_workers=1",
               "data.max_consecutive_skips=20", "logger=csv", f"hydra.run.dir={tmp_path / 'run'}"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("segany-train: error: no usable training sample") and str(bad) in last, run.stderr[-3000:]
