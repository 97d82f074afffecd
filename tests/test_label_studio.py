"""segany-serve and annotator.kind=label_studio against a real Label Studio on loopback.

One Label Studio server (its own venv, built once and cached: tests/label_studio_servers.py) and one
segany-serve with the engine's shipped seed model (a small trained SAM, so clicks give object masks)
are started for the session and stopped at its end. Everything goes through Label Studio's own API,
as its web page would: the backend is never called directly.
"""

import json
import os
import subprocess
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from headless_chromium import CHROMIUM, login_session_cookie, screenshot
from label_studio_servers import (
    API_TOKEN,
    USER_EMAIL,
    USER_PASSWORD,
    free_port,
    label_studio_venv,
    start_label_studio,
    start_segany_serve,
)
from PIL import Image

from data_engine.annotation_tasks import AwaitingAnnotation, export_tasks, import_annotations
from data_engine.corpus import gt_masks_of, read_labelled_images
from data_engine.label_studio_tasks import (
    LABEL_CONFIG,
    PREFILL_MODEL_VERSION,
    SCHEMA,
    collect_round,
    connect_backend,
    publish_round,
)
from segany_train.data.brush_rle import brush_rle_to_mask, mask_to_brush_rle
from segany_train.data.coco import CocoConversionWarning
from segany_train.data.synthetic import write_synthetic_corpus
from segany_train.inference.cli_options import build_model
from segany_train.inference.predictor import SamPredictor
from segany_train.label_studio.client import LabelStudioClient
from segany_train.label_studio.regions import brush_region

pytestmark = pytest.mark.label_studio

SEED_MODEL = Path(__file__).resolve().parents[1] / "segany_train" / "model" / "seed" / "engine_seed.pt"


class Servers:
    def __init__(self, label_studio, serve, client: LabelStudioClient) -> None:
        self.label_studio, self.serve, self.client = label_studio, serve, client

    def project(self, title: str, *, label_config: str = LABEL_CONFIG, backend: bool = True) -> int:
        project = self.client.call("POST", "/api/projects", json={"title": title, "label_config": label_config})["id"]
        if backend:
            assert connect_backend(self.client, project, self.serve.url) is None
        return project

    def backend_of(self, project: int) -> dict:
        (backend,) = self.client.call("GET", "/api/ml", params={"project": project})
        return backend

    def click(self, project: int, task: int, regions: list[dict]) -> dict:
        """What the labeling page sends when the annotator clicks with a smart tool."""
        answer = self.client.call("POST", f"/api/ml/{self.backend_of(project)['id']}/interactive-annotating", json={"task": task, "context": {"result": regions}})
        assert "errors" not in answer, answer
        return answer["data"]


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    work = tmp_path_factory.mktemp("label_studio")
    started = time.perf_counter()
    venv = label_studio_venv()
    print(f"\nLabel Studio venv ready in {time.perf_counter() - started:.1f} s: {venv}")
    started = time.perf_counter()
    label_studio = start_label_studio(venv, work / "data", port=free_port())
    print(f"Label Studio answered /health after {time.perf_counter() - started:.1f} s at {label_studio.url}")
    serve = None
    try:
        started = time.perf_counter()
        serve = start_segany_serve(["--checkpoint", str(SEED_MODEL)], port=free_port(), label_studio_url=label_studio.url, work_dir=work)
        print(f"segany-serve answered /health after {time.perf_counter() - started:.1f} s at {serve.url}")
        client = LabelStudioClient(url=label_studio.url, api_key=API_TOKEN)
        yield Servers(label_studio, serve, client)
        client.close()
    finally:
        if serve is not None:
            serve.stop()
        label_studio.stop()


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> list[str]:
    directory = tmp_path_factory.mktemp("pool")
    write_synthetic_corpus(directory, num_images=6, size=96, images_per_shard=3, min_objects=2, max_objects=3, seed=5, progress=False)
    return [str(p) for p in sorted(directory.glob("sa_*.tar"))]


def _keypoint(x: int, y: int, width: int, height: int, *, positive: bool = True) -> dict:
    """A smart keypoint in the middle of pixel (x, y), as Label Studio sends it (percent of the image)."""
    return {
        "type": "keypointlabels", "from_name": "click", "to_name": "image", "origin": "manual",
        "original_width": width, "original_height": height, "image_rotation": 0, "is_positive": positive,
        "value": {"x": (x + 0.5) / width * 100, "y": (y + 0.5) / height * 100, "width": 0.5, "keypointlabels": ["object"]},
    }  # fmt: skip


