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
  `--prefill-detector` (the round's box detector, `segany_train/box_detection/prefill.py`); otherwise no regions;
- `/webhook`: annotation events are recorded (JSON lines in `--events`, the latest in memory).

Image embeddings are cached per task (bounded LRU, `embedding_cache.py`), so a click costs one
decoder pass. Images are fetched from the URL in the task (`task_images.py`): a path on Label
Studio's configured origin with its API key, or a URL under an `--allow-image-url` prefix; within a
deadline and a size cap, outside the model lock, so one slow image delays no other annotator.

Anyone who reaches the port can post to it, so: bodies are JSON (`Content-Type: application/json`,
which a web page cannot send cross-origin without a preflight this server does not answer) and at
most `--max-body-mb`; a click has at most `--max-points` points; `/setup` cannot redirect image
fetches (its `hostname` is ignored); with `--auth-token` (env SEGANY_SERVE_AUTH_TOKEN) every call but
/health needs it, as HTTP Basic auth's password (what Label Studio sends for a backend connected with
Basic auth) or a Bearer token.

The labeling config and regions are read and written by `regions.py`.
"""

import argparse
import base64
import binascii
import hmac
import json
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
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
from segany_train.label_studio.embedding_cache import EmbeddingCache
from segany_train.label_studio.regions import BadRequest, LabelingSchema, Prompts, brush_region
from segany_train.label_studio.task_images import TaskImageSource
from segany_train.model.sam import Sam

LOGITS_PER_IMAGE = 64  # prompt sequences whose answer is kept per cached image (256 kB each for SAM)
MAX_POINTS = 64  # per click request: a person places a handful; thousands would hold the model for seconds
MAX_BODY_BYTES = 10 << 20  # a request body held in memory (a 50 MB body of tasks took 1.7 GB to parse)


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
        images: TaskImageSource | None = None,
        max_points: int = MAX_POINTS,
        events_path: Path | None = None,
        checkpoint: str | None = None,
        prefill: Callable[[np.ndarray], list[np.ndarray]] | None = None,
        precision: str = "fp32",
    ) -> None:
        if label_studio_url is not None and not label_studio_url.startswith(("http://", "https://")):
            raise ValueError(f"the Label Studio URL must start with http:// or https://, got {label_studio_url!r}")
        if max_points < 1:
            raise ValueError(f"--max-points must be at least 1, got {max_points}")
        self.model = model
        self.model_version = model_version
        self.cache = EmbeddingCache(model, capacity=cache_size, precision=precision)
        self.label_studio_url = label_studio_url
        self.label_studio_api_key = label_studio_api_key
        self.images = images or TaskImageSource()
        self.max_points = max_points
        self.events_path = events_path
        self.events: deque[dict[str, Any]] = deque(maxlen=1000)
        self.prefill = prefill  # image -> pre-filled masks (stage 2), or None
        self.checkpoint = checkpoint  # the served file's absolute path (None: random weights), for /health
        self._client: LabelStudioClient | None = None
        self._lock = threading.Lock()  # one model call at a time: the predictors share the model

    def setup(self, request: dict[str, Any]) -> dict[str, Any]:
        """Label Studio's /setup: checks the labeling config; takes its token when no key was given.
        Its `hostname` is not used: image fetches (with the key) go only to the configured address."""
        LabelingSchema.from_config(request.get("schema") or "")
        token = request.get("access_token")
        if self.label_studio_url and not self.label_studio_api_key and isinstance(token, str) and token:
            if self._client is None or self._client.api_key != token:  # the latest token Label Studio gave
                self._client = LabelStudioClient(url=self.label_studio_url, api_key=token)
        return {"model_version": self.model_version}

    def _label_studio(self) -> LabelStudioClient | None:
        if self._client is None and self.label_studio_url and self.label_studio_api_key:
            self._client = LabelStudioClient(url=self.label_studio_url, api_key=self.label_studio_api_key)
        return self._client

    async def _pixels(self, url: str) -> np.ndarray:
        data = await self.images.fetch(url, self._label_studio())
        return await run_in_threadpool(lambda: load_image(data).pixels)

    @staticmethod
    def _image_url(task: dict[str, Any], schema: LabelingSchema) -> str:
        url = (task.get("data") or {}).get(schema.image_field) if isinstance(task, dict) else None
        if not isinstance(url, str):
            raise BadRequest(f"task {task.get('id') if isinstance(task, dict) else task!r} has no {schema.image_field!r} image URL in its data")
        return url

    async def predict(self, request: dict[str, Any]) -> dict[str, Any]:
        """Label Studio's /predict: a click's mask, or each task's pre-fill. Images are fetched
        before the model lock is taken, and the lock is held per model call, not per request."""
        tasks = request.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise BadRequest("the /predict request has no tasks")
        schema = LabelingSchema.from_config(request.get("label_config") or "")
        context = (request.get("params") or {}).get("context")
        if context:
            prompts = Prompts.from_context(context, max_points=self.max_points)
            return {"results": [await self._interactive(tasks[0], schema, prompts)]}
        return {"results": [await self._prefilled(task, schema) for task in tasks]}

    async def _interactive(self, task: dict[str, Any], schema: LabelingSchema, prompts: Prompts) -> dict[str, Any]:
        url = self._image_url(task, schema)
        key = (task.get("id"), url)
        answer = await run_in_threadpool(self._answer_click, key, None, schema, prompts)
        if answer is None:  # not cached: fetch (no lock held), then encode and answer
            answer = await run_in_threadpool(self._answer_click, key, await self._pixels(url), schema, prompts)
        return answer

    def _answer_click(self, key: Hashable, pixels: np.ndarray | None, schema: LabelingSchema, prompts: Prompts) -> dict[str, Any] | None:
        """The click's region, or None when the image is not cached and `pixels` is None."""
        with self._lock, torch.inference_mode():
            cached = self.cache.get(key, pixels)
            if cached is None:
                return None
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

    async def _prefilled(self, task: dict[str, Any], schema: LabelingSchema) -> dict[str, Any]:
        if self.prefill is None:
            return {"result": [], "score": 0.0, "model_version": self.model_version}
        pixels = await self._pixels(self._image_url(task, schema))
        masks = await run_in_threadpool(self._prefill_locked, pixels)
        label = (schema.brush_labels or (None,))[0]
        return {"result": [brush_region(m, schema=schema, label=label) for m in masks], "score": 1.0, "model_version": self.model_version}

    def _prefill_locked(self, pixels: np.ndarray) -> list[np.ndarray]:
        with self._lock, torch.inference_mode():
            return self.prefill(pixels)

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


