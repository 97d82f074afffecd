"""Stages 1-2 with a real annotation tool: COCO tasks out, the tool's COCO result back in as shards."""

import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from data_engine.annotation_step import summarize_images
from data_engine.annotation_tasks import (
    IMAGES_DIR,
    INDEX_FILE,
    RESULT_FILE,
    AwaitingAnnotation,
    export_tasks,
    import_annotations,
)
from data_engine.corpus import gt_masks_of, read_labelled_images
from segany_train.data.coco import CocoConversionWarning
from segany_train.data.pipeline import read_records
from segany_train.data.shard_writer import read_manifest
from segany_train.data.synthetic import write_synthetic_corpus


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    directory = tmp_path_factory.mktemp("pool")
    write_synthetic_corpus(directory, num_images=6, size=64, images_per_shard=3, min_objects=2, max_objects=3, progress=False)
    return [str(p) for p in sorted(directory.glob("sa_*.tar"))]


def _rle_json(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def test_export_writes_a_coco_dataset_with_images_and_prefilled_masks(shards, tmp_path):
    items = {i.key: i for i in read_labelled_images(shards)}
    keys = iter(items)  # the prefill is called once per image, in shard order
    tasks = export_tasks(shards, tmp_path, prefill=lambda image: [max(items[next(keys)].gt_masks, key=np.sum)], progress=False)
    coco = COCO(str(tasks))  # pycocotools reads it as an instances dataset
    assert len(coco.getImgIds()) == 6 and len(coco.getAnnIds()) == 6
    for image in coco.loadImgs(coco.getImgIds()):
        key = Path(image["file_name"]).stem
        assert (tmp_path / IMAGES_DIR / image["file_name"]).read_bytes() == items[key].jpeg  # no re-encode
        (ann,) = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert ann["attributes"]["prefilled"]
        assert np.array_equal(coco.annToMask(ann).astype(bool), max(items[key].gt_masks, key=np.sum))
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert sorted(e["shard"] for e in index["images"].values()) == [0, 0, 0, 1, 1, 1]
    before = tasks.stat().st_mtime_ns
    assert export_tasks(shards, tmp_path, progress=False) == tasks and tasks.stat().st_mtime_ns == before  # done once


def test_import_needs_the_result_and_says_where_it_goes(shards, tmp_path):
    export_tasks(shards[:1], tmp_path / "tasks", progress=False)
    with pytest.raises(AwaitingAnnotation, match=str(tmp_path / "tasks" / RESULT_FILE)):
        import_annotations(tmp_path / "tasks", tmp_path / "out")
    (tmp_path / "tasks" / RESULT_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        import_annotations(tmp_path / "tasks", tmp_path / "out")


def test_a_tools_result_comes_back_as_annotated_shards(shards, tmp_path):
    """The tool renumbers images, returns polygons and RLEs, keeps one pre-filled mask, loses an
    image and has a broken annotation: each mask lands on the right image, each loss is counted."""
    items = {i.key: i for i in read_labelled_images(shards)}
    prefilled = {key: [max(item.gt_masks, key=np.sum)] for key, item in items.items()}
    order = iter(items)
    task_dir = tmp_path / "tasks"
    exported = json.loads(export_tasks(shards, task_dir, prefill=lambda image: prefilled[next(order)], progress=False).read_text())

    images, annotations, expected = [], [], {}
    for n, image in enumerate(exported["images"]):
        key = Path(image["file_name"]).stem
        if n == 4:  # the tool lost this image
            continue
        tool_id = 1000 + n  # tools number images their own way
        images.append({**image, "id": tool_id})
        others = [m for m in items[key].gt_masks if not np.array_equal(m, prefilled[key][0])]
        kept = [prefilled[key][0]] if n != 1 else []  # on image 1 the annotator deleted the pre-filled mask
        anns = [{"segmentation": _rle_json(m)} for m in kept + others[:1]]
        if n == 0:  # a rectangle drawn as a polygon, and an unreadable annotation
            anns.append({"segmentation": [[10, 10, 30, 10, 30, 20, 10, 20]]})
            anns.append({"segmentation": [[1, 2]]})
        if n == 2:  # the annotator deleted everything on this one
            anns = []
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": tool_id, "category_id": 1, "iscrowd": 0, **ann})
        if anns:
            expected[key] = len(anns) - (n == 0)
    images.append({"id": 5000, "file_name": "stranger.jpg", "width": 64, "height": 64})
    (task_dir / RESULT_FILE).write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1}]}))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = import_annotations(task_dir, tmp_path / "out", first_index=7)
    assert any(issubclass(w.category, CocoConversionWarning) for w in caught)
    assert out["skipped"] == {
        "malformed_segmentation": 1,
        "images_not_in_task": 1,
        "images_missing_from_result": 1,
        "images_without_masks": 1,
    }
    assert [Path(s).name for s in out["shards"]] == ["annotated-000007.tar", "annotated-000008.tar"]
    assert sorted(read_manifest(tmp_path / "out")["shards"]) == ["annotated-000007.tar", "annotated-000008.tar"]
    written = {key: record for url in out["shards"] for key, _, record in read_records([url])}
    assert {k: len(r["annotations"]) for k, r in written.items()} == expected
    for key, record in written.items():
        assert record["image"]["image_id"] == items[key].record["image"]["image_id"]  # the corpus id, not the tool's
    first = Path(exported["images"][0]["file_name"]).stem
    rectangle = gt_masks_of(written[first])[-1]
    assert rectangle[10:20, 10:30].all() and rectangle.sum() <= 11 * 21
    stats = {i["key"]: i for i in out["images"]}
    second = Path(exported["images"][1]["file_name"]).stem
    assert stats[first]["prefilled_accepted"] == 1 and stats[first]["new_masks"] == 2
    assert stats[second]["prefilled_accepted"] == 0 and stats[second]["new_masks"] == 1
    assert all(s["prefilled_correct"] == 1 for s in stats.values())  # the pre-fill was a GT mask
    emptied = Path(exported["images"][2]["file_name"]).stem
    assert stats[emptied]["masks"] == 0 and emptied not in written  # counted as an image, not written
    assert len(stats) == 5  # every returned image of the task, the emptied one included
    assert np.isnan(stats[first]["seconds"])  # COCO carries no clock

    # the round's stats files are valid JSON: the unknown seconds and clicks are null, not NaN
    for path in sorted((tmp_path / "out").glob("*.stats.json")):
        written_stats = json.loads(path.read_text(), parse_constant=lambda constant: pytest.fail(f"{path.name} holds {constant}"))
        assert all(image["seconds"] is None and image["clicks"] is None for image in written_stats["images"])

    again = import_annotations(task_dir, tmp_path / "out", first_index=7)  # finished shards are not rewritten
    assert again["shards"] == out["shards"]
    # read back from those files, the round's figures are the same (NaN where unknown)
    summary, resumed = summarize_images(out["images"]), summarize_images(again["images"])
    assert np.isnan(resumed["seconds_per_mask"]) and np.isnan(resumed["clicks_per_mask"])
    assert {k: v for k, v in resumed.items() if v == v} == {k: v for k, v in summary.items() if v == v}
    assert [(i["key"], i["masks"]) for i in again["images"]] == [(i["key"], i["masks"]) for i in out["images"]]
    with tarfile.open(out["shards"][0]) as tar:
        assert len(tar.getmembers()) == 2 * len([k for k in written if k in {Path(i["file_name"]).stem for i in exported["images"][:3]}])