def _mask_of(prediction: dict, height: int, width: int) -> np.ndarray:
    (region,) = prediction["result"]
    assert region["type"] == "brushlabels" and region["from_name"] == "mask" and region["value"]["brushlabels"] == ["object"]
    return brush_rle_to_mask(region["value"]["rle"], height=height, width=width)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return np.count_nonzero(a & b) / np.count_nonzero(a | b)


def _upload(client: LabelStudioClient, project: int, pool: list[str], count: int) -> list[tuple[int, object]]:
    """`count` pool images uploaded as tasks: [(task id, LabelledImage)]."""
    items = list(read_labelled_images(pool))[:count]
    client.call("POST", f"/api/projects/{project}/import", files=[(f"file{k}", (f"{i.key}.jpg", i.jpeg, "image/jpeg")) for k, i in enumerate(items)])
    tasks = client.call("GET", f"/api/projects/{project}/export", params={"exportType": "JSON", "download_all_tasks": "true"})
    by_name = {t["file_upload"].split("-", 1)[1]: t["id"] for t in tasks}
    return [(by_name[f"{i.key}.jpg"], i) for i in items]


# runs in Label Studio's venv: its own brush RLE decoder and encoder (label_studio_sdk.converter.brush)
_LABEL_STUDIO_BRUSH = """
import json, sys
import numpy as np
from label_studio_sdk.converter.brush import decode_rle, mask2rle
cases = json.load(sys.stdin)
out = []
for case in cases:
    h, w = case["shape"]
    decoded = np.reshape(decode_rle(case["ours"]), (h, w, 4))[:, :, 3] > 127
    out.append({"decoded": decoded.ravel().tolist(), "theirs": [int(v) for v in mask2rle(np.array(case["mask"], np.uint8).reshape(h, w) * 255)]})
json.dump(out, sys.stdout)
"""


