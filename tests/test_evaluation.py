"""Evaluation: the interactive click protocol (against brute force), its aggregation (NoC, mIoU after
k clicks), COCO mask AP through pycocotools (hand-computed and brute-force references), segany-eval."""

import json
from io import BytesIO

import numpy as np
import pytest
import torch
from PIL import Image

from segany_train.data.image_decoding import decode_record_image
from segany_train.data.pipeline import read_records
from segany_train.data.sa1b import annotation_from_mask, make_record
from segany_train.data.sam_sample import valid_region
from segany_train.data.shard_writer import SA1BShardWriter
from segany_train.data.synthetic import write_synthetic_corpus
from segany_train.evaluation import cli
from segany_train.evaluation.coco_ap import STAT_NAMES, coco_mask_ap
from segany_train.evaluation.interactive import InteractiveEvalConfig, summarize_interactive
from segany_train.inference.automatic_mask_generator import SamAutomaticMaskGenerator
from segany_train.model import build_sam, build_sam_by_name
from segany_train.prompting.rollout import run_rollout
from tests.conftest import TINY, randomized
from tests.full_disk import FullDirectory

# ---------------------------------------------------------------- click placement vs brute force


def brute_force_depth(region: np.ndarray) -> np.ndarray:
    """HxW bool -> HxW float: each region pixel's Euclidean distance (pixel centres) to the nearest
    pixel outside the region, the image's surrounding ring included; 0 outside the region."""
    h, w = region.shape
    padded = np.pad(region, 1, constant_values=False)
    outside = np.argwhere(~padded) - 1  # (row, col) in image coordinates, the ring at -1 and h / w
    inside = np.argwhere(region)
    depth = np.zeros((h, w))
    if inside.size:
        pairwise = np.sqrt(((inside[:, None, :] - outside[None, :, :]) ** 2).sum(-1))  # inside x outside
        depth[tuple(inside.T)] = pairwise.min(axis=1)
    return depth


def brute_force_click(pred: np.ndarray, gt: np.ndarray) -> tuple[tuple[int, int], int]:
    """The protocol's click ((row, col), label) by brute force: the deepest pixel of the false-negative
    or false-positive region, whichever is deeper (false positive on a tie), first in row-major order."""
    fn, fp = brute_force_depth(gt & ~pred), brute_force_depth(pred & ~gt)
    depth, label = (fn, 1) if fn.max() > fp.max() else (fp, 0)
    flat = int(np.argmax(depth))  # the first maximum in row-major order
    return divmod(flat, gt.shape[1]), label


