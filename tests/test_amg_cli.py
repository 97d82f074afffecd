"""segany-amg (folders, files and shards in; SA-1B JSON, overlays and shards out; resuming) and the
mask overlay renderer."""

import json
from io import BytesIO

import numpy as np
import pytest
from PIL import Image

from segany_train.data.datamodule import count_samples
from segany_train.data.pipeline import read_records
from segany_train.data.sa1b import decode_sample, encode_sample, validate_record
from segany_train.data.synthetic import generate_image, write_synthetic_corpus
from segany_train.inference import amg_cli
from segany_train.inference.mask_overlay import distinct_colours, mask_outline, render_overlay
from tests.full_disk import FullDirectory

# a random-weight model keeps almost nothing under the official thresholds
LOW_THRESHOLDS = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--box-nms-thresh", "0.9"]
MODEL = ["--model-type", "vit_t_256_small_decoder", "--no-progress"]

# ---------------------------------------------------------------- overlay


def brute_force_outline(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    out = np.zeros_like(mask)
    for r in range(h):
        for c in range(w):
            if mask[r, c]:
                neighbours = [(r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)]
                out[r, c] = any(not (0 <= y < h and 0 <= x < w) or not mask[y, x] for y, x in neighbours)
    return out


def test_mask_outline_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(5):
        mask = rng.random((9, 13)) < 0.6
        assert np.array_equal(mask_outline(mask), brute_force_outline(mask))


def test_overlay_blends_largest_first_and_outlines():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    big = np.zeros((40, 50), bool)
    big[5:35, 5:45] = True
    small = np.zeros((40, 50), bool)
    small[15:25, 20:30] = True
    alpha = 0.4
    # listed small first: the big mask is still drawn first (colour 0), the small one over it (colour 1)
    out = render_overlay(image, [small, big], alpha=alpha)
    colours = distinct_colours(2).astype(np.float64)
    assert out.shape == image.shape and out.dtype == np.uint8
    untouched = ~big
    assert np.array_equal(out[untouched], image[untouched])
    only_big = big & ~small & ~mask_outline(big)
    expected = np.rint((1 - alpha) * image[only_big] + alpha * colours[0])
    assert np.abs(out[only_big].astype(int) - expected).max() <= 1
    inside_small = small & ~mask_outline(small)
    twice = (1 - alpha) * ((1 - alpha) * image[inside_small] + alpha * colours[0]) + alpha * colours[1]
    assert np.abs(out[inside_small].astype(int) - np.rint(twice)).max() <= 1
    assert (out[mask_outline(small)] == distinct_colours(2)[1]).all()
    big_edge = mask_outline(big) & ~small
    assert (out[big_edge] == distinct_colours(2)[0]).all()
    # the order of the list does not matter, only the areas
    assert np.array_equal(out, render_overlay(image, [big, small], alpha=alpha))
    # without outlines, the small mask's edge is a blend too
    plain = render_overlay(image, [small, big], alpha=alpha, outline=False)
    assert not (plain[mask_outline(small)] == distinct_colours(2)[1]).all()


def test_distinct_colours_differ():
    colours = distinct_colours(32).astype(int)
    distances = np.abs(colours[:, None] - colours[None]).sum(-1)  # L1 over RGB
    np.fill_diagonal(distances, 999)
    assert distances.min() >= 40  # no two of 32 colours are near-identical
    # masks drawn one after the other (similar sizes, often neighbours) get very different colours
    assert np.abs(colours[1:] - colours[:-1]).sum(-1).min() >= 300


def test_overlay_rejects_bad_input():
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="mask 0"):
        render_overlay(image, [np.zeros((8, 9), bool)])
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        render_overlay(image[..., 0], [])
    assert np.array_equal(render_overlay(image, []), image)


