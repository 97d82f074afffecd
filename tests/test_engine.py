"""The data engine: the ledger, the corpus split, resumable annotation and automatic stages, the cycle."""

import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from data_engine.annotation_step import annotate_shards, summarize_images
from data_engine.annotator import ImageAnnotation, MaskRecord
from data_engine.automatic_step import generate_shards, summarize_quality
from data_engine.corpus import read_labelled_images, split_corpus
from data_engine.ledger import ConfigChangedError, RunLedger
from segany_train.config_paths import CONFIG_DIR
from segany_train.data.shard_writer import read_manifest
from segany_train.data.synthetic import write_synthetic_corpus


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> list[str]:
    directory = tmp_path_factory.mktemp("pool")
    write_synthetic_corpus(directory, num_images=12, size=96, images_per_shard=3, min_objects=2, max_objects=4, progress=False)
    return [str(p) for p in sorted(directory.glob("sa_*.tar"))]


def _keys(shard: str) -> list[str]:
    with tarfile.open(shard) as tar:
        return sorted({Path(m.name).name.split(".")[0] for m in tar.getmembers()})


def test_ledger_records_steps_and_refuses_another_config(tmp_path):
    ledger = RunLedger(tmp_path, {"a": 1})
    calls = []
    assert ledger.run("s1", lambda: calls.append(1) or {"x": 1}) == {"x": 1}
    assert RunLedger(tmp_path, {"a": 1}).run("s1", lambda: calls.append(2) or {"x": 2}) == {"x": 1}  # not rerun
    assert calls == [1] and not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ConfigChangedError, match="another engine configuration"):
        RunLedger(tmp_path, {"a": 2})


def test_corpus_split_partitions_the_pool(pool):
    split = split_corpus(pool[1:], seed=pool[:1], holdout_shards=1, rounds=2)
    assert split.seed == pool[:1] and split.holdout == pool[-1:]
    with pytest.raises(ValueError, match="share shards"):
        split_corpus(pool, seed=pool[:1], holdout_shards=1, rounds=2)
    assert split.pool == pool[1:-1] and [len(c) for c in split.chunks] == [1, 1]
    with pytest.raises(ValueError, match="at least one pool shard for each of 3"):
        split_corpus(pool[1:], seed=pool[:1], holdout_shards=1, rounds=3)


class GroundTruthTool:
    """A stand-in annotation tool (the Annotator interface): returns the GT objects missing from the
    pre-filled masks, costing 5 s and 2 clicks each; fails on one given image to inject a kill."""

    def __init__(self, gt_masks, key, fail_on=None):
        self.gt_masks, self.key, self.fail_on = gt_masks, key, fail_on

    def annotate(self, image, prefilled):
        if self.key == self.fail_on:
            raise KeyboardInterrupt("killed")
        covered = {k for k, g in enumerate(self.gt_masks) for p in prefilled if (g & p).sum() / max((g | p).sum(), 1) > 0.9}
        accepted = [i for i, p in enumerate(prefilled) if any((g & p).sum() / max((g | p).sum(), 1) > 0.9 for g in self.gt_masks)]
        new = [g for k, g in enumerate(self.gt_masks) if k not in covered]
        records = [MaskRecord(k, (), 0, 5.0, 1.0, 1.0, False) for k in range(len(new))]
        return ImageAnnotation(masks=new, records=records, accepted_prefilled=accepted)


def test_annotation_resumes_after_a_kill_without_losing_or_duplicating(pool, tmp_path):
    inputs = pool[:3]
    every_key = sorted(k for url in inputs for k in _keys(url))
    doomed = _keys(inputs[1])[1]  # the second image of the second shard
    with pytest.raises(KeyboardInterrupt):
        annotate_shards(inputs, tmp_path, lambda item: GroundTruthTool(item.gt_masks, item.key, fail_on=doomed), progress=False)
    assert sorted(read_manifest(tmp_path)["shards"]) == ["annotated-000000.tar"]  # only the complete shard
    assert not (tmp_path / "annotated-000001.tar").exists()
    out = annotate_shards(inputs, tmp_path, lambda item: GroundTruthTool(item.gt_masks, item.key), progress=False)
    written = sorted(k for s in out["shards"] for k in _keys(s))
    assert written == every_key  # every image once, none twice
    assert sorted(read_manifest(tmp_path)["shards"]) == [Path(s).name for s in out["shards"]]
    assert not list(tmp_path.glob("*.tmp"))
    for item in read_labelled_images(out["shards"]):  # the annotated masks are the GT objects
        assert len(item.gt_masks) == len(next(i for i in read_labelled_images(inputs) if i.key == item.key).gt_masks)
    stats = summarize_images(out["images"])
    assert stats["images"] == 9 and stats["seconds_per_mask"] == pytest.approx(5.0)


