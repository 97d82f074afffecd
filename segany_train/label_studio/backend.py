"""segany-serve: a Label Studio ML backend that answers annotators' clicks with SAM masks.

Label Studio's ML-backend protocol (https://labelstud.io/guide/ml_create): `GET /health`,
`POST /setup` (the project's labeling config and Label Studio's address and token; answers the model
version), `POST /predict` and `POST /webhook`. This server speaks it over Starlette/uvicorn:

- interactive `/predict` (the request's `params.context.result` holds the annotator's smart
  regions): positive/negative `KeyPointLabels` points (`is_positive`) and a `RectangleLabels` box,
  in percent of the image, become SAM prompts; the answer is one `BrushLabels` region in Label
  Studio's brush RLE (`segany_train.data.brush_rle`). The first single click gets three candidate
  masks and the most confident one is shown; each next click on the same region gets one mask, with
  the previous answer's low-res logits fed back as the mask prompt (as the engine's annotator does);
- whole-task `/predict` (no context): stage 2's pre-filled masks, when started with
  `--prefill-detector` (the round's box detector, `data_engine/prefill.py`); otherwise no regions;
- `/webhook`: annotation events are recorded (JSON lines in `--events`, the latest in memory).

Image embeddings are cached per task (bounded LRU, `embedding_cache.py`), so a click costs one
decoder pass. Images are fetched from the URL in the task: a path on Label Studio's server
(`/data/upload/...`) with its API key, or any http(s) URL.

The labeling config and regions are read and written by `regions.py`.
"""

import argparse
import json
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from segany_train.data.image_loading import load_image
from segany_train.inference.cli_options import add_model_arguments, describe_model, load_model
from segany_train.label_studio.client import LabelStudioClient, LabelStudioError
from segany_train.label_studio.embedding_cache import CachedImage, EmbeddingCache
from segany_train.label_studio.regions import BadRequest, LabelingSchema, Prompts, brush_region
from segany_train.model.sam import Sam

LOGITS_PER_IMAGE = 64  # prompt sequences whose answer is kept per cached image (256 kB each for SAM)


