"""GPU smoke suite (issue 15): the training step, the rollout, the CLIs and the predictor on CUDA.

Every test here is marked `gpu`: where CUDA is absent they are skipped, with the reason printed
(tests/conftest.py). Run them alone with `python -m pytest -m gpu tests/gpu -rs`.
"""

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from segany_train import SamPredictor
from segany_train.config_paths import CONFIG_DIR
from segany_train.data.synthetic import write_synthetic_corpus
from segany_train.evaluation import cli as eval_cli
from segany_train.inference import amg_cli
from segany_train.prompting.rollout import RolloutConfig, run_rollout
from segany_train.training.run import train
from tests.conftest import tiny_training_overrides

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")


def test_fast_dev_run_on_gpu_in_bf16_mixed(tmp_path):
    overrides = tiny_training_overrides(tmp_path / "corpus") + [
        "trainer=gpu", "trainer.devices=1", "trainer.fast_dev_run=true", "prompting.num_iterations=4",
        "prompting.num_correction_clicks=2", f"run_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("train", overrides=overrides)
    assert cfg.trainer.precision == "bf16-mixed"
    metrics = train(cfg)
    assert np.isfinite(metrics["train/loss"])


@pytest.mark.parametrize("prompting", ["sam", "sam2"])
def test_rollout_on_cuda_under_bf16_autocast(tiny_sam, prompting):
    sam2 = prompting == "sam2"
    cfg = RolloutConfig(
        num_iterations=10 if sam2 else 11, num_correction_clicks=7 if sam2 else 8,
        gt_mask_prompt_probability=0.5 if sam2 else 0.0, gt_click_probability=0.1 if sam2 else 0.0,
    )  # fmt: skip
    sam = tiny_sam.to(CUDA)
    gt = torch.zeros(6, 32, 32, dtype=torch.bool, device=CUDA)
    for i in range(6):
        gt[i, 4 + i : 20 + i, 6 : 14 + 2 * i] = True
    embeddings = torch.randn(2, 32, 8, 8, device=CUDA, requires_grad=True)
    valid = torch.ones_like(gt)
    valid[:, :, 28:] = False
    seen = []
    with torch.autocast("cuda", dtype=torch.bfloat16):
        run_rollout(sam, embeddings, gt, torch.tensor([0, 0, 0, 1, 1, 1], device=CUDA), cfg, seen.append,
                    torch.Generator(device=CUDA).manual_seed(0), valid=valid)  # fmt: skip
    assert len(seen) == cfg.num_iterations
    sum(g.logits.sum() for g in seen[-1].groups).backward()
    assert torch.isfinite(embeddings.grad).all()


def test_segany_eval_and_segany_amg_on_cuda(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    write_synthetic_corpus(corpus, num_images=2, size=64, images_per_shard=2, min_objects=2, max_objects=3, progress=False)
    model = ["--model-type", "vit_t_256_small_decoder", "--device", "cuda", "--no-progress"]
    eval_cli.main([*model, "--shards", str(corpus / "*.tar"), "--protocol", "both", "--max-clicks", "3", "--out", str(tmp_path / "eval")])
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert 0.0 <= result["interactive"]["miou"]["1"] <= 1.0 and "amg" in result
    amg_cli.main([str(corpus / "sa_000000.tar"), "--out", str(tmp_path / "amg"), *model, "--points-per-side", "4",
                  "--pred-iou-thresh", "0", "--stability-score-thresh", "0"])  # fmt: skip
    assert len(list((tmp_path / "amg").glob("*.json"))) == 2


def test_predictor_on_cuda_matches_cpu(tiny_sam):
    image = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    prompts = [
        {"point_coords": np.array([[30, 40]]), "point_labels": np.array([1])},
        {"box": np.array([10, 10, 80, 60]), "multimask_output": False},
        {"point_coords": np.array([[30, 40], [70, 50]]), "point_labels": np.array([1, 0]), "box": np.array([5, 5, 90, 80])},
    ]
    outputs = {}
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    # full fp32 on the GPU (no TF32 matmuls or convolutions): what remains is kernel rounding
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for device in ("cpu", "cuda"):
            predictor = SamPredictor(tiny_sam.to(device))
            predictor.set_image(image)
            outputs[device] = [predictor.predict(**p, return_logits=True) for p in prompts]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    for cpu, cuda in zip(outputs["cpu"], outputs["cuda"]):
        for a, b in zip(cpu, cuda):
            np.testing.assert_allclose(b, a, atol=1e-3, rtol=1e-3)


def test_bf16_inference_on_cuda(tmp_path):
    """precision="bf16" on CUDA: the predictor's outputs are float32 and close to fp32's on the shipped
    seed; the generator and segany-eval --precision bf16 run there."""
    from segany_train.model.seed_model import BUILTIN, resolve_seed_checkpoint
    from segany_train.data.synthetic import generate_image
    from segany_train.inference.automatic_mask_generator import SamAutomaticMaskGenerator
    from segany_train.inference.cli_options import build_model

    seed = build_model(resolve_seed_checkpoint(BUILTIN), None).to(CUDA).eval()
    image, masks = generate_image(0, seed=3, size=256, min_objects=2, max_objects=4, min_radius=0.1, max_radius=0.35)
    fp32, bf16 = SamPredictor(seed), SamPredictor(seed, precision="bf16")
    fp32.set_image(image)
    bf16.set_image(image)
    for gt in masks:
        ys, xs = np.nonzero(gt)
        click = dict(point_coords=np.array([[xs.mean(), ys.mean()]]), point_labels=np.array([1]))
        (m32, s32, _), (m16, s16, low16) = fp32.predict(**click), bf16.predict(**click)
        assert low16.dtype == np.float32 and np.abs(s32 - s16).max() < 0.03
        assert (m32 & m16).sum() / max(1, (m32 | m16).sum()) > 0.95
    records = SamAutomaticMaskGenerator(seed, points_per_side=8, pred_iou_thresh=0.5, precision="bf16").generate(image)
    assert all(isinstance(r["predicted_iou"], float) for r in records)
    corpus = tmp_path / "corpus"
    write_synthetic_corpus(corpus, num_images=2, size=64, images_per_shard=2, min_objects=2, max_objects=3, progress=False)
    eval_cli.main(["--model-type", "vit_t_256_small_decoder", "--device", "cuda", "--precision", "bf16", "--no-progress",
                   "--shards", str(corpus / "*.tar"), "--protocol", "interactive", "--max-clicks", "2", "--out", str(tmp_path / "eval")])  # fmt: skip
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["precision"] == "bf16"