def test_prefilled_masks_are_kept_counted_and_scored(pool, tmp_path):
    def prefill(image):
        item = next(i for i in read_labelled_images(pool[:1]) if np.array_equal(i.image, image))
        wrong = np.zeros_like(item.gt_masks[0])
        wrong[:5, :5] = True
        return [item.gt_masks[0], wrong]

    out = annotate_shards(pool[:1], tmp_path, lambda item: GroundTruthTool(item.gt_masks, item.key), prefill=prefill, progress=False)
    stats = summarize_images(out["images"])
    assert stats["prefilled_per_image"] == 2 and stats["prefilled_accepted_per_image"] == 1
    assert stats["prefilled_precision"] == pytest.approx(0.5)
    for item in read_labelled_images(out["shards"]):
        original = next(i for i in read_labelled_images(pool[:1]) if i.key == item.key)
        assert len(item.gt_masks) == len(original.gt_masks)  # accepted pre-filled + the rest, no duplicate


class GroundTruthGenerator:
    """A stand-in automatic mask generator: the GT masks of known images, plus one junk mask each."""

    def __init__(self, shards, fail_after=None):
        self.by_image = {i.image.tobytes(): i.gt_masks for i in read_labelled_images(shards)}
        self.calls, self.fail_after = 0, fail_after

    def generate(self, image):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("killed")
        junk = np.zeros(image.shape[:2], bool)
        junk[-3:, -3:] = True
        masks = self.by_image[image.tobytes()] + [junk]
        return [
            {"segmentation": m, "predicted_iou": 0.9, "stability_score": 0.95, "point_coords": [[0.0, 0.0]], "crop_box": [0, 0, m.shape[1], m.shape[0]]}
            for m in masks
        ]


def test_automatic_stage_resumes_and_measures_quality(pool, tmp_path):
    inputs = pool[:2]
    with pytest.raises(KeyboardInterrupt):
        generate_shards(GroundTruthGenerator(inputs, fail_after=4), inputs, tmp_path, progress=False)
    assert sorted(read_manifest(tmp_path)["shards"]) == ["automatic-000000.tar"]
    out = generate_shards(GroundTruthGenerator(inputs), inputs, tmp_path, progress=False)
    assert sorted(k for s in out["shards"] for k in _keys(s)) == sorted(k for u in inputs for k in _keys(u))
    quality = summarize_quality(out["images"])
    gt_total = sum(len(i.gt_masks) for i in read_labelled_images(inputs))
    assert quality["masks"] == gt_total + 6  # one junk mask per image
    assert quality["share_iou_above_90"] == pytest.approx(gt_total / (gt_total + 6))
    assert quality["gt_recall_75"] == 1.0
    with open(out["shards"][0].replace(".tar", ".stats.json")) as f:
        assert json.load(f)["shard"] == "automatic-000000.tar"


TRAINING = [
    "experiment=tiny_synthetic_cpu",
    "data.num_workers=0",
    "data.max_masks=4",
    "prompting.num_iterations=2",
    "prompting.num_correction_clicks=1",
    "callbacks.checkpoint_every_n_steps=1",
    "callbacks.progress_bar=false",
]


def _seed_weights(directory: Path) -> tuple[Path, str]:
    """A seed model file for the engine's test training config, and its SHA-256."""
    from segany_train.model.seed_model import file_sha256
    from segany_train.model import build_sam_by_name

    path = directory / "seed.pth"
    if not path.exists():
        torch.manual_seed(5)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(build_sam_by_name("vit_t_256_small_decoder").state_dict(), path)
    return path, file_sha256(path)


