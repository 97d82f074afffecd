"""segany-engine: SAM's data engine (paper section 4) as a resumable annotate -> retrain cycle.

seed model -> stage 1 rounds (assisted-manual: annotate a pool chunk, retrain on everything annotated
so far) -> stage 2 rounds (semi-automatic: a box detector pre-fills confident masks, annotators add
the missed objects) -> stage 3 (the automatic mask generator over the whole pool, a quality check,
and a final retrain on the automatic masks mixed with the oversampled manual ones) -> report.

Every step's outputs live in the run directory and are recorded in engine.json (`ledger.py`); the
same command continues a killed run. `only=stage3` runs stage 3 alone on given shards and checkpoint.
Annotators are simulated, or people in a real tool (`annotator.kind=coco_tasks`, `annotation_tasks.py`,
or `annotator.kind=label_studio` with the round's model assisting, `label_studio_tasks.py`): then each
round waits, exiting with status 3, until the tool's result is in place.
"""

import itertools
import logging
import os
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from data_engine.annotation_step import annotate_shards, summarize_images
from data_engine.annotation_tasks import TASKS_FILE, AwaitingAnnotation, export_tasks, import_annotations
from data_engine.annotator import SimulatedAnnotator, TimeModel
from data_engine.automatic_step import generate_shards, summarize_quality
from data_engine.corpus import CorpusSplit, LabelledImage, read_labelled_images, split_corpus
from data_engine.engine_config_check import check_engine_config
from data_engine.ledger import RunLedger
from data_engine.progress import CycleProgress, PlannedStep, plan_cycle, round_summary
from data_engine.report import AutomaticExample, save_overlays, write_report
from data_engine.retraining import compose_training_config, retrain
from data_engine.targets import engine_summary
from data_engine.threshold_sweep import choose_thresholds, sweep_automatic, sweep_prefill
from segany_train.amg.generator_settings import GeneratorSettings
from segany_train.box_detection.prefill import BoxPrefill, train_prefill_detector
from segany_train.config_paths import CONFIG_DIR
from segany_train.data.directory_lock import DirectoryLocked, lock_directory
from segany_train.data.pipeline import expand_shard_patterns
from segany_train.data.synthetic import write_configured_corpus
from segany_train.evaluation.holdout import evaluate_holdout
from segany_train.inference.automatic_mask_generator import SamAutomaticMaskGenerator
from segany_train.inference.predictor import SamPredictor
from segany_train.inference.precision import check_precision
from segany_train.model import Sam, build_sam_from_checkpoint
from segany_train.model.seed_model import resolve_seed_checkpoint
from segany_train.os_errors import describe_os_error

log = logging.getLogger(__name__)
ANNOTATOR_KINDS = ("simulated", "coco_tasks", "label_studio")
EXIT_AWAITING_ANNOTATION = 3  # segany-engine's exit status while a round waits for a real tool's result


def engine_device(setting: str, trainer_accelerator: str | None) -> torch.device:
    """Where annotation, pre-fill, stage 3 and evaluation run: `auto` follows the trainer (a GPU
    trainer, or an `auto` one on a machine with CUDA, means CUDA); else the named device."""
    if setting == "auto":
        gpu = trainer_accelerator in ("gpu", "cuda") or (trainer_accelerator == "auto" and torch.cuda.is_available())
        setting = "cuda" if gpu else "cpu"
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"the engine's device is {setting}, but this machine has no CUDA device (use device=cpu or auto)")
    return device


def _annotator_factory(predictor: SamPredictor, cfg: DictConfig):
    time_model = TimeModel(**OmegaConf.to_container(cfg.annotator.time, resolve=True))

    def annotator_for(item: LabelledImage) -> SimulatedAnnotator:
        return SimulatedAnnotator(
            predictor,
            item.gt_masks,
            target_iou=cfg.annotator.target_iou,
            # a pre-filled mask is kept when it is as good as a mask the annotator would finish with clicks
            prefilled_iou=cfg.annotator.target_iou,
            max_clicks=cfg.annotator.max_clicks,
            max_seconds_per_mask=cfg.annotator.max_seconds_per_mask,
            min_area=cfg.annotator.min_area,
            time_model=time_model,
        )

    return annotator_for