class InteractiveSegmenter:
    """The model, its embedding cache, Label Studio's address, and the recorded webhook events."""

    def __init__(
        self,
        model: Sam,
        *,
        model_version: str,
        cache_size: int = 16,
        label_studio_url: str | None = None,
        label_studio_api_key: str | None = None,
        events_path: Path | None = None,
        checkpoint: str | None = None,
        prefill: Callable[[np.ndarray], list[np.ndarray]] | None = None,
    ) -> None:
        self.model = model
        self.model_version = model_version
        self.cache = EmbeddingCache(model, capacity=cache_size)
        self.label_studio_url = label_studio_url
        self.label_studio_api_key = label_studio_api_key
        self.events_path = events_path
        self.events: deque[dict[str, Any]] = deque(maxlen=1000)
        self.prefill = prefill  # image -> pre-filled masks (stage 2), or None
        self.checkpoint = checkpoint  # the served file's absolute path (None: random weights), for /health
        self._client: LabelStudioClient | None = None
        self._lock = threading.Lock()  # one model call at a time: the predictors share the model

    def setup(self, request: dict[str, Any]) -> dict[str, Any]:
        """Label Studio's /setup: checks the labeling config, remembers its address and token."""
        LabelingSchema.from_config(request.get("schema") or "")
        if self._client is None and (self.label_studio_url or request.get("hostname")):
            url = self.label_studio_url or request["hostname"]
            key = self.label_studio_api_key or request.get("access_token")
            if key:
                self._client = LabelStudioClient(url=url, api_key=key)
        return {"model_version": self.model_version}

    def _label_studio(self) -> LabelStudioClient:
        if self._client is None:
            if not (self.label_studio_url and self.label_studio_api_key):
                raise BadRequest("segany-serve does not know Label Studio's address yet: connect it from the project, or pass --label-studio-url and --label-studio-api-key")
            self._client = LabelStudioClient(url=self.label_studio_url, api_key=self.label_studio_api_key)
        return self._client

    def _image(self, url: str) -> np.ndarray:
        if url.startswith("/") or (self.label_studio_url and url.startswith(self.label_studio_url)):
            data = self._label_studio().fetch(url)
        elif url.startswith(("http://", "https://")):
            response = httpx.get(url, timeout=60.0)
            if response.status_code != 200:
                raise BadRequest(f"GET {url}: {response.status_code}")
            data = response.content
        else:
            raise BadRequest(f"cannot fetch the task image {url[:100]!r}: not an http(s) URL or a Label Studio path")
        return load_image(data).pixels

    def _cached(self, task: dict[str, Any], schema: LabelingSchema) -> CachedImage:
        url = (task.get("data") or {}).get(schema.image_field)
        if not isinstance(url, str):
            raise BadRequest(f"task {task.get('id')} has no {schema.image_field!r} image URL in its data")
        return self.cache.get((task.get("id"), url), lambda: self._image(url))

    def predict(self, request: dict[str, Any]) -> dict[str, Any]:
        tasks = request.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise BadRequest("the /predict request has no tasks")
        schema = LabelingSchema.from_config(request.get("label_config") or "")
        context = (request.get("params") or {}).get("context")
        with self._lock, torch.inference_mode():
            if context:
                return {"results": [self._interactive(tasks[0], schema, Prompts.from_context(context))]}
            return {"results": [self._prefilled(task, schema) for task in tasks]}

    def _interactive(self, task: dict[str, Any], schema: LabelingSchema, prompts: Prompts) -> dict[str, Any]:
        cached = self._cached(task, schema)
        predictor = cached.predictor
        if predictor.original_size != (prompts.height, prompts.width):
            raise BadRequest(f"the regions are for a {prompts.width}x{prompts.height} image, the task's image is {predictor.original_size[1]}x{predictor.original_size[0]}")
        previous = cached.logits_by_prompts.get(prompts.without_last_point().key()) if prompts.points else None
        single_click = len(prompts.points) == 1 and prompts.box is None
        masks, scores, logits = predictor.predict(
            point_coords=np.array([p[:2] for p in prompts.points], np.float32) if prompts.points else None,
            point_labels=np.array([p[2] for p in prompts.points], np.int64) if prompts.points else None,
            box=np.array(prompts.box, np.float32) if prompts.box is not None else None,
            mask_input=previous,
            # one click is ambiguous: three candidates, the most confident shown; later clicks decide
            multimask_output=single_click and previous is None,
        )
        best = int(np.argmax(scores))
        cached.logits_by_prompts[prompts.key()] = logits[best][None]
        while len(cached.logits_by_prompts) > LOGITS_PER_IMAGE:  # the oldest prompt sequences go first
            del cached.logits_by_prompts[next(iter(cached.logits_by_prompts))]
        label = prompts.label if prompts.label in schema.brush_labels else (schema.brush_labels or (None,))[0]
        region = brush_region(masks[best], schema=schema, label=label)
        return {"result": [region], "score": float(scores[best]), "model_version": self.model_version}

    def _prefilled(self, task: dict[str, Any], schema: LabelingSchema) -> dict[str, Any]:
        if self.prefill is None:
            return {"result": [], "score": 0.0, "model_version": self.model_version}
        url = (task.get("data") or {}).get(schema.image_field)
        if not isinstance(url, str):
            raise BadRequest(f"task {task.get('id')} has no {schema.image_field!r} image URL in its data")
        masks = self.prefill(self._image(url))
        label = (schema.brush_labels or (None,))[0]
        return {"result": [brush_region(m, schema=schema, label=label) for m in masks], "score": 1.0, "model_version": self.model_version}

    def record_event(self, event: dict[str, Any]) -> None:
        """Keeps an annotation event (action, project, task, annotation ids, time received)."""
        record = {
            "received": time.time(),
            "action": event.get("action"),
            "project": (event.get("project") or {}).get("id"),
            "task": (event.get("task") or {}).get("id"),
            "annotation": (event.get("annotation") or {}).get("id"),
        }
        self.events.append(record)
        if self.events_path is not None:
            with self.events_path.open("a") as log:
                log.write(json.dumps(record) + "\n")