def _hand_made_masks(size: int, rows: int) -> torch.Tensor:
    """Masks in a size x size frame whose image part is the top `rows` rows: a ring (its deepest point
    is not its centre), an L, a bar touching the image's left edge and a blob at the padding's edge."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - 11.3, xx - 12.6)
    ring = (r >= 4) & (r <= 9)
    ell = np.zeros((size, size), bool)
    ell[3:20, 20:24] = True
    ell[16:20, 20:31] = True
    bar = np.zeros((size, size), bool)
    bar[9:14, 0:14] = True
    blob = (np.hypot(yy - (rows - 4), xx - 25) <= 4) & (yy < rows)
    masks = np.stack([ring, ell, bar, blob]) & (yy < rows)
    return torch.from_numpy(masks)


def test_protocol_clicks_match_brute_force():
    """Runs the evaluation's rollout with a random tiny model (arbitrary, imperfect predictions) and
    checks every click: the first at the GT's most interior point, each next at the deepest point of
    the largest error region between the previous shown mask (inside the image) and the GT, labelled
    1 in a false negative and 0 in a false positive, never in the padding."""
    torch.manual_seed(0)
    sam = randomized(build_sam(TINY), seed=1).eval()
    size = sam.prompt_encoder.mask_input_size[0]  # 32
    valid = valid_region(torch.tensor([[24, 32]]), size)  # landscape: rows 24..31 of the low-res frame are padding
    rows = int(valid[0].any(1).sum())
    assert rows == 24 and bool(valid[0, :rows].all()) and not bool(valid[0, rows:].any())
    gt = _hand_made_masks(size, rows)
    n = gt.shape[0]
    cfg = InteractiveEvalConfig(max_clicks=6).rollout()
    scale = sam.image_encoder.img_size / size
    embeddings = sam.image_encoder(torch.randn(1, 3, sam.image_encoder.img_size, sam.image_encoder.img_size))
    outputs = []
    with torch.no_grad():
        run_rollout(sam, embeddings, gt, torch.zeros(n, dtype=torch.long), cfg, outputs.append, valid=valid.expand(n, -1, -1))
    assert len(outputs) == 6
    labels_seen, predicted_in_padding = set(), False
    for step, out in enumerate(outputs):
        for i in range(n):
            g = gt[i].numpy()
            if step == 0:
                prev = np.zeros_like(g)
            else:
                before = outputs[step - 1]
                shown = before.shown[i] > sam.mask_threshold
                predicted_in_padding |= bool((shown & ~valid[0]).any())
                prev = (shown & valid[0]).numpy()
            if step > 0 and (prev == g).all():
                assert out.point_labels[i, step] < 0  # nothing to correct: padding token
                continue
            (row, col), label = brute_force_click(prev, g)
            # the prompt's token `step` is this step's click (token 0 is the first click)
            x, y = out.point_coords[i, step].tolist()
            assert (x, y) == pytest.approx(((col + 0.5) * scale - 0.5, (row + 0.5) * scale - 0.5))
            assert int(out.point_labels[i, step]) == label
            assert row < rows  # never in the padding
            labels_seen.add(label)
    assert labels_seen == {0, 1}  # both kinds of correction occurred
    assert predicted_in_padding  # so the clearing of the padding was exercised


# ---------------------------------------------------------------- aggregation


def test_summary_of_known_iou_sequences():
    # rows: masks; columns: IoU after 1..9 clicks
    shown = torch.tensor(
        [
            [0.50, 0.80, 0.86, 0.88, 0.91, 0.92, 0.93, 0.94, 0.95],  # 85% at click 3, 90% at click 5
            [0.90, 0.90, 0.90, 0.90, 0.90, 0.90, 0.90, 0.90, 0.90],  # both at click 1 (>= counts)
            [0.10, 0.20, 0.30, 0.40, 0.50, 0.60, 0.70, 0.80, 0.84],  # never: counts 9 for both
            [0.60, 0.85, 0.89, 0.89, 0.89, 0.89, 0.89, 0.89, 0.89],  # 85% at click 2, 90% never
            [0.70, 0.95, 0.50, 0.50, 0.50, 0.50, 0.50, 0.50, 0.50],  # both at click 2, then drops
        ],
        dtype=torch.float64,
    )
    oracle = shown.clone()
    oracle[:, 0] += 0.05
    report = summarize_interactive(shown, oracle)
    assert report["masks"] == 5 and report["max_clicks"] == 9
    for k in (1, 2, 3, 5, 9):
        assert report["miou"][str(k)] == pytest.approx(float(shown[:, k - 1].mean()))
        assert report["oracle_miou"][str(k)] == pytest.approx(float(oracle[:, k - 1].mean()))
    assert report["miou"]["1"] == pytest.approx((0.5 + 0.9 + 0.1 + 0.6 + 0.7) / 5)
    assert report["noc"]["85"] == pytest.approx((3 + 1 + 9 + 2 + 2) / 5)
    assert report["noc"]["90"] == pytest.approx((5 + 1 + 9 + 9 + 2) / 5)
    assert report["nof"] == {"85": 1, "90": 2}

    # a 3-click cap: only the click counts that exist are reported, and NoC caps at 3
    capped = summarize_interactive(shown[:, :3], oracle[:, :3])
    assert list(capped["miou"]) == ["1", "2", "3"]
    assert capped["noc"]["90"] == pytest.approx((3 + 1 + 3 + 3 + 2) / 5)
    assert capped["nof"]["90"] == 3

    empty = summarize_interactive(torch.zeros(0, 9), torch.zeros(0, 9))
    assert empty["miou"]["1"] is None and empty["noc"]["85"] is None
    with pytest.raises(ValueError, match="NxK"):
        summarize_interactive(shown, oracle[:, :3])


# ---------------------------------------------------------------- COCO AP


def _box(shape, y0, x0, y1, x1) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _record(masks: list[np.ndarray]) -> dict:
    h, w = masks[0].shape
    anns = [annotation_from_mask(m, annotation_id=i) for i, m in enumerate(masks)]
    return make_record(image_id=0, width=w, height=h, file_name="x.jpg", annotations=anns)


def test_coco_ap_of_perfect_predictions_is_one():
    shape = (64, 80)
    gt = [_box(shape, 0, 0, 40, 40), _box(shape, 40, 40, 64, 80), _box(shape, 5, 50, 15, 60)]
    preds = [{"segmentation": m, "predicted_iou": s} for m, s in zip(gt, (0.9, 0.8, 0.7))]
    stats = coco_mask_ap([_record(gt)], [preds])
    assert list(stats) == list(STAT_NAMES)
    for name in ("AP", "AP50", "AP75", "AR@100", "AR@1000"):
        assert stats[name] == pytest.approx(1.0)
    assert stats["AR@1"] == pytest.approx(1 / 3)  # one mask allowed, three to find
    assert stats["AP_large"] == -1.0  # no GT mask over 96^2 pixels


def test_coco_ap_half_right_known_value():
    """Two GT masks A, B; two predictions: a wrong mask W (score 0.95, overlapping nothing) and A
    itself (0.9). In score order: W is a false positive (precision 0, recall 0), then A a true
    positive (precision 1/2, recall 1/2), at every IoU threshold (IoUs are exactly 0 or 1). The
    interpolated precision is 1/2 for recall 0, 0.01, ..., 0.50 (51 of COCO's 101 recall points)
    and 0 above, so AP = 51 * 0.5 / 101. Recall with 1 detection: the top one is W, so 0."""
    shape = (64, 64)
    a, b, wrong = _box(shape, 0, 0, 40, 40), _box(shape, 40, 40, 64, 64), _box(shape, 0, 44, 20, 64)
    preds = [{"segmentation": wrong, "predicted_iou": 0.95}, {"segmentation": a, "predicted_iou": 0.9}]
    stats = coco_mask_ap([_record([a, b])], [preds])
    assert stats["AP"] == pytest.approx(25.5 / 101)
    assert stats["AP50"] == pytest.approx(25.5 / 101) and stats["AP75"] == pytest.approx(25.5 / 101)
    assert stats["AR@1"] == 0.0 and stats["AR@100"] == pytest.approx(0.5)
    # the same wrong mask ranked below A: precision 1 up to recall 1/2 -> AP = 51 / 101
    preds[0]["predicted_iou"] = 0.5
    assert coco_mask_ap([_record([a, b])], [preds])["AP"] == pytest.approx(51 / 101)
    # no prediction at all: AP 0, not an error
    assert coco_mask_ap([_record([a, b])], [[]])["AP"] == 0.0


def test_coco_ap_counts_every_mask_of_an_image_with_more_than_100():
    """150 GT masks, each predicted exactly: AP 1.0. COCO's own maxDets (1, 10, 100) counts only the
    100 best-scored predictions of an image, and then scores the same perfect predictions 0.663."""
    shape = (60, 100)
    gt = [_box(shape, 4 * (i // 10), 10 * (i % 10), 4 * (i // 10) + 4, 10 * (i % 10) + 10) for i in range(150)]
    preds = [{"segmentation": m, "predicted_iou": 1.0 - i / 1000} for i, m in enumerate(gt)]
    stats = coco_mask_ap([_record(gt)], [preds])
    assert stats["AP"] == pytest.approx(1.0) and stats["AR@1000"] == pytest.approx(1.0)
    assert coco_mask_ap([_record(gt)], [preds], max_dets=(1, 10, 100))["AP"] < 0.7


def brute_force_ap(gts: list[list[np.ndarray]], preds: list[list[tuple[np.ndarray, float]]], threshold: float) -> float:
    """COCO's AP at one IoU threshold, all areas, up to 100 masks per image, written out plainly:
    per image, predictions in score order take the unmatched GT of highest IoU >= threshold;
    all predictions pooled by score; precision made non-increasing; averaged at 101 recall points."""
    matches = []  # (score, is true positive)
    for image_gts, image_preds in zip(gts, preds):
        taken = set()
        for mask, score in sorted(image_preds, key=lambda p: -p[1])[:100]:
            best, best_iou = None, threshold
            for g, gt in enumerate(image_gts):
                iou = (mask & gt).sum() / max((mask | gt).sum(), 1)
                if g not in taken and iou >= best_iou:
                    best, best_iou = g, iou
            if best is not None:
                taken.add(best)
            matches.append((score, best is not None))
    matches.sort(key=lambda m: -m[0])
    total = sum(len(g) for g in gts)
    tp = np.cumsum([m[1] for m in matches])
    precision = tp / np.arange(1, len(matches) + 1)
    recall = tp / total
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at this recall or more
    points = []
    for r in np.linspace(0, 1, 101):
        reached = np.flatnonzero(recall >= r)
        points.append(precision[reached[0]] if reached.size else 0.0)
    return float(np.mean(points))


def test_coco_ap_matches_brute_force_on_partial_overlaps():
    """Shifted copies of GT boxes (IoUs spread over 0.3..1) plus spurious masks, random scores."""
    rng = np.random.default_rng(0)
    shape = (48, 48)
    gts, preds, records, inputs = [], [], [], []
    for _ in range(3):
        image_gts, image_preds = [], []
        for _ in range(int(rng.integers(2, 5))):
            y0, x0 = rng.integers(0, 30, size=2)
            h, w = rng.integers(8, 18, size=2)
            image_gts.append(_box(shape, y0, x0, y0 + h, x0 + w))
            dy, dx = rng.integers(-4, 5, size=2)
            shifted = _box(shape, max(y0 + dy, 0), max(x0 + dx, 0), y0 + h + dy, x0 + w + dx)
            image_preds.append((shifted, float(rng.random())))
        for _ in range(2):
            y0, x0 = rng.integers(0, 40, size=2)
            image_preds.append((_box(shape, y0, x0, y0 + 8, x0 + 8), float(rng.random())))
        gts.append(image_gts)
        preds.append(image_preds)
        records.append(_record(image_gts))
        inputs.append([{"segmentation": m, "predicted_iou": s} for m, s in image_preds])
    stats = coco_mask_ap(records, inputs)
    thresholds = np.linspace(0.5, 0.95, 10)
    expected = [brute_force_ap(gts, preds, t) for t in thresholds]
    assert 0.0 < stats["AP"] < 1.0
    assert stats["AP"] == pytest.approx(np.mean(expected), abs=1e-9)
    assert stats["AP50"] == pytest.approx(expected[0], abs=1e-9)
    assert stats["AP75"] == pytest.approx(expected[5], abs=1e-9)


def test_coco_ap_rejects_a_mask_of_the_wrong_size():
    gt = [_box((32, 32), 0, 0, 8, 8)]
    with pytest.raises(ValueError, match="predicted mask"):
        coco_mask_ap([_record(gt)], [[{"segmentation": np.zeros((16, 32), bool), "predicted_iou": 1.0}]])


# ---------------------------------------------------------------- segany-eval end to end


@pytest.fixture(scope="module")
def eval_shards(tmp_path_factory):
    """Three synthetic images in two shards, plus a shard holding one good and one bad sample."""
    root = tmp_path_factory.mktemp("eval_shards")
    write_synthetic_corpus(root, num_images=3, size=64, images_per_shard=2, min_objects=2, max_objects=3, progress=False)
    key, jpeg, record = next(read_records([str(root / "sa_000000.tar")]))
    small = BytesIO()
    Image.new("RGB", (32, 32)).save(small, format="JPEG")
    with SA1BShardWriter(root, prefix="extra_") as writer:
        writer.write("sa_100", jpeg, record)
        writer.write("sa_101", small.getvalue(), record)  # the record says 64x64: a bad sample
    return root


def test_segany_eval_interactive_end_to_end(eval_shards, tmp_path):
    samples = read_records(sorted(str(p) for p in eval_shards.glob("*.tar")))
    records = [r for key, _, r in samples if key != "sa_101"]  # the bad sample's record is valid, its image not
    out = tmp_path / "out"
    cli.main(
        ["--model-type", "vit_t_256_small_decoder", "--shards", str(eval_shards / "*.tar"), "--protocol", "interactive",
         "--max-clicks", "3", "--out", str(out), "--no-progress"]
    )  # fmt: skip
    result = json.loads((out / "eval.json").read_text())
    inter = result["interactive"]
    assert "amg" not in result and len(result["shards"]) == 3
    assert inter["images"] == 4 and inter["images_skipped"] == {"bad_sample": 1}
    # every mask of the good images is evaluated (64-px images: the low-res frame keeps them all)
    assert inter["masks_in_images"] == inter["masks"] == sum(len(r["annotations"]) for r in records)
    assert inter["masks_skipped"] == 0 and inter["low_res_frame"] == [64, 64]
    assert inter["iou_resolution"] == "full" and inter["settings"]["iou_resolution"] == "full"
    assert list(inter["miou"]) == ["1", "2", "3"]
    for k in ("1", "2", "3"):
        assert 0.0 <= inter["miou"][k] <= inter["oracle_miou"][k] <= 1.0
    assert inter["oracle_miou"]["2"] == pytest.approx(inter["miou"]["2"])  # one output after 1 click
    assert 1.0 <= inter["noc"]["85"] <= inter["noc"]["90"] <= 3.0
    assert inter["settings"]["max_clicks"] == 3 and inter["settings"]["mask_feedback"] is True
    markdown = (out / "eval.md").read_text()
    assert "| clicks | mIoU | oracle mIoU |" in markdown and "NoC@85" in markdown
    assert "IoU at each image's own resolution" in markdown

    # the same weights from a checkpoint file give the same figures
    torch.manual_seed(0)  # segany-eval's random weights for the default --seed 0
    torch.save(build_sam_by_name("vit_t_256_small_decoder").state_dict(), tmp_path / "sam.pth")
    cli.main(
        ["--checkpoint", str(tmp_path / "sam.pth"), "--shards", str(eval_shards / "*.tar"), "--protocol", "interactive",
         "--max-clicks", "3", "--out", str(tmp_path / "from_checkpoint"), "--no-progress"]
    )  # fmt: skip
    loaded = json.loads((tmp_path / "from_checkpoint" / "eval.json").read_text())["interactive"]
    assert loaded["miou"] == inter["miou"] and loaded["noc"] == inter["noc"]

    # --max-images counts evaluated images; a batch of 2 is cut to what is left
    cli.main(
        ["--model-type", "vit_t_256_small_decoder", "--shards", str(eval_shards / "sa_*.tar"), "--protocol", "interactive",
         "--max-clicks", "2", "--max-images", "1", "--batch-size", "2", "--out", str(out), "--no-progress"]
    )  # fmt: skip
    first = json.loads((out / "eval.json").read_text())["interactive"]
    assert first["images"] == 1 and first["masks"] == len(records[1]["annotations"])  # sa_0 (extra_ sorts first)

    # the low-res frame on request, said so in the report
    cli.main(
        ["--model-type", "vit_t_256_small_decoder", "--shards", str(eval_shards / "*.tar"), "--protocol", "interactive",
         "--max-clicks", "3", "--iou-resolution", "low_res", "--out", str(out), "--no-progress"]
    )  # fmt: skip
    low = json.loads((out / "eval.json").read_text())["interactive"]
    assert low["iou_resolution"] == "low_res" and low["masks"] == inter["masks"]
    assert "IoU in the 64x64 low-res frame (not the image's resolution)" in (out / "eval.md").read_text()


def test_segany_eval_without_bars_says_how_far_it_is_every_n_images(eval_shards, tmp_path, capsys):
    cli.main(
        ["--model-type", "vit_t_256_small_decoder", "--shards", str(eval_shards / "*.tar"), "--protocol", "both", "--max-clicks", "1",
         "--batch-size", "1", "--points-per-side", "2", "--out", str(tmp_path / "out"), "--no-progress", "--report-every", "2"]
    )  # fmt: skip
    lines = [line.split(",")[0] for line in capsys.readouterr().err.splitlines() if line.startswith(("interactive:", "automatic masks:"))]
    assert lines == ["interactive: 2 images", "interactive: 4 images", "interactive: 4 images (done)",
                     "automatic masks: 2 images", "automatic masks: 4 images", "automatic masks: 4 images (done)"]  # fmt: skip
    cli.main(
        ["--model-type", "vit_t_256_small_decoder", "--shards", str(eval_shards / "*.tar"), "--protocol", "interactive", "--max-clicks", "1",
         "--max-images", "1", "--out", str(tmp_path / "out"), "--no-progress", "--report-every", "0"]
    )  # fmt: skip
    assert "interactive:" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model-type", "vit_t_256", "--shards", "/nonexistent/*.tar"], "matches no file"),
        (["--checkpoint", "/nonexistent/sam.pth", "--shards", "SHARDS"], "checkpoint not found"),
        (["--shards", "SHARDS"], "give --checkpoint"),
    ],
)
def test_segany_eval_one_line_errors(eval_shards, tmp_path, capsys, argv, message):
    argv = [str(eval_shards / "*.tar") if a == "SHARDS" else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv + ["--out", str(tmp_path)])
    assert message in str(exit_info.value) and "\n" not in str(exit_info.value)


def test_segany_eval_on_a_full_disk_says_so_in_one_line_and_leaves_no_half_report(eval_shards, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval.json").write_text('{"earlier": "report"}\n')
    FullDirectory(out, room=100, monkeypatch=monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--model-type", "vit_t_256_small_decoder", "--shards", str(eval_shards / "sa_*.tar"), "--protocol", "interactive",
                  "--max-clicks", "1", "--out", str(out), "--no-progress"])  # fmt: skip
    monkeypatch.undo()
    message = str(exit_info.value.code)
    assert message.startswith(f"segany-eval: error: disk full writing {out / 'eval.json'} ") and "\n" not in message, message
    assert sorted(p.name for p in out.iterdir()) == ["eval.json"] and json.loads((out / "eval.json").read_text()) == {"earlier": "report"}


@pytest.mark.parametrize("protocol", ["interactive", "amg"])
def test_segany_eval_fails_when_every_image_was_skipped(eval_shards, tmp_path, protocol):
    key, jpeg, record = next(read_records([str(eval_shards / "sa_000000.tar")]))
    small = BytesIO()
    Image.new("RGB", (32, 32)).save(small, format="JPEG")
    with SA1BShardWriter(tmp_path / "bad") as writer:
        writer.write("sa_101", small.getvalue(), record)  # the record says 64x64
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--model-type", "vit_t_256_small_decoder", "--shards", str(tmp_path / "bad" / "*.tar"), "--protocol", protocol,
                  "--max-clicks", "1", "--points-per-side", "2", "--out", str(tmp_path / "out"), "--no-progress"])  # fmt: skip
    message = str(exit_info.value.code)
    assert message.startswith(f"segany-eval: error: no image was evaluated ({protocol}; skipped: ") and "bad_sample" in message
    assert (tmp_path / "out" / "eval.json").exists()  # the skip counts are kept


def test_segany_eval_amg_end_to_end(eval_shards, tmp_path):
    """segany-eval's automatic-mask figures are COCOeval's on the generator's own masks for the first
    images of the shards, in order (a random model: low thresholds so that it keeps some masks)."""
    out = tmp_path / "out"
    settings = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    cli.main(
        ["--model-type", "vit_t_256_small_decoder", "--seed", "5", "--shards", str(eval_shards / "sa_*.tar"),
         "--protocol", "amg", "--max-images", "2", "--out", str(out), "--no-progress", "--max-dets", "1", "10", "50"]
        + [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    )  # fmt: skip
    amg = json.loads((out / "eval.json").read_text())["amg"]
    assert "interactive" not in json.loads((out / "eval.json").read_text())

    torch.manual_seed(5)  # segany-eval's random weights for --seed 5
    generator = SamAutomaticMaskGenerator(build_sam_by_name("vit_t_256_small_decoder").eval(), output_mode="coco_rle", **settings)
    samples = list(read_records([str(eval_shards / "sa_000000.tar")]))[:2]
    records = [r for _, _, r in samples]
    predictions = [generator.generate(decode_record_image(jpeg, r)) for _, jpeg, r in samples]
    assert sum(map(len, predictions)) > 0
    assert amg["images"] == 2 and amg["images_skipped"] == {}
    assert amg["gt_masks"] == sum(len(r["annotations"]) for r in records)
    assert amg["predicted_masks"] == sum(map(len, predictions))
    assert amg["max_dets"] == [1, 10, 50]
    assert amg["stats"] == pytest.approx(coco_mask_ap(records, predictions, max_dets=(1, 10, 50)))
    assert amg["generator"]["points_per_side"] == 4 and amg["generator"]["box_nms_thresh"] == 0.7
    assert "| AP | AP50 |" in (out / "eval.md").read_text() and "| AR@50 |" in (out / "eval.md").read_text()


def test_segany_eval_rejects_bad_generator_settings(eval_shards, tmp_path):
    with pytest.raises(SystemExit, match="points_per_batch"):
        shards = str(eval_shards / "*.tar")
        cli.main(["--model-type", "vit_t_256", "--shards", shards, "--points-per-batch", "0", "--out", str(tmp_path)])


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    from segany_train.evaluation.interactive import spearman

    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, 40).astype(np.float32)  # many ties
    b = a + rng.normal(0, 2, 40).astype(np.float32)
    assert spearman(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(spearmanr(a, b).statistic, abs=1e-9)
    assert spearman(torch.ones(5), torch.arange(5.0)) is None  # a constant side has no ranking
    assert spearman(torch.ones(1), torch.ones(1)) is None
