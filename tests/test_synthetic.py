"""The synthetic SA-1B corpus: deterministic, hierarchical visible masks, shards that round-trip."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from pycocotools import mask as mask_utils

from segany_train.data.sa1b import decode_sample
from segany_train.data.shard_writer import read_manifest
from segany_train.data.synthetic import MIN_VISIBLE_AREA, generate_image, main, write_synthetic_corpus
from tests.full_disk import FullDirectory

SIZE = 128
SMALL = dict(size=SIZE, min_objects=8, max_objects=20)


def read_corpus(paths: list[Path]) -> list[tuple[str, bytes, dict]]:
    """(key, JPEG bytes, record) of every sample, in shard order."""
    return [decode_sample(s) for s in wds.WebDataset([str(p) for p in paths], shardshuffle=False)]


def json_bytes(paths: list[Path]) -> list[bytes]:
    return [s["json"] for s in wds.WebDataset([str(p) for p in paths], shardshuffle=False)]


def assert_same(a: tuple[np.ndarray, list[np.ndarray]], b: tuple[np.ndarray, list[np.ndarray]]) -> None:
    np.testing.assert_array_equal(a[0], b[0])
    assert len(a[1]) == len(b[1])
    for x, y in zip(a[1], b[1]):
        np.testing.assert_array_equal(x, y)


def test_deterministic_and_independent_of_other_images():
    first = generate_image(3, seed=7, **SMALL)
    for i in range(3):  # generating other images first changes nothing
        generate_image(i, seed=7, **SMALL)
    assert_same(first, generate_image(3, seed=7, **SMALL))
    assert not np.array_equal(first[0], generate_image(3, seed=8, **SMALL)[0])
    assert not np.array_equal(first[0], generate_image(4, seed=7, **SMALL)[0])


def test_image_and_masks_shapes():
    for index in range(4):
        image, masks = generate_image(index, **SMALL)
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
        assert len(masks) >= 4
        for m in masks:
            assert m.shape == (SIZE, SIZE) and m.dtype == bool
            assert m.sum() >= MIN_VISIBLE_AREA


def test_masks_nest_or_are_disjoint():
    """Visible masks of distinct objects are disjoint (occlusion); a part lies inside its whole."""
    strict_subsets = 0
    for index in range(4):
        _, masks = generate_image(index, **SMALL)
        flat = np.stack(masks).reshape(len(masks), -1).astype(np.int64)
        overlap, area = flat @ flat.T, flat.sum(1)
        for i in range(len(masks)):
            for j in range(len(masks)):
                if i != j and overlap[i, j]:
                    assert overlap[i, j] in (area[i], area[j]), "overlapping masks must nest"
                    assert area[i] != area[j], "no mask is repeated"
                    strict_subsets += overlap[i, j] == area[i]
    assert strict_subsets >= 4  # whole/part hierarchies occur in typical images


def test_colour_thresholding_does_not_solve_it():
    """For objects of at least 100 px, the best mask 'pixels within k of the object's mean colour'
    (k from a few values) has a low IoU with the ground truth on average."""
    ious = []
    for index in range(3):
        image, masks = generate_image(index, **SMALL)
        pixels = image.astype(np.float32)
        for m in [m for m in masks if m.sum() >= 100][:8]:
            distance = np.abs(pixels - pixels[m].mean(0)).max(-1)
            ious.append(max(((distance <= k) & m).sum() / ((distance <= k) | m).sum() for k in (10, 20, 40, 80)))
    assert len(ious) >= 10
    assert np.mean(ious) < 0.8


def test_shards_round_trip(tmp_path):
    paths = write_synthetic_corpus(tmp_path, num_images=6, images_per_shard=4, progress=False, **SMALL)
    assert [p.name for p in paths] == ["sa_000000.tar", "sa_000001.tar"]
    samples = read_corpus(paths)
    assert [key for key, _, _ in samples] == [f"sa_{i}" for i in range(6)]
    annotation_ids = set()
    for index, (_, jpeg, record) in enumerate(samples):
        image, masks = generate_image(index, **SMALL)
        assert record["image"] == {"image_id": index, "width": SIZE, "height": SIZE, "file_name": f"sa_{index}.jpg"}
        decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        # JPEG at quality 90 with 4:2:0 chroma loses ~5 levels on grain and sharp colour edges; an
        # unrelated image differs by ~60
        assert np.abs(decoded.astype(np.float32) - image).mean() < 10
        segs = [ann["segmentation"] for ann in record["annotations"]]
        decoded_masks = mask_utils.decode([{"size": s["size"], "counts": s["counts"].encode()} for s in segs])
        np.testing.assert_array_equal(decoded_masks.transpose(2, 0, 1).astype(bool), np.stack(masks))
        assert [ann["area"] for ann in record["annotations"]] == [m.sum() for m in masks]
        annotation_ids.update(ann["id"] for ann in record["annotations"])
    assert len(annotation_ids) == sum(len(r["annotations"]) for _, _, r in samples)
    manifest = read_manifest(tmp_path)["shards"]
    assert {name: entry["samples"] for name, entry in manifest.items()} == {"sa_000000.tar": 4, "sa_000001.tar": 2}
    assert sum(entry["masks"] for entry in manifest.values()) == len(annotation_ids)


def test_same_seed_same_bytes(tmp_path):
    a = write_synthetic_corpus(tmp_path / "a", num_images=3, images_per_shard=2, progress=False, **SMALL)
    b = write_synthetic_corpus(tmp_path / "b", num_images=3, images_per_shard=2, progress=False, **SMALL)
    assert json_bytes(a) == json_bytes(b)
    for (_, jpeg_a, _), (_, jpeg_b, _) in zip(read_corpus(a), read_corpus(b)):
        assert jpeg_a == jpeg_b


def test_rerun_resumes_without_rewriting(tmp_path):
    paths = write_synthetic_corpus(tmp_path, num_images=6, images_per_shard=4, progress=False, **SMALL)
    mtimes = [p.stat().st_mtime_ns for p in paths]
    assert write_synthetic_corpus(tmp_path, num_images=6, images_per_shard=4, progress=False, **SMALL) == paths
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    # extending the corpus keeps full shards and completes the partial last one
    more = write_synthetic_corpus(tmp_path, num_images=10, images_per_shard=4, progress=False, **SMALL)
    assert [p.name for p in more] == ["sa_000000.tar", "sa_000001.tar", "sa_000002.tar"]
    assert more[0].stat().st_mtime_ns == mtimes[0]
    assert read_manifest(tmp_path)["total_samples"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "manifest.json", *(p.name for p in more), "synthetic.json"]
    fresh = write_synthetic_corpus(tmp_path / "fresh", num_images=10, images_per_shard=4, progress=False, **SMALL)
    assert json_bytes(more) == json_bytes(fresh)


def test_refuses_a_directory_made_with_other_settings(tmp_path):
    write_synthetic_corpus(tmp_path, num_images=1, progress=False, **SMALL)
    with pytest.raises(ValueError, match="synthetic corpus made with"):
        write_synthetic_corpus(tmp_path, num_images=1, seed=1, progress=False, **SMALL)


def test_command_line(tmp_path, capsys):
    main(["--out", str(tmp_path), "--num-images", "3", "--size", "64", "--images-per-shard", "2", "--no-progress"])
    assert "3 images in 2 shards" in capsys.readouterr().out
    assert read_manifest(tmp_path)["total_samples"] == 3
    assert json.loads((tmp_path / "synthetic.json").read_text())["size"] == 64


def test_command_line_on_a_full_disk(tmp_path, capsys, monkeypatch):
    argv = ["--num-images", "3", "--size", "64", "--images-per-shard", "2", "--no-progress"]
    main(["--out", str(tmp_path / "reference"), *argv])
    out = tmp_path / "out"
    out.mkdir()
    with monkeypatch.context() as patch:  # room for the settings file, not for a shard
        FullDirectory(out, room=len((tmp_path / "reference" / "synthetic.json").read_bytes()), monkeypatch=patch)
        with pytest.raises(SystemExit) as failed:
            main(["--out", str(out), *argv])
    message = str(failed.value.code)
    assert message.startswith(f"segany-synth: error: disk full writing {out / 'sa_000000.tar'} ") and "\n" not in message, message
    assert not list(out.glob("*.tar*"))  # no partial shard, no temporary
    main(["--out", str(out), *argv])  # space freed
    assert "3 images in 2 shards" in capsys.readouterr().out.splitlines()[-1]


def test_scene_settings_radii_and_style():
    big = dict(size=SIZE, min_objects=2, max_objects=4, min_radius=0.1, max_radius=0.35)
    small = dict(size=SIZE, min_objects=2, max_objects=4, min_radius=0.04, max_radius=0.06)
    # the largest mask of each image: a whole object (medians over all masks mix in parts and occlusion)
    largest = lambda scene: np.median([max(m.sum() for m in generate_image(i, **scene)[1]) for i in range(12)])  # noqa: E731
    assert largest(big) > 8 * largest(small)
    # tinted: one hue per image, so the three channels of every pixel keep nearly one ratio
    image = generate_image(0, style="tinted", **big)[0].reshape(-1, 3).astype(float) + 1
    textured = generate_image(0, **big)[0].reshape(-1, 3).astype(float) + 1
    spread = lambda img: np.std(np.log(img[:, 0] / img[:, 1])) + np.std(np.log(img[:, 1] / img[:, 2]))  # noqa: E731
    assert spread(image) < 0.5 * spread(textured)
    for bad in (dict(style="neon"), dict(min_radius=0.3, max_radius=0.2), dict(min_radius=0.0)):
        with pytest.raises(ValueError):
            generate_image(0, size=SIZE, **bad)


def test_a_corpus_records_only_settings_that_differ_from_the_defaults(tmp_path):
    write_synthetic_corpus(tmp_path / "a", num_images=1, progress=False, **SMALL)
    assert set(json.loads((tmp_path / "a" / "synthetic.json").read_text())) == {"seed", "images_per_shard", "size", "min_objects", "max_objects"}
    write_synthetic_corpus(tmp_path / "b", num_images=1, progress=False, style="tinted", **SMALL)
    assert json.loads((tmp_path / "b" / "synthetic.json").read_text())["style"] == "tinted"
    with pytest.raises(ValueError, match="holds a synthetic corpus made with"):
        write_synthetic_corpus(tmp_path / "b", num_images=1, progress=False, **SMALL)


def test_label_map_objects_are_the_visible_wholes_and_fluorescent_background_is_dark():
    from segany_train.data.synthetic import generate_label_map

    scene = {"size": 96, "min_objects": 3, "max_objects": 6, "min_radius": 0.1, "max_radius": 0.3, "style": "fluorescent"}
    image, labels = generate_label_map(2, seed=4, **scene)
    same_image, masks = generate_image(2, seed=4, **scene)
    np.testing.assert_array_equal(image, same_image)
    objects = [labels == v for v in range(1, int(labels.max()) + 1)]
    assert objects and all(obj.any() for obj in objects)
    assert all(any(np.array_equal(obj, m) for m in masks) for obj in objects)  # each object is one of the corpus's masks
    background, foreground = image[labels == 0].mean(), image[labels > 0].mean()
    assert background < 0.4 * foreground
