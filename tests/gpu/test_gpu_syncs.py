"""No host sync in a CUDA training step: `torch.cuda.set_sync_debug_mode("error")` from the batch's
start to the optimiser step (the encoder, the 11 decoder iterations, every backward pass) raises on
any operation that makes the host wait for the device. tests/test_host_syncs.py counts the same
operations on CPU."""

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

from segany_train.config_paths import CONFIG_DIR
from segany_train.data.synthetic import write_synthetic_corpus
from segany_train.training.run import build_datamodule, build_model, build_training_module
from tests.conftest import tiny_training_overrides

pytestmark = pytest.mark.gpu


class SyncsAreErrors(L.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        torch.cuda.synchronize()  # what came before (the batch's copy) is not the step's
        torch.cuda.set_sync_debug_mode("error")

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        torch.cuda.set_sync_debug_mode("default")
        self.steps += 1


@pytest.mark.parametrize(("prompting", "iterations", "clicks"), [("sam", 11, 8), ("sam2", 10, 7)])
def test_a_cuda_training_step_never_waits_for_the_device(tmp_path, prompting, iterations, clicks):
    corpus = tmp_path / "corpus"
    write_synthetic_corpus(corpus, num_images=16, size=128, images_per_shard=2, min_objects=3, max_objects=8, progress=False)
    overrides = [*tiny_training_overrides(corpus), f"prompting={prompting}", f"prompting.num_iterations={iterations}"]
    overrides += [f"prompting.num_correction_clicks={clicks}", "model.drop_path=0.2", f"run_dir={tmp_path / 'run'}"]
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("train", overrides=overrides)
    sam = build_model(cfg.model)
    module = build_training_module(cfg, sam)
    callback = SyncsAreErrors()
    trainer = L.Trainer(
        accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=2, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
        default_root_dir=str(tmp_path),
    )  # fmt: skip
    try:
        trainer.fit(module, datamodule=build_datamodule(cfg, sam))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert callback.steps == 2