def _shard_list(results: list[dict[str, Any]]) -> list[str]:
    return [s for r in results for s in r["shards"]]


def _imported(step: str, out: dict[str, Any]) -> str:
    """What a real tool's result brought into the round, in one line."""
    images = out["images"]
    skipped = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in sorted(out["skipped"].items()) if n) or "nothing"
    return f"{step}: imported {len(images)} images with {sum(i['masks'] for i in images)} masks; skipped: {skipped}"


class Engine:
    """One engine run: the corpus split, the ledger, and the current model between steps."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        if cfg.annotator.kind not in ANNOTATOR_KINDS:  # checked before minutes of seed training
            raise ValueError(f"annotator.kind must be one of {ANNOTATOR_KINDS}, got {cfg.annotator.kind!r}")
        self.run_dir = Path(cfg.run_dir)
        self.train_base = compose_training_config(list(cfg.training.overrides))
        self.device = engine_device(cfg.device, self.train_base.trainer.get("accelerator"))
        self.precision = check_precision(cfg.precision)
        # the shipped (or a given) seed model, hash-checked before anything runs; None: trained here
        self.seed_weights = str(resolve_seed_checkpoint(cfg.seed_model.checkpoint, cfg.seed_model.sha256)) if cfg.seed_model.checkpoint else None
        self.ledger = RunLedger(self.run_dir, OmegaConf.to_container(cfg, resolve=True))
        # the retrains after the seed; the control trains as many steps on the seed split alone
        self.cycle_steps = cfg.stage1.rounds * cfg.stage1.train_steps + cfg.stage2.rounds * cfg.stage2.train_steps + cfg.stage3.train_steps
        # one lr schedule over the whole cycle: every retrain continues the training run before it
        self.total_train_steps = self.cycle_steps + (0 if self.seed_weights else cfg.seed_model.train_steps)
        self.rows: list[dict[str, Any]] = []
        self.rounds = {"stage1": cfg.stage1.rounds, "stage2": cfg.stage2.rounds}

    def show_progress(self, plan: list[PlannedStep]) -> None:
        """Logs a line as each step of `plan` starts (progress.py)."""
        wall_seconds = self.ledger.state.setdefault("wall_seconds", {})
        self.ledger.on_start = CycleProgress(plan, wall_seconds, set(self.ledger.state["steps"]), self.rounds).started

    def _add_row(self, row: dict[str, Any]) -> None:
        """A row of the report, logged as the round's summary line."""
        self.rows.append(row)
        seed = next((r for r in self.rows if r["stage"] == "seed"), None)
        log.info(round_summary(row, seed, self.rounds))

    def _relative(self, path: str) -> str:
        # abspath, not resolve: a retrain returns checkpoints/last.ckpt, a link (save_last: link) whose
        # target's name (epoch=0-step=20.ckpt) cannot go into a Hydra override
        return str(Path(os.path.abspath(path)).relative_to(os.path.abspath(self.run_dir)))

    def _absolute(self, path: str) -> str:
        return str(self.run_dir / path)

    def train_step(self, step: str, shards: list[str], init: str | None, steps: int, holdout: list[str]) -> str:
        """A retrain step; returns the checkpoint path (recorded relative to the run directory).

        init: None trains a new model; the seed weights start a new training run from them; any other
        checkpoint is an earlier retrain, whose whole training state is continued."""
        from_weights = init is not None and init == self.seed_weights
        result = self.ledger.run(
            step,
            lambda: {
                "checkpoint": self._relative(
                    retrain(
                        self.train_base,
                        run_dir=self.ledger.step_dir(step),
                        train_shards=shards,
                        val_shards=holdout,
                        steps=steps,
                        continue_from=None if from_weights else init,
                        weights=init if from_weights else None,
                        total_steps=self.total_train_steps,
                        seed=self.cfg.seed + len(self.ledger.state["order"]),
                        progress=self.cfg.progress,
                    )
                ),
                "train_shards": [self._relative(s) if Path(s).resolve().is_relative_to(self.run_dir.resolve()) else s for s in shards],
            },
        )
        return self._absolute(result["checkpoint"])

    def evaluate_step(self, step: str, checkpoint: str, holdout: list[str]) -> dict[str, Any]:
        cfg = self.cfg
        return self.ledger.run(
            step,
            lambda: evaluate_holdout(
                self._model(checkpoint),
                holdout,
                max_images=cfg.eval.max_images,
                max_masks_per_image=cfg.eval.max_masks_per_image,
                batch_size=cfg.eval.batch_size,
                seed=cfg.seed,
                progress=cfg.progress,
            ),
        )

    def _model(self, checkpoint: str) -> Sam:
        return build_sam_from_checkpoint(checkpoint).to(self.device).eval()

    def annotate_step(self, step: str, checkpoint: str, chunk: list[str], first_index: int, prefill=None) -> dict[str, Any]:
        def work() -> dict[str, Any]:
            step_dir = self.ledger.step_dir(step)
            if self.cfg.annotator.kind in ("coco_tasks", "label_studio"):  # a real tool: export, wait for its result, import
                if not (step_dir / "tasks" / TASKS_FILE).exists():
                    shown = prefill(SamPredictor(self._model(checkpoint), precision=self.precision)) if prefill else None
                    export_tasks(chunk, step_dir / "tasks", prefill=shown, progress=self.cfg.progress)
                if self.cfg.annotator.kind == "label_studio":  # published, assisted by segany-serve, collected when done
                    from data_engine.label_studio_tasks import sync_round  # needs the [annotate] extra

                    sync_round(step_dir / "tasks", settings=self.cfg.annotator.label_studio, title=f"{self.run_dir.name} {step}", checkpoint=checkpoint)
                out = import_annotations(step_dir / "tasks", step_dir, first_index=first_index)
                log.info(_imported(step, out))
            else:
                predictor = SamPredictor(self._model(checkpoint), precision=self.precision)
                out = annotate_shards(
                    chunk,
                    step_dir,
                    _annotator_factory(predictor, self.cfg),
                    prefill=prefill(predictor) if prefill else None,
                    first_index=first_index,
                    progress=self.cfg.progress,
                    description=step,
                )
            return {"shards": [self._relative(s) for s in out["shards"]], "stats": summarize_images(out["images"])}

        result = self.ledger.run(step, work)
        return {"shards": [self._absolute(s) for s in result["shards"]], "stats": result["stats"]}

    def run(self, split: CorpusSplit) -> Path:
        cfg = self.cfg
        seed = self.seed_weights or self.train_step("seed/train", split.seed, None, cfg.seed_model.train_steps, split.holdout)
        self._add_row({"stage": "seed", "round": None, **self.evaluate_step("seed/eval", seed, split.holdout)})
        checkpoint = seed
        annotated: list[dict[str, Any]] = []
        chunk = 0
        for stage, rounds in (("stage1", cfg.stage1.rounds), ("stage2", cfg.stage2.rounds)):
            for r in range(1, rounds + 1):
                step = f"{stage}/round{r}"
                prefill = None
                if stage == "stage2":  # the detector learns from the current model's embeddings, every round
                    if r == 1:  # thresholds measured on the model stage 2 starts from
                        prefill_settings = self._prefill_settings(checkpoint, annotated)
                    detector_path = self._detector(f"{step}/detector", checkpoint, _shard_list(annotated))
                    prefill = partial(BoxPrefill.from_files, detector_path, settings=prefill_settings)
                ann = self.annotate_step(f"{step}/annotate", checkpoint, split.chunks[chunk], sum(map(len, split.chunks[:chunk])), prefill)
                chunk += 1
                annotated.append(ann)
                steps = cfg[stage].train_steps
                shards = _shard_list(annotated) + (split.seed if cfg.training.keep_seed_data else [])
                checkpoint = self.train_step(f"{step}/train", shards, checkpoint, steps, split.holdout)
                self._add_row({"stage": stage, "round": r, **ann["stats"], **self.evaluate_step(f"{step}/eval", checkpoint, split.holdout)})
        quality, overlays = self.automatic_stage(checkpoint, split, _shard_list(annotated))
        if cfg.control.enabled:
            # the same number of steps from the same seed on the seed split alone: does the gain come
            # from the engine's masks, or just from training longer?
            control = self.train_step("control/train", split.seed, seed, self.cycle_steps, split.holdout)
            self._add_row({"stage": "control", "round": None, **self.evaluate_step("control/eval", control, split.holdout)})
        summary = engine_summary(self.rows, quality)
        self.ledger.record_summary(summary)
        notes = [
            f"run directory: {self.run_dir}",
            f"seed split: {len(split.seed)} shards; pool: {len(split.pool)} shards; held out: {len(split.holdout)} shards",
            f"devices: training {self.train_base.trainer.get('accelerator')}, annotation/stage 3/evaluation {self.device}",
            *self._threshold_notes(),
        ]
        return write_report(self.run_dir, self.rows, quality, overlays, notes, self.ledger.state.get("wall_seconds"), summary)

    def _detector(self, step: str, checkpoint: str, shards: list[str]) -> str:
        def work() -> dict[str, Any]:
            path = train_prefill_detector(
                self._model(checkpoint),
                shards,
                self.ledger.step_dir(step),
                settings=self.cfg.stage2.detector,
                seed=self.cfg.seed,
                progress=self.cfg.progress,
            )
            return {"detector": self._relative(path), "model": self._relative(checkpoint)}

        return self._absolute(self.ledger.run(step, work)["detector"])

    def automatic_stage(
        self, checkpoint: str, split: CorpusSplit, manual: list[str], retrain_after: bool = True
    ) -> tuple[dict[str, float], list[Path]]:
        """Stage 3 over the pool with `checkpoint`, then (optionally) the final retrain."""
        cfg = self.cfg

        settings = self._stage3_settings(checkpoint, manual)

        def generate() -> dict[str, Any]:
            generator = SamAutomaticMaskGenerator.from_settings(self._model(checkpoint), settings, precision=self.precision)
            out = generate_shards(generator, split.pool, self.ledger.step_dir("stage3/generate"), progress=cfg.progress)
            return {"shards": [self._relative(s) for s in out["shards"]], "quality": summarize_quality(out["images"])}

        auto = self.ledger.run("stage3/generate", generate)
        auto_shards = [self._absolute(s) for s in auto["shards"]]
        quality = auto["quality"]
        self._add_row({"stage": "stage3", "round": None, "images": quality["images"], "masks_per_image": quality["masks_per_image"]})
        # the generator may keep no mask at all (thresholds above what the model's IoU head reads):
        # the report shows 0 masks, and the final retrain has only the manual masks, if mixed in
        overlays = self._overlays(auto_shards[:1], split.pool) if auto_shards else []
        mix = manual * cfg.stage3.oversample_manual if cfg.stage3.mix_manual else []
        if retrain_after and cfg.stage3.train_steps and auto_shards + mix:
            # the paper's final SAM trained on automatic masks only; mixing in the manual masks, each
            # shard listed `oversample_manual` times, is the ablation that helped slightly
            final = self.train_step("stage3/train", auto_shards + mix, checkpoint, cfg.stage3.train_steps, split.holdout)
            self._add_row({"stage": "final", "round": None, **self.evaluate_step("stage3/eval", final, split.holdout)})
        return quality, overlays

    def _threshold_notes(self) -> list[str]:
        """What the in-cycle sweeps chose, for the report."""
        outcome = {
            "stage 2 pre-fill": ("stage2/thresholds", lambda c: f"{c['prefilled_per_image']:.2f} per image at {c['precision']:.0%} precision"),
            "stage 3": ("stage3/thresholds", lambda c: f"{c['share_iou_above_75']:.0%} of masks above IoU 0.75, {c['gt_recall_50']:.0%} of objects recalled"),
        }
        notes = []
        for name, (step, figures) in outcome.items():
            sweep = self.ledger.result(step)
            if sweep:
                c = sweep["chosen"]
                notes.append(
                    f"{name} thresholds measured on {sweep['model']} over {sweep['images']} annotated images: predicted IoU "
                    f">= {c['pred_iou_thresh']}, stability >= {c['stability_score_thresh']} ({figures(c)} there)"
                )
        return notes

    def _prefill_settings(self, checkpoint: str, annotated: list[dict[str, Any]]) -> DictConfig:
        """stage2.prefill with its predicted-IoU and stability thresholds measured on `checkpoint`: a
        detector trained on all annotated chunks but the last pre-fills the last one, and the pair
        with the most pre-fills per image at `threshold_sweep.prefill_min_precision` is taken."""
        cfg, sweep = self.cfg, self.cfg.threshold_sweep
        if not sweep.enabled or len(annotated) < 2:  # nothing to train a detector on and check it against
            return cfg.stage2.prefill
        step = "stage2/thresholds"

        def work() -> dict[str, Any]:
            detector = train_prefill_detector(
                self._model(checkpoint),
                _shard_list(annotated[:-1]),
                self.ledger.step_dir(step),
                settings=cfg.stage2.detector,
                seed=cfg.seed,
                progress=cfg.progress,
            )
            prefill = BoxPrefill.from_files(detector, SamPredictor(self._model(checkpoint), precision=self.precision), settings=cfg.stage2.prefill)
            items = list(itertools.islice(read_labelled_images(annotated[-1]["shards"]), sweep.images))
            rows = sweep_prefill(
                prefill, items, target_iou=cfg.annotator.target_iou, pred_iou=sweep.pred_iou, stability=sweep.stability, progress=cfg.progress
            )
            chosen = choose_thresholds(rows, quality="precision", minimum=sweep.prefill_min_precision, amount="prefilled_per_image")
            return {"chosen": chosen, "rows": rows, "images": len(items), "model": self._relative(checkpoint)}

        chosen = self.ledger.run(step, work)["chosen"]
        return OmegaConf.merge(cfg.stage2.prefill, {k: chosen[k] for k in ("pred_iou_thresh", "stability_score_thresh")})

    def _stage3_settings(self, checkpoint: str, manual: list[str]) -> GeneratorSettings:
        """stage3.generator with its thresholds measured on `checkpoint` over the last annotated images
        (the most complete ones): the pair with the highest recall of annotated objects among those
        whose masks have IoU > 0.75 at least `threshold_sweep.stage3_min_share_iou_75` of the time."""
        cfg, sweep = self.cfg, self.cfg.threshold_sweep
        settings = GeneratorSettings.from_mapping(OmegaConf.to_container(cfg.stage3.generator, resolve=True), where="stage3.generator")
        if not sweep.enabled or not manual:
            return settings

        def work() -> dict[str, Any]:
            items = list(itertools.islice(read_labelled_images(manual[::-1]), sweep.images))
            rows = sweep_automatic(
                self._model(checkpoint),
                items,
                settings=settings,
                pred_iou=sweep.pred_iou,
                stability=sweep.stability,
                progress=cfg.progress,
                precision=self.precision,
            )
            chosen = choose_thresholds(rows, quality="share_iou_above_75", minimum=sweep.stage3_min_share_iou_75, amount="gt_recall_50")
            return {"chosen": chosen, "rows": rows, "images": len(items), "model": self._relative(checkpoint)}

        chosen = self.ledger.run("stage3/thresholds", work)["chosen"]
        return replace(settings, pred_iou_thresh=chosen["pred_iou_thresh"], stability_score_thresh=chosen["stability_score_thresh"])

    def _overlays(self, shards: list[str], inputs: list[str]) -> list[Path]:
        """The report's overlays: the first images of `shards` (automatic masks) beside their GT,
        found in the `inputs` they were generated from."""
        automatic = list(itertools.islice(read_labelled_images(shards), self.cfg.report.overlays))
        wanted = {item.key for item in automatic}
        gt: dict[str, list[np.ndarray]] = {}
        for item in read_labelled_images(inputs):
            if item.key in wanted:
                gt[item.key] = item.gt_masks
                if len(gt) == len(wanted):
                    break
        examples = [
            AutomaticExample(item.key, item.image, gt.get(item.key, []), item.gt_masks, [a["predicted_iou"] for a in item.record["annotations"]])
            for item in automatic  # the automatic shard's masks are its "GT"
        ]
        return save_overlays(examples, self.run_dir / "overlays")


