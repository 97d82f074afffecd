"""Scale-out on SLURM, without SLURM: the slurm/ scripts run as they would on a cluster, with an `srun`
stand-in that starts each task with the variables srun sets, real Lightning DDP over gloo, real Hydra.

- training as 2 ranks (Lightning's SLURM environment, auto-requeue handlers), and SIGUSR1: the
  hpc checkpoint, then a requeued job (same job id) resuming from it with the same wandb run;
- stage 3 as 2 array tasks, one killed mid-shard and rerun: every output shard exactly once;
- the cycle driver's sbatch chain, the scripts' syntax, the submitit launcher config.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from data_engine.automatic_step import completed_shard
from data_engine.corpus import read_labelled_images
from data_engine.distributed_stage3 import MissingOutputsError, merge_outputs, run_task, shards_of_task, task_slot
from segany_train.config_paths import CONFIG_DIR
from segany_train.data.shard_writer import read_manifest
from segany_train.data.synthetic import write_synthetic_corpus
from segany_train.model import build_sam
from segany_train.model.checkpoint import save_official_checkpoint
from segany_train.model.seed_model import BUILTIN_PATH
from tests.conftest import TINY, randomized, tiny_training_overrides
from tests.full_disk import FullDirectory

REPO = Path(__file__).resolve().parent.parent
SLURM = REPO / "slurm"

# Starts "$@" once per task with the variables srun gives each task, like srun inside an allocation;
# the tasks' pids go to $SRUN_PIDS so a test can signal one as SLURM would.
SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((rank = 0; rank < SLURM_NTASKS; rank++)); do
    SLURM_PROCID=$rank SLURM_LOCALID=$rank SLURM_NODEID=0 "$@" &
    pids+=($!)
    echo $! >> "$SRUN_PIDS"
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
# Records the request, then ends the job as SLURM does when it requeues one (all its processes).
SCONTROL = """#!/bin/bash
echo "$@" >> "$SCONTROL_LOG"
kill -KILL 0
"""


@pytest.fixture(scope="module")
def slurm_bin(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("bin")
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (directory / name).write_text(text)
        (directory / name).chmod(0o755)
    return directory


def _job_env(slurm_bin: Path, tmp_path: Path, *, job_id: int, tasks: int, **extra: str) -> dict[str, str]:
    """The environment sbatch gives a job script on one node (SLURM_* of the allocation)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_"))}
    env.update(
        PATH=f"{slurm_bin}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        OMP_NUM_THREADS="1",
        SRUN_PIDS=str(tmp_path / f"srun-{job_id}.pids"),
        SCONTROL_LOG=str(tmp_path / "scontrol.log"),
        SLURM_JOB_ID=str(job_id),
        SLURM_JOB_NAME="segany",
        SLURM_NNODES="1",
        SLURM_NTASKS=str(tasks),
        SLURM_NTASKS_PER_NODE=str(tasks),
        SLURM_JOB_NODELIST="127.0.0.1",
        SLURM_NODELIST="127.0.0.1",
        MASTER_PORT=str(20000 + (os.getpid() * 7 + job_id) % 20000),
    )
    env.update(extra)
    return env


