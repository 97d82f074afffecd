"""segany-convert: every layout converted and read back equal to its source masks (pycocotools decodes
the written RLEs), bad items counted and named, the seeded split, resume and the cached rerun."""

import io
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from pycocotools import mask as mask_utils

from segany_train.data.dataset_layouts import label_map_rles
from segany_train.data.folder_conversion import REPORT_NAME, FolderSource, convert_folder, convert_item, main, split_items
from segany_train.data.image_loading import load_image
from segany_train.data.sa1b import decode_sample
from segany_train.data.shard_writer import read_manifest, write_manifest

H, W = 30, 40


def _label_map(seed: int, objects: int) -> np.ndarray:
    """H x W uint16 label map of `objects` rectangles with ids 1..objects (later ones on top)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((H, W), np.uint16)
    for label in range(1, objects + 1):
        y, x = rng.integers(0, H - 8), rng.integers(0, W - 8)
        labels[y : y + rng.integers(4, 8), x : x + rng.integers(4, 8)] = label * 300 if label > 1 else label  # ids up to 16 bits
    return labels


def _image(seed: int, kind: str) -> Image.Image:
    """A smooth image (JPEG keeps it within a few levels) of the given kind."""
    rng = np.random.default_rng(seed + 100)
    yy, xx = np.mgrid[0:H, 0:W] / np.array([H, W]).reshape(2, 1, 1)
    ramp = np.stack([yy, xx, (yy + xx) / 2], axis=-1) * rng.uniform(0.5, 1.0, 3)
    if kind == "grey16":
        return Image.fromarray((1000 + 39000 * ramp[..., 2]).astype(np.uint16))
    rgb = (ramp * 255).astype(np.uint8)
    if kind == "rgba":
        return Image.fromarray(np.concatenate([rgb, rng.integers(0, 255, (H, W, 1), dtype=np.uint8)], axis=2), mode="RGBA")
    if kind == "grey8":
        return Image.fromarray(rgb[..., 0], mode="L")
    return Image.fromarray(rgb)


IMAGES = {"a": ("rgb", "png"), "b": ("grey16", "png"), "c": ("rgba", "png"), "d": ("grey8", "tif"), "e": ("rgb", "jpg"), "f": ("rgb", "png")}


def _write_images(root: Path) -> dict[str, np.ndarray]:
    """Writes the images and returns each one's label map (the truth every layout is made from)."""
    (root / "images").mkdir(parents=True)
    truth = {}
    for i, (name, (kind, suffix)) in enumerate(IMAGES.items()):
        _image(i, kind).save(root / "images" / f"{name}.{suffix}")
        truth[name] = _label_map(i, objects=1 + i % 3)
    return truth


def _objects(labels: np.ndarray) -> list[np.ndarray]:
    return [labels == v for v in np.unique(labels) if v != 0]


