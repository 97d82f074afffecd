"""Latency of an interactive click through Label Studio -> segany-serve -> back, per model.

Starts a real Label Studio (tests/label_studio_servers.py: its own cached venv) and, per model, a
segany-serve process; uploads synthetic images as tasks and sends clicks the way the labeling page
does (POST /api/ml/<id>/interactive-annotating, one positive keypoint). Prints p50 and p95 of
- the first click on an image (image fetched from Label Studio, encoder, decoder),
- clicks on an image whose embedding is cached (one decoder pass),
- the same cached clicks sent to segany-serve directly (the backend's share of a click),
and, measured in this process on the same weights, image and thread count, the bare decoder call
(`SamPredictor.predict` for one point), with the ratio cached p50 / decoder p50 (target: <= 2).

Models: `tiny` (the tests' tiny config, random weights) and `vit_b` (random weights).
"""

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import TINY, randomized
from label_studio_servers import API_TOKEN, free_port, label_studio_venv, start_label_studio, start_segany_serve

from data_engine.label_studio_tasks import LABEL_CONFIG, connect_backend
from segany_train.inference.cli_options import build_model
from segany_train.inference.predictor import SamPredictor
from segany_train.label_studio.client import LabelStudioClient
from segany_train.model import build_sam

TARGET_RATIO = 2.0


def synthetic_image(seed: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    image = np.full((size, size, 3), rng.integers(40, 200, 3), np.uint8)
    for _ in range(4):
        cy, cx, r = rng.integers(size // 5, 4 * size // 5, 2).tolist() + [int(rng.integers(size // 12, size // 5))]
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 255, 3)
    return image


def jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def click(x: float, y: float, size: int) -> dict:
    return {
        "type": "keypointlabels", "from_name": "click", "to_name": "image", "origin": "manual",
        "original_width": size, "original_height": size, "image_rotation": 0, "is_positive": True,
        "value": {"x": (x + 0.5) / size * 100, "y": (y + 0.5) / size * 100, "width": 0.5, "keypointlabels": ["object"]},
    }  # fmt: skip


def percentiles(seconds: list[float]) -> tuple[float, float]:
    return float(np.percentile(seconds, 50) * 1000), float(np.percentile(seconds, 95) * 1000)


def measure(name: str, model_args: list[str], sam: torch.nn.Module, args, client: LabelStudioClient, label_studio_url: str, work: Path) -> dict:
    serve = start_segany_serve(model_args, port=free_port(), label_studio_url=label_studio_url, work_dir=work)
    try:
        project = client.call("POST", "/api/projects", json={"title": f"benchmark {name}", "label_config": LABEL_CONFIG})["id"]
        problem = connect_backend(client, project, serve.url)
        if problem:
            raise RuntimeError(problem)
        (backend,) = client.call("GET", "/api/ml", params={"project": project})
        images = [synthetic_image(seed, args.image_size) for seed in range(args.images)]
        client.call("POST", f"/api/projects/{project}/import", files=[(f"file{k}", (f"img{k}.jpg", jpeg(im), "image/jpeg")) for k, im in enumerate(images)])
        tasks = sorted(t["id"] for t in client.call("GET", f"/api/projects/{project}/export", params={"exportType": "JSON", "download_all_tasks": "true"}))
        rng = np.random.default_rng(0)

        def timed_click(task: int) -> float:
            x, y = rng.integers(0, args.image_size, 2).tolist()
            started = time.perf_counter()
            answer = client.call("POST", f"/api/ml/{backend['id']}/interactive-annotating", json={"task": task, "context": {"result": [click(x, y, args.image_size)]}})
            elapsed = time.perf_counter() - started
            if "errors" in answer:
                raise RuntimeError(answer["errors"])
            return elapsed

        first = [timed_click(task) for task in tasks]  # the embedding is computed on each
        cached = [timed_click(tasks[k % len(tasks)]) for k in range(args.clicks)]
        # the same cached clicks sent to segany-serve directly: how much of a click is Label Studio's
        exported = {t["id"]: t for t in client.call("GET", f"/api/projects/{project}/export", params={"exportType": "JSON", "download_all_tasks": "true"})}
        direct = []
        with httpx.Client(timeout=60) as http:
            for k in range(args.clicks):
                x, y = rng.integers(0, args.image_size, 2).tolist()
                task = exported[tasks[k % len(tasks)]]
                request = {"tasks": [{"id": task["id"], "data": task["data"]}], "label_config": LABEL_CONFIG, "params": {"context": {"result": [click(x, y, args.image_size)]}}}
                started = time.perf_counter()
                http.post(f"{serve.url}/predict", json=request).raise_for_status()
                direct.append(time.perf_counter() - started)
    finally:
        serve.stop()
    # the bare decoder call, same weights, same image size, same threads
    predictor = SamPredictor(sam.eval())
    predictor.set_image(images[0])
    decoder = []
    for _ in range(args.clicks):
        x, y = rng.integers(0, args.image_size, 2).tolist()
        started = time.perf_counter()
        predictor.predict(np.array([[x, y]]), np.array([1]), multimask_output=True)
        decoder.append(time.perf_counter() - started)
    return {"first": percentiles(first), "cached": percentiles(cached), "direct": percentiles(direct), "decoder": percentiles(decoder)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "vit_b"], choices=["tiny", "vit_b"])
    parser.add_argument("--images", type=int, default=5, help="images (first clicks) per model")
    parser.add_argument("--clicks", type=int, default=40, help="cached clicks per model")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and in segany-serve")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # segany-serve inherits it
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="segany-serve-benchmark-"))
    started = time.perf_counter()
    label_studio = start_label_studio(label_studio_venv(), work / "label-studio", port=free_port())
    print(f"Label Studio {label_studio.url} up in {time.perf_counter() - started:.1f} s; {args.images} images of {args.image_size} px, {args.clicks} cached clicks, {args.threads} thread(s)")
    client = LabelStudioClient(url=label_studio.url, api_key=API_TOKEN)
    rows = []
    try:
        for name in args.models:
            if name == "tiny":
                torch.manual_seed(0)
                sam = randomized(build_sam(TINY))
                torch.save(sam.state_dict(), work / "tiny.pth")
                model_args = ["--checkpoint", str(work / "tiny.pth")]
            else:
                sam = build_model(None, "vit_b", seed=0)
                model_args = ["--model-type", "vit_b", "--seed", "0"]
            rows.append((name, measure(name, model_args, sam, args, client, label_studio.url, work)))
    finally:
        client.close()
        label_studio.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"{'model':6} | {'first click p50/p95 ms':>22} | {'cached click p50/p95 ms':>23} | {'backend alone p50/p95 ms':>24} | "
        f"{'bare decoder p50/p95 ms':>23} | cached/decoder p50 (target <= {TARGET_RATIO:g})"
    )
    for name, r in rows:
        ratio = r["cached"][0] / r["decoder"][0]
        print(
            f"{name:6} | {r['first'][0]:10.1f} / {r['first'][1]:9.1f} | {r['cached'][0]:11.1f} / {r['cached'][1]:9.1f} | "
            f"{r['direct'][0]:12.1f} / {r['direct'][1]:9.1f} | {r['decoder'][0]:11.1f} / {r['decoder'][1]:9.1f} | "
            f"{ratio:.2f} {'ok' if ratio <= TARGET_RATIO else 'over'}"
        )


if __name__ == "__main__":
    main()
