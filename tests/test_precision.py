"""The bf16 inference path (`precision="bf16"`): the shipped seed's masks under bfloat16 autocast stay
close to fp32 ones, outputs stay float32, the generator and the CLIs take the option, bad values are
refused in one line. (The figures over 500 prompts: benchmarks/bf16_quality.py.)"""

import json

import numpy as np
import pytest
import torch

from segany_train.data.synthetic import generate_image, write_synthetic_corpus
from segany_train.evaluation import cli as eval_cli
from segany_train.inference.automatic_mask_generator import SamAutomaticMaskGenerator
from segany_train.inference.cli_options import build_model
from segany_train.inference.precision import check_precision, inference_autocast
from segany_train.inference.predictor import SamPredictor
from segany_train.model.seed_model import BUILTIN, resolve_seed_checkpoint

SCENE = dict(size=256, min_objects=5, max_objects=10, min_radius=0.06, max_radius=0.2, style="fluorescent", part_masks=False)


@pytest.fixture(scope="module")
def seed():
    return build_model(resolve_seed_checkpoint(BUILTIN), None).eval()


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return np.logical_and(a, b).sum() / max(1, np.logical_or(a, b).sum())


def test_bf16_predictor_masks_match_fp32_on_the_seed(seed):
    fp32, bf16 = SamPredictor(seed), SamPredictor(seed, precision="bf16")
    ious, deltas = [], []
    for index in range(3):
        image, masks = generate_image(50_000 + index, seed=3, **SCENE)
        fp32.set_image(image)
        bf16.set_image(image)
        assert bf16.features.dtype == torch.float32
        # the embeddings differ (bf16 products), but not by much
        assert 0 < (fp32.features - bf16.features).abs().max() < 0.2
        for gt in masks:
            ys, xs = np.nonzero(gt)
            click = dict(point_coords=np.array([[xs.mean(), ys.mean()]]), point_labels=np.array([1]))
            m32, s32, low32 = fp32.predict(**click)
            m16, s16, low16 = bf16.predict(**click)
            assert s16.dtype == np.float32 and low16.dtype == np.float32 and m16.dtype == bool
            ious += [_iou(a, b) for a, b in zip(m32, m16)]
            deltas += np.abs(s32 - s16).tolist()
    assert len(ious) >= 30
    assert np.mean(ious) > 0.98 and np.min(ious) > 0.8
    assert np.max(deltas) < 0.03


def test_bf16_generator_finds_the_same_masks(seed):
    settings = dict(points_per_side=12, pred_iou_thresh=0.5, stability_score_thresh=0.7)
    # the seed's own (textured) scenes: it finds few masks on the fluorescent pool
    image, _ = generate_image(60_000, seed=3, size=256, min_objects=2, max_objects=4, min_radius=0.1, max_radius=0.35)
    a = SamAutomaticMaskGenerator(seed, **settings).generate(image)
    b = SamAutomaticMaskGenerator(seed, **settings, precision="bf16").generate(image)
    assert len(a) >= 3 and abs(len(a) - len(b)) <= 1
    matched = [max(_iou(x["segmentation"], y["segmentation"]) for y in b) for x in a]
    assert np.median(matched) > 0.95


def test_precision_is_checked():
    assert check_precision("bf16") == "bf16"
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, got 'fp16'"):
        check_precision("fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        SamPredictor(build_model(None, "vit_t_256_small_decoder"), precision="half")
    x = torch.randn(4, 4)
    with inference_autocast(torch.device("cpu"), "bf16"):
        assert (x @ x).dtype == torch.bfloat16
    with inference_autocast(torch.device("cpu"), "fp32"):
        assert (x @ x).dtype == torch.float32


def test_segany_eval_bf16_is_recorded_and_close(seed, tmp_path):
    write_synthetic_corpus(tmp_path / "shards", num_images=4, images_per_shard=4, seed=5, progress=False, **SCENE)
    torch.save(seed.state_dict(), tmp_path / "seed.pth")
    results = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        eval_cli.main(
            ["--checkpoint", str(tmp_path / "seed.pth"), "--shards", str(tmp_path / "shards" / "*.tar"),
             "--protocol", "interactive", "--max-clicks", "2", "--precision", precision, "--out", str(out), "--no-progress"]
        )  # fmt: skip
        results[precision] = json.loads((out / "eval.json").read_text())
    assert results["bf16"]["precision"] == "bf16" and results["fp32"]["precision"] == "fp32"
    for k in ("1", "2"):
        assert results["bf16"]["interactive"]["miou"][k] == pytest.approx(results["fp32"]["interactive"]["miou"][k], abs=0.02)
    with pytest.raises(SystemExit):
        eval_cli.main(["--model-type", "vit_t_256_small_decoder", "--shards", "x.tar", "--precision", "fp16", "--out", str(tmp_path)])