def _read_back(out: Path) -> dict[str, tuple[np.ndarray, list[np.ndarray]]]:
    """source name -> (image pixels, masks decoded by pycocotools) over both splits."""
    found = {}
    for split in ("train", "val"):
        if not list((out / split).glob("sa_*.tar")):
            continue
        for sample in wds.WebDataset(sorted(str(p) for p in (out / split).glob("sa_*.tar")), shardshuffle=False, empty_check=False):
            _, jpeg, record = decode_sample(sample)
            rles = [{"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()} for a in record["annotations"]]
            masks = [mask_utils.decode(r).astype(bool) for r in rles]
            found[record["image"]["source"]] = (np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")), masks)
    return found


def _assert_equal_to_truth(found, truth: dict[str, list[np.ndarray]]) -> None:
    assert sorted(found) == sorted(truth)
    for name, masks in truth.items():
        got = found[name][1]
        assert len(got) == len(masks), name
        for a, b in zip(got, masks):
            np.testing.assert_array_equal(a, b)


def test_label_maps_8_and_16_bit_png_and_tiff_read_back_equal(tmp_path: Path) -> None:
    truth = _write_images(tmp_path)
    (tmp_path / "labels").mkdir()
    for i, (name, labels) in enumerate(truth.items()):
        if i % 3 == 0:
            Image.fromarray(labels).save(tmp_path / "labels" / f"{name}.png")  # 16-bit PNG
        elif i % 3 == 1:
            Image.fromarray(labels).save(tmp_path / "labels" / f"{name}.tif")  # 16-bit TIFF
        else:
            Image.fromarray(np.minimum(labels, 255).astype(np.uint8)).save(tmp_path / "labels" / f"{name}.png")
            truth[name] = np.minimum(labels, 255)
    source = FolderSource(layout="label-maps", images=tmp_path / "images", labels=tmp_path / "labels")
    report = convert_folder(source, tmp_path / "out", val_fraction=0.34, seed=3, images_per_shard=2, progress=False)
    assert report.skipped == {}
    assert report.splits["val"].images_written == 2 and report.splits["train"].images_written == 4
    assert read_manifest(tmp_path / "out" / "train")["total_samples"] == 4
    found = _read_back(tmp_path / "out")
    _assert_equal_to_truth(found, {n: _objects(labels) for n, labels in truth.items()})
    # the shards hold load_image's pixels (16-bit grey stretched, alpha dropped), up to JPEG loss
    for name, (kind, suffix) in IMAGES.items():
        expected = load_image((tmp_path / "images" / f"{name}.{suffix}").read_bytes()).pixels.astype(float)
        assert np.abs(found[name][0] - expected).mean() < 3, name
        if kind == "grey16":
            assert expected.max() == 255 and expected.min() == 0


def test_mask_folders_pattern_and_csv_read_back_equal(tmp_path: Path) -> None:
    truth = {n: _objects(labels) for n, labels in _write_images(tmp_path).items()}
    rows = ["image,mask"]
    for name, masks in truth.items():
        (tmp_path / "folders" / name).mkdir(parents=True)
        (tmp_path / "flat").mkdir(exist_ok=True)
        suffix = IMAGES[name][1]
        for k, mask in enumerate(masks):
            Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "folders" / name / f"{k}.png")
            Image.fromarray(mask).save(tmp_path / "flat" / f"{name}_{k}.png")  # 1-bit PNG
            rows.append(f"images/{name}.{suffix},flat/{name}_{k}.png")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    sources = {
        "folders": FolderSource(layout="mask-folders", images=tmp_path / "images", masks=tmp_path / "folders"),
        "pattern": FolderSource(layout="mask-pattern", images=tmp_path / "images", masks=tmp_path / "flat", pattern="{name}_*.png"),
        "csv": FolderSource(layout="csv", csv=tmp_path / "pairs.csv"),
    }
    for label, source in sources.items():
        report = convert_folder(source, tmp_path / f"out_{label}", val_fraction=0.2, images_per_shard=4, progress=False)
        assert report.skipped == {}, label
        found = _read_back(tmp_path / f"out_{label}")
        if label == "csv":  # CSV names are paths relative to the CSV
            found = {k.removeprefix("images/"): v for k, v in found.items()}
        _assert_equal_to_truth(found, truth)


def test_bad_items_are_counted_and_named(tmp_path: Path) -> None:
    truth = _write_images(tmp_path)
    (tmp_path / "labels").mkdir()
    for name, labels in truth.items():
        Image.fromarray(labels).save(tmp_path / "labels" / f"{name}.png")
    (tmp_path / "images" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # corrupt
    Image.fromarray(np.zeros((H + 1, W), np.uint16)).save(tmp_path / "labels" / "b.png")  # mismatched size
    Image.fromarray(np.zeros((H, W), np.uint16)).save(tmp_path / "labels" / "c.png")  # empty
    (tmp_path / "labels" / "d.png").unlink()  # no label map
    (tmp_path / "labels" / "e.png").write_bytes(b"garbage")  # unreadable mask
    source = FolderSource(layout="label-maps", images=tmp_path / "images", labels=tmp_path / "labels")
    with pytest.warns(UserWarning, match="skipped"):
        report = convert_folder(source, tmp_path / "out", val_fraction=0.0, progress=False)
    assert report.skipped == {"undecodable_image": 1, "size_mismatch": 1, "empty": 1, "missing_masks": 1, "unreadable_mask": 1}
    assert [line.split(":")[0] for line in report.skipped_items] == ["a", "b", "c", "d", "e"]
    assert report.splits["train"].images_written == 1
    assert sorted(_read_back(tmp_path / "out")) == ["f"]


def test_split_is_seeded_and_stable_under_order(tmp_path: Path) -> None:
    from segany_train.data.dataset_layouts import DatasetItem

    items = [DatasetItem(name=f"img{i:02d}", image=Path(f"img{i:02d}.png")) for i in range(20)]
    one = split_items(items, val_fraction=0.25, seed=5)
    again = split_items(list(reversed(items)), val_fraction=0.25, seed=5)
    other = split_items(items, val_fraction=0.25, seed=6)
    names = lambda split: [item.name for _, item in split["val"]]  # noqa: E731
    assert names(one) == names(again) and len(names(one)) == 5
    assert names(one) != names(other)
    assert not set(names(one)) & {item.name for _, item in one["train"]}


def test_resume_after_a_lost_shard_and_cached_rerun(tmp_path: Path) -> None:
    truth = _write_images(tmp_path)
    (tmp_path / "labels").mkdir()
    for name, labels in truth.items():
        Image.fromarray(labels).save(tmp_path / "labels" / f"{name}.png")
    source = FolderSource(layout="label-maps", images=tmp_path / "images", labels=tmp_path / "labels")
    out = tmp_path / "out"
    first = convert_folder(source, out, val_fraction=0.2, images_per_shard=2, progress=False)
    before = _read_back(out)
    # a run killed while writing the last train shard: no report, the shard and its entry absent
    (out / REPORT_NAME).unlink()
    shards = read_manifest(out / "train")["shards"]
    last = sorted(shards)[-1]
    (out / "train" / last).unlink()
    write_manifest(out / "train", {k: v for k, v in shards.items() if k != last})
    resumed = convert_folder(source, out, val_fraction=0.2, images_per_shard=2, progress=False)
    assert resumed.splits["train"].images_resumed == first.splits["train"].images_written - shards[last]["samples"]
    assert resumed.splits["train"].images_written == shards[last]["samples"]
    assert resumed.summary() == first.summary()  # every image's masks counted, not only the last part's
    after = _read_back(out)
    assert sorted(after) == sorted(before)
    cached = convert_folder(source, out, val_fraction=0.2, images_per_shard=2, progress=False)
    val = json.loads((out / REPORT_NAME).read_text())["report"]["splits"]["val"]
    assert cached.cached and val["images_written"] + val["images_resumed"] == 1
    with pytest.raises(FileExistsError, match="holds shards made otherwise"):
        convert_folder(source, out, val_fraction=0.5, images_per_shard=2, progress=False)


def test_cli_one_line_errors(tmp_path: Path, capsys) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["label-maps", "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images" / "x.png")
    with pytest.raises(SystemExit) as exit_info:  # no usable item: exit 1 naming the skip counts
        main(["label-maps", "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"), "--out", str(tmp_path / "o"), "--no-progress"])
    assert exit_info.value.code == 1
    assert "missing_masks=1" in capsys.readouterr().err


def test_label_map_rles_are_pycocotools_encodings_of_each_id() -> None:
    rng = np.random.default_rng(0)
    maps = [
        rng.integers(0, 6, (17, 13)).astype(np.int32) * np.where(rng.random((17, 13)) < 0.5, 1, -1),  # runs, negative ids
        np.pad(np.ones((3, 4), np.uint8), ((5, 0), (7, 0))),  # the object ends at the last pixel
        np.eye(9, dtype=bool),
    ]
    for labels in maps:
        ids = [i for i in np.unique(labels) if i != 0]
        expected = [mask_utils.encode(np.asfortranarray((labels == i).astype(np.uint8))) for i in ids]
        assert label_map_rles(labels) == expected


def test_a_label_map_of_many_ids_takes_memory_by_pixels_not_pixels_times_ids(tmp_path: Path) -> None:
    side = 100  # 10 000 one-pixel objects: a boolean mask per id would take 100 MB
    labels = (np.random.default_rng(0).permutation(side * side) + 1).reshape(side, side).astype(np.uint16)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(tmp_path / "images" / "many.png")
    Image.fromarray(labels).save(tmp_path / "labels" / "many.png")
    item = FolderSource(layout="label-maps", images=tmp_path / "images", labels=tmp_path / "labels").items()[0]
    tracemalloc.start()
    try:
        _, _, record, _ = convert_item(0, item)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(record["annotations"]) == side * side
    assert peak < 30 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    first = record["annotations"][0]["segmentation"]
    assert mask_utils.decode({"size": first["size"], "counts": first["counts"].encode()}).sum() == 1


def test_cli_on_a_full_disk_says_so_in_one_line_and_resumes(tmp_path: Path, capsys, monkeypatch) -> None:
    from tests.full_disk import FullDirectory

    truth = _write_images(tmp_path)
    (tmp_path / "labels").mkdir()
    for name, labels in truth.items():
        Image.fromarray(labels).save(tmp_path / "labels" / f"{name}.png")
    out = tmp_path / "out"
    out.mkdir()
    argv = ["label-maps", "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"), "--out", str(out), "--no-progress"]
    with monkeypatch.context() as patch:
        FullDirectory(out, room=0, monkeypatch=patch)
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
    message = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in message, message
    assert f": error: disk full writing {out}/" in message and "resumes" in message, message
    assert not list(out.rglob("*.tar*"))
    main(argv)  # space freed: the same command finishes
    _assert_equal_to_truth(_read_back(out), {name: _objects(labels) for name, labels in truth.items()})