# ---------------------------------------------------------------- segany-amg


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    pixels, _ = generate_image(0, size=96, min_objects=2, max_objects=4)
    Image.fromarray(pixels[:, :80]).save(folder / "scene.png")  # 96 high, 80 wide
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image, not listed")
    return folder


def _summary(capsys) -> str:
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("segany-amg:")]
    return lines[-1]


def test_segany_amg_on_a_folder(image_folder, tmp_path, capsys):
    out, shards = tmp_path / "out", tmp_path / "shards"
    argv = [str(image_folder), "--out", str(out), "--shards-out", str(shards), *MODEL, *LOW_THRESHOLDS]
    amg_cli.main(argv)
    captured = capsys.readouterr()
    assert "2 images: 1 done now, 0 done before, 1 unreadable" in captured.out
    masks = len(json.loads((out / "scene.json").read_text())["annotations"])
    assert f"; {masks} masks, {masks:.1f} per image (fewest {masks}, most {masks}); outputs in" in captured.out
    assert "broken.jpg" in captured.err and "warning" in captured.err
    assert sorted(p.name for p in out.iterdir()) == [".segany-amg-settings", "scene.json", "scene.png"]

    record = json.loads((out / "scene.json").read_text())
    validate_record(record)
    assert record["image"]["width"] == 80 and record["image"]["height"] == 96
    assert record["image"]["file_name"] == "scene.png"
    assert record["image"]["image_id"] == amg_cli.image_id_for("scene")
    assert len(record["annotations"]) > 0
    for ann in record["annotations"]:
        assert set(ann) >= {"id", "segmentation", "bbox", "area", "predicted_iou", "stability_score", "crop_box", "point_coords"}
        assert ann["crop_box"] == [0, 0, 80, 96] and len(ann["point_coords"]) == 1
    with Image.open(out / "scene.png") as overlay:
        assert overlay.size == (80, 96) and overlay.mode == "RGB"

    # the record round-trips through the SA-1B shard format, and the shard holds the image
    (key, jpeg, shard_record), = list(read_records([str(p) for p in sorted(shards.glob("*.tar"))]))
    assert key == f"sa_{record['image']['image_id']}" and shard_record == record
    with Image.open(BytesIO(jpeg)) as img:
        assert img.size == (80, 96)
    assert decode_sample(encode_sample(key, jpeg, record))[2] == record
    assert count_samples(sorted(str(p) for p in shards.glob("*.tar"))) == 1

    # a rerun does nothing new; --overwrite redoes the image (same masks: deterministic)
    before = (out / "scene.json").stat().st_mtime_ns
    amg_cli.main(argv)
    assert "2 images: 0 done now, 1 done before, 1 unreadable" in _summary(capsys)
    assert (out / "scene.json").stat().st_mtime_ns == before
    # the shards are rewritten from the JSONs, done-before images included
    (key_again, _, again), = list(read_records([str(p) for p in sorted(shards.glob("*.tar"))]))
    assert key_again == key and again == record
    amg_cli.main(argv + ["--overwrite"])
    assert "1 done now, 0 done before" in _summary(capsys)
    assert json.loads((out / "scene.json").read_text()) == record