def _engine_config(tmp_path: Path, corpus: Path, extra: list[str] = ()):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose("engine/cycle", overrides=engine_overrides(tmp_path, corpus, extra))


def engine_overrides(tmp_path: Path, corpus: Path, extra: list[str] = ()) -> list[str]:
    """A cycle sized for tests (seconds per step): `segany-engine <these>` runs it as `_engine_config` composes it."""
    seed, digest = _seed_weights(corpus.parent / "seed_model")
    return [
        f"run_dir={tmp_path / 'run'}",
        "progress=false",
        f"corpus.synthetic.directory={corpus}",
        "corpus.synthetic.num_images=10",
        "corpus.synthetic.images_per_shard=2",
        "corpus.synthetic.size=96",
        f"corpus.shards='{corpus}/sa_{{000000..000004}}.tar'",
        "corpus.holdout_shards=1",
        f"seed_model.checkpoint={seed}",
        f"seed_model.sha256={digest}",
        f"seed_model.corpus.directory={corpus}_seed",
        "seed_model.corpus.num_images=4",
        "seed_model.corpus.images_per_shard=2",
        "seed_model.corpus.size=96",
        f"seed_model.shards='{corpus}_seed/sa_{{000000..000001}}.tar'",
        "seed_model.train_steps=3",
        "training.overrides=[" + ",".join(f"'{o}'" for o in TRAINING) + "]",
        "stage1.rounds=2",
        "stage1.train_steps=2",
        "stage2.rounds=2",
        "stage2.train_steps=2",
        "stage2.detector.steps=3",
        "stage2.prefill.pred_iou_thresh=0.0",
        "stage2.prefill.stability_score_thresh=0.0",
        "stage2.prefill.score_threshold=0.0",
        "stage3.generator.points_per_side=4",
        "stage3.generator.pred_iou_thresh=0.0",
        "stage3.generator.stability_score_thresh=0.0",
        "stage3.train_steps=2",
        "eval.max_images=2",
        "report.overlays=1",
        "device=auto",
        *extra,
    ]


