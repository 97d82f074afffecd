"""Writes that survive crashes and concurrent writers, each tested with two real processes: atomic JSON
files, manifest updates under a lock, one process per run directory, and the synthetic corpus."""

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from segany_train.config_paths import CONFIG_DIR
from segany_train.data.directory_lock import DirectoryLocked, lock_directory
from segany_train.atomic_files import write_json_atomically
from segany_train.data.shard_writer import read_manifest, record_shard
from segany_train.data.synthetic import write_synthetic_corpus
from tests.shards import write_shards

FORK = multiprocessing.get_context("fork")


def _started_together(barrier, target, worker: int, *args) -> None:
    barrier.wait()  # starting a process takes longer than a few writes: without this they would not overlap
    target(worker, *args)


def _run_in_two_processes(target, *args) -> None:
    """Runs target(worker, *args) in two processes at once; both must succeed."""
    barrier = FORK.Barrier(2)
    workers = [FORK.Process(target=_started_together, args=(barrier, target, w, *args)) for w in range(2)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=120)
    assert [p.exitcode for p in workers] == [0, 0]


def _record_shards(worker: int, directory: str) -> None:
    for i in range(60):
        record_shard(directory, f"w{worker}-{i:03d}.tar", samples=1, masks=2)


def test_concurrent_manifest_updates_lose_no_entry(tmp_path):
    _run_in_two_processes(_record_shards, str(tmp_path))
    assert len(read_manifest(tmp_path)["shards"]) == 120


def _write_json(worker: int, path: str) -> None:
    for i in range(500):
        write_json_atomically(Path(path), {"worker": worker, "i": i, "padding": "x" * 20000})


def test_concurrent_json_writes_neither_collide_nor_tear(tmp_path):
    _run_in_two_processes(_write_json, str(tmp_path / "stats.json"))
    assert json.loads((tmp_path / "stats.json").read_text())["i"] == 499
    assert [p.name for p in tmp_path.iterdir()] == ["stats.json"]  # no temporary file left behind


def test_json_files_are_created_with_the_usual_permissions(tmp_path):
    write_json_atomically(tmp_path / "stats.json", {})
    (tmp_path / "plain").touch()  # as open() creates a file under this process's umask
    assert (tmp_path / "stats.json").stat().st_mode == (tmp_path / "plain").stat().st_mode


def _write_corpus(worker: int, directory: str) -> None:
    write_synthetic_corpus(directory, num_images=12, size=64, images_per_shard=2, min_objects=2, max_objects=4, progress=False)


def test_two_processes_writing_one_synthetic_corpus(tmp_path):
    _run_in_two_processes(_write_corpus, str(tmp_path))
    shards = read_manifest(tmp_path)["shards"]
    assert sorted(shards) == [f"sa_{i:06d}.tar" for i in range(6)] and all(s["samples"] == 2 for s in shards.values())


HOLD = "import sys; from segany_train.data.directory_lock import lock_directory\n" \
    "with lock_directory(sys.argv[1]):\n    print('locked', flush=True); sys.stdin.read()"


def _holder(directory: Path) -> subprocess.Popen:
    """Another process holding the directory's lock until its stdin closes."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_engine_on_one_run_directory_fails_naming_the_first(tmp_path):
    from data_engine.engine import run_engine

    write_shards(tmp_path / "pool", num_images=2, per_shard=2)
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("engine/cycle", overrides=[
            f"run_dir={tmp_path / 'run'}", "only=stage3", "corpus.synthetic=null", f"corpus.shards={tmp_path}/pool/sa_000000.tar",
        ])
    holder = _holder(tmp_path / "run")
    try:
        with pytest.raises(DirectoryLocked, match=rf"pid {holder.pid}\b"):
            run_engine(cfg)
    finally:
        holder.communicate("")
    with pytest.raises(ValueError, match="only=stage3 needs checkpoint"):  # free again: the run itself starts
        run_engine(cfg)


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_the_second_engine_command_says_so_in_one_line_and_writes_nothing(tmp_path):
    holder = _holder(tmp_path / "run")
    (tmp_path / "run" / "hydra").mkdir()
    (tmp_path / "run" / "hydra" / "config.yaml").write_text("the first engine's\n")  # what a run had written
    (tmp_path / "run" / "engine.log").write_text("[12:00:00] the first engine's log\n")
    before = _files(tmp_path / "run")
    try:
        second = subprocess.run(
            [sys.executable, "-m", "data_engine.engine", f"run_dir={tmp_path / 'run'}", "only=stage3", "corpus.synthetic=null",
             f"corpus.shards={tmp_path}/pool/sa_000000.tar", "progress=false"],
            capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        after = _files(tmp_path / "run")  # while the first still holds it
    finally:
        holder.communicate("")
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 1 and len(lines) == 1, second.stderr[-3000:]
    assert lines[0].startswith("segany-engine: error: ") and f"pid {holder.pid} " in lines[0], lines[0]
    assert after == before  # the running engine's directory is left as it was


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = _holder(tmp_path)
    holder.kill()
    holder.wait()
    with lock_directory(tmp_path):
        pass