def test_brush_rles_are_label_studios_own_format(servers):
    """Our masks decode with Label Studio's decoder, and its encoder's RLEs decode with ours."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:90, :120]
    masks = [rng.random((31, 17)) > 0.5, np.zeros((8, 9), bool), (yy - 40) ** 2 + (xx - 70) ** 2 < 900, np.ones((300, 300), bool)]
    cases = [{"shape": list(m.shape), "ours": mask_to_brush_rle(m), "mask": m.astype(int).ravel().tolist()} for m in masks]
    python = str(label_studio_venv() / "bin" / "python")
    answer = subprocess.run([python, "-c", _LABEL_STUDIO_BRUSH], input=json.dumps(cases), capture_output=True, text=True, check=True)
    for mask, result in zip(masks, json.loads(answer.stdout)):
        assert np.array_equal(np.array(result["decoded"]).reshape(mask.shape), mask)
        assert np.array_equal(brush_rle_to_mask(result["theirs"], height=mask.shape[0], width=mask.shape[1]), mask)


def test_segany_serve_connects_and_refuses_a_config_without_brush_labels(servers):
    project = servers.project("connect")
    backend = servers.backend_of(project)
    assert backend["readable_state"] == "Connected" and backend["model_version"] == f"segany {SEED_MODEL}"
    # /setup checks the labeling config: without a BrushLabels tag there is nowhere to put masks
    bare = servers.project("no brush", label_config='<View><Image name="image" value="$image"/><KeyPointLabels name="k" toName="image"><Label value="a"/></KeyPointLabels></View>', backend=False)
    problem = connect_backend(servers.client, bare, servers.serve.url)
    assert "doesn't look like a valid ML backend" in problem and "400 Client Error" in problem
    assert servers.client.call("GET", "/api/ml", params={"project": bare}) == []


def test_clicks_through_label_studio_give_the_predictors_masks(servers, pool):
    project = servers.project("clicks")
    (task, item), = _upload(servers.client, project, pool, 1)
    height, width = item.image.shape[:2]
    predictor = SamPredictor(build_model(SEED_MODEL, None).eval())
    predictor.set_image(item.image)
    obj = max(item.gt_masks, key=np.count_nonzero)
    ys, xs = np.nonzero(obj)
    x, y = int(xs[len(xs) // 2]), int(ys[len(ys) // 2])
    first = _mask_of(servers.click(project, task, [_keypoint(x, y, width, height)]), height, width)
    masks, scores, logits = predictor.predict(np.array([[x, y]]), np.array([1]), multimask_output=True)
    expected = masks[int(np.argmax(scores))]
    assert 0 < np.count_nonzero(expected) < expected.size  # a real object mask, not a trivial one
    assert _iou(first, expected) >= 0.99
    assert _iou(first, obj) > 0.5  # the trained seed finds the object it was clicked on

    # a negative click inside the mask, on the background: the previous mask is fed back
    outside = np.argwhere(first & ~obj) if np.any(first & ~obj) else np.argwhere(~obj)
    ny, nx = (int(v) for v in outside[len(outside) // 2])
    second = _mask_of(servers.click(project, task, [_keypoint(x, y, width, height), _keypoint(nx, ny, width, height, positive=False)]), height, width)
    again, _, _ = predictor.predict(
        np.array([[x, y], [nx, ny]]), np.array([1, 0]), mask_input=logits[int(np.argmax(scores))][None], multimask_output=False
    )
    assert not np.array_equal(second, first)
    assert _iou(second, again[0]) >= 0.99


def test_a_stage2_task_shows_its_prefilled_masks_as_predictions(servers, pool, tmp_path):
    items = {i.key: i for i in read_labelled_images(pool[:1])}
    order = iter(items)
    prefill = {key: item.gt_masks[:2] for key, item in items.items()}
    export_tasks(pool[:1], tmp_path, prefill=lambda image: prefill[next(order)], progress=False)
    record = publish_round(tmp_path, servers.client, title="stage 2 pre-fill")
    assert publish_round(tmp_path, servers.client, title="stage 2 pre-fill") == record  # once
    for name, task_id in record["tasks"].items():
        task = servers.client.call("GET", f"/api/tasks/{task_id}")
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == PREFILL_MODEL_VERSION
        height, width = items[Path(name).stem].image.shape[:2]
        shown = [brush_rle_to_mask(r["value"]["rle"], height=height, width=width) for r in prediction["result"]]
        assert len(shown) == 2 and all(np.array_equal(a, b) for a, b in zip(shown, prefill[Path(name).stem]))


def test_a_round_through_label_studio_comes_back_as_the_submitted_masks(servers, pool, tmp_path):
    """Export, people annotate in Label Studio (submitted through its API: one task skipped, one with
    a pre-filled mask deleted, one with a broken brush result), import: the shards hold exactly the
    submitted masks, each loss is counted, and the seconds come from lead_time."""
    items = {i.key: i for i in read_labelled_images(pool)}
    order = iter(items)
    prefill = {key: [max(item.gt_masks, key=np.count_nonzero)] for key, item in items.items()}
    task_dir = tmp_path / "tasks"
    export_tasks(pool, task_dir, prefill=lambda image: prefill[next(order)], progress=False)
    record = publish_round(task_dir, servers.client, title="engine round")
    assert connect_backend(servers.client, record["project"], servers.serve.url) is None
    with pytest.raises(AwaitingAnnotation, match="6 of 6 tasks still to submit or skip; open here"):
        collect_round(task_dir, servers.client, waiting_message="open here")

    keys = sorted(items)
    skipped, deleted, broken = keys[1], keys[2], keys[4]
    submitted: dict[str, list[np.ndarray]] = {}
    for key in keys:
        task_id = record["tasks"][f"{key}.jpg"]
        if key == skipped:
            servers.client.call("POST", f"/api/tasks/{task_id}/annotations", json={"result": [], "was_cancelled": True, "lead_time": 3.0})
            continue
        # the pre-fill is accepted (sent back as it was) except on `deleted`; the rest of the GT is drawn
        masks = ([] if key == deleted else prefill[key]) + [m for m in items[key].gt_masks if _iou(m, prefill[key][0]) < 1.0]
        regions = [{**brush_region(m, schema=SCHEMA, label="object"), "id": f"r{k}"} for k, m in enumerate(masks)]
        regions.append({**_keypoint(5, 5, 96, 96), "id": "prompt"})  # the click that prompted a mask stays in the annotation
        if key == broken:
            regions.append({**brush_region(masks[0], schema=SCHEMA, label="object"), "id": "bad", "value": {"format": "rle", "rle": [1, 2, 3], "brushlabels": ["object"]}})
        servers.client.call("POST", f"/api/tasks/{task_id}/annotations", json={"result": regions, "lead_time": 20.0 + len(masks)})
        submitted[key] = masks

    # Label Studio told segany-serve's /webhook about each submission (it makes the hook when the backend connects)
    events_path = servers.serve.log.parent / "events.jsonl"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        events = [json.loads(line) for line in events_path.read_text().splitlines()] if events_path.exists() else []
        created = {e["task"] for e in events if e["action"] == "ANNOTATION_CREATED" and e["project"] == record["project"]}
        if created == set(record["tasks"].values()):
            break
        time.sleep(0.5)
    assert created == set(record["tasks"].values())

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        collect_round(task_dir, servers.client, waiting_message="open here")
        out = import_annotations(task_dir, tmp_path / "out")
    messages = [str(w.message) for w in caught if issubclass(w.category, CocoConversionWarning)]
    assert any("1 task(s) tasks skipped" in m for m in messages)
    assert any("brush result of task" in m and broken in m for m in messages)
    coco = json.loads((task_dir / "annotations.json").read_text())
    assert coco["label_studio"] == {"tasks_skipped": 1, "unreadable_brush_results": 1, "tasks_not_in_round": 0}

    written = {}
    for shard in out["shards"]:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    rec = json.loads(tar.extractfile(member).read())
                    written[member.name.rsplit(".", 1)[0]] = gt_masks_of(rec)
    assert sorted(written) == sorted(k for k in keys if k != skipped)
    for key, masks in submitted.items():
        assert len(written[key]) == len(masks) and all(np.array_equal(a, b) for a, b in zip(written[key], masks))
    stats = {i["key"]: i for i in out["images"]}
    assert stats[skipped]["masks"] == 0 and stats[skipped]["seconds"] == 3.0
    assert stats[deleted]["prefilled_accepted"] == 0 and stats[deleted]["new_masks"] == len(submitted[deleted])
    kept = keys[0]
    assert stats[kept]["prefilled_accepted"] == 1 and stats[kept]["seconds"] == 20.0 + len(submitted[kept])
    assert stats[kept]["mask_seconds"] == [stats[kept]["seconds"] / stats[kept]["new_masks"]] * stats[kept]["new_masks"]


def test_the_engine_waits_for_each_label_studio_round_and_imports_it(servers, tmp_path):
    """segany-engine annotator.kind=label_studio: each round is a project the engine waits on (exit
    status 3 from the command), people submit every GT object, the cycle continues with their masks."""
    from test_engine import _engine_config

    from data_engine import engine
    from data_engine.annotation_tasks import INDEX_FILE
    from data_engine.label_studio_tasks import PROJECT_FILE

    corpus = tmp_path / "corpus"
    cfg = _engine_config(
        tmp_path,
        corpus,
        [
            "annotator.kind=label_studio",
            f"annotator.label_studio.url={servers.label_studio.url}",
            f"annotator.label_studio.api_key={API_TOKEN}",
            f"annotator.label_studio.backend_url={servers.serve.url}",
            "stage1.rounds=1", "stage2.rounds=1", "stage3.train_steps=0", "control.enabled=false",
        ],
    )  # fmt: skip
    run = tmp_path / "run"
    for step in ("stage1/round1/annotate", "stage2/round1/annotate"):
        with pytest.raises(AwaitingAnnotation, match=rf"tasks still to submit or skip; open {servers.label_studio.url}/projects/\d+ .*segany-serve --checkpoint") as waiting:
            engine.run_engine(cfg)
        # the session's segany-serve runs the shipped seed, not this run's model: the message says so
        assert f"serves {SEED_MODEL}, not this round's model" in str(waiting.value)
        assert step not in json.loads((run / "engine.json").read_text())["steps"]
        tasks = run / step / "tasks"
        record = json.loads((tasks / PROJECT_FILE).read_text())
        (backend,) = servers.client.call("GET", "/api/ml", params={"project": record["project"]})
        assert backend["url"] == servers.serve.url and backend["is_interactive"]
        index = json.loads((tasks / INDEX_FILE).read_text())
        gt = {item.key: item.gt_masks for item in read_labelled_images(index["shards"])}
        for name, task_id in record["tasks"].items():
            regions = [{**brush_region(m, schema=SCHEMA, label="object"), "id": f"r{k}"} for k, m in enumerate(gt[index["images"][name]["key"]])]
            servers.client.call("POST", f"/api/tasks/{task_id}/annotations", json={"result": regions, "lead_time": 6.0 * len(regions)})
    engine.run_engine(cfg)
    steps = json.loads((run / "engine.json").read_text())["steps"]
    for step in ("stage1/round1/annotate", "stage2/round1/annotate"):
        stats = steps[step]["stats"]
        assert stats["masks_per_image"] == stats["gt_objects_per_image"] > 0  # every GT object came back
        if stats["prefilled_accepted_per_image"] == 0:
            assert stats["seconds_per_mask"] == pytest.approx(6.0)  # lead_time over the new masks


def test_a_labeling_page_with_its_prefilled_masks_in_headless_chromium(servers, pool, tmp_path):
    """The labeling page of a stage 2 task, as an annotator sees it, saved as a PNG (docs/annotating.md links
    the copy in benchmarks/; $SEGANY_SCREENSHOT_DIR chooses where the test writes it)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (Debian: apt-get install -y chromium)")
    items = list(read_labelled_images(pool[:1]))[:1]
    prefill = iter([sorted(items[0].gt_masks, key=np.count_nonzero)[-2:]])
    export_tasks(pool[:1], tmp_path, prefill=lambda image: next(prefill, []), progress=False)
    record = publish_round(tmp_path, servers.client, title="screenshot")
    task = record["tasks"][f"{items[0].key}.jpg"]
    cookie = login_session_cookie(servers.label_studio.url, email=USER_EMAIL, password=USER_PASSWORD)
    out = Path(os.environ.get("SEGANY_SCREENSHOT_DIR", tmp_path)) / "label_studio_labeling_page.png"
    # ready: the editor drew the image and listed both pre-filled regions
    # (the label button names "object" once, each region in the Regions panel once more)
    ready = "document.querySelectorAll('canvas').length > 0 && document.body.innerText.split('object').length - 1 >= 3"
    screenshot(
        f"{servers.label_studio.url}/projects/{record['project']}/data?task={task}",
        out,
        cookie=("sessionid", cookie, servers.label_studio.url),
        ready_script=ready,
    )
    print(f"\nscreenshot: {out}")
    pixels = np.asarray(Image.open(out).convert("RGB"))
    assert pixels.shape == (900, 1400, 3) and pixels.std() > 10  # a drawn page, not a blank one