def test_end_to_end_cycle_resumes_after_interruptions_between_and_inside_steps(tmp_path, monkeypatch):
    from data_engine import engine

    corpus = tmp_path / "corpus"
    cfg = _engine_config(tmp_path, corpus)
    real_retrain, calls = engine.retrain, {"n": 0}

    def flaky_retrain(*args, **kwargs):  # the second retrain (stage 1 round 2) is killed partway
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed while training")
        return real_retrain(*args, **kwargs)

    monkeypatch.setattr(engine, "retrain", flaky_retrain)
    with pytest.raises(KeyboardInterrupt):
        engine.run_engine(cfg)
    ledger = json.loads((tmp_path / "run" / "engine.json").read_text())
    # the shipped-style seed weights are used as they are: no seed training, the seed is evaluated
    assert ledger["order"][:4] == ["seed/eval", "stage1/round1/annotate", "stage1/round1/train", "stage1/round1/eval"]
    assert "stage1/round2/annotate" in ledger["order"] and "stage1/round2/train" not in ledger["steps"]

    monkeypatch.setattr(engine, "retrain", real_retrain)
    report = engine.run_engine(cfg.copy())
    ledger = json.loads((tmp_path / "run" / "engine.json").read_text())
    steps = ledger["steps"]
    assert ledger["order"].count("stage1/round1/annotate") == 1
    expected = ["stage2/round1/detector", "stage2/round2/detector", "stage2/round2/eval", "stage3/generate", "stage3/train", "stage3/eval", "control/train", "control/eval"]
    assert all(step in steps for step in expected)
    # stage 2's detector is retrained every round, on the embeddings of the model that round annotates with
    assert steps["stage2/round1/detector"]["model"] == steps["stage1/round2/train"]["checkpoint"]
    assert steps["stage2/round2/detector"]["model"] == steps["stage2/round1/train"]["checkpoint"]
    # thresholds measured in the cycle, on the model each stage starts from, over annotated images only
    from data_engine.threshold_sweep import choose_thresholds

    for name, start, quality, amount, minimum in (
        ("stage2/thresholds", "stage1/round2/train", "precision", "prefilled_per_image", cfg.threshold_sweep.prefill_min_precision),
        ("stage3/thresholds", "stage2/round2/train", "share_iou_above_75", "gt_recall_50", cfg.threshold_sweep.stage3_min_share_iou_75),
    ):
        sweep = steps[name]
        assert sweep["model"] == steps[start]["checkpoint"] and sweep["images"] > 0
        assert len(sweep["rows"]) == len(cfg.threshold_sweep.pred_iou) * len(cfg.threshold_sweep.stability)
        assert sweep["chosen"] == choose_thresholds(sweep["rows"], quality=quality, minimum=minimum, amount=amount)
    assert "stage 2 pre-fill thresholds measured on" in report.read_text() and "stage 3 thresholds measured on" in report.read_text()
    assert ledger["order"].index("stage3/thresholds") < ledger["order"].index("stage3/generate")
    text = report.read_text()
    assert "| stage2 | 2 |" in text and "held-out mIoU@5" in text and (tmp_path / "run" / "trends.png").exists()
    assert "| control |" in text and "## Targets" in text
    # every figure the targets need, under stable keys, with 95% intervals
    summary = ledger["summary"]
    for who in ("seed", "final", "control"):
        low, high = summary[who]["miou_1_ci"]
        assert low <= summary[who]["miou_1"] <= high
    assert set(summary["targets"]) == {
        "final_vs_seed", "final_vs_control", "stage1_seconds_fall", "stage1_masks_rise",
        "stage2_prefill", "stage2_more_masks_than_stage1", "stage3_quality", "iou_head_spearman",
    }
    # every pool image annotated exactly once across the rounds, and stage 3 covered the whole pool
    annotated = [k for s in Path(tmp_path / "run").glob("stage[12]/round*/annotate/annotated-*.tar") for k in _keys(str(s))]
    assert len(annotated) == len(set(annotated))
    pool_keys = {k for i in range(0, 4) for k in _keys(str(corpus / f"sa_{i:06d}.tar"))}
    assert set(annotated) <= pool_keys
    assert steps["stage3/generate"]["quality"]["images"] == len(pool_keys)
    assert engine.run_engine(cfg.copy()) == report  # a finished run only rewrites the report

    # one training run across the cycle, started from the seed weights: each retrain continued the
    # last (4 rounds x 2 + final 2), the one killed partway included
    final = tmp_path / "run" / steps["stage3/train"]["checkpoint"]
    state = torch.load(final, map_location="cpu", weights_only=True)
    assert state["global_step"] == 4 * 2 + 2
    assert state["lr_schedulers"][0]["last_epoch"] == 4 * 2 + 2  # the schedule went on, not restarted
    # the control: as many steps from the same seed, on the seed split only
    control = torch.load(tmp_path / "run" / steps["control/train"]["checkpoint"], map_location="cpu", weights_only=True)
    assert control["global_step"] == state["global_step"]
    control_shards = steps["control/train"]["train_shards"]
    assert control_shards and all(Path(s).parent == Path(f"{corpus}_seed") for s in control_shards)

    # stage 3 alone: a team's own shards and model, no cycle around it
    extra = ["only=stage3", f"checkpoint={final}", "corpus.synthetic=null", f"corpus.shards='{corpus}/sa_000004.tar'"]
    alone = engine.run_engine(_engine_config(tmp_path / "alone", corpus, extra))
    automatic = sorted((tmp_path / "alone" / "run" / "stage3" / "generate").glob("automatic-*.tar"))
    assert [k for s in automatic for k in _keys(str(s))] == _keys(str(corpus / "sa_000004.tar"))
    assert "Stage 3 automatic masks" in alone.read_text()
    # the same in bf16: the generator ran under bfloat16 autocast on the same images
    engine.run_engine(_engine_config(tmp_path / "alone_bf16", corpus, [*extra, "precision=bf16"]))
    automatic_bf16 = sorted((tmp_path / "alone_bf16" / "run" / "stage3" / "generate").glob("automatic-*.tar"))
    assert [k for s in automatic_bf16 for k in _keys(str(s))] == _keys(str(corpus / "sa_000004.tar"))
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, got 'fp16'"):
        engine.run_engine(_engine_config(tmp_path / "fp16", corpus, [*extra, "precision=fp16"]))

    # a generator that keeps no mask leaves no shard, and the report says so instead of failing
    strict = engine.run_engine(_engine_config(tmp_path / "strict", corpus, [*extra, "stage3.generator.pred_iou_thresh=1.0"]))
    assert "- 0 masks on 2 images" in strict.read_text()
    assert not list((tmp_path / "strict" / "run" / "stage3" / "generate").glob("*.tar"))