def test_segany_amg_on_a_file_and_on_shards(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    write_synthetic_corpus(corpus, num_images=3, size=64, images_per_shard=2, min_objects=2, max_objects=3, progress=False)
    out = tmp_path / "out"
    amg_cli.main([str(corpus / "sa_{000000..000001}.tar"), "--out", str(out), *MODEL, *LOW_THRESHOLDS])
    assert "3 images: 3 done now" in _summary(capsys)
    assert sorted(p.name for p in out.glob("*.json")) == ["sa_0.json", "sa_1.json", "sa_2.json"]
    for key, _, source in read_records(sorted(str(p) for p in corpus.glob("*.tar"))):
        made = json.loads((out / f"{key}.json").read_text())
        validate_record(made)
        assert made["image"] == source["image"]  # the shard's id, size and file name are kept

    single = tmp_path / "one.png"
    Image.fromarray(generate_image(1, size=48)[0]).save(single)
    amg_cli.main([str(single), "--out", str(out), *MODEL, *LOW_THRESHOLDS])
    assert "1 images: 1 done now" in _summary(capsys)
    assert (out / "one.json").exists() and (out / "one.png").exists()


def test_segany_amg_says_when_an_image_gets_no_mask_and_which_thresholds_to_lower(image_folder, tmp_path, capsys):
    # the official thresholds (0.88 / 0.95) keep nothing of a random model's masks
    amg_cli.main([str(image_folder / "scene.png"), "--out", str(tmp_path / "out"), *MODEL, "--points-per-side", "4"])
    captured = capsys.readouterr()
    assert "1 images: 1 done now, 0 done before, 0 unreadable; 0 masks, 0.0 per image (fewest 0, most 0)" in captured.out
    warning = next(line for line in captured.err.splitlines() if "no mask kept for" in line)
    assert "scene.png" in warning and "--pred-iou-thresh 0.88" in warning and "--stability-score-thresh 0.95" in warning
    assert "1 of 1 images got no mask" in captured.err


@pytest.mark.parametrize(
    "source, message",
    [("missing_dir/*.tar", "matches no file"), ("notes.txt", "not a jpg/png/tif image")],
)
def test_segany_amg_one_line_errors(tmp_path, source, message):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        amg_cli.main([str(tmp_path / source), "--out", str(tmp_path / "out"), *MODEL])
    assert message in str(exit_info.value) and "\n" not in str(exit_info.value)


@pytest.mark.parametrize("full", ["out", "shards"])
def test_a_full_disk_is_one_line_and_keeps_what_was_done(tmp_path, capsys, monkeypatch, full):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(generate_image(0, size=64)[0]).save(folder / "a.png")
    out, shards = tmp_path / "out", tmp_path / "shards"
    argv = [str(folder), "--out", str(out), "--shards-out", str(shards), *MODEL, *LOW_THRESHOLDS]
    amg_cli.main(argv)
    done = {p: p.read_bytes() for p in [*out.iterdir(), *shards.iterdir()] if p.is_file()}
    Image.fromarray(generate_image(1, size=64)[0]).save(folder / "b.png")
    # room for the settings file each run writes again, not for an image's outputs
    with monkeypatch.context() as patch:
        FullDirectory(out if full == "out" else shards, room=len((out / amg_cli.SETTINGS_FILE).read_bytes()), monkeypatch=patch)
        with pytest.raises(SystemExit) as failed:
            amg_cli.main(argv)
    message = str(failed.value.code)
    written = f"{out / 'b.png'}" if full == "out" else f"{shards / 'sa_000000.tar'}"
    assert message.startswith(f"segany-amg: error: disk full writing {written} ") and "\n" not in message, message
    # what was done is intact (with a full --shards-out, b's masks in --out are done too); no partial
    # file or temporary is left in the full directory
    left = {p: p.read_bytes() for p in [*out.iterdir(), *shards.iterdir()] if p.is_file()}
    assert left == done | ({} if full == "out" else {out / "b.json": left[out / "b.json"], out / "b.png": left[out / "b.png"]})
    capsys.readouterr()
    amg_cli.main(argv)  # space freed: the rerun does only what was not done
    assert ("2 images: 1 done now, 1 done before" if full == "out" else "2 images: 0 done now, 2 done before") in _summary(capsys)
    assert len(list(read_records([str(shards / "sa_000000.tar")]))) == 2


def test_image_ids_are_stable_and_keep_sa1b_ids():
    assert amg_cli.image_id_for("sa_1234") == 1234
    assert amg_cli.image_id_for("holiday") == amg_cli.image_id_for("holiday") != amg_cli.image_id_for("holiday2")
    assert 0 <= amg_cli.image_id_for("holiday") < 2**48