def prepare_corpus(cfg: DictConfig) -> None:
    """Writes the synthetic corpora the config names, the pool's and the seed split's (resumable,
    deterministic)."""
    if cfg.corpus.synthetic:
        write_configured_corpus(cfg.corpus.synthetic, progress=cfg.progress)
    if cfg.only is None and cfg.seed_model.corpus:
        write_configured_corpus(cfg.seed_model.corpus, progress=cfg.progress)


def run_engine(cfg: DictConfig) -> Path:
    """The whole cycle (or `only=stage3`); returns the report's path. One process per run directory."""
    check_engine_config(cfg)
    with lock_directory(cfg.run_dir):
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        prepare_corpus(cfg)
        engine = Engine(cfg)
        log.info("run directory %s (engine.json: finished steps; engine.log: this log)", engine.run_dir)
        if cfg.only == "stage3":
            if not cfg.checkpoint:
                raise ValueError("only=stage3 needs checkpoint=<a segany-train .ckpt or official .pth>")
            split = CorpusSplit(seed=[], chunks=[expand_shard_patterns(cfg.corpus.shards)], holdout=[])
            engine.show_progress([PlannedStep("stage3/generate")])
            # a team's own images: the masks are the product; no held-out set to retrain against
            quality, overlays = engine.automatic_stage(str(Path(cfg.checkpoint).resolve()), split, manual=[], retrain_after=False)
            return write_report(engine.run_dir, engine.rows, quality, overlays, [f"stage 3 alone with {cfg.checkpoint}"])
        if cfg.only:
            raise ValueError(f"only must be null or stage3, got {cfg.only!r}")
        rounds = cfg.stage1.rounds + cfg.stage2.rounds
        split = split_corpus(cfg.corpus.shards, seed=cfg.seed_model.shards, holdout_shards=cfg.corpus.holdout_shards, rounds=rounds)
        engine.show_progress(plan_cycle(cfg, train_seed=engine.seed_weights is None))
        return engine.run(split)


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="engine/cycle")
def main(cfg: DictConfig) -> None:
    try:
        report = run_engine(cfg)
    except AwaitingAnnotation as waiting:  # annotator.kind=coco_tasks or label_studio: a round's tasks are out
        log.warning("waiting for annotations: %s", waiting)  # the console and engine.log
        sys.exit(EXIT_AWAITING_ANNOTATION)
    except DirectoryLocked as locked:  # another segany-engine runs in this run directory
        sys.exit(f"segany-engine: error: {locked}")
    except OSError as error:  # a full disk
        sys.exit(f"segany-engine: error: {describe_os_error(error, rerun='the engine resumes in the step that failed')}")
    print(report.read_text())
    print(f"\nreport: {report}")


if __name__ == "__main__":
    main()