def test_seed_model_is_hash_checked_before_anything_runs(tmp_path):
    from data_engine import engine
    from segany_train.model.seed_model import BUILTIN_PATH, BUILTIN_SHA256, SeedModelError, file_sha256, resolve_seed_checkpoint

    corpus = tmp_path / "corpus"
    with pytest.raises(SeedModelError, match="expected 0000"):
        engine.run_engine(_engine_config(tmp_path, corpus, ["seed_model.sha256=" + "0" * 64]))
    assert not (tmp_path / "run" / "engine.json").exists()  # refused before the ledger or any training
    with pytest.raises(SeedModelError, match="not found"):
        resolve_seed_checkpoint(str(tmp_path / "missing.pt"))
    # the shipped seed is the file its recorded hash names, and loads as plain weights
    assert resolve_seed_checkpoint("builtin") == BUILTIN_PATH and file_sha256(BUILTIN_PATH) == BUILTIN_SHA256
    weights = torch.load(BUILTIN_PATH, map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float16 for v in weights.values() if v.is_floating_point())
    assert BUILTIN_PATH.stat().st_size <= 10 * 2**20


def test_engine_device_follows_the_trainer():
    from data_engine.engine import engine_device

    assert engine_device("auto", "cpu") == torch.device("cpu")
    assert engine_device("cpu", "gpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            engine_device("auto", "gpu")
        with pytest.raises(ValueError, match="no CUDA device"):
            engine_device("cuda", "cpu")
        assert engine_device("auto", "auto") == torch.device("cpu")


@pytest.mark.gpu
def test_engine_device_auto_puts_the_engine_on_cuda_with_a_gpu_trainer(tmp_path):
    from data_engine.engine import Engine

    corpus = tmp_path / "corpus"
    cfg = _engine_config(tmp_path, corpus, ["training.overrides=[" + ",".join(f"'{o}'" for o in [*TRAINING, "trainer=gpu"]) + "]"])
    eng = Engine(cfg)
    assert eng.device.type == "cuda"
    seed, _ = _seed_weights(corpus.parent / "seed_model")
    assert next(eng._model(str(seed)).parameters()).device.type == "cuda"


def _answer_tasks_with_ground_truth(task_dir: Path) -> None:
    """Stands in for a real annotation tool: exports every exported image's GT objects as COCO RLEs."""
    from data_engine.annotation_tasks import INDEX_FILE, RESULT_FILE, TASKS_FILE
    from segany_train.data.sa1b import annotation_from_mask

    tasks = json.loads((task_dir / TASKS_FILE).read_text())
    index = json.loads((task_dir / INDEX_FILE).read_text())
    gt = {item.key: item.gt_masks for item in read_labelled_images(index["shards"])}
    annotations = []
    for image in tasks["images"]:
        for mask in gt[index["images"][image["file_name"]]["key"]]:
            ann = annotation_from_mask(mask, annotation_id=len(annotations) + 1)
            annotations.append({**ann, "image_id": image["id"], "category_id": 1, "iscrowd": 0})
    (task_dir / RESULT_FILE).write_text(json.dumps({**tasks, "annotations": annotations}))


def test_cycle_with_a_real_annotation_tool_waits_for_each_rounds_coco_result(tmp_path, caplog):
    from data_engine import engine

    caplog.set_level(logging.INFO, logger="data_engine")
    from data_engine.annotation_tasks import AwaitingAnnotation

    corpus = tmp_path / "corpus"
    # also: a seed trained here from scratch (seed_model.checkpoint=null) instead of a shipped one
    cfg = _engine_config(
        tmp_path,
        corpus,
        ["annotator.kind=coco_tasks", "stage1.rounds=1", "stage2.rounds=1", "stage3.train_steps=0", "seed_model.checkpoint=null", "control.enabled=false"],
    )
    run = tmp_path / "run"
    for step in ("stage1/round1/annotate", "stage2/round1/annotate"):
        with pytest.raises(AwaitingAnnotation, match="annotations.json"):
            engine.run_engine(cfg)
        assert step not in json.loads((run / "engine.json").read_text())["steps"]
        _answer_tasks_with_ground_truth(run / step / "tasks")
    report = engine.run_engine(cfg).read_text()
    steps = json.loads((run / "engine.json").read_text())["steps"]
    # the console (and engine.log) says what each round's result brought in
    imported = [r.getMessage() for r in caplog.records if ": imported " in r.getMessage()]
    assert [line.split(":")[0] for line in imported] == ["stage1/round1/annotate", "stage2/round1/annotate"]
    stats = steps["stage1/round1/annotate"]["stats"]
    assert f"stage1/round1/annotate: imported {stats['images']} images with {stats['masks']} masks; skipped: nothing" in imported
    with pytest.raises(ValueError, match="annotator.kind must be one of"):
        engine.run_engine(_engine_config(tmp_path / "typo", corpus, ["annotator.kind=cocotasks"]))
    for step in ("stage1/round1/annotate", "stage2/round1/annotate"):
        stats = steps[step]["stats"]
        assert stats["masks_per_image"] == stats["gt_objects_per_image"] > 0  # every GT object came back
    assert "seed/train" in steps and "control/train" not in steps
    assert "stage2/round1/detector" in steps  # stage 2's tasks went out with the detector's pre-fill (none, this untrained)
    assert "| stage2 | 1 |" in report


def test_the_seed_can_start_from_a_trained_model_and_retrains_continue_it(pool, tmp_path):
    from data_engine.retraining import compose_training_config, retrain
    from segany_train.model import build_sam_by_name, build_sam_from_checkpoint

    torch.manual_seed(3)
    start = build_sam_by_name("vit_t_256_small_decoder")
    torch.save(start.state_dict(), tmp_path / "start.pth")
    # lr 0: the weights stay what was loaded, so the check is exact
    base = compose_training_config([*TRAINING, f"model.checkpoint={tmp_path / 'start.pth'}", "optim.lr=0.0"])
    seed = retrain(base, run_dir=tmp_path / "seed", train_shards=pool[:1], val_shards=pool[1:2], steps=2, seed=0, total_steps=5, progress=False)
    assert all(torch.equal(v, start.state_dict()[k]) for k, v in build_sam_from_checkpoint(seed).state_dict().items())
    again = retrain(base, run_dir=tmp_path / "round", train_shards=pool[1:2], val_shards=pool[1:2], steps=3, seed=0, continue_from=seed, total_steps=5, progress=False)
    assert torch.load(again, map_location="cpu", weights_only=False)["global_step"] == 5
    with pytest.raises(ValueError, match="the lr schedule has 5 steps"):
        retrain(base, run_dir=tmp_path / "over", train_shards=pool[:1], val_shards=pool[1:2], steps=1, seed=0, continue_from=again, total_steps=5, progress=False)


def test_resuming_with_other_presentation_settings_is_not_a_changed_config(tmp_path):
    RunLedger(tmp_path, {"a": 1, "progress": True, "threads": None})
    RunLedger(tmp_path, {"a": 1, "progress": False, "threads": 2})  # accepted
    with pytest.raises(ConfigChangedError):
        RunLedger(tmp_path, {"a": 2, "progress": True, "threads": None})


def test_the_annotation_tool_connection_is_not_run_config_and_its_key_is_not_written(tmp_path):
    tool = {"url": "http://localhost:8080", "api_key": "secret-token-1", "backend_url": "http://localhost:9090"}
    RunLedger(tmp_path, {"a": 1, "annotator": {"kind": "label_studio", "target_iou": 0.85, "label_studio": tool}})
    assert "secret-token-1" not in (tmp_path / "engine_config.json").read_text()
    moved = {**tool, "url": "http://annotate:8080", "api_key": "rotated-token"}
    RunLedger(tmp_path, {"a": 1, "annotator": {"kind": "label_studio", "target_iou": 0.85, "label_studio": moved}})  # accepted
    with pytest.raises(ConfigChangedError):
        RunLedger(tmp_path, {"a": 1, "annotator": {"kind": "label_studio", "target_iou": 0.9, "label_studio": tool}})

