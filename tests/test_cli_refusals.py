"""What the commands refuse before doing any work: outputs that would overwrite their inputs,
unusable values, outputs that cannot be written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from segany_train.data import coco, synthetic
from segany_train.data.datamodule import count_samples
from segany_train.data.pipeline import expand_shard_patterns, read_records
from segany_train.data.sa1b import annotation_from_mask, sample_key
from segany_train.data.shard_writer import SA1BShardWriter, read_manifest
from segany_train.evaluation import cli as evaluation_cli
from segany_train.inference import amg_cli
from tests.conftest import tiny_training_overrides
from tests.shards import jpeg_bytes, make_image, record_for, write_shards

MODEL = ["--model-type", "vit_t_256_small_decoder", "--no-progress", "--points-per-side", "2"]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def image_folder(directory: Path, count: int = 2) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(make_image(i)[0]).save(directory / f"photo{i}.png")
    return directory


@pytest.mark.parametrize("nested", ["same", "file"])
def test_amg_refuses_to_write_over_its_input_images(tmp_path, nested, capsys):
    photos = image_folder(tmp_path / "photos")
    before = snapshot(photos)
    source = photos if nested == "same" else photos / "photo0.png"
    with pytest.raises(SystemExit) as exit_:
        amg_cli.main([str(source), "--out", str(photos / "." ), *MODEL])
    assert exit_.value.code != 0 and "input" in str(exit_.value.code)
    assert snapshot(photos) == before


def test_amg_refuses_shards_out_over_its_input_shards(tmp_path):
    write_shards(tmp_path / "shards", 4, 2)
    before = snapshot(tmp_path / "shards")
    pattern = str(tmp_path / "shards" / "sa_*.tar")
    with pytest.raises(SystemExit) as exit_:
        amg_cli.main([pattern, "--out", str(tmp_path / "masks"), "--shards-out", str(tmp_path / "x" / ".." / "shards"), *MODEL])
    assert exit_.value.code != 0 and "input" in str(exit_.value.code)
    assert snapshot(tmp_path / "shards") == before


def test_synth_refuses_fewer_images_than_its_directory_holds(tmp_path):
    argv = ["--out", str(tmp_path / "corpus"), "--size", "64", "--images-per-shard", "2", "--no-progress"]
    synthetic.main([*argv, "--num-images", "6"])
    before = snapshot(tmp_path / "corpus")
    with pytest.raises(SystemExit) as exit_:
        synthetic.main([*argv, "--num-images", "3"])
    assert "6 images" in str(exit_.value.code)
    assert snapshot(tmp_path / "corpus") == before


def test_a_shorter_amg_rerun_leaves_exactly_its_own_shards(tmp_path):
    many, few = image_folder(tmp_path / "many", 4), image_folder(tmp_path / "few", 2)
    shards = tmp_path / "shards"
    for source in (many, few):
        amg_cli.main([str(source), "--out", str(tmp_path / "masks"), "--shards-out", str(shards), "--images-per-shard", "1", *MODEL])
    assert sorted(p.name for p in shards.glob("*.tar")) == ["sa_000000.tar", "sa_000001.tar"]
    assert read_manifest(shards)["total_samples"] == 2
    assert count_samples([str(p) for p in shards.glob("*.tar")]) == 2


def test_amg_refuses_a_shards_out_directory_holding_another_corpus(tmp_path):
    """Its cleanup of a longer run's shards would remove the other corpus' shards and manifest."""
    photos = image_folder(tmp_path / "photos", 1)
    write_shards(tmp_path / "corpus", 6, 2)  # sa_000000..2.tar and a manifest
    before = snapshot(tmp_path / "corpus")
    argv = [str(photos), "--out", str(tmp_path / "masks"), "--shards-out", str(tmp_path / "corpus"), *MODEL]
    with pytest.raises(SystemExit) as exit_:
        amg_cli.main(argv)
    message = str(exit_.value.code)
    assert "segany-amg did not write" in message and "--overwrite" in message and "\n" not in message
    assert snapshot(tmp_path / "corpus") == before and not (tmp_path / "masks").exists()
    amg_cli.main([*argv, "--overwrite"])  # replacing it is a choice
    assert sorted(p.name for p in (tmp_path / "corpus").glob("*.tar")) == ["sa_000000.tar"]


def test_a_brace_range_naming_missing_shards_is_an_error_listing_them(tmp_path):
    write_shards(tmp_path, 4, 2)  # sa_000000.tar and sa_000001.tar
    with pytest.raises(FileNotFoundError, match=r"sa_000002\.tar.*sa_000003\.tar"):
        expand_shard_patterns(str(tmp_path / "sa_{000000..000003}.tar"))
    assert len(expand_shard_patterns(str(tmp_path / "sa_{000000..000001}.tar"))) == 2
    assert len(expand_shard_patterns(str(tmp_path / "sa_00000[0-9].tar"))) == 2  # a glob may match fewer


def coco_json(tmp_path: Path, images: Path) -> Path:
    image, masks = make_image(0)
    images.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(images / "a.png")
    rle = annotation_from_mask(masks[0], annotation_id=1)
    dataset = {
        "images": [{"id": 1, "file_name": "a.png", "width": image.shape[1], "height": image.shape[0]}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": rle["segmentation"], "area": rle["area"], "bbox": rle["bbox"], "iscrowd": 0}],
        "categories": [{"id": 1, "name": "object"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(dataset))
    return path


@pytest.mark.parametrize("case", ["missing_images", "empty_json", "not_coco", "missing_json"])
def test_coco_to_shards_that_would_write_nothing_exits_non_zero_saying_why(tmp_path, case, capsys):
    annotations = coco_json(tmp_path, tmp_path / "images")
    images = tmp_path / "images"
    if case == "missing_images":
        images = tmp_path / "nowhere"
    elif case == "empty_json":
        annotations.write_text("")
    elif case == "not_coco":
        annotations.write_text(json.dumps({"hello": "world"}))
    else:
        annotations = tmp_path / "absent.json"
    with pytest.raises(SystemExit) as exit_:
        coco.main(["to-shards", "--annotations", str(annotations), "--images", str(images), "--out", str(tmp_path / "out"), "--no-progress"])
    assert exit_.value.code not in (0, None)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    named = images if case == "missing_images" else annotations
    assert str(named) in err[0]


def test_coco_to_shards_still_converts_a_good_dataset(tmp_path, capsys):
    annotations = coco_json(tmp_path, tmp_path / "images")
    coco.main(["to-shards", "--annotations", str(annotations), "--images", str(tmp_path / "images"), "--out", str(tmp_path / "out"), "--no-progress"])
    assert read_manifest(tmp_path / "out")["total_samples"] == 1


@pytest.mark.parametrize("content", ["empty", "text_files"])
def test_amg_on_a_folder_without_images_exits_non_zero(tmp_path, content):
    (tmp_path / "in").mkdir()
    if content == "text_files":
        (tmp_path / "in" / "notes.txt").write_text("hello")
    with pytest.raises(SystemExit) as exit_:
        amg_cli.main([str(tmp_path / "in"), "--out", str(tmp_path / "out"), *MODEL])
    assert "no jpg/png/tif image" in str(exit_.value.code)


def test_amg_reads_tif_images_and_refuses_a_truncated_shard_in_one_line(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(make_image(0)[0]).save(photos / "scan.tif")
    amg_cli.main([str(photos), "--out", str(tmp_path / "masks"), *MODEL])
    assert (tmp_path / "masks" / "scan.json").exists()
    (shard,) = write_shards(tmp_path / "shards", 2, 2)
    (tmp_path / "shards" / "manifest.json").unlink()  # as SA-1B is released: the tar index is counted
    shard.write_bytes(shard.read_bytes()[:700])  # a download cut off inside the first member
    with pytest.raises(SystemExit) as exit_:
        amg_cli.main([str(shard), "--out", str(tmp_path / "out"), *MODEL])
    message = str(exit_.value.code)
    assert f"{shard} is not a readable tar shard" in message and "\n" not in message


@pytest.mark.parametrize(
    "option, value",
    [("--pred-iou-thresh", "nan"), ("--stability-score-thresh", "nan"), ("--box-nms-thresh", "inf"), ("--points-per-side", "0"), ("--images-per-shard", "0")],
)
def test_amg_refuses_values_that_cannot_work_before_any_work(tmp_path, option, value):
    photos = image_folder(tmp_path / "photos", 1)
    with pytest.raises(SystemExit) as exit_:
        amg_cli.main([str(photos), "--out", str(tmp_path / "out"), "--shards-out", str(tmp_path / "shards"), *MODEL, option, value])
    assert option in str(exit_.value.code) or option.lstrip("-").replace("-", "_") in str(exit_.value.code)
    assert not (tmp_path / "out").exists() and not (tmp_path / "shards").exists()


@pytest.mark.parametrize("option, value", [("--num-images", "-5"), ("--images-per-shard", "0"), ("--size", "0")])
def test_synth_refuses_values_that_cannot_work(tmp_path, option, value):
    argv = ["--out", str(tmp_path / "corpus"), "--num-images", "4", "--size", "64", "--no-progress"]
    with pytest.raises(SystemExit) as exit_:
        synthetic.main([*argv, option, value])
    assert option.lstrip("-").replace("-", "_") in str(exit_.value.code)
    assert not (tmp_path / "corpus").exists()


def test_train_refuses_zero_max_steps_before_any_work(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "segany_train.train", *tiny_training_overrides(tmp_path / "corpus"), "trainer.max_steps=0",
         f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "max_steps" in run.stderr.strip().splitlines()[-1], run.stderr[-2000:]
    assert not (tmp_path / "corpus").exists() and not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=nan", "optim.lr must be a number >= 0, got nan"),
        ("trainer.max_steps=ten", "trainer.max_steps must be a positive integer (or -1 for no limit), got 'ten'"),
        ("data.batch_size=1.5", "data.batch_size must be an integer of at least 1, got 1.5"),
        ("optim.warmup_steps=-5", "optim.warmup_steps must be an integer >= 0, got -5"),
        ("optim.betas=[0.9,1.5]", "optim.betas must be two numbers in [0, 1)"),
    ],
)
def test_train_refuses_values_that_cannot_work_before_touching_an_existing_run(tmp_path, override, message):
    from hydra import compose, initialize_config_dir

    from segany_train.config_paths import CONFIG_DIR
    from segany_train.training.run import RunConfigError, train

    run = tmp_path / "run"
    (run / "csv" / "version_0").mkdir(parents=True)
    (run / "config.yaml").write_text("the earlier run's config\n")
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("train", overrides=[*tiny_training_overrides(tmp_path / "corpus"), f"run_dir={run}", "logger=csv", override])
    with pytest.raises(RunConfigError) as refused:
        train(cfg)
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    assert (run / "config.yaml").read_text() == "the earlier run's config\n" and not (tmp_path / "corpus").exists()


def test_eval_and_amg_refuse_an_output_that_is_a_file_before_any_work(tmp_path):
    shard = str(write_shards(tmp_path / "shards", 1, 1)[0])
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a directory")
    photos = image_folder(tmp_path / "photos", 1)
    for main, argv in (
        (evaluation_cli.main, ["--shards", shard, "--out", str(blocker / "eval")]),
        (evaluation_cli.main, ["--shards", shard, "--out", str(blocker)]),
        (amg_cli.main, [str(photos), "--out", str(blocker)]),
        (amg_cli.main, [str(photos), "--out", str(tmp_path / "masks"), "--shards-out", str(blocker)]),
    ):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, *MODEL])
        assert str(blocker) in str(exit_.value.code) and "\n" not in str(exit_.value.code)
    assert not (tmp_path / "masks").exists()


def test_to_coco_skips_samples_with_malformed_rles_or_areas(tmp_path):
    with SA1BShardWriter(tmp_path / "shards") as writer:
        for i, damage in enumerate(["none", "counts", "area"]):
            image, masks = make_image(i)
            record = record_for(i, image, masks)
            if damage == "counts":
                record["annotations"][0]["segmentation"]["counts"] = "zzzz"
            elif damage == "area":
                record["annotations"][0]["area"] = "large"
            writer.write(sample_key(i), jpeg_bytes(image), record)
    with pytest.warns(coco.CocoConversionWarning, match="malformed"):
        dataset = coco.shards_to_coco(str(tmp_path / "shards" / "sa_000000.tar"), tmp_path / "new" / "gt.json")
    assert [image["id"] for image in dataset["images"]] == [0]
    assert (tmp_path / "new" / "gt.json").exists()


def test_coco_to_shards_resumes_after_an_interrupted_run(tmp_path, capsys):
    annotations = coco_json(tmp_path, tmp_path / "images")
    dataset = json.loads(annotations.read_text())
    second = dict(dataset["images"][0], id=2, file_name="b.png")
    Image.open(tmp_path / "images" / "a.png").save(tmp_path / "images" / "b.png")
    dataset["images"].append(second)
    dataset["annotations"].append(dict(dataset["annotations"][0], id=2, image_id=2))
    annotations.write_text(json.dumps(dataset))
    argv = ["to-shards", "--annotations", str(annotations), "--images", str(tmp_path / "images"), "--out", str(tmp_path / "out"),
            "--images-per-shard", "1", "--no-progress"]
    coco.main(argv)
    complete = (tmp_path / "out" / "sa_000000.tar").read_bytes()
    # what a kill during the second shard leaves: the first shard and its manifest entry only
    (tmp_path / "out" / "sa_000001.tar").unlink()
    manifest = read_manifest(tmp_path / "out")
    del manifest["shards"]["sa_000001.tar"]
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    coco.main(argv)
    assert "wrote 1 images" in capsys.readouterr().out
    assert read_manifest(tmp_path / "out")["total_samples"] == 2
    assert (tmp_path / "out" / "sa_000000.tar").read_bytes() == complete
    keys = [key for key, _, _ in read_records(sorted(str(p) for p in (tmp_path / "out").glob("*.tar")))]
    assert len(set(keys)) == 2


def test_an_amg_rerun_with_other_settings_over_the_same_out_is_refused_unless_it_redoes_everything(tmp_path, capsys):
    images, out = image_folder(tmp_path / "images", 2), tmp_path / "masks"
    amg_cli.main([str(images), "--out", str(out), *MODEL])
    before = snapshot(out)
    with pytest.raises(SystemExit, match="other settings \\(pred_iou_thresh\\)"):
        amg_cli.main([str(images), "--out", str(out), *MODEL, "--pred-iou-thresh", "0.5"])
    assert snapshot(out) == before  # nothing rewritten
    amg_cli.main([str(images), "--out", str(out), *MODEL, "--pred-iou-thresh", "0.5", "--overwrite"])
    assert "2 done now" in capsys.readouterr().out
    amg_cli.main([str(images), "--out", str(out), *MODEL, "--pred-iou-thresh", "0.5"])  # the same settings resume
    assert "2 done before" in capsys.readouterr().out


def test_an_amg_settings_file_without_a_newer_default_setting_still_resumes(tmp_path):
    import json

    settings = {"checkpoint": None, "model_type": "vit_t_256", "pred_iou_thresh": 0.88, "max_mask_area_fraction": None}
    older = {k: v for k, v in settings.items() if k != "max_mask_area_fraction"}  # written before the setting existed
    (tmp_path / amg_cli.SETTINGS_FILE).write_text(json.dumps(older))
    amg_cli.claim_output_settings(tmp_path, settings, overwrite=False)  # the same run: no refusal
    with pytest.raises(ValueError, match=r"other settings \(max_mask_area_fraction\)"):
        amg_cli.claim_output_settings(tmp_path, {**settings, "max_mask_area_fraction": 0.9}, overwrite=False)
