"""Two writers of one output directory: unique temporary names, and one segany-amg per --shards-out
directory (a clear message naming the other)."""

import subprocess
import sys

import pytest
from PIL import Image

from segany_train.data.sa1b import sample_key
from segany_train.data.shard_writer import SA1BShardWriter
from segany_train.inference import amg_cli
from tests.shards import jpeg_bytes, make_image, record_for

HOLD_LOCK = """
import sys, time
from segany_train.data.directory_lock import lock_directory
with lock_directory(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_two_shard_writers_in_one_directory_do_not_share_a_temporary_name(tmp_path):
    image, masks = make_image(0)
    first = SA1BShardWriter(tmp_path, record_manifest=False)
    second = SA1BShardWriter(tmp_path, record_manifest=False)
    first.write(sample_key(0), jpeg_bytes(image), record_for(0, image, masks))
    second.write(sample_key(1), jpeg_bytes(image), record_for(1, image, masks))
    first.close()
    second.close()  # used to find its temporary file renamed away by the first
    assert [p.name for p in tmp_path.glob("*.tar")] == ["sa_000000.tar"]
    assert not list(tmp_path.glob("*.tmp"))


def test_a_second_amg_on_one_shards_out_directory_fails_naming_the_first(tmp_path):
    (tmp_path / "photos").mkdir()
    Image.fromarray(make_image(0)[0]).save(tmp_path / "photos" / "a.png")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "shards")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as exit_:
            amg_cli.main([str(tmp_path / "photos"), "--out", str(tmp_path / "out"), "--shards-out", str(tmp_path / "shards"),
                          "--model-type", "vit_t_256_small_decoder", "--no-progress", "--points-per-side", "2"])
        assert f"pid {holder.pid}" in str(exit_.value.code)
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_writers_temporary_file_is_removed_by_the_next_writer(tmp_path):
    orphan = tmp_path / "sa_000000.tar.0123abcd.tmp"  # what a SIGKILLed writer leaves: nobody holds it
    orphan.write_bytes(b"partial")
    image, masks = make_image(0)
    with SA1BShardWriter(tmp_path) as writer:
        writer.write(sample_key(0), jpeg_bytes(image), record_for(0, image, masks))
    assert not orphan.exists() and not list(tmp_path.glob("*.tmp"))
