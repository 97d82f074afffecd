"""Stages 1 and 2 with people in Label Studio, assisted by the round's model (`annotator.kind=label_studio`).

Each round's chunk is exported as `coco_tasks` does (`annotation_tasks.export_tasks`: the images,
the pre-filled masks, the index back to the shards), then published through Label Studio's API:

- one project per round (labeling config `LABEL_CONFIG`: BrushLabels for the masks, smart
  KeyPointLabels and RectangleLabels for the clicks and boxes that prompt the model), its images
  uploaded as tasks, stage 2's pre-filled masks attached to them as predictions;
- `segany-serve` (a Label Studio ML backend, `segany_train/label_studio/backend.py`) connected as
  the project's interactive model; the engine's message says which checkpoint it should serve. A
  backend that is not reachable yet is connected on the next run.

The engine then waits (exit status 3) until every task is submitted or skipped. The next run pulls
the annotations (Label Studio's JSON export) into `annotations.json`, a COCO result with each
brush mask converted to an SA-1B RLE, and imports it like a COCO tool's result
(`annotation_tasks.import_annotations`). Counted warnings (`CocoConversionWarning`): skipped tasks
(imported as images without masks), brush results that cannot be decoded, tasks that are not the
round's; empty masks and missing images are counted by the import. Keypoints and rectangles left in
an annotation are the prompts, not results, and are ignored. An annotation's `lead_time` (seconds
from opening the task to submitting it) becomes the image's seconds, spread evenly over its new
masks.
"""

import json
import math
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from data_engine.annotation_tasks import (
    CATEGORY,
    IMAGES_DIR,
    RESULT_FILE,
    TASKS_FILE,
    AwaitingAnnotation,
    exported_prefilled_masks,
)
from segany_train.data.brush_rle import brush_rle_to_mask
from segany_train.data.coco import CocoConversionWarning
from segany_train.data.sa1b import annotation_from_mask
from segany_train.atomic_files import write_json_atomically
from segany_train.label_studio.client import LabelStudioClient, LabelStudioError
from segany_train.label_studio.regions import LabelingSchema, brush_region

PROJECT_FILE = "label_studio_project.json"  # in the task directory: the round's project and task ids
PREFILL_MODEL_VERSION = "stage 2 pre-fill"
UPLOAD_BATCH = 50  # images per upload request
LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true" zoomControl="true"/>
  <BrushLabels name="mask" toName="image">
    <Label value="object" background="#ff6a00"/>
  </BrushLabels>
  <KeyPointLabels name="click" toName="image" smart="true">
    <Label value="object" smart="true" background="#00a0ff" showInline="true"/>
  </KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true">
    <Label value="object" smart="true" background="#00a0ff" showInline="true"/>
  </RectangleLabels>
</View>"""
SCHEMA = LabelingSchema.from_config(LABEL_CONFIG)


def publish_round(task_dir: str | Path, client: LabelStudioClient, *, title: str) -> dict[str, Any]:
    """Creates the round's project from the exported task directory (once; the ids are kept in
    PROJECT_FILE, so a rerun finds the same project). Returns {"project", "tasks": {file name: task id}}."""
    task_dir = Path(task_dir)
    record_path = task_dir / PROJECT_FILE
    if record_path.exists():
        return json.loads(record_path.read_text())
    exported = json.loads((task_dir / TASKS_FILE).read_text())
    project = client.call("POST", "/api/projects", json={"title": title[:50], "label_config": LABEL_CONFIG, "description": str(task_dir)})
    project_id = project["id"]
    names = [image["file_name"] for image in exported["images"]]
    for start in range(0, len(names), UPLOAD_BATCH):
        # one form field per file: Label Studio keeps one file per field name
        files = [(f"file{k}", (name, (task_dir / IMAGES_DIR / name).read_bytes(), "image/jpeg")) for k, name in enumerate(names[start : start + UPLOAD_BATCH])]
        client.call("POST", f"/api/projects/{project_id}/import", files=files)
    tasks = {}
    for task in _export(client, project_id):
        tasks[_uploaded_name(task)] = task["id"]
    if sorted(tasks) != sorted(names):
        raise LabelStudioError(f"project {project_id} holds {len(tasks)} tasks after the upload of {len(names)} images")
    prefilled = exported_prefilled_masks(exported)
    for name, masks in prefilled.items():  # stage 2: the pre-filled masks, to accept, fix or delete
        client.call(
            "POST",
            "/api/predictions",
            json={
                "task": tasks[name],
                "result": [{**brush_region(m, schema=SCHEMA, label="object"), "id": f"prefill{k}"} for k, m in enumerate(masks)],
                "model_version": PREFILL_MODEL_VERSION,
                "score": 1.0,
            },
        )
    if prefilled:  # show the pre-fill when a task opens
        client.call("PATCH", f"/api/projects/{project_id}", json={"model_version": PREFILL_MODEL_VERSION, "show_collab_predictions": True})
    record = {"project": project_id, "tasks": tasks}
    write_json_atomically(record_path, record)
    return record


def connect_backend(client: LabelStudioClient, project_id: int, backend_url: str) -> str | None:
    """Connects segany-serve at `backend_url` as the project's interactive model (once); returns
    None when connected, else Label Studio's reason (the backend is not running, for instance)."""
    connected = client.call("GET", "/api/ml", params={"project": project_id}) or []
    if any(backend["url"].rstrip("/") == backend_url.rstrip("/") for backend in connected):
        return None
    try:
        client.call("POST", "/api/ml", json={"url": backend_url, "project": project_id, "title": "segany-serve", "is_interactive": True})
    except LabelStudioError as error:
        return str(error)
    return None