def _srun_pids(env: dict[str, str]) -> list[int]:
    path = Path(env["SRUN_PIDS"])
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def _wait_for(condition, process: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the job ended before {what}:\n{process.stdout.read()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_every_script_parses():
    scripts = sorted(SLURM.glob("*.sbatch")) + sorted(SLURM.glob("*.sh"))
    assert len(scripts) >= 4
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"
    train = (SLURM / "train.sbatch").read_text()
    assert "#SBATCH --signal=SIGUSR1@300" in train and "#SBATCH --ntasks-per-node=" in train and "srun " in train


# ---------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("synthetic")
    write_synthetic_corpus(directory, num_images=16, size=128, images_per_shard=2, min_objects=3, max_objects=8, progress=False)
    return directory


def _training(corpus: Path) -> list[str]:
    """segany-train overrides: tiny_synthetic_cpu shrunk to seconds, on the CPU (gloo)."""
    return [
        *tiny_training_overrides(corpus),
        "data.batch_size=1",
        "prompting.num_iterations=2",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.limit_val_batches=0",
        "trainer.log_every_n_steps=1",
        "logger.log_images_every_n_steps=0",
    ]


def _global_step(checkpoint: Path) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"]


def test_train_sbatch_runs_two_ranks_with_lightnings_slurm_environment(slurm_bin, corpus, tmp_path):
    env = _job_env(slurm_bin, tmp_path, job_id=7001, tasks=2)
    command = ["bash", str(SLURM / "train.sbatch"), *_training(corpus), "trainer.max_steps=3", "callbacks.checkpoint_every_n_steps=3"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert len(_srun_pids(env)) == 2
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in output and "GLOBAL_RANK: 1, MEMBER: 2/2" in output
    assert output.count("SLURM auto-requeueing enabled") == 2  # Lightning's SLURMEnvironment, on both ranks
    run_dir = tmp_path / "outputs" / "slurm-7001"  # named by the job id, which a requeue keeps
    assert _global_step(run_dir / "checkpoints" / "last.ckpt") == 3
    saved = OmegaConf.load(run_dir / "config.yaml").trainer  # trainer=ddp, sized by SLURM's variables
    assert (saved.strategy, saved.devices, saved.num_nodes) == ("ddp", 2, 1)


def test_sigusr1_saves_an_hpc_checkpoint_that_the_requeued_job_resumes(slurm_bin, corpus, tmp_path):
    env = _job_env(slurm_bin, tmp_path, job_id=7002, tasks=1)
    run_dir = tmp_path / "outputs" / "slurm-7002"
    base = ["bash", str(SLURM / "train.sbatch"), *_training(corpus), "logger=wandb", "callbacks.checkpoint_every_n_steps=2"]
    first = subprocess.Popen(
        [*base, "trainer.max_steps=1000"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    try:
        _wait_for(lambda: last.exists() and (run_dir / "wandb_id").exists(), first, 180, "a first checkpoint")
        (task,) = _srun_pids(env)
        os.kill(task, signal.SIGUSR1)  # what --signal=SIGUSR1@300 sends each task before the time limit
        first.wait(timeout=120)  # Lightning saves, calls `scontrol requeue`, and the job is ended
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert Path(env["SCONTROL_LOG"]).read_text() == "requeue 7002\n"
    saved_step = _global_step(run_dir / "hpc_ckpt_1.ckpt")
    assert saved_step >= max(_global_step(last), 2)
    run_id = (run_dir / "wandb_id").read_text()

    # the requeued job: the same script and job id, so the same run directory
    again = subprocess.run([*base, f"trainer.max_steps={saved_step + 2}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-3000:]
    assert f"Restoring states from the checkpoint path at {run_dir / 'hpc_ckpt_1.ckpt'}" in output
    assert _global_step(last) == saved_step + 2
    assert (run_dir / "wandb_id").read_text() == run_id
    assert len([p for p in (run_dir / "wandb").iterdir() if p.name.endswith(run_id)]) == 2  # one wandb run, resumed


# ----------------------------------------------------------------------------------------------- stage 3


def test_task_slot_from_the_environment():
    assert task_slot(None, None, {}) == (0, 1)
    array = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert task_slot(None, None, {**array, "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == (1, 3)
    assert task_slot(None, None, {"SLURM_PROCID": "3", "SLURM_NTASKS": "8"}) == (3, 8)  # ranks of one job
    assert task_slot(None, None, {"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)  # torchrun
    assert task_slot(None, None, {**array, "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == (3, 6)  # array of jobs
    assert task_slot(2, 4, array) == (2, 4)  # given values win
    with pytest.raises(ValueError, match=r"task 4 of 4: need 0 <= task_id < num_tasks"):
        task_slot(4, 4)
    with pytest.raises(ValueError, match="both task_id and num_tasks"):
        task_slot(1, None)
    with pytest.raises(ValueError, match="contiguous range"):
        task_slot(None, None, {"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_COUNT": "3"})
    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_COUNT is not"):
        task_slot(None, None, {"SLURM_ARRAY_TASK_ID": "0"})
    with pytest.raises(ValueError, match="SLURM_PROCID='x' is not an integer"):
        task_slot(None, None, {"SLURM_PROCID": "x", "SLURM_NTASKS": "2"})
    assert [shards_of_task(7, t, 3) for t in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> list[str]:
    directory = tmp_path_factory.mktemp("pool")
    write_synthetic_corpus(directory, num_images=20, size=96, images_per_shard=4, min_objects=2, max_objects=4, progress=False)
    return [str(p) for p in sorted(directory.glob("sa_*.tar"))]


def _keys(shard: str) -> list[str]:
    with tarfile.open(shard) as tar:
        return [Path(m.name).name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".json")]


def _assert_each_image_once(pool: list[str], out_dir: Path) -> None:
    stats = [completed_shard(out_dir, i) for i in range(len(pool))]
    written = [k for s in stats if s["shard"] for k in _keys(str(out_dir / s["shard"]))]
    kept = [i["key"] for s in stats for i in s["images"] if i["masks"]]
    assert sorted(written) == sorted(kept) and len(set(written)) == len(written)  # no image twice
    assert sorted(i["key"] for s in stats for i in s["images"]) == sorted(k for url in pool for k in _keys(url))
    assert not list(out_dir.glob("*.tmp"))


class FailingGenerator:
    """A stand-in mask generator: one square mask per image, and an exception at image `fail_at`."""

    def __init__(self, fail_at: int | None = None):
        self.calls, self.fail_at = 0, fail_at

    def generate(self, image):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("injected failure")
        mask = np.zeros(image.shape[:2], bool)
        mask[4:20, 4:20] = True
        return [{"segmentation": mask, "predicted_iou": 0.9, "stability_score": 0.95, "point_coords": [[8.0, 8.0]], "crop_box": [0, 0, 96, 96]}]


def test_a_task_that_fails_mid_shard_leaves_only_complete_outputs_and_a_rerun_finishes(pool, tmp_path):
    with pytest.raises(RuntimeError, match="injected failure"):
        run_task(lambda: FailingGenerator(fail_at=6), pool, tmp_path, 0, 2, progress=False)  # in shard 2
    assert completed_shard(tmp_path, 0) is not None and completed_shard(tmp_path, 2) is None
    assert sorted(p.name for p in tmp_path.glob("automatic-*")) == ["automatic-000000.stats.json", "automatic-000000.tar"]
    with pytest.raises(MissingOutputsError, match=r"4 of 5 input shard\(s\) have no complete output.*1 \(sa_000001.tar\)"):
        merge_outputs(pool, tmp_path)
    assert run_task(FailingGenerator, pool, tmp_path, 0, 2, progress=False) == {"generated": [2, 4], "skipped": [0]}
    assert run_task(FailingGenerator, pool, tmp_path, 1, 2, progress=False) == {"generated": [1, 3], "skipped": []}
    unused = []
    assert run_task(lambda: unused.append(1), pool, tmp_path, 1, 2, progress=False)["skipped"] == [1, 3]
    assert not unused  # nothing pending: no model is loaded
    _assert_each_image_once(pool, tmp_path)
    with pytest.raises(ValueError, match="outputs of 5 other input shard"):
        run_task(FailingGenerator, pool[:3], tmp_path, 0, 1, progress=False)


def test_a_stage3_task_on_a_full_disk_says_so_in_one_line(pool, tmp_path, monkeypatch):
    from data_engine.distributed_stage3 import main

    out_dir = tmp_path / "run" / "stage3" / "generate"
    out_dir.mkdir(parents=True)
    FullDirectory(out_dir, room=0, monkeypatch=monkeypatch)
    monkeypatch.setattr(sys, "argv", ["segany-stage3", "mode=task", f"checkpoint={BUILTIN_PATH}", f"corpus.shards='{Path(pool[0]).parent}/sa_*.tar'",
                                      f"run_dir={tmp_path / 'run'}", "task_id=0", "num_tasks=1", "progress=false"])  # fmt: skip
    with pytest.raises(SystemExit) as failed:
        main()
    message = str(failed.value.code)
    assert message.startswith(f"segany-stage3: error: disk full writing {out_dir / 'inputs.json'} ") and "\n" not in message, message
    assert not list(out_dir.iterdir())


def test_stage3_array_tasks_with_one_killed_and_rerun_write_each_shard_once(slurm_bin, pool, tmp_path):
    torch.manual_seed(0)
    checkpoint = save_official_checkpoint(randomized(build_sam(TINY)), tmp_path / "tiny.pth")
    run_dir = tmp_path / "stage3"
    out_dir = run_dir / "stage3" / "generate"
    # thresholds at 0: an untrained model's masks are all kept; 16x16 points make an image take long
    # enough to stop a task inside a shard
    overrides = [f"checkpoint={checkpoint}", f"corpus.shards='{Path(pool[0]).parent}/sa_*.tar'", f"run_dir={run_dir}"]
    overrides += ["stage3.generator.points_per_side=16", "stage3.generator.pred_iou_thresh=0.0"]
    overrides += ["stage3.generator.stability_score_thresh=0.0", "progress=false", "threads=1"]
    script = ["bash", str(SLURM / "engine_stage3.sbatch"), *overrides]

    def element(task: int, **popen) -> subprocess.Popen:
        env = _job_env(slurm_bin, tmp_path, job_id=7100 + task, tasks=1, SLURM_ARRAY_JOB_ID="7100", SLURM_ARRAY_TASK_ID=str(task))
        env.update(SLURM_ARRAY_TASK_MIN="0", SLURM_ARRAY_TASK_COUNT="2")
        return subprocess.Popen(script, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)

    killed, other = element(0, start_new_session=True), element(1)
    try:  # task 0 owns shards 0, 2, 4: stop it inside shard 2, after shard 0 is complete
        _wait_for(lambda: any(out_dir.glob("automatic-000002.tar.*.tmp")), killed, 180, "task 0 inside shard 2")
        os.killpg(killed.pid, signal.SIGKILL)  # as SLURM ends a job: every process of it
        killed.wait()
    finally:
        if killed.poll() is None:
            os.killpg(killed.pid, signal.SIGKILL)
    assert completed_shard(out_dir, 0) is not None and completed_shard(out_dir, 2) is None
    assert not (out_dir / "automatic-000002.tar").exists()  # the partial shard is only a .tmp
    assert other.wait(timeout=300) == 0, other.stdout.read()[-3000:]
    assert "task 1 of 2: generated 2 shard(s), 0 already complete" in other.stdout.read()

    rerun = element(0)
    output = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, output[-3000:]
    assert "task 0 of 2: generated 2 shard(s), 1 already complete" in output
    _assert_each_image_once(pool, out_dir)

    merge = subprocess.run(
        ["bash", str(SLURM / "engine_stage3_merge.sbatch"), *overrides[1:3]], cwd=tmp_path,
        env=_job_env(slurm_bin, tmp_path, job_id=7200, tasks=1), capture_output=True, text=True, timeout=300,
    )
    assert merge.returncode == 0, merge.stdout[-2000:] + merge.stderr[-2000:]
    manifest = read_manifest(out_dir)
    assert sorted(manifest["shards"]) == [f"automatic-{i:06d}.tar" for i in range(len(pool))]
    assert manifest["total_samples"] == sum(len(_keys(url)) for url in pool)
    for name, entry in manifest["shards"].items():
        masks = sum(len(item.gt_masks) for item in read_labelled_images([str(out_dir / name)]))
        assert entry == {"samples": len(_keys(str(out_dir / name))), "masks": masks}
    quality = json.loads((out_dir / "quality.json").read_text())
    assert quality["images"] == 20 and quality["masks"] == sum(e["masks"] for e in manifest["shards"].values())


# ------------------------------------------------------------------------------------ submission paths


def _sbatch_calls(tmp_path: Path, **settings: str) -> list[list[str]]:
    """Runs slurm/submit_engine_cycle.sh with an sbatch that records its arguments and answers ids."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "sbatch.log"
    (bin_dir / "sbatch").write_text(
        '#!/bin/bash\nn=$(( $(wc -l < "$SBATCH_LOG" 2>/dev/null || echo 0) + 101 ))\n'
        'printf "%q " "$@" >> "$SBATCH_LOG"; echo >> "$SBATCH_LOG"; echo "$n;cluster"\n'
    )
    (bin_dir / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SBATCH_LOG": str(log), **settings}
    result = subprocess.run(["bash", str(SLURM / "submit_engine_cycle.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in log.read_text().splitlines()]


def test_the_cycle_driver_chains_train_annotate_merge_retrain_with_afterok(tmp_path):
    settings = {"POOL": "/data/pool/sa_{000000..000009}.tar", "VAL_SHARDS": "/data/val/sa_000000.tar", "CYCLE": "c1"}
    train, annotate, merge, retrain = _sbatch_calls(tmp_path, **settings, ARRAY_TASKS="4")
    assert train[1:3] == ["--nodes=2", str(SLURM / "train.sbatch")]
    assert "--dependency=afterok:101" in annotate and "--array=0-3%32" in annotate
    assert "--dependency=afterok:102" in merge and "--dependency=afterok:103" in retrain
    assert "checkpoint='outputs/c1-train/checkpoints/last.ckpt'" in annotate
    script = annotate.index(str(SLURM / "engine_stage3.sbatch"))
    with initialize_config_dir(CONFIG_DIR, version_base=None):  # every step's overrides compose
        stage3 = compose("engine/distributed_stage3", overrides=annotate[script + 1 :])
        compose("engine/distributed_stage3", overrides=["mode=merge", *merge[merge.index(str(SLURM / "engine_stage3_merge.sbatch")) + 1 :]])
        final = compose("train", overrides=["trainer=ddp", *retrain[retrain.index(str(SLURM / "train.sbatch")) + 1 :]])
    assert stage3.corpus.shards == settings["POOL"] and stage3.out_dir == "outputs/c1-stage3/stage3/generate"
    assert final.data.train_shards == f"{stage3.out_dir}/automatic-*.tar"
    assert final.model.checkpoint == "outputs/c1-train/checkpoints/last.ckpt" and final.run_name == "c1-retrain"

    given = _sbatch_calls(tmp_path / "given", **settings, CHECKPOINT="/models/sam.pth")
    assert len(given) == 3 and not any(a.startswith("--dependency") for a in given[0])  # no training first
    assert "checkpoint='/models/sam.pth'" in given[0]


def test_submitit_launcher_config_composes_into_a_slurm_launcher(tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    monkeypatch.setenv("SLURM_NNODES", "4")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8")
    overrides = ["hydra/launcher=slurm", "experiment=sam_vit_h_sa1b", "hydra.launcher.nodes=4", "hydra.launcher.partition=gpu"]
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.nodes == 4 and launcher.tasks_per_node == launcher.gpus_per_node
    assert launcher.name == "sam_vit_h_sa1b" and launcher.max_num_timeout > 0
    assert cfg.hydra.sweep.dir == "outputs/sam_vit_h_sa1b"  # not a timestamp: a resubmitted job finds its run
    assert instantiate(cfg.trainer, _convert_="all")["num_nodes"] == 4  # trainer=ddp reads the allocation
    plugin = instantiate(launcher)
    assert plugin.params["partition"] == "gpu" and plugin.params["nodes"] == 4
