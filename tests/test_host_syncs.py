"""Host syncs in a training step: operations that on CUDA make the host wait for the device (a value
read back: `.item()`, `bool(tensor)`, `int(tensor)`; an output whose size depends on the data:
`nonzero`, `unique`, `masked_select`, boolean indexing, `repeat_interleave` by a tensor), counted with
a dispatch mode over one real Lightning training step of the SAM recipe's 11-iteration rollout, from
the batch's start to the optimiser step (the encoder, every decoder iteration, every backward pass).

The same operations on a CPU tensor are no sync, but on this CPU-only machine every tensor is a CPU
tensor, so the count is of what would sync on CUDA. `tests/gpu/test_gpu_syncs.py` runs the step under
`torch.cuda.set_sync_debug_mode("error")`.
"""

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils._python_dispatch import TorchDispatchMode

from segany_train.config_paths import CONFIG_DIR
from segany_train.data.synthetic import write_synthetic_corpus
from segany_train.prompting.rollout import RolloutConfig
from segany_train.training.run import _dataclass_from, build_datamodule, build_model, build_training_module
from tests.conftest import tiny_training_overrides

aten = torch.ops.aten
SYNCING = {
    aten._local_scalar_dense, aten.nonzero, aten._unique2, aten.unique_dim, aten.unique_consecutive,
    aten.masked_select, aten.is_nonzero, aten.equal,
}  # fmt: skip
# none: what the host must know (prompt kinds, which prompts get 3 outputs, the masks of each image)
# it decides or is told itself (it was 52 per step with SAM's prompting, 45 with SAM 2's)
MAX_SYNCS_PER_STEP = 0


class SyncCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in SYNCING:
            self.calls.append(str(func))
        elif packet is aten.repeat_interleave and isinstance(args[0], torch.Tensor) and kwargs.get("output_size") is None:
            self.calls.append(str(func))
        elif packet is aten.index and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            self.calls.append(f"{func} (boolean mask)")
        return func(*args, **kwargs)


class CountSyncs(L.Callback):
    """Counts from the batch's start to the optimiser step (clipping and AdamW are torch's own)."""

    def __init__(self) -> None:
        self.steps: list[list[str]] = []
        self.mode: SyncCounter | None = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.mode = SyncCounter()
        self.mode.__enter__()

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        self.mode.__exit__(None, None, None)
        self.steps.append(self.mode.calls)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("synthetic")
    write_synthetic_corpus(directory, num_images=16, size=128, images_per_shard=2, min_objects=3, max_objects=8, progress=False)
    return directory


@pytest.mark.parametrize(("prompting", "iterations", "clicks"), [("sam", 11, 8), ("sam2", 10, 7)])
def test_a_training_step_reads_the_device_at_most_a_fixed_number_of_times(corpus, tmp_path, prompting, iterations, clicks):
    overrides = [*tiny_training_overrides(corpus), f"prompting={prompting}", f"prompting.num_iterations={iterations}"]
    overrides += [f"prompting.num_correction_clicks={clicks}", "model.drop_path=0.2", f"run_dir={tmp_path}"]
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("train", overrides=overrides)
    sam = build_model(cfg.model)
    rollout = _dataclass_from(RolloutConfig, cfg.prompting)
    assert rollout.num_iterations >= 10
    module = build_training_module(cfg, sam)
    counter = CountSyncs()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[counter], default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(module, datamodule=build_datamodule(cfg, sam))
    assert len(counter.steps) == 2
    for calls in counter.steps:
        assert len(calls) <= MAX_SYNCS_PER_STEP, f"{len(calls)} host syncs in one step: {sorted(set(calls))}"


def test_prompts_grouped_by_image_on_the_host_decode_as_grouped_on_the_device(tiny_sam):
    from segany_train.prompting.rollout import run_rollout

    gt = torch.zeros(7, 32, 32, dtype=torch.bool)
    for i in range(7):
        gt[i, 4 + i : 20 + i, 6 : 14 + 2 * i] = True
    embeddings = torch.randn(3, 32, 8, 8)
    image_index = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    runs = []
    for host_index in (None, image_index.numpy()):
        seen = []
        cfg = RolloutConfig(num_iterations=3, num_correction_clicks=2)
        run_rollout(tiny_sam, embeddings, gt, image_index, cfg, seen.append, torch.Generator().manual_seed(2), host_image_index=host_index)
        runs.append([out.expanded()[0] for out in seen])
    for device_grouped, host_grouped in zip(*runs):
        torch.testing.assert_close(host_grouped, device_grouped)


def test_a_training_step_lets_each_iterations_logits_go(corpus, tmp_path, monkeypatch):
    """Issue 25 item 13: the step keeps the first iteration's prompts for its overlay, not the
    iteration itself, so the first iteration's N x M x S x S logits are freed as the rollout goes on
    (it kept them alive for the whole rollout)."""
    import gc
    import weakref

    from segany_train.training import module as module_file

    alive_later: list[bool] = []

    def rollout_watching_the_first_logits(*args, **kwargs):
        sam, leaf, gt, image_index, cfg, on_iteration, *rest = args
        first: list[weakref.ref] = []

        def watched(out):
            on_iteration(out)
            if out.step == 0:
                first.extend(weakref.ref(g.logits) for g in out.groups)
            else:
                gc.collect()
                alive_later.append(any(ref() is not None for ref in first))

        return real_rollout(sam, leaf, gt, image_index, cfg, watched, *rest, **kwargs)

    real_rollout = module_file.run_rollout
    monkeypatch.setattr(module_file, "run_rollout", rollout_watching_the_first_logits)
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("train", overrides=[*tiny_training_overrides(corpus), "prompting.num_iterations=4", f"run_dir={tmp_path}"])
    sam = build_model(cfg.model)
    module = build_training_module(cfg, sam)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(module, datamodule=build_datamodule(cfg, sam))
    assert alive_later and not any(alive_later), f"the first iteration's logits alive at later iterations: {alive_later}"
