"""fp16 mixed precision (`trainer.precision=16-mixed`: autocast to float16 and a GradScaler): the
gradients that reach the optimiser equal fp32's within fp16's tolerance, the encoder's as well as the
decoder's, and gradient clipping acts on the unscaled gradients.

Lightning's precision flag turns 16-mixed into bf16-mixed on CPU, so the test hands the Trainer the
plugin itself: the same MixedPrecision plugin and GradScaler code path that CUDA runs.
"""

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.plugins.precision import MixedPrecision

from segany_train.config_paths import CONFIG_DIR
from segany_train.data.synthetic import write_synthetic_corpus
from segany_train.training.run import build_datamodule, build_model, build_training_module
from tests.conftest import tiny_training_overrides

LOSS_SCALE = 256.0


class GradientsAfterTheStep(L.Callback):
    """Every parameter's gradient as the optimiser used it (after unscaling and clipping)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        self.grads = {n: p.grad.detach().clone() for n, p in module.sam.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("synthetic")
    write_synthetic_corpus(directory, num_images=16, size=128, images_per_shard=2, min_objects=3, max_objects=8, progress=False)
    return directory


def _one_step(corpus: Path, run_dir: Path, fp16: bool, overrides: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose(
            "train",
            overrides=[*tiny_training_overrides(corpus), "prompting.num_iterations=3", f"run_dir={run_dir}", *overrides],
        )
    L.seed_everything(0)
    sam = build_model(cfg.model)
    module = build_training_module(cfg, sam)
    recorder = GradientsAfterTheStep()
    plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=LOSS_SCALE))] if fp16 else []
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=plugins,
        callbacks=[recorder],
        default_root_dir=str(run_dir),
    )
    trainer.fit(module, datamodule=build_datamodule(cfg, sam))
    assert recorder.grads, "no step was taken"
    return recorder.grads


def _flat(grads: dict[str, torch.Tensor], part: str) -> torch.Tensor:
    return torch.cat([g.flatten().float() for name, g in grads.items() if name.startswith(part)])


def test_fp16_gradients_equal_fp32_in_encoder_and_decoder(corpus, tmp_path):
    fp32 = _one_step(corpus, tmp_path / "fp32", fp16=False)
    fp16 = _one_step(corpus, tmp_path / "fp16", fp16=True)
    assert fp32.keys() == fp16.keys()
    for part in ("image_encoder.", "prompt_encoder.", "mask_decoder."):
        exact, mixed = _flat(fp32, part), _flat(fp16, part)
        ratio = float(mixed.norm() / exact.norm())
        assert ratio == pytest.approx(1.0, rel=0.05), f"{part} gradient norm fp16/fp32 = {ratio:.3f}"
        assert float(torch.nn.functional.cosine_similarity(mixed, exact, dim=0)) > 0.98, part


def test_fp16_clips_the_unscaled_gradients(corpus, tmp_path):
    clip = ("optim.gradient_clip=1e-4",)  # far below the gradients' norm: clipping always acts
    for fp16 in (False, True):
        grads = _one_step(corpus, tmp_path / str(fp16), fp16=fp16, overrides=clip)
        norm = float(torch.cat([g.flatten().float() for g in grads.values()]).norm())
        assert norm == pytest.approx(1e-4, rel=0.02), f"fp16={fp16}: gradient norm {norm:.3g} after clipping at 1e-4"
