"""segany-serve against requests from anyone who can reach its port, over real listeners on
127.0.0.1: segany-serve under uvicorn, a stand-in for Label Studio's file server that records who
sent what, and an image server that drips its bytes. The Label Studio key reaches Label Studio's
origin only; requests cannot point fetches elsewhere; a slow image delays no other click; requests
past the caps get a one-line 400."""

import asyncio
import base64
import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from conftest import TINY, randomized
from label_studio_servers import free_port
from PIL import Image

from data_engine.label_studio_tasks import LABEL_CONFIG
from segany_train.label_studio.backend import InteractiveSegmenter, build_app
from segany_train.label_studio.task_images import TaskImageSource
from segany_train.model import build_sam

KEY = "5e9a" * 10
FETCH_DEADLINE_SECONDS = 4.0


def _png(width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class FileServer:
    """A real HTTP server on 127.0.0.1: *.png paths answer an image, /slow/* drips one byte every
    0.2 s until the client goes (/public/slow/x.png); every request's path and Authorization header are recorded."""

    url: str = ""
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def serve(self) -> Iterator["FileServer"]:
        image, recorded, stop = _png(), self.requests, self.stop

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                recorded.append((self.path, self.headers.get("Authorization")))
                if "/slow/" in self.path:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(image)))
                    self.end_headers()
                    try:
                        for byte in image:
                            if stop.wait(0.2):
                                return
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                    except OSError:  # segany-serve gave up
                        return
                elif self.path.endswith(".png"):
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(image)))
                    self.end_headers()
                    self.wfile.write(image)
                else:
                    self.send_error(404)

            def log_message(self, *args) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.stop.set()
            server.shutdown()
            server.server_close()


@pytest.fixture
def label_studio():
    yield from FileServer().serve()


@pytest.fixture
def elsewhere():
    yield from FileServer().serve()