def build_app(segmenter: InteractiveSegmenter, *, auth_token: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
    """The ASGI application speaking Label Studio's ML-backend protocol for `segmenter`; with
    `auth_token`, every route but /health and / answers 401 without it (see the module doc)."""
    if auth_token is not None and not auth_token:
        raise ValueError("--auth-token must not be empty")
    if max_body_bytes < 1:
        raise ValueError(f"--max-body-mb must be positive, got {max_body_bytes} bytes")

    async def _json_body(request: Request) -> dict[str, Any]:
        if auth_token is not None and not _presents(request, auth_token):
            raise Unauthorized("segany-serve needs its --auth-token: HTTP Basic auth's password (Label Studio: the backend's Basic auth) or 'Authorization: Bearer <token>'")
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise BadRequest(f"the request body must be JSON sent as Content-Type: application/json, got {media_type or 'none'!r}")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise BadRequest(f"the request body is {int(declared)} bytes, over the {max_body_bytes}-byte cap (--max-body-mb)")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > max_body_bytes:
                raise BadRequest(f"the request body is over the {max_body_bytes}-byte cap (--max-body-mb)")
        try:
            body = json.loads(data)
        except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
            raise BadRequest("the request body is not JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "UP", "model_class": "segany SAM", "model_version": segmenter.model_version, "checkpoint": segmenter.checkpoint})

    async def setup(request: Request) -> JSONResponse:
        return JSONResponse(segmenter.setup(await _json_body(request)))

    async def predict(request: Request) -> JSONResponse:
        return JSONResponse(await segmenter.predict(await _json_body(request)))

    async def webhook(request: Request) -> JSONResponse:
        segmenter.record_event(await _json_body(request))
        return JSONResponse({})

    async def unauthorized(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=401, headers={"WWW-Authenticate": 'Basic realm="segany-serve"'})

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
        exception_handlers={Unauthorized: unauthorized, ValueError: bad_request, LabelStudioError: upstream_error, httpx.HTTPError: upstream_error},
    )


class Unauthorized(Exception):
    """A request without segany-serve's --auth-token."""


def _presents(request: Request, token: str) -> bool:
    """Whether the request carries `token` as a Bearer token or as Basic auth's password (any user)."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode("utf-8"), token.encode("utf-8"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segany-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=9090)
    parser.add_argument("--cache-size", type=int, default=16, help="images whose embeddings are kept (least recently used dropped)")
    parser.add_argument("--label-studio-url", help="Label Studio's address, the only one its API key and image fetches of task paths go to (env LABEL_STUDIO_URL)")
    parser.add_argument("--label-studio-api-key", help="its API key (default: the token /setup gives; env LABEL_STUDIO_API_KEY)")
    parser.add_argument("--allow-image-url", action="append", default=[], metavar="PREFIX", help="also fetch task images under this URL prefix (no key sent; repeatable), e.g. https://images.example.com/tasks/")
    parser.add_argument("--auth-token", help="require this token on /setup, /predict and /webhook (Basic auth password or Bearer; env SEGANY_SERVE_AUTH_TOKEN)")
    parser.add_argument("--fetch-timeout", type=_positive, default=30.0, help="seconds a task image may take to arrive, all of it")
    parser.add_argument("--max-image-mb", type=_positive, default=50.0, help="largest task image fetched")
    parser.add_argument("--max-body-mb", type=_positive, default=MAX_BODY_BYTES / (1 << 20), help="largest request body read")
    parser.add_argument("--max-points", type=int, default=MAX_POINTS, help="most points one click request may hold")
    parser.add_argument("--events", type=Path, help="append the webhook's annotation events here (JSON lines)")
    parser.add_argument("--prefill-detector", type=Path, help="stage 2: the round's box detector (box_head.pt); whole-task /predict pre-fills with it")
    add_model_arguments(parser)
    return parser


def _positive(text: str) -> float:
    """An option's value as a positive finite number (argparse reports anything else in one line)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> None:
    import os

    import uvicorn

    args = build_parser().parse_args(argv)
    try:
        if args.cache_size < 1:
            raise ValueError(f"--cache-size must be at least 1, got {args.cache_size}")
        images = TaskImageSource(allowed_prefixes=args.allow_image_url, deadline_seconds=args.fetch_timeout, max_bytes=int(args.max_image_mb * (1 << 20)))
        auth_token = args.auth_token if args.auth_token is not None else os.environ.get("SEGANY_SERVE_AUTH_TOKEN")
        model = load_model(args)
        prefill = _prefill(args.prefill_detector, model) if args.prefill_detector else None
        segmenter = InteractiveSegmenter(
            model,
            model_version=f"segany {describe_model(args)}",
            checkpoint=str(args.checkpoint.resolve()) if args.checkpoint else None,
            cache_size=args.cache_size,
            label_studio_url=args.label_studio_url or os.environ.get("LABEL_STUDIO_URL"),
            label_studio_api_key=args.label_studio_api_key or os.environ.get("LABEL_STUDIO_API_KEY"),
            images=images,
            max_points=args.max_points,
            events_path=args.events,
            prefill=prefill,
            precision=args.precision,
        )
        app = build_app(segmenter, auth_token=auth_token, max_body_bytes=int(args.max_body_mb * (1 << 20)))
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"segany-serve: error: {error}")
    print(f"segany-serve: {segmenter.model_version} on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def _prefill(detector: Path, model: Sam):
    """Stage 2's pre-fill with the engine's shipped settings (conf/engine/cycle.yaml, stage2.prefill)."""
    from omegaconf import OmegaConf

    from segany_train.box_detection.prefill import BoxPrefill
    from segany_train.config_paths import CONFIG_DIR
    from segany_train.inference.predictor import SamPredictor

    settings = OmegaConf.load(Path(CONFIG_DIR) / "engine" / "cycle.yaml").stage2.prefill
    return BoxPrefill.from_files(detector, SamPredictor(model), settings=settings)


if __name__ == "__main__":
    main()
