"""Interactive evaluation at the images' own resolution (segany-eval's default) against brute force:
the predictor's full-size mask for the protocol's first click, scored against pycocotools' decode."""

from io import BytesIO

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from segany_train.data.pipeline import collate_sam_samples, read_records, sam_sample_pipeline
from segany_train.data.sa1b import annotation_from_mask, make_record
from segany_train.data.sam_sample import SamSampleConfig
from segany_train.data.shard_writer import SA1BShardWriter
from segany_train.evaluation.interactive import FullResolutionIoU, InteractiveEvalConfig, evaluate_interactive
from segany_train.inference.predictor import SamPredictor
from segany_train.model import build_sam_from_checkpoint
from segany_train.model.seed_model import BUILTIN_PATH
from segany_train.prompting import center_correction_clicks

SIZES = [(150, 230), (97, 61), (300, 300)]  # (H, W): wide, tall and larger than the 256 model input


def _scene(index: int, height: int, width: int) -> tuple[bytes, dict]:
    """An image with a thin bar and two ellipses (the bar is where low and full resolution disagree)."""
    rng = np.random.default_rng(index)
    image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 80, 3)))
    draw = ImageDraw.Draw(image)
    annotations = []
    shapes = [
        ("rectangle", (width * 0.1, height * 0.45, width * 0.9, height * 0.45 + 3)),
        ("ellipse", (width * 0.15, height * 0.1, width * 0.5, height * 0.4)),
        ("ellipse", (width * 0.55, height * 0.55, width * 0.95, height * 0.95)),
    ]
    for i, (kind, box) in enumerate(shapes):
        layer = Image.new("L", (width, height))
        getattr(ImageDraw.Draw(layer), kind)(box, fill=255)
        colour = tuple(int(v) for v in rng.integers(150, 256, 3))
        getattr(draw, kind)(box, fill=colour)
        annotations.append(np.asarray(layer) > 0)
    for i in range(len(annotations)):  # later shapes cover earlier ones
        for later in annotations[i + 1 :]:
            annotations[i] = annotations[i] & ~later
    buffer = BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    record = make_record(
        image_id=index, width=width, height=height, file_name=f"sa_{index}.jpg",
        annotations=[annotation_from_mask(m, annotation_id=i) for i, m in enumerate(annotations) if m.any()],
    )  # fmt: skip
    return buffer.getvalue(), record


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("full_res")
    with SA1BShardWriter(root, max_samples_per_shard=2) as writer:
        for index, (h, w) in enumerate(SIZES):
            writer.write(f"sa_{index}", *_scene(index, h, w))
    return sorted(str(p) for p in root.glob("*.tar"))


@pytest.fixture(scope="module")
def sam():
    torch.manual_seed(0)
    return build_sam_from_checkpoint(BUILTIN_PATH).eval()  # a trained model: masks worth measuring


def _brute_force_first_click(sam, shards) -> list[float]:
    """Per mask: IoU at the image's size of the predictor's shown mask for the protocol's first click."""
    records = {key: record for key, _, record in read_records(shards)}
    predictor = SamPredictor(sam)
    scale = sam.image_encoder.img_size / sam.prompt_encoder.mask_input_size[0]
    cfg = SamSampleConfig(image_size=sam.image_encoder.img_size, mask_size=sam.prompt_encoder.mask_input_size[0], max_masks=100)
    ious = []
    for sample in sam_sample_pipeline(shards, cfg, mode="once"):
        h, w = sample["input_size"]
        predictor.set_torch_image(sample["image"][None, :, :h, :w], sample["original_size"])
        record = records[sample["key"]]
        for gt_low, annotation_id in zip(sample["masks"], sample["annotation_ids"].tolist()):
            click, _, _ = center_correction_clicks(torch.zeros_like(gt_low)[None], gt_low[None], scale=scale)
            masks, scores, _ = predictor.predict_torch(click[None] - 0.5, torch.ones(1, 1), multimask_output=True)
            shown = masks[0, int(scores[0].argmax())].numpy()
            gt = mask_utils.decode(record["annotations"][annotation_id]["segmentation"]).astype(bool)
            ious.append((shown & gt).sum() / (shown | gt).sum())
    return ious


def test_first_click_iou_at_full_resolution_matches_the_predictor(sam, shards):
    cfg = InteractiveEvalConfig(max_clicks=2, batch_size=2)  # two images per batch: masks of both in one call
    report = evaluate_interactive(sam, shards, cfg, progress=False, per_mask=True)
    assert report["iou_resolution"] == "full" and report["images"] == len(SIZES)
    measured = np.asarray(report["per_mask"]["shown"])[:, 0]
    expected = np.asarray(_brute_force_first_click(sam, shards))
    assert len(measured) == len(expected) == report["masks"] == 9
    assert 0.2 < expected.mean() < 0.99  # a model whose masks are neither empty nor perfect
    np.testing.assert_allclose(measured, expected, atol=2e-3)
    # the low-res frame scores the same clicks differently (the thin bars above all)
    low = evaluate_interactive(sam, shards, InteractiveEvalConfig(max_clicks=2, iou_resolution="low_res"), progress=False, per_mask=True)
    assert low["iou_resolution"] == "low_res" and low["low_res_frame"] == [64, 64]
    assert np.abs(np.asarray(low["per_mask"]["shown"])[:, 0] - expected).max() > 0.01


def test_chunked_measurement_equals_one_pass(sam, shards):
    cfg = SamSampleConfig(image_size=256, mask_size=64, max_masks=100, keep_segmentations=True)
    batch = collate_sam_samples(list(sam_sample_pipeline(shards, cfg, mode="once")))
    assert len(batch["segmentations"]) == batch["masks"].shape[0]
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(batch["masks"].shape[0], 3, 64, 64, generator=generator) * 4
    common = dict(
        segmentations=batch["segmentations"], image_index=batch["image_index"],
        input_size=batch["input_size"], original_size=batch["original_size"],
    )  # fmt: skip
    whole = FullResolutionIoU(sam, **common)(logits)
    chunked = FullResolutionIoU(sam, max_elements=1, **common)(logits)  # one mask at a time
    torch.testing.assert_close(chunked, whole)
    # against pycocotools' decode and the same upsampling, one mask at a time
    for n in (0, 4, 8):
        i = int(batch["image_index"][n])
        full = sam.postprocess_masks(logits[n : n + 1], tuple(batch["input_size"][i].tolist()), tuple(batch["original_size"][i].tolist()))[0] > 0
        gt = torch.from_numpy(mask_utils.decode(batch["segmentations"][n]).astype(bool))
        for k in range(3):
            iou = float((full[k] & gt).sum() / (full[k] | gt).sum())
            assert float(whole[n, k]) == pytest.approx(iou, abs=1e-6)


def test_segmentations_only_without_augmentation():
    with pytest.raises(ValueError, match="keep_segmentations"):
        SamSampleConfig(keep_segmentations=True, horizontal_flip=True)
    with pytest.raises(ValueError, match="iou_resolution"):
        InteractiveEvalConfig(iou_resolution="half")