@contextmanager
def _serve(segmenter: InteractiveSegmenter, **app_options) -> Iterator[str]:
    """segany-serve's app under uvicorn on a free 127.0.0.1 port, in a thread; yields its URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(segmenter, **app_options), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "segany-serve did not start"
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _segmenter(label_studio: FileServer, elsewhere: FileServer) -> InteractiveSegmenter:
    torch.manual_seed(0)
    model = randomized(build_sam(TINY)).eval()
    images = TaskImageSource(allowed_prefixes=[f"{elsewhere.url}/public/"], deadline_seconds=FETCH_DEADLINE_SECONDS, max_bytes=1 << 20)
    return InteractiveSegmenter(model, model_version="tiny", label_studio_url=label_studio.url, label_studio_api_key=KEY, images=images, max_points=8)


@pytest.fixture
def serve(label_studio, elsewhere):
    with _serve(_segmenter(label_studio, elsewhere), max_body_bytes=64 << 10) as url:
        yield url


def _click_request(image: str, *, task: int = 1, points: int = 1) -> dict:
    regions = [
        {"type": "keypointlabels", "original_width": 64, "original_height": 48, "is_positive": True, "value": {"x": 40 + i % 10, "y": 50, "keypointlabels": ["object"]}}
        for i in range(points)
    ]
    return {"tasks": [{"id": task, "data": {"image": image}}], "label_config": LABEL_CONFIG, "params": {"context": {"result": regions}}}


def _error(answer: httpx.Response, status: int = 400) -> str:
    assert answer.status_code == status, answer.text
    message = answer.json()["error"]
    assert "\n" not in message
    return message


def test_the_label_studio_key_goes_to_label_studio_only(serve, label_studio, elsewhere):
    http = httpx.Client(base_url=serve, timeout=30)
    other = elsewhere.url.removeprefix("http:")  # //127.0.0.1:PORT: urljoin makes it another host
    # /setup may not redirect fetches: its hostname is ignored (an unauthenticated caller could send it)
    assert http.post("/setup", json={"schema": LABEL_CONFIG, "hostname": elsewhere.url, "access_token": "theirs"}).status_code == 200
    assert http.post("/predict", json=_click_request("/data/upload/1/a.png")).status_code == 200
    assert label_studio.requests == [("/data/upload/1/a.png", f"Token {KEY}")]
    refused = {
        f"{other}/data/upload/1/b.png": "not on Label Studio's origin",
        f"{elsewhere.url}/data/upload/1/c.png": "not under an --allow-image-url prefix",  # SSRF
        f"{elsewhere.url}/public/%2E%2E/private/d.png": "not under an --allow-image-url prefix",
        "/data/upload/../../admin/e.png": "'..' path segment",
        "/data/upload/%2e%2e/%2e%2e/admin/f.png": "'..' path segment",
        "file:///etc/passwd": "not under an --allow-image-url prefix",
    }
    for task, (image, message) in enumerate(refused.items(), start=2):
        assert message in _error(http.post("/predict", json=_click_request(image, task=task))), image
    # an allowed image host gets the image request, without the key
    assert http.post("/predict", json=_click_request(f"{elsewhere.url}/public/g.png", task=20)).status_code == 200
    assert elsewhere.requests == [("/public/g.png", None)]
    assert label_studio.requests == [("/data/upload/1/a.png", f"Token {KEY}")]
    # a web page can post text/plain cross-origin without a preflight: not taken as JSON
    answer = http.post("/setup", content=b'{"schema": "<View/>"}', headers={"Content-Type": "text/plain"})
    assert "Content-Type: application/json" in _error(answer)


def test_an_auth_token_is_required_when_given(label_studio, elsewhere):
    with _serve(_segmenter(label_studio, elsewhere), auth_token="s3cret") as url:
        assert httpx.get(f"{url}/health").status_code == 200  # liveness stays open
        body = {"schema": LABEL_CONFIG}
        assert "--auth-token" in _error(httpx.post(f"{url}/setup", json=body), 401)
        assert _error(httpx.post(f"{url}/setup", json=body, headers={"Authorization": "Bearer wrong"}), 401)
        basic = base64.b64encode(b"label-studio:s3cret").decode()  # what Label Studio sends with Basic auth
        assert httpx.post(f"{url}/setup", json=body, headers={"Authorization": f"Basic {basic}"}).status_code == 200
        assert httpx.post(f"{url}/setup", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_a_slow_image_delays_no_other_click_and_ends_by_its_deadline(serve, label_studio, elsewhere):
    http = httpx.Client(base_url=serve, timeout=30)
    assert http.post("/predict", json=_click_request("/data/upload/1/a.png")).status_code == 200  # cached now
    slow: dict = {}

    def slow_click() -> None:
        started = time.monotonic()
        slow["answer"] = httpx.post(f"{serve}/predict", json=_click_request(f"{elsewhere.url}/public/slow/x.png", task=2), timeout=60)
        slow["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=slow_click)
    thread.start()
    deadline = time.monotonic() + 10
    while not elsewhere.requests:  # the slow fetch has begun
        assert time.monotonic() < deadline
        time.sleep(0.02)
    for image, task in (("/data/upload/1/a.png", 1), ("/data/upload/1/other.png", 3)):  # cached, then fetched
        started = time.monotonic()
        answer = http.post("/predict", json=_click_request(image, task=task), timeout=FETCH_DEADLINE_SECONDS)
        assert answer.status_code == 200 and time.monotonic() - started < FETCH_DEADLINE_SECONDS  # generous: ~0.1 s
    assert thread.is_alive()  # the slow image is still dripping
    thread.join(timeout=60)
    assert "no complete image within 4 s" in _error(slow["answer"])
    assert slow["seconds"] < FETCH_DEADLINE_SECONDS + 10  # ends by its deadline, not by the drip


def test_requests_past_the_caps_are_refused(serve, elsewhere):
    http = httpx.Client(base_url=serve, timeout=30)
    assert "at most 8 (--max-points)" in _error(http.post("/predict", json=_click_request("/data/upload/1/a.png", points=9)))
    big = {"schema": LABEL_CONFIG, "padding": "x" * (65 << 10)}
    assert "over the 65536-byte cap" in _error(http.post("/setup", json=big))

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap holds while reading
        yield b'{"padding": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    assert "over the 65536-byte cap" in _error(http.post("/setup", content=chunks(), headers={"Content-Type": "application/json"}))
    assert "not JSON" in _error(http.post("/setup", content=b"[" * 30000 + b"]" * 30000, headers={"Content-Type": "application/json"}))
    click = _click_request("/data/upload/1/a.png")
    click["params"]["context"]["result"][0]["is_positive"] = "false"
    assert "is_positive must be true or false" in _error(http.post("/predict", json=click))
    # an image past the size cap
    small = TaskImageSource(allowed_prefixes=[f"{elsewhere.url}/public/"], max_bytes=100)
    with pytest.raises(ValueError, match="over the 100-byte cap"):
        asyncio.run(small.fetch(f"{elsewhere.url}/public/big.png", None))