def collect_round(task_dir: str | Path, client: LabelStudioClient, *, waiting_message: str) -> Path:
    """Writes the round's annotations as the COCO result `annotations.json` once every task is
    submitted or skipped; raises AwaitingAnnotation(`waiting_message` with the count) before."""
    task_dir = Path(task_dir)
    record = json.loads((task_dir / PROJECT_FILE).read_text())
    exported = {image["file_name"]: image for image in json.loads((task_dir / TASKS_FILE).read_text())["images"]}
    task_names = {task_id: name for name, task_id in record["tasks"].items()}
    tasks = _export(client, record["project"])
    open_tasks = [t for t in tasks if t["id"] in task_names and not t.get("annotations")]
    if open_tasks:
        raise AwaitingAnnotation(f"{len(open_tasks)} of {len(task_names)} tasks still to submit or skip; {waiting_message}")
    images, annotations, counts = [], [], {"tasks_skipped": 0, "unreadable_brush_results": 0, "tasks_not_in_round": 0}
    for task in tasks:
        name = task_names.get(task["id"])
        if name is None:
            counts["tasks_not_in_round"] += 1
            continue
        image = exported[name]
        submitted = [a for a in task["annotations"] if not a.get("was_cancelled")]
        entry = {"id": len(images) + 1, "file_name": name, "width": image["width"], "height": image["height"]}
        # the latest submission; a skipped task (only cancelled ones) comes back without masks
        latest = max(submitted or task["annotations"], key=lambda a: a["id"])
        if isinstance(latest.get("lead_time"), (int, float)) and math.isfinite(latest["lead_time"]):
            entry["annotation_seconds"] = float(latest["lead_time"])  # time on a skipped task counts too
        images.append(entry)
        if not submitted:
            counts["tasks_skipped"] += 1
            continue
        for region in latest.get("result", []):
            if region.get("type") != "brushlabels":
                continue  # the prompts (keypoints, boxes) stay in the annotation; they are not masks
            try:
                mask = brush_rle_to_mask(region["value"]["rle"], height=image["height"], width=image["width"])
            except (KeyError, TypeError, ValueError) as error:
                counts["unreadable_brush_results"] += 1
                warnings.warn(f"skipped a brush result of task {task['id']} ({name}): {error}", CocoConversionWarning, stacklevel=2)
                continue
            ann = annotation_from_mask(mask, annotation_id=len(annotations) + 1)
            annotations.append({**ann, "image_id": entry["id"], "category_id": CATEGORY["id"], "iscrowd": 0})
    for reason, count in counts.items():
        if count and reason != "unreadable_brush_results":
            warnings.warn(f"{count} task(s) {reason.replace('_', ' ')} in project {record['project']}", CocoConversionWarning, stacklevel=2)
    result_path = task_dir / RESULT_FILE
    write_json_atomically(result_path, {"images": images, "annotations": annotations, "categories": [CATEGORY], "label_studio": counts})
    return result_path


def sync_round(task_dir: str | Path, *, settings: Any, title: str, checkpoint: str) -> None:
    """The round's side in Label Studio: published, connected to segany-serve, and collected into
    `annotations.json` when done (AwaitingAnnotation until then). `settings`: url, api_key, backend_url."""
    task_dir = Path(task_dir)
    if (task_dir / RESULT_FILE).exists():
        return
    if not settings.api_key:
        raise ValueError("annotator.kind=label_studio needs annotator.label_studio.api_key (or LABEL_STUDIO_API_KEY in the environment)")
    client = LabelStudioClient(url=settings.url, api_key=settings.api_key)
    try:
        record = publish_round(task_dir, client, title=title)
        problem = connect_backend(client, record["project"], settings.backend_url)
        problem = f"it is not connected: {problem}" if problem else _serves_another_model(settings.backend_url, checkpoint)
        serve = f"segany-serve --checkpoint {checkpoint} --port {urlsplit(settings.backend_url).port or 80} --label-studio-url {settings.url}"
        message = (
            f"open {client.url}/projects/{record['project']} ({title}); run `{serve}` for the round's model"
            + (f" ({problem})" if problem else "")
            + "; then run the same command again"
        )
        collect_round(task_dir, client, waiting_message=message)
    except LabelStudioError as error:  # not running, a wrong key...: the round waits for the tool, in one line
        raise AwaitingAnnotation(f"Label Studio at {settings.url} did not answer as expected ({error}); start it or fix the setting, then run the same command again") from None
    finally:
        client.close()


def _serves_another_model(backend_url: str, checkpoint: str) -> str | None:
    """Why the segany-serve at `backend_url` is not serving the round's `checkpoint`, or None if it is
    (or cannot be asked: connect_backend says why)."""
    try:
        served = httpx.get(f"{backend_url.rstrip('/')}/health", timeout=10).json().get("checkpoint")
    except (httpx.HTTPError, ValueError):
        return None
    if served and Path(served) == Path(checkpoint).resolve():
        return None
    return f"the segany-serve at {backend_url} serves {served or 'random weights'}, not this round's model"


def _export(client: LabelStudioClient, project_id: int) -> list[dict[str, Any]]:
    """Every task of the project with its annotations (Label Studio's JSON export)."""
    return client.call("GET", f"/api/projects/{project_id}/export", params={"exportType": "JSON", "download_all_tasks": "true"})


def _uploaded_name(task: dict[str, Any]) -> str:
    """The file name an uploaded image had (Label Studio prefixes 8 hex digits and a dash)."""
    stored = task.get("file_upload") or task["data"]["image"].rsplit("/", 1)[-1]
    return stored.split("-", 1)[1]
