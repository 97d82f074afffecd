#!/bin/bash
# Submits one turn of the data engine's annotate -> retrain cycle at scale as chained SLURM jobs, each
# starting only when the one before it succeeded (--dependency=afterok):
#
#   1. train     slurm/train.sbatch, run outputs/<CYCLE>-train          (skipped when CHECKPOINT is set)
#   2. annotate  slurm/engine_stage3.sbatch, an array over the pool's shards, into <RUN_DIR>/stage3/generate
#   3. merge     slurm/engine_stage3_merge.sbatch: all outputs there, manifest.json and quality.json
#   4. retrain   slurm/train.sbatch on the automatic masks, from the model of step 1, run outputs/<CYCLE>-retrain
#
# Settings are environment variables:
#   POOL          the shards to annotate, a brace pattern or glob (required)
#   VAL_SHARDS    held-out shards for the retrain's validation (required)
#   CYCLE         a name for this turn (default: cycle); runs and RUN_DIR are named after it
#   RUN_DIR       stage 3's directory (default: outputs/<CYCLE>-stage3)
#   CHECKPOINT    start from this model instead of training one (a .ckpt or official .pth)
#   TRAIN_ARGS    segany-train overrides of steps 1 and 4 (default: experiment=sam_vit_b_sa1b)
#   RETRAIN_ARGS  more overrides of step 4 only (for example trainer.max_steps=20000)
#   STAGE3_ARGS   segany-stage3 overrides (for example stage3.generator.points_per_side=32)
#   TRAIN_NODES   nodes of each training job (default: 2)
#   ARRAY_TASKS   stage 3 array size (default: 64); ARRAY_LIMIT: how many run at once (default: 32)
#
#   POOL='/data/pool/sa_{000000..000999}.tar' VAL_SHARDS='/data/val/sa_{000000..000001}.tar' \
#       slurm/submit_engine_cycle.sh
#
# Prints the job ids; `squeue -u $USER` shows the chain, a failed step leaves the rest pending
# (DependencyNeverSatisfied) until cancelled. Every step resumes where it stopped when resubmitted.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${POOL:?set POOL to the shards to annotate}"
: "${VAL_SHARDS:?set VAL_SHARDS to held-out shards for the retrain}"
cycle="${CYCLE:-cycle}"
run_dir="${RUN_DIR:-outputs/${cycle}-stage3}"
train_nodes="${TRAIN_NODES:-2}"
array_tasks="${ARRAY_TASKS:-64}"
array_limit="${ARRAY_LIMIT:-32}"
read -r -a train_args <<< "${TRAIN_ARGS:-experiment=sam_vit_b_sa1b}"
read -r -a retrain_args <<< "${RETRAIN_ARGS:-}"
read -r -a stage3_args <<< "${STAGE3_ARGS:-}"

submit() {  # sbatch ARGS...: prints the new job's id
    sbatch --parsable "$@" | cut -d';' -f1
}

after=()
checkpoint="${CHECKPOINT:-}"
if [[ -z "$checkpoint" ]]; then
    train_job=$(submit --nodes="$train_nodes" "$here/train.sbatch" "${train_args[@]}" "run_name=${cycle}-train")
    echo "train:    $train_job"
    after=(--dependency="afterok:${train_job}")
    checkpoint="outputs/${cycle}-train/checkpoints/last.ckpt"
fi

# values in Hydra's quotes: shard patterns hold braces, checkpoint names may hold '='
stage3=("checkpoint='${checkpoint}'" "corpus.shards='${POOL}'" "run_dir='${run_dir}'" "${stage3_args[@]}")
annotate_job=$(submit "${after[@]}" --array="0-$((array_tasks - 1))%${array_limit}" "$here/engine_stage3.sbatch" "${stage3[@]}")
echo "annotate: $annotate_job (array of $array_tasks)"
merge_job=$(submit --dependency="afterok:${annotate_job}" "$here/engine_stage3_merge.sbatch" "corpus.shards='${POOL}'" "run_dir='${run_dir}'")
echo "merge:    $merge_job"
# the paper's final model trained on the automatic masks alone; the manifest gives the epoch length
retrain_job=$(submit --dependency="afterok:${merge_job}" --nodes="$train_nodes" "$here/train.sbatch" \
    "${train_args[@]}" "run_name=${cycle}-retrain" "model.checkpoint='${checkpoint}'" data.synthetic=null \
    "data.train_shards='${run_dir}/stage3/generate/automatic-*.tar'" "data.val_shards='${VAL_SHARDS}'" "${retrain_args[@]}")
echo "retrain:  $retrain_job"
