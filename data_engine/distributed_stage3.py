"""segany-stage3: the data engine's stage 3 spread over SLURM array tasks, or over the ranks of one job.

Input shards are independent, so task t of n takes the shards i with i % n == t and writes, per shard,
`automatic-<i>.tar` and `automatic-<i>.stats.json` exactly as the one-process engine does
(`data_engine.automatic_step.generate_one_shard`, each file renamed into place when complete). A task
skips the shards whose output is already complete, so a rerun or a requeued task does only what is
missing, and no partial output is ever visible under a final name. Tasks leave `manifest.json` alone
(they would race on it); `mode=merge`, run once after every task, checks that each input shard has its
output, then writes the manifest and the quality summary.

    segany-stage3 mode=task checkpoint=model.ckpt "corpus.shards='pool/sa_{000000..000999}.tar'" run_dir=outputs/s3
    segany-stage3 mode=merge "corpus.shards='pool/sa_{000000..000999}.tar'" run_dir=outputs/s3

The task's place comes from SLURM: an array element (SLURM_ARRAY_TASK_ID, relative to
SLURM_ARRAY_TASK_MIN, of SLURM_ARRAY_TASK_COUNT) times the ranks of its step (SLURM_PROCID of
SLURM_NTASKS, or torch's RANK of WORLD_SIZE), so an array, one multi-GPU job, or an array of
multi-GPU jobs all split the same way; `task_id` and `num_tasks` override it.
"""

import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from data_engine.automatic_step import completed_shard, generate_one_shard, summarize_quality
from segany_train.amg.generator_settings import GeneratorSettings
from segany_train.config_paths import CONFIG_DIR
from segany_train.data.pipeline import expand_shard_patterns
from segany_train.atomic_files import write_json_atomically
from segany_train.data.shard_writer import write_manifest
from segany_train.inference.automatic_mask_generator import SamAutomaticMaskGenerator
from segany_train.model import build_sam_from_checkpoint
from segany_train.os_errors import describe_os_error

INPUTS_NAME = "inputs.json"
QUALITY_NAME = "quality.json"


class MissingOutputsError(RuntimeError):
    """The merge found input shards without a complete output."""


