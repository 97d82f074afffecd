"""One output per input shard, marked done by its stats file written last: every state a kill can
leave is either done or redone, a shard deleted by hand is noticed, and directories written by the
earlier annotation convention (stats file first, manifest entry last) read the same."""

import pytest

from data_engine.shard_outputs import completed_output, resume_outputs, write_output
from segany_train.data.pipeline import read_records
from segany_train.atomic_files import write_json_atomically
from segany_train.data.shard_writer import read_manifest
from segany_train.data.synthetic import write_synthetic_corpus


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pool")
    write_synthetic_corpus(directory, num_images=3, size=64, images_per_shard=3, min_objects=1, max_objects=2, progress=False)
    return list(read_records([str(directory / "sa_000000.tar")]))


def _images(samples, *, fail_at=None, keep=lambda k: True):
    for k, sample in enumerate(samples):
        if k == fail_at:
            raise KeyboardInterrupt("killed")
        yield {"key": sample[0], "masks": len(sample[2]["annotations"]) if keep(k) else 0}, sample if keep(k) else None


def test_the_stats_file_written_last_marks_an_output_done(samples, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        write_output(tmp_path, "out-", 3, _images(samples, fail_at=2))
    assert completed_output(tmp_path, "out-", 3) is None and not list(tmp_path.glob("out-*"))  # only a .tmp, removed
    stats = write_output(tmp_path, "out-", 3, _images(samples))
    assert stats["shard"] == "out-000003.tar" and [i["key"] for i in stats["images"]] == [s[0] for s in samples]
    assert completed_output(tmp_path, "out-", 3) == stats and "out-000003.tar" in read_manifest(tmp_path)["shards"]

    calls = []

    def images_of(position):
        calls.append(position)
        return _images(samples)

    assert resume_outputs(tmp_path, "out-", 1, images_of, first_index=3)["shards"] == [str(tmp_path / "out-000003.tar")]
    assert calls == []  # done: not redone
    (tmp_path / "out-000003.stats.json").unlink()  # killed after the shard's rename, before its stats file
    assert completed_output(tmp_path, "out-", 3) is None
    again = resume_outputs(tmp_path, "out-", 1, images_of, first_index=3)
    assert calls == [0] and again["images"] == stats["images"]
    (tmp_path / "out-000003.tar").unlink()  # deleted by hand
    assert completed_output(tmp_path, "out-", 3) is None

    empty = write_output(tmp_path, "out-", 4, _images(samples, keep=lambda k: False), record_manifest=False)
    assert empty["shard"] is None and completed_output(tmp_path, "out-", 4) == empty  # counted, nothing written
    assert not (tmp_path / "out-000004.tar").exists()


def test_an_annotation_directory_of_the_earlier_convention_reads_the_same(samples, tmp_path):
    stats = write_output(tmp_path, "annotated-", 0, _images(samples), record_manifest=False)
    # the earlier convention wrote the stats file before the shard's rename and its manifest entry
    assert read_manifest(tmp_path)["shards"] == {}  # killed before the entry: the shard is complete
    assert completed_output(tmp_path, "annotated-", 0) == stats
    write_json_atomically(tmp_path / "annotated-000001.stats.json", {"shard": "annotated-000001.tar", "images": []})
    assert completed_output(tmp_path, "annotated-", 1) is None  # killed before the rename: redone
