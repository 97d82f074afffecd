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

Coordinates: Label Studio's percent positions are continuous (a click in the middle of pixel column
c is at (c + 0.5) / width * 100); SAM's are pixel indices (its prompt encoder adds the half pixel),
so a position maps to percent / 100 * width - 0.5.
"""

import argparse
import json
import sys
import threading
import time
import xml.etree.ElementTree as ElementTree
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
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

from segany_train.data.brush_rle import mask_to_brush_rle
from segany_train.data.image_loading import load_image
from segany_train.embedding_cache import CachedImage, EmbeddingCache
from segany_train.inference_options import add_model_arguments, describe_model, load_model
from segany_train.label_studio_client import LabelStudioClient, LabelStudioError
from segany_train.model.sam import Sam


class BadRequest(ValueError):
    """The request cannot be answered; the message (one line) goes back to Label Studio."""


@dataclass(frozen=True)
class LabelingSchema:
    """The tags of a labeling config the backend reads and writes."""

    image_name: str  # the Image tag's name (the regions' to_name)
    image_field: str  # the task data field holding the image URL ($image -> image)
    brush_name: str  # the BrushLabels tag the masks go to
    brush_labels: tuple[str, ...]

    @classmethod
    def from_config(cls, label_config: str) -> "LabelingSchema":
        try:
            root = ElementTree.fromstring(label_config)
        except ElementTree.ParseError as error:
            raise BadRequest(f"the labeling config is not XML: {error}") from None
        brush = next(root.iter("BrushLabels"), None)
        if brush is None:
            raise BadRequest("the labeling config has no BrushLabels tag for the masks")
        images = {tag.get("name"): tag.get("value", "") for tag in root.iter("Image")}
        image_name = brush.get("toName")
        if image_name not in images or not images[image_name].startswith("$"):
            raise BadRequest(f"the BrushLabels tag points to {image_name!r}, not an Image tag with a $field value")
        labels = tuple(label.get("value") for label in brush.iter("Label"))
        return cls(image_name=image_name, image_field=images[image_name][1:], brush_name=brush.get("name"), brush_labels=labels)


@dataclass(frozen=True)
class Prompts:
    """SAM prompts from one interactive context, in original-image pixels (see the module doc)."""

    points: tuple[tuple[float, float, int], ...]  # (x, y, label 1 foreground / 0 background), in click order
    box: tuple[float, float, float, float] | None  # XYXY
    label: str | None  # the label the annotator chose on the smart tool, if any
    width: int
    height: int

    @classmethod
    def from_context(cls, context: dict[str, Any]) -> "Prompts":
        regions = context.get("result")
        if not isinstance(regions, list) or not regions:
            raise BadRequest("the interactive context has no result regions")
        points, box, label, size = [], None, None, None
        for region in regions:
            kind, value = region.get("type"), region.get("value") or {}
            try:
                width, height = int(region["original_width"]), int(region["original_height"])
                if kind == "keypointlabels":
                    x, y = float(value["x"]) / 100 * width - 0.5, float(value["y"]) / 100 * height - 0.5
                    points.append((x, y, 1 if region.get("is_positive", True) else 0))
                    label = (value.get("keypointlabels") or [label])[0]
                elif kind == "rectanglelabels":
                    x0, y0 = float(value["x"]) / 100 * width, float(value["y"]) / 100 * height
                    x1, y1 = x0 + float(value["width"]) / 100 * width, y0 + float(value["height"]) / 100 * height
                    box = (x0 - 0.5, y0 - 0.5, x1 - 0.5, y1 - 0.5)
                    label = (value.get("rectanglelabels") or [label])[0]
                else:
                    continue
            except (KeyError, TypeError, ValueError) as error:
                raise BadRequest(f"a {kind} region lacks or mangles a field: {type(error).__name__}: {error}") from None
            if size not in (None, (width, height)):
                raise BadRequest(f"the regions disagree on the image size: {size} and {(width, height)}")
            size = (width, height)
        if not points and box is None:
            raise BadRequest("the interactive context has no keypoint or rectangle region")
        return cls(points=tuple(points), box=box, label=label, width=size[0], height=size[1])

    def key(self) -> Hashable:
        return (self.points, self.box)

    def without_last_point(self) -> "Prompts":
        return Prompts(points=self.points[:-1], box=self.box, label=self.label, width=self.width, height=self.height)


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
        prefill: Any = None,
    ) -> None:
        self.model = model
        self.model_version = model_version
        self.cache = EmbeddingCache(model, capacity=cache_size)
        self.label_studio_url = label_studio_url
        self.label_studio_api_key = label_studio_api_key
        self.events_path = events_path
        self.events: deque[dict[str, Any]] = deque(maxlen=1000)
        self.prefill = prefill  # image -> pre-filled masks (stage 2), or None
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


def brush_region(mask: np.ndarray, *, schema: LabelingSchema, label: str | None) -> dict[str, Any]:
    """A Label Studio BrushLabels region holding an HxW bool mask."""
    height, width = mask.shape
    return {
        "from_name": schema.brush_name,
        "to_name": schema.image_name,
        "type": "brushlabels",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": mask_to_brush_rle(np.asarray(mask, dtype=bool)), "brushlabels": [label] if label else []},
    }


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
        return JSONResponse({"status": "UP", "model_class": "segany SAM", "model_version": segmenter.model_version})

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
        exception_handlers={BadRequest: bad_request, LabelStudioError: upstream_error},
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
    from segany_train.predictor import SamPredictor
    from segany_train.config_paths import CONFIG_DIR

    settings = OmegaConf.load(Path(CONFIG_DIR) / "engine" / "cycle.yaml").stage2.prefill
    return BoxPrefill.from_files(detector, SamPredictor(model), settings=settings)


if __name__ == "__main__":
    main()