def _int_env(env: Mapping[str, str], name: str, default: str | None = None) -> int:
    value = env.get(name, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def task_slot(task_id: int | None, num_tasks: int | None, env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(this task's index, the number of tasks): the given pair, else from SLURM's or torch's environment.

    array element a of A (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, SLURM_ARRAY_TASK_COUNT), rank r of R
    within its step (SLURM_PROCID, SLURM_NTASKS; else RANK, WORLD_SIZE): task a * R + r of A * R.
    """
    if (task_id is None) != (num_tasks is None):
        raise ValueError("give both task_id and num_tasks, or neither (then SLURM's or torch's environment says)")
    if task_id is None:
        array, arrays = 0, 1
        if "SLURM_ARRAY_TASK_ID" in env:
            if "SLURM_ARRAY_TASK_COUNT" not in env:
                raise ValueError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not: give task_id and num_tasks")
            array = _int_env(env, "SLURM_ARRAY_TASK_ID") - _int_env(env, "SLURM_ARRAY_TASK_MIN", "0")
            arrays = _int_env(env, "SLURM_ARRAY_TASK_COUNT")
        rank, ranks = 0, 1
        if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            rank, ranks = _int_env(env, "SLURM_PROCID"), _int_env(env, "SLURM_NTASKS")
        elif "RANK" in env and "WORLD_SIZE" in env:
            rank, ranks = _int_env(env, "RANK"), _int_env(env, "WORLD_SIZE")
        task_id, num_tasks = array * ranks + rank, arrays * ranks
    if num_tasks < 1 or not 0 <= task_id < num_tasks:
        raise ValueError(
            f"task {task_id} of {num_tasks}: need 0 <= task_id < num_tasks (a SLURM array must be one contiguous "
            "range, --array=0-N, optionally with %limit)"
        )
    return task_id, num_tasks


def shards_of_task(num_shards: int, task_id: int, num_tasks: int) -> list[int]:
    """The input shard indices task `task_id` of `num_tasks` owns (round-robin, so every task gets an
    even share of a sorted shard list whatever its length)."""
    return list(range(task_id, num_shards, num_tasks))


def claim_inputs(out_dir: str | Path, input_shards: list[str]) -> None:
    """Records the input shard list in `out_dir`, or checks it against the one recorded: output k
    belongs to input k, so outputs of another list must not be mixed in (or merged) silently."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / INPUTS_NAME
    if path.exists():
        recorded = json.loads(path.read_text())
        if recorded != input_shards:
            raise ValueError(
                f"{out_dir} holds the outputs of {len(recorded)} other input shard(s) (first {recorded[:1]}); "
                f"got {len(input_shards)} (first {input_shards[:1]}): use another out_dir"
            )
        return
    # tasks start together and may all write it: one identical content, each through its own tmp name
    write_json_atomically(path, input_shards)


def run_task(
    make_generator: Callable[[], SamAutomaticMaskGenerator],
    input_shards: list[str],
    out_dir: str | Path,
    task_id: int,
    num_tasks: int,
    *,
    progress: bool = True,
) -> dict[str, list[int]]:
    """Generates this task's shards that are not complete yet; the generator (the model load) is made
    only if one is missing. Returns {"generated": [indices], "skipped": [indices already complete]}."""
    claim_inputs(out_dir, input_shards)
    owned = shards_of_task(len(input_shards), task_id, num_tasks)
    pending = [i for i in owned if completed_shard(out_dir, i) is None]
    if pending:
        generator = make_generator()
        for index in pending:
            generate_one_shard(generator, input_shards[index], index, out_dir, record_manifest=False, progress=progress)
    return {"generated": pending, "skipped": [i for i in owned if i not in pending]}


def merge_outputs(input_shards: list[str], out_dir: str | Path) -> dict[str, Any]:
    """Checks that every input shard has a complete output, then writes `manifest.json` (the shards and
    their counts, as SA1BShardWriter records them) and `quality.json`. Returns {"shards", "quality"}."""
    out_dir = Path(out_dir)
    if not (out_dir / INPUTS_NAME).exists():
        raise MissingOutputsError(f"{out_dir} holds no stage 3 task output ({INPUTS_NAME} is missing)")
    claim_inputs(out_dir, input_shards)
    stats, missing = [], []
    for index, url in enumerate(input_shards):
        found = completed_shard(out_dir, index)
        if found is None:
            missing.append(f"{index} ({Path(url).name})")
        else:
            stats.append(found)
    if missing:
        listed = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise MissingOutputsError(
            f"{len(missing)} of {len(input_shards)} input shard(s) have no complete output in {out_dir}: {listed}. "
            "Rerun the tasks (complete shards are skipped), then merge again."
        )
    # only images that kept a mask were written, one annotation per mask
    entries = {
        s["shard"]: {"samples": sum(1 for i in s["images"] if i["masks"]), "masks": sum(i["masks"] for i in s["images"])}
        for s in stats
        if s["shard"]
    }
    write_manifest(out_dir, entries)
    quality = summarize_quality([image for s in stats for image in s["images"]])
    write_json_atomically(out_dir / QUALITY_NAME, quality)
    return {"shards": [str(out_dir / name) for name in entries], "quality": quality}


def task_device(name: str, env: Mapping[str, str] = os.environ) -> torch.device:
    """`auto`: the GPU of this task's local rank when CUDA is there (with one GPU visible per task,
    that one), else the CPU; any other value as torch names it."""
    if name != "auto":
        return torch.device(name)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = int(env.get("SLURM_LOCALID", env.get("LOCAL_RANK", "0")))
    return torch.device("cuda", local % torch.cuda.device_count())


def run(cfg: DictConfig) -> dict[str, Any]:
    """One task (mode=task) or the merge (mode=merge), as configured."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    input_shards = expand_shard_patterns(cfg.corpus.shards)
    if cfg.mode == "merge":
        return merge_outputs(input_shards, cfg.out_dir)
    if cfg.mode != "task":
        raise ValueError(f"mode must be task or merge, got {cfg.mode!r}")
    task_id, num_tasks = task_slot(cfg.task_id, cfg.num_tasks)
    device = task_device(cfg.device)
    settings = GeneratorSettings.from_mapping(OmegaConf.to_container(cfg.stage3.generator, resolve=True), where="stage3.generator")

    def make_generator() -> SamAutomaticMaskGenerator:
        torch.manual_seed(cfg.seed)
        model = build_sam_from_checkpoint(str(cfg.checkpoint)).eval().to(device)
        return SamAutomaticMaskGenerator.from_settings(model, settings)

    done = run_task(make_generator, input_shards, cfg.out_dir, task_id, num_tasks, progress=cfg.progress)
    return {"task_id": task_id, "num_tasks": num_tasks, **done}


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="engine/distributed_stage3")
def main(cfg: DictConfig) -> None:
    try:
        result = run(cfg)
    except OSError as error:  # a full disk: complete outputs are kept, the shard being written is dropped
        sys.exit(f"segany-stage3: error: {describe_os_error(error, rerun='complete shards are skipped')}")
    if cfg.mode == "merge":
        print(f"merged {len(result['shards'])} shard(s) into {Path(cfg.out_dir) / 'manifest.json'}")
        print(json.dumps(result["quality"], indent=1, sort_keys=True))
    else:
        print(
            f"task {result['task_id']} of {result['num_tasks']}: generated {len(result['generated'])} shard(s), "
            f"{len(result['skipped'])} already complete"
        )


if __name__ == "__main__":
    main()
