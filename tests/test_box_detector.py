"""Stage 2's class-agnostic box detector: targets against a brute-force encoding, targets -> detections
round trip, learning the boxes of a few synthetic images, determinism, save/load, input errors."""

import math

import numpy as np
import pytest
import torch

from segany_train.box_detection.box_head import BoxHead, BoxHeadConfig
from segany_train.box_detection.box_targets import BoxTargets, box_slots, decode_boxes, encode_targets
from segany_train.box_detection.detection import detect_boxes
from segany_train.box_detection.head_file import load_box_head, save_box_head
from segany_train.box_detection.image_embeddings import encode_images
from segany_train.box_detection.training import fit_box_head, train_box_detector
from segany_train.box_detection.training_data import encode_training_data, xywh_to_input_xyxy
from segany_train.data.image_decoding import decode_record_image
from segany_train.data.pipeline import read_records
from segany_train.data.synthetic import write_synthetic_corpus
from segany_train.inference.predictor import SamPredictor
from segany_train.model import build_sam_by_name

EDGES = (1.0, 2.5, 6.0)


def _box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of Nx4 and Mx4 XYXY boxes -> NxM."""
    lt, rb = torch.maximum(a[:, None, :2], b[None, :, :2]), torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a, area_b = (a[:, 2:] - a[:, :2]).prod(-1), (b[:, 2:] - b[:, :2]).prod(-1)
    return inter / (area_a[:, None] + area_b[None] - inter)


def _random_boxes(gen: torch.Generator, k: int, side: float) -> torch.Tensor:
    """k XYXY boxes inside a side x side image, sizes from 4 px to half the image."""
    wh = torch.exp(torch.empty(k, 2).uniform_(math.log(4), math.log(side / 2), generator=gen))
    xy = torch.rand(k, 2, generator=gen) * (side - wh)
    return torch.cat([xy, xy + wh], dim=1)


def _brute_force_targets(boxes: torch.Tensor, h: int, w: int, stride: float, edges: tuple[float, ...]):
    """The documented target definition, one cell and one box at a time in Python floats."""
    heat = torch.zeros(len(edges) + 1, h, w)
    params = torch.zeros(len(edges) + 1, h, w, 4)
    weight = torch.zeros(len(edges) + 1, h, w)
    info = []
    for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        bw, bh = max(x1 - x0, 1.0) / stride, max(y1 - y0, 1.0) / stride
        slot = sum(math.sqrt(bw * bh) >= e for e in edges)
        cx, cy = (x0 + x1) / 2 / stride, (y0 + y1) / 2 / stride
        centre = (min(max(math.floor(cy), 0), h - 1), min(max(math.floor(cx), 0), w - 1))
        info.append((slot, cx, cy, bw, bh, centre, bw * bh, k))
    for s in range(len(edges) + 1):
        for i in range(h):
            for j in range(w):
                best = None
                for slot, cx, cy, bw, bh, centre, area, k in info:
                    if slot != s:
                        continue
                    sx, sy = max(bw / 6, 0.5), max(bh / 6, 0.5)
                    g = 1.0 if centre == (i, j) else math.exp(-((j + 0.5 - cx) ** 2) / (2 * sx**2) - ((i + 0.5 - cy) ** 2) / (2 * sy**2))
                    key = (g, -area, -k)  # highest value; on a tie the smaller box, then the earlier one
                    if best is None or key > best[0]:
                        best = (key, [cx - (j + 0.5), cy - (i + 0.5), math.log(bw), math.log(bh)])
                if best is not None:
                    heat[s, i, j] = best[0][0]
                    params[s, i, j] = torch.tensor(best[1])
                    weight[s, i, j] = best[0][0] if best[0][0] >= 0.3 else 0.0
    return heat, params, weight


@pytest.mark.parametrize("grid", [(16, 16), (12, 20)])
def test_targets_match_a_brute_force_encoding(grid):
    gen = torch.Generator().manual_seed(grid[1])
    h, w = grid
    boxes = _random_boxes(gen, 12, 16.0 * min(h, w))
    # two boxes of one slot sharing a centre cell (the smaller regresses there) and a sub-pixel side
    extra = torch.tensor([[104.0, 102.0, 136.0, 128.0], [100.0, 100.0, 140.0, 130.0], [5.0, 5.0, 5.5, 30.0]])
    boxes = torch.cat([boxes, extra])
    targets = encode_targets(boxes, grid, stride=16.0, scale_edges=EDGES)
    heat, params, weight = _brute_force_targets(boxes, h, w, 16.0, EDGES)
    assert isinstance(targets, BoxTargets)
    assert torch.allclose(targets.heat, heat, atol=1e-5)
    assert torch.allclose(targets.weight, weight, atol=1e-5)
    regressed = weight > 0
    assert torch.allclose(targets.params[regressed], params[regressed], atol=1e-4)
    assert torch.equal(targets.weight > 0, regressed)


def test_box_slots_follow_the_size_edges():
    boxes = torch.tensor([[0.0, 0.0, 15.9, 16.0], [0.0, 0.0, 16.0, 16.0], [10.0, 10.0, 50.0, 50.0], [0.0, 0.0, 96.0, 100.0], [0, 0, 0, 0]])
    sizes = [math.sqrt(max(b[2] - b[0], 1) * max(b[3] - b[1], 1)) / 16 for b in boxes.tolist()]
    expected = [sum(s >= e for e in EDGES) for s in sizes]
    assert box_slots(boxes, stride=16.0, scale_edges=EDGES).tolist() == expected == [0, 1, 2, 3, 0]


class _FixedOutputHead(BoxHead):
    """A BoxHead whose output is given: lets the detection path be checked on known maps."""

    def __init__(self, logits: torch.Tensor, params: torch.Tensor, stride: float) -> None:
        super().__init__(BoxHeadConfig(channels=1, stride=stride, scale_edges=EDGES))
        self.fixed = (logits, params)

    def forward(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fixed


def test_targets_decode_back_to_the_boxes():
    gen = torch.Generator().manual_seed(3)
    boxes = _random_boxes(gen, 40, 256.0)
    # keep boxes that own their (slot, centre cell) and overlap no kept box much (NMS would merge them)
    slots = box_slots(boxes, stride=16.0, scale_edges=EDGES)
    cells = ((boxes[:, :2] + boxes[:, 2:]) / 32).floor().long()
    kept: list[int] = []
    for k in range(len(boxes)):
        owned = all((int(slots[k]), *cells[k].tolist()) != (int(slots[i]), *cells[i].tolist()) for i in kept)
        if owned and (not kept or _box_iou(boxes[k : k + 1], boxes[kept]).max() < 0.5):
            kept.append(k)
    boxes = boxes[kept]
    assert len(boxes) >= 10
    targets = encode_targets(boxes, (16, 16), stride=16.0, scale_edges=EDGES)
    # every centre cell decodes to its box (brute force: one box at a time)
    decoded = decode_boxes(targets.params.movedim(-1, 1), 16.0)  # Sx16x16x4
    for box, slot, (j, i) in zip(boxes, slots[kept], cells[kept]):
        assert torch.allclose(decoded[slot, i, j], box, atol=1e-3)
    # and through detection: centre cells are the only peaks above 0.99
    logits = torch.logit(targets.heat.clamp(1e-4, 1 - 1e-4))[None]
    head = _FixedOutputHead(logits, targets.params.movedim(-1, 1)[None], 16.0)
    (found, scores), = detect_boxes(head, torch.zeros(1, 1, 16, 16), score_threshold=0.99, max_detections=100, input_size=(256, 256))
    assert found.shape == boxes.shape and scores.shape == (len(boxes),)
    iou = _box_iou(boxes, found)
    assert torch.equal(iou.argmax(1).sort().values, torch.arange(len(boxes)))  # one detection per box
    assert (iou.max(1).values > 1 - 1e-4).all()


def test_detections_are_clipped_sorted_thresholded_and_capped():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 8, 8, generator=gen) * 3
    params = torch.randn(2, 4, 4, 8, 8, generator=gen)
    params[:, :, 2:] += 1.5  # boxes of several cells, many crossing the image border
    head = _FixedOutputHead(logits, params, 16.0)
    embeddings = torch.zeros(2, 1, 8, 8)
    sizes = [(100, 128), (128, 64)]
    out = detect_boxes(head, embeddings, score_threshold=0.5, max_detections=7, input_size=sizes)
    assert len(out) == 2
    for (boxes, scores), (h, w) in zip(out, sizes):
        assert boxes.dtype == torch.float32 and boxes.shape == (len(scores), 4) and 0 < len(scores) <= 7
        assert (scores >= 0.5).all() and torch.equal(scores, scores.sort(descending=True).values)
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        assert (_box_iou(boxes, boxes).triu(1) <= 0.7).all()  # box NMS
    loose = detect_boxes(head, embeddings, score_threshold=0.5, max_detections=1000, input_size=sizes)
    assert all(torch.equal(a[1], b[1][:7]) for a, b in zip(out, loose))  # the cap keeps the best
    same = detect_boxes(head, embeddings, score_threshold=0.5, max_detections=7, input_size=[(100, 128)] * 2)
    shared = detect_boxes(head, embeddings, score_threshold=0.5, max_detections=7, input_size=(100, 128))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(same, shared))
    none = detect_boxes(head, embeddings, score_threshold=1.0, max_detections=7, input_size=sizes)
    assert all(b.shape == (0, 4) and s.shape == (0,) for b, s in none)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("box_corpus")
    write_synthetic_corpus(directory, num_images=8, size=256, images_per_shard=8, min_objects=3, max_objects=6, progress=False)
    shard = str(directory / "sa_000000.tar")
    pairs = []
    for _, jpeg, record in read_records([shard]):
        pairs.append((decode_record_image(jpeg, record), np.array([a["bbox"] for a in record["annotations"]]).reshape(-1, 4)))
    return shard, pairs


@pytest.fixture(scope="module")
def sam():
    torch.manual_seed(0)
    return build_sam_by_name("vit_t_256_small_decoder").eval()


@pytest.fixture(scope="module")
def encoded(sam, corpus):
    return encode_training_data(sam, corpus[0])


def _recall(head: BoxHead, embeddings: torch.Tensor, boxes: list[torch.Tensor]) -> float:
    """Fraction of GT boxes that a detection overlaps with IoU > 0.5."""
    found = total = 0
    detections = detect_boxes(head, embeddings, score_threshold=0.3, max_detections=50, input_size=(256, 256))
    for (det, _), gt in zip(detections, boxes):
        total += len(gt)
        if len(det) and len(gt):
            found += int((_box_iou(gt, det).max(1).values > 0.5).sum())
    return found / total


def test_head_learns_the_boxes_of_its_training_images(encoded, tmp_path):
    embeddings, boxes = encoded
    head, losses = fit_box_head(embeddings, boxes, stride=16.0, steps=150, lr=3e-3, batch_size=8, seed=0, hidden=32, progress=False)
    untrained = BoxHead(head.config)
    untrained.set_input_statistics(embeddings)
    assert np.mean(losses[-10:]) < 0.3 * np.mean(losses[:10])
    before, after = _recall(untrained.eval(), embeddings, boxes), _recall(head, embeddings, boxes)
    # measured: 0.0 -> 0.79 (a tiny random encoder; memorising the eight images is the check)
    assert before < 0.05 and after > 0.5
    loaded = load_box_head(save_box_head(head, tmp_path / "round" / "box_head.pt"))
    assert loaded.config == head.config and not loaded.training
    a = detect_boxes(head, embeddings, score_threshold=0.2, max_detections=20, input_size=(256, 256))
    b = detect_boxes(loaded, embeddings, score_threshold=0.2, max_detections=20, input_size=(256, 256))
    assert sum(len(x[0]) for x in a) > 0
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_training_is_deterministic_and_reads_shards_and_pairs_alike(sam, corpus):
    shard, pairs = corpus
    options = dict(steps=4, lr=1e-3, batch_size=3, seed=5, hidden=16, progress=False)
    from_shard = train_box_detector(sam, [shard], **options)
    from_pairs = train_box_detector(sam, pairs, **options)
    other_seed = train_box_detector(sam, shard, **{**options, "seed": 6})
    state_a, state_b, state_c = from_shard.state_dict(), from_pairs.state_dict(), other_seed.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not all(torch.equal(state_a[k], state_c[k]) for k in state_a)


def test_images_without_boxes_are_negatives(encoded):
    embeddings, boxes = encoded
    empty = [torch.zeros(0, 4)] * len(boxes)
    head, losses = fit_box_head(embeddings, empty, stride=16.0, steps=20, lr=3e-3, batch_size=4, seed=0, hidden=16, progress=False)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    mixed = boxes[:4] + empty[4:]
    _, losses = fit_box_head(embeddings, mixed, stride=16.0, steps=5, lr=3e-3, batch_size=2, seed=0, hidden=16, progress=False)
    assert all(math.isfinite(x) for x in losses)


def test_flip_augmentation_encodes_mirror_images_with_mirrored_boxes(sam, corpus):
    _, pairs = corpus
    embeddings, boxes = encode_training_data(sam, pairs[:3], horizontal_flip=True)
    assert embeddings.shape[0] == 6
    mirror, _ = encode_images(sam, [np.ascontiguousarray(pairs[1][0][:, ::-1])])
    assert torch.allclose(embeddings[3], mirror[0], atol=1e-5)
    original, flipped = boxes[2], boxes[3]
    assert torch.allclose(flipped[:, [2, 0]], 256 - original[:, [0, 2]], atol=1e-4)
    assert torch.equal(flipped[:, [1, 3]], original[:, [1, 3]])


def test_embeddings_are_the_predictors_and_boxes_follow_the_resize(sam):
    image = np.random.default_rng(0).integers(0, 256, (120, 200, 3), dtype=np.uint8)  # not square: padded
    embeddings, sizes = encode_images(sam, [image])
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    assert sizes == [predictor.input_size] == [(154, 256)]
    assert torch.allclose(embeddings, predictor.get_image_embedding(), atol=1e-4)
    xyxy = xywh_to_input_xyxy(np.array([[10.0, 20.0, 50.0, 40.0]]), (120, 200), 256)
    scale = torch.tensor([256 / 200, 154 / 120] * 2)  # per axis: the resized sides are rounded
    assert torch.allclose(xyxy, torch.tensor([[10.0, 20.0, 60.0, 60.0]]) * scale, atol=1e-4)


def test_bad_input_gets_a_clear_error(sam, encoded, corpus, tmp_path):
    embeddings, boxes = encoded
    head, _ = fit_box_head(embeddings[:2], boxes[:2], stride=16.0, steps=1, lr=1e-3, batch_size=2, hidden=16, progress=False)
    detect = dict(score_threshold=0.5, max_detections=5, input_size=(256, 256))
    with pytest.raises(ValueError, match="embeddings"):
        detect_boxes(head, embeddings[:, :64], **detect)
    with pytest.raises(ValueError, match="input_size"):
        detect_boxes(head, embeddings[:3], **{**detect, "input_size": [(256, 256)] * 2})
    with pytest.raises(ValueError, match="score_threshold"):
        detect_boxes(head, embeddings, **{**detect, "score_threshold": 1.5})
    with pytest.raises(ValueError, match="max_detections"):
        detect_boxes(head, embeddings, **{**detect, "max_detections": 0})
    with pytest.raises(ValueError, match="Kx4"):
        encode_targets(torch.zeros(3, 3), (16, 16), stride=16.0, scale_edges=EDGES)
    with pytest.raises(ValueError, match="steps"):
        fit_box_head(embeddings, boxes, stride=16.0, steps=0, lr=1e-3, batch_size=2)
    with pytest.raises(ValueError, match="N box tensors"):
        fit_box_head(embeddings, boxes[:2], stride=16.0, steps=1, lr=1e-3, batch_size=2)
    image = corpus[1][0][0]
    with pytest.raises(ValueError, match="non-negative"):
        train_box_detector(sam, [(image, np.array([[0.0, 0.0, -5.0, 3.0]]))], steps=1, lr=1e-3, batch_size=1)
    with pytest.raises(ValueError, match="uint8"):
        train_box_detector(sam, [(image.astype(np.float32), np.zeros((0, 4)))], steps=1, lr=1e-3, batch_size=1)
    with pytest.raises(ValueError, match="no usable image"):
        train_box_detector(sam, [], steps=1, lr=1e-3, batch_size=1)
    with pytest.raises(ValueError, match="pairs"):
        train_box_detector(sam, [image], steps=1, lr=1e-3, batch_size=1)
    with pytest.raises(FileNotFoundError, match="matches no file"):
        train_box_detector(sam, [str(tmp_path / "missing.tar")], steps=1, lr=1e-3, batch_size=1)
    with pytest.raises(ValueError, match="ascending"):
        BoxHeadConfig(channels=8, stride=16.0, scale_edges=(2.0, 1.0))
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a box head"):
        load_box_head(tmp_path / "other.pt")


def test_spooled_embeddings_train_the_head_that_in_memory_ones_train(sam, corpus, encoded):
    embeddings, boxes = encoded
    in_memory, _ = encode_images(sam, [image for image, _ in corpus[1]])
    # the spool keeps the encoder's layout: same values, same strides, so the same arithmetic
    assert torch.equal(embeddings, in_memory) and embeddings.stride() == in_memory.stride()
    options = dict(stride=16.0, steps=6, lr=3e-3, batch_size=3, seed=1, hidden=16, progress=False)
    (spooled, spooled_losses), (kept, kept_losses) = fit_box_head(embeddings, boxes, **options), fit_box_head(in_memory, boxes, **options)
    assert spooled_losses == kept_losses
    assert all(torch.equal(spooled.state_dict()[k], kept.state_dict()[k]) for k in kept.state_dict())