def test_whole_task_predictions_are_stage2s_prefill_from_the_rounds_detector(servers, pool, tmp_path):
    """segany-serve --prefill-detector answers Label Studio's whole-task predictions (the Data
    Manager's "Retrieve predictions", no interactive context) with the pre-fill the engine computes."""
    from omegaconf import OmegaConf

    from segany_train.box_detection.prefill import BoxPrefill, train_prefill_detector
    from segany_train.config_paths import CONFIG_DIR

    sam = build_model(SEED_MODEL, None).eval()
    settings = OmegaConf.load(Path(CONFIG_DIR) / "engine" / "cycle.yaml").stage2
    detector = train_prefill_detector(sam, pool, tmp_path / "detector", settings=OmegaConf.merge(settings.detector, {"steps": 60}), seed=0, progress=False)
    serve = start_segany_serve(["--checkpoint", str(SEED_MODEL), "--prefill-detector", str(detector)], port=free_port(), label_studio_url=servers.label_studio.url, work_dir=tmp_path)
    try:
        project = servers.client.call("POST", "/api/projects", json={"title": "whole-task predictions", "label_config": LABEL_CONFIG})["id"]
        assert connect_backend(servers.client, project, serve.url) is None
        uploaded = _upload(servers.client, project, pool, 3)
        servers.client.call("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project}, json={"selectedItems": {"all": True, "excluded": []}})
    finally:
        serve.stop()
    prefill = BoxPrefill.from_files(detector, SamPredictor(sam), settings=settings.prefill)
    shown = 0
    for task_id, item in uploaded:
        (prediction,) = servers.client.call("GET", f"/api/tasks/{task_id}")["predictions"]
        assert prediction["model_version"] == f"segany {SEED_MODEL}"
        height, width = item.image.shape[:2]
        masks = [brush_rle_to_mask(r["value"]["rle"], height=height, width=width) for r in prediction["result"]]
        expected = prefill(item.image)
        assert len(masks) == len(expected) and all(np.array_equal(a, b) for a, b in zip(masks, expected))
        shown += len(masks)
    assert shown > 0  # the detector found objects, so the comparison covers masks
