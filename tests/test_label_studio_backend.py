"""segany-serve's protocol answers in process (Starlette's test client, no Label Studio): what it
refuses and how, the embedding cache's bound, the webhook record, and the command's one-line errors.
The whole loop through a real Label Studio is in tests/test_label_studio.py."""

import json
import socket

import numpy as np
import pytest
import torch
from conftest import TINY, randomized
from starlette.testclient import TestClient

from data_engine.label_studio_tasks import LABEL_CONFIG
from segany_train.label_studio.backend import InteractiveSegmenter, build_app, main
from segany_train.label_studio.embedding_cache import EmbeddingCache
from segany_train.model import build_sam


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return randomized(build_sam(TINY)).eval()


def _click(x: float, y: float, **extra) -> dict:
    return {"type": "keypointlabels", "original_width": 64, "original_height": 48, "value": {"x": x, "y": y, "keypointlabels": ["object"]}, **extra}


def test_requests_it_cannot_use_are_refused_in_one_line(tiny_model, tmp_path):
    segmenter = InteractiveSegmenter(tiny_model, model_version="tiny", events_path=tmp_path / "events.jsonl")
    client = TestClient(build_app(segmenter))
    assert client.get("/health").json() == {"status": "UP", "model_class": "segany SAM", "model_version": "tiny", "checkpoint": None}
    assert client.post("/setup", json={"schema": LABEL_CONFIG}).json() == {"model_version": "tiny"}
    cases = [
        ("/setup", {"schema": "<View><Image name='i' value='$i'/></View>"}, "no BrushLabels tag"),
        ("/setup", {"schema": "<View"}, "not XML"),
        ("/predict", {"label_config": LABEL_CONFIG}, "has no tasks"),
        ("/predict", {"tasks": [{"id": 1, "data": {}}], "label_config": LABEL_CONFIG, "params": {"context": {"result": [_click(10, 10)]}}}, "has no 'image' image URL"),
        ("/predict", {"tasks": [{"id": 1, "data": {"image": "/x.jpg"}}], "label_config": LABEL_CONFIG, "params": {"context": {"result": [{"type": "keypointlabels", "value": {}}]}}}, "lacks or mangles a field"),
        ("/predict", {"tasks": [{"id": 1, "data": {"image": "/x.jpg"}}], "label_config": LABEL_CONFIG, "params": {"context": {"result": [{"type": "choices"}]}}}, "no keypoint or rectangle region"),
        ("/predict", {"tasks": [{"id": 1, "data": {"image": "/x.jpg"}}], "label_config": LABEL_CONFIG, "params": {"context": {"result": [_click(10, 10)]}}}, "does not know Label Studio's address"),
        ("/predict", {"tasks": [{"id": 1, "data": {"image": "ftp://x/y.jpg"}}], "label_config": LABEL_CONFIG, "params": {"context": {"result": [_click(10, 10)]}}}, "not under an --allow-image-url prefix"),
    ]
    for path, body, message in cases:
        answer = client.post(path, json=body)
        assert answer.status_code == 400 and message in answer.json()["error"] and "\n" not in answer.json()["error"], (path, answer.text)
    assert client.post("/predict", content=b"not json").status_code == 400
    # the webhook records annotation events
    client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 3}, "task": {"id": 7}, "annotation": {"id": 11}})
    (event,) = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert (event["action"], event["project"], event["task"], event["annotation"]) == ("ANNOTATION_CREATED", 3, 7, 11)
    assert list(segmenter.events) == [event]


def test_the_embedding_cache_keeps_the_most_recently_used_images(tiny_model):
    cache = EmbeddingCache(tiny_model, capacity=2)

    def image(seed: int) -> np.ndarray:
        return np.random.default_rng(seed).integers(0, 255, (40, 50, 3), dtype=np.uint8)

    assert cache.get("a", None) is None and len(cache) == 0  # a miss without pixels: the caller fetches them
    first = cache.get("a", image(1))
    assert cache.get("a", None) is first  # a hit: no pixels needed, no encoder
    cache.get("b", image(2))
    cache.get("a", None)  # a is now the most recent
    cache.get("c", image(3))  # drops b
    assert "a" in cache and "c" in cache and "b" not in cache and len(cache) == 2
    with pytest.raises(ValueError, match="capacity >= 1"):
        EmbeddingCache(tiny_model, capacity=0)


def test_the_command_refuses_bad_options_in_one_line(capsys):
    with pytest.raises(SystemExit, match="segany-serve: error: give --checkpoint, --model-type"):
        main([])
    with pytest.raises(SystemExit, match="--cache-size must be at least 1, got 0"):
        main(["--model-type", "vit_b", "--cache-size", "0"])
    with pytest.raises(SystemExit, match="segany-serve: error: .*missing.pth"):
        main(["--checkpoint", "missing.pth"])
    with pytest.raises(SystemExit, match=r"--allow-image-url 'https://images.example.com': give an http\(s\) URL with a host and a path ending in '/'"):
        main(["--model-type", "vit_b", "--allow-image-url", "https://images.example.com"])
    with pytest.raises(SystemExit) as exit_:
        main(["--model-type", "vit_b", "--max-body-mb", "nan"])
    assert exit_.value.code == 2 and "argument --max-body-mb: must be a positive number, got 'nan'" in capsys.readouterr().err


def test_a_round_waits_in_one_line_when_label_studio_is_not_there(tmp_path):
    from omegaconf import OmegaConf

    from data_engine.annotation_tasks import AwaitingAnnotation, export_tasks
    from data_engine.label_studio_tasks import sync_round
    from segany_train.data.synthetic import write_synthetic_corpus

    shards = write_synthetic_corpus(tmp_path / "pool", num_images=2, size=64, images_per_shard=2, progress=False)
    export_tasks([str(s) for s in shards], tmp_path / "tasks", progress=False)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = OmegaConf.create({"url": f"http://127.0.0.1:{port}", "api_key": "0" * 40, "backend_url": "http://127.0.0.1:9"})
    with pytest.raises(AwaitingAnnotation, match=rf"Label Studio at http://127.0.0.1:{port} did not answer as expected \(POST .*ConnectError"):
        sync_round(tmp_path / "tasks", settings=settings, title="t", checkpoint="c.pt")
    settings.api_key = None
    with pytest.raises(ValueError, match="needs annotator.label_studio.api_key"):
        sync_round(tmp_path / "tasks", settings=settings, title="t", checkpoint="c.pt")
