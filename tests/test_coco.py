"""COCO <-> SA-1B shard conversion: masks preserved exactly, bad input counted, COCOeval round trip."""

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segany_train.data.coco import CocoConversionWarning, coco_to_shards, main, shards_to_coco
from segany_train.data.sa1b import annotation_from_mask, decode_sample, make_record, sample_key
from segany_train.data.shard_writer import SA1BShardWriter

H, W = 60, 80  # not square, so a swapped height/width shows


def _box_mask(top: int, bottom: int, left: int, right: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[top:bottom, left:right] = 1
    return mask


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths (zeros first) over the column-major pixels."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    counts = np.diff(bounds).tolist()
    return {"size": [H, W], "counts": ([0] + counts) if flat[0] else counts}


def _compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [H, W], "counts": rle["counts"].decode("ascii")}


def _image(mode: str) -> Image.Image:
    """A smooth image (JPEG-friendly, so a re-encode stays close to the original pixels)."""
    y, x = np.mgrid[0:H, 0:W]
    rgb = np.stack([x * 3, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb).convert(mode)


def _ann(ann_id: int, image_id: int, segmentation, iscrowd: int = 0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": 7, "segmentation": segmentation, "iscrowd": iscrowd}


@pytest.fixture
def coco_dataset(tmp_path: Path) -> tuple[Path, Path]:
    """(annotation file, image dir) of a small COCO dataset with one of each kind of annotation and fault."""
    images = tmp_path / "images"
    images.mkdir()
    _image("RGB").save(images / "a.jpg", quality=90)
    _image("RGBA").save(images / "b.png")
    _image("RGB").save(images / "d.jpg", quality=90)
    (images / "e.jpg").write_bytes((images / "a.jpg").read_bytes()[:300])  # truncated
    _image("RGB").resize((W // 2, H // 2)).save(images / "f.jpg")  # smaller than its entry says
    annotations = [
        _ann(10, 1, [[5, 5, 30, 5, 30, 25, 5, 25], [40, 30, 70, 30, 55, 55]]),  # two polygons, merged
        _ann(11, 1, _uncompressed_rle(_box_mask(35, 50, 10, 30))),
        _ann(12, 1, _uncompressed_rle(_box_mask(0, 10, 0, 10)), iscrowd=1),
        _ann(13, 1, [[5, 5, 30, 5, 30, 25], [1, 2, 3, 4]]),  # a polygon of 2 points (pycocotools takes it)
        _ann(14, 1, [[100, 100, 110, 100, 110, 110]]),  # entirely outside the image: empty mask
        _ann(20, 2, _compressed_rle(_box_mask(3, 40, 50, 75))),
        _ann(21, 2, {"size": [W, H], "counts": _compressed_rle(_box_mask(3, 40, 50, 75))["counts"]}),
        _ann(30, 3, [[5, 5, 30, 5, 30, 25]]),  # its image file is missing
        _ann(40, 4, _compressed_rle(_box_mask(1, 9, 1, 9)), iscrowd=1),
        _ann(41, 4, []),  # empty polygon list; image 4 is left without a usable mask
        _ann(50, 99, [[5, 5, 30, 5, 30, 25]]),  # no such image
        _ann(60, 5, [[5, 5, 30, 5, 30, 25]]),
        _ann(70, 6, [[5, 5, 30, 5, 30, 25]]),
    ]
    dataset = {
        "images": [
            {"id": 1, "width": W, "height": H, "file_name": "a.jpg"},
            {"id": 2, "width": W, "height": H, "file_name": "b.png"},
            {"id": 3, "width": W, "height": H, "file_name": "missing.jpg"},
            {"id": 4, "width": W, "height": H, "file_name": "d.jpg"},
            {"id": 5, "width": W, "height": H, "file_name": "e.jpg"},
            {"id": 6, "width": W, "height": H, "file_name": "f.jpg"},
        ],
        "annotations": annotations,
        "categories": [{"id": 7, "name": "thing"}],
    }
    annotation_file = tmp_path / "instances.json"
    annotation_file.write_text(json.dumps(dataset))
    return annotation_file, images


def _convert(coco_dataset: tuple[Path, Path], out_dir: Path, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = coco_to_shards(*coco_dataset, out_dir, progress=False, **kwargs)
    return report, [str(w.message) for w in caught if issubclass(w.category, CocoConversionWarning)]


def _read_shards(paths) -> dict[str, tuple[bytes, dict]]:
    samples = wds.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False)
    return {key: (jpeg, record) for key, jpeg, record in map(decode_sample, samples)}


def _decode(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")})


def test_coco_to_shards_keeps_masks_and_counts_every_skip(coco_dataset, tmp_path):
    report, messages = _convert(coco_dataset, tmp_path / "shards")

    assert (report.images_written, report.masks_written) == (2, 3)
    assert report.skipped == {
        "crowd": 2,
        "malformed_segmentation": 3,
        "zero_area": 1,
        "missing_image": 1,
        "undecodable_image": 1,
        "image_size_mismatch": 1,
        "annotations_of_skipped_images": 3,
        "images_without_masks": 1,
        "annotations_of_unknown_images": 1,
    }
    assert "missing_image=1" in report.summary()
    named = ["missing.jpg", "e.jpg", "f.jpg", "d.jpg"] + [f"annotation {i} " for i in (13, 14, 21, 41)]
    for expected in named:
        assert any(expected in m for m in messages), (expected, messages)
    assert not any("annotation 12 " in m for m in messages)  # crowd skips are policy, counted but not warned

    samples = _read_shards(report.shards)
    assert sorted(samples) == [sample_key(1), sample_key(2)]
    original = COCO(str(coco_dataset[0]))
    for jpeg, record in samples.values():
        assert (record["image"]["width"], record["image"]["height"]) == (W, H)
        for ann in record["annotations"]:
            np.testing.assert_array_equal(_decode(ann["segmentation"]), original.annToMask(original.anns[ann["id"]]))
            assert ann["area"] == int(original.annToMask(original.anns[ann["id"]]).sum())
    assert {a["id"] for a in samples[sample_key(1)][1]["annotations"]} == {10, 11}

    images = coco_dataset[1]
    assert samples[sample_key(1)][0] == (images / "a.jpg").read_bytes()  # JPEG copied, not re-encoded
    png_as_jpeg = Image.open(io.BytesIO(samples[sample_key(2)][0]))
    assert png_as_jpeg.format == "JPEG" and png_as_jpeg.mode == "RGB"
    difference = np.abs(np.asarray(png_as_jpeg, dtype=int) - np.asarray(_image("RGB"), dtype=int))
    assert difference.mean() < 2


def test_round_trip_through_coco_json_and_cocoeval(coco_dataset, tmp_path):
    report, _ = _convert(coco_dataset, tmp_path / "shards", images_per_shard=1)
    assert len(report.shards) == 2

    export = shards_to_coco(report.shards, tmp_path / "export.json", category_id=3, category_name="thing")
    assert export["categories"] == [{"id": 3, "name": "thing"}]
    gt = COCO(str(tmp_path / "export.json"))
    original = COCO(str(coco_dataset[0]))
    assert sorted(gt.anns) == [10, 11, 20]  # unique SA-1B ids are kept
    for ann_id, ann in gt.anns.items():
        assert ann["iscrowd"] == 0 and isinstance(ann["segmentation"]["counts"], str)
        np.testing.assert_array_equal(gt.annToMask(ann), original.annToMask(original.anns[ann_id]))

    # these shards carry no predicted IoU (so no score); give the results one
    results = [dict(ann, score=1.0) for ann in export["annotations"]]
    evaluation = COCOeval(gt, gt.loadRes(results), iouType="segm")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)


def test_duplicate_annotation_ids_are_renumbered(tmp_path):
    masks = [_box_mask(5, 20, 5, 20), _box_mask(30, 50, 40, 70)]
    with SA1BShardWriter(tmp_path) as writer:
        for image_id, mask in enumerate(masks, start=1):
            ann = annotation_from_mask(mask, annotation_id=1, predicted_iou=0.5 + image_id / 10)
            record = make_record(image_id=image_id, width=W, height=H, file_name=f"{image_id}.jpg", annotations=[ann])
            writer.write(sample_key(image_id), b"not decoded", record)

    with pytest.warns(CocoConversionWarning, match="renumbering"):
        export = shards_to_coco(str(tmp_path / "sa_*.tar"))
    assert [a["id"] for a in export["annotations"]] == [1, 2]
    assert [a["score"] for a in export["annotations"]] == pytest.approx([0.6, 0.7])
    gt = COCO()
    gt.dataset = export
    gt.createIndex()
    for ann, mask in zip(export["annotations"], masks):
        np.testing.assert_array_equal(gt.annToMask(ann), mask)


def test_cli_round_trip_and_errors(coco_dataset, tmp_path, capsys):
    annotation_file, images = coco_dataset
    shards = tmp_path / "shards"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CocoConversionWarning)
        args = ["--annotations", str(annotation_file), "--images", str(images), "--out", str(shards)]
        main(["to-shards", *args, "--images-per-shard", "1", "--no-progress"])
        assert "wrote 2 images" in capsys.readouterr().out
        with pytest.raises(SystemExit):
            main(["to-shards", *args, "--no-progress"])
        assert "already holds shards" in capsys.readouterr().err

    out = tmp_path / "out.json"
    main(["to-coco", "--shards", f"{shards}/sa_{{000000..000001}}.tar", "--out", str(out)])
    assert len(json.loads(out.read_text())["annotations"]) == 3

    pattern = f"{tmp_path}/nothing_{{0..3}}.tar"
    with pytest.raises(SystemExit):
        main(["to-coco", "--shards", pattern, "--out", str(out)])
    assert pattern in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="nothing"):
        shards_to_coco(pattern)


def test_to_shards_on_a_full_disk_says_so_in_one_line_and_resumes(coco_dataset, tmp_path, capsys, monkeypatch):
    from tests.full_disk import FullDirectory

    annotation_file, images = coco_dataset
    args = ["--annotations", str(annotation_file), "--images", str(images), "--images-per-shard", "1", "--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CocoConversionWarning)
        main(["to-shards", *args, "--out", str(tmp_path / "reference")])
        settings = len((tmp_path / "reference" / "coco_conversion.json").read_bytes())
        out = tmp_path / "out"
        out.mkdir()
        with monkeypatch.context() as patch:  # room for the settings file, not for a shard
            FullDirectory(out, room=settings, monkeypatch=patch)
            with pytest.raises(SystemExit):
                main(["to-shards", *args, "--out", str(out)])
        message = capsys.readouterr().err.strip()
        assert f": error: disk full writing {out / 'sa_000000.tar'} " in message and "\n" not in message, message
        assert "resumes" in message and not list(out.glob("*.tar*"))
        main(["to-shards", *args, "--out", str(out)])  # space freed: the same command finishes
    assert "wrote 2 images" in capsys.readouterr().out