def build_app(segmenter: InteractiveSegmenter) -> Starlette:
    """The ASGI application speaking Label Studio's ML-backend protocol for `segmenter`."""

    async def _json_body(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise BadRequest("the request body is not JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "UP", "model_class": "segany SAM", "model_version": segmenter.model_version, "checkpoint": segmenter.checkpoint})

    async def setup(request: Request) -> JSONResponse:
        return JSONResponse(segmenter.setup(await _json_body(request)))

    async def predict(request: Request) -> JSONResponse:
        body = await _json_body(request)
        return JSONResponse(await run_in_threadpool(segmenter.predict, body))

    async def webhook(request: Request) -> JSONResponse:
        segmenter.record_event(await _json_body(request))
        return JSONResponse({})

    async def bad_request(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=400)

    async def upstream_error(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=502)

    return Starlette(
        routes=[
            Route("/", health, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/setup", setup, methods=["POST"]),
            Route("/predict", predict, methods=["POST"]),
            Route("/webhook", webhook, methods=["POST"]),
        ],
        # ValueError: a request segany cannot use (BadRequest, bad prompts, an unreadable image)
        exception_handlers={ValueError: bad_request, LabelStudioError: upstream_error, httpx.HTTPError: upstream_error},
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segany-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=9090)
    parser.add_argument("--cache-size", type=int, default=16, help="images whose embeddings are kept (least recently used dropped)")
    parser.add_argument("--label-studio-url", help="Label Studio's address, to fetch task images (default: the one /setup gives)")
    parser.add_argument("--label-studio-api-key", help="its API key (default: the token /setup gives; env LABEL_STUDIO_API_KEY)")
    parser.add_argument("--events", type=Path, help="append the webhook's annotation events here (JSON lines)")
    parser.add_argument("--prefill-detector", type=Path, help="stage 2: the round's box detector (box_head.pt); whole-task /predict pre-fills with it")
    add_model_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    import os

    import uvicorn

    args = build_parser().parse_args(argv)
    try:
        if args.cache_size < 1:
            raise ValueError(f"--cache-size must be at least 1, got {args.cache_size}")
        model = load_model(args)
        prefill = _prefill(args.prefill_detector, model) if args.prefill_detector else None
        segmenter = InteractiveSegmenter(
            model,
            model_version=f"segany {describe_model(args)}",
            checkpoint=str(args.checkpoint.resolve()) if args.checkpoint else None,
            cache_size=args.cache_size,
            label_studio_url=args.label_studio_url or os.environ.get("LABEL_STUDIO_URL"),
            label_studio_api_key=args.label_studio_api_key or os.environ.get("LABEL_STUDIO_API_KEY"),
            events_path=args.events,
            prefill=prefill,
        )
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"segany-serve: error: {error}")
    print(f"segany-serve: {segmenter.model_version} on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(build_app(segmenter), host=args.host, port=args.port, log_level="warning")


def _prefill(detector: Path, model: Sam):
    """Stage 2's pre-fill with the engine's shipped settings (conf/engine/cycle.yaml, stage2.prefill)."""
    from omegaconf import OmegaConf

    from data_engine.prefill import BoxPrefill
    from segany_train.config_paths import CONFIG_DIR
    from segany_train.inference.predictor import SamPredictor

    settings = OmegaConf.load(Path(CONFIG_DIR) / "engine" / "cycle.yaml").stage2.prefill
    return BoxPrefill.from_files(detector, SamPredictor(model), settings=settings)


if __name__ == "__main__":
    main()
