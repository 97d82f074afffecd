"""Drop path (stochastic depth) in real training runs: every rank draws its own decisions, a resumed run
continues the draws of the run it resumes, and activation checkpointing recomputes with the same ones.

The decisions are read from the blocks' activations alone (global module hooks), not from how the
encoder draws them: a sample's attention branch was dropped where the block's second norm sees the
block's input unchanged, its MLP branch where the block's output equals that norm's input.
"""

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from segany_train.config_paths import CONFIG_DIR
from segany_train.data.synthetic import write_synthetic_corpus
from segany_train.model import SamConfig, build_sam
from segany_train.model.image_encoder import ImageEncoderViT
from segany_train.model.vit_block import ViTBlock
from segany_train.training.run import train
from tests.conftest import tiny_training_overrides

Draws = list[list[list[list[bool]]]]  # per training step, per dropping block, (attention, MLP), per sample


@contextmanager
def recorded_drops() -> Iterator[Draws]:
    """The drop decisions of every encoder forward pass in training mode, in call order."""
    draws: Draws = []
    norm2_inputs: dict[int, torch.Tensor] = {}  # id(block.norm2) -> its input (None: not recorded)
    block_inputs: dict[int, torch.Tensor] = {}

    def before(module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, ImageEncoderViT) and module.training:
            draws.append([])
        elif isinstance(module, ViTBlock) and module.training and module.drop_path > 0:
            block_inputs[id(module)] = args[0].detach().clone()
            norm2_inputs[id(module.norm2)] = None
        elif id(module) in norm2_inputs:
            norm2_inputs[id(module)] = args[0].detach().clone()

    def after(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if id(module) in block_inputs:
            x, mid = block_inputs.pop(id(module)), norm2_inputs.pop(id(module.norm2))
            attention_kept = (mid != x).flatten(1).any(1)
            mlp_kept = (output.detach() != mid).flatten(1).any(1)
            draws[-1].append([attention_kept.tolist(), mlp_kept.tolist()])

    handles = [register_module_forward_pre_hook(before), register_module_forward_hook(after)]
    try:
        yield draws
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("synthetic")
    write_synthetic_corpus(directory, num_images=16, size=128, images_per_shard=2, min_objects=3, max_objects=8, progress=False)
    return directory


def _overrides(corpus: Path, run_dir: Path, steps: int) -> list[str]:
    return [
        *tiny_training_overrides(corpus),
        "model.drop_path=0.5",
        "prompting.num_iterations=2",
        "prompting.num_correction_clicks=1",
        "trainer.limit_val_batches=0",
        f"trainer.max_steps={steps}",
        "callbacks.checkpoint_every_n_steps=2",
        "logger.log_images_every_n_steps=0",
        f"run_dir={run_dir}",
    ]


def _train(overrides: list[str]) -> Draws:
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("train", overrides=overrides)
    with recorded_drops() as draws:
        train(cfg)
    return draws


def _rank_main(rank: int, corpus: str, run_dir: str, out_dir: str, port: int) -> None:
    # launched as torchrun would launch it: Lightning then joins the process group instead of spawning
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    draws = _train(_overrides(Path(corpus), Path(run_dir), steps=3) + ["trainer=ddp_cpu"])
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(draws))


def test_two_ranks_draw_different_drop_path_decisions(corpus, tmp_path):
    out = tmp_path / "draws"
    out.mkdir()
    port = 29600 + os.getpid() % 1000
    mp.spawn(_rank_main, args=(str(corpus), str(tmp_path / "run"), str(out), port), nprocs=2, join=True)
    rank0, rank1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(rank0) == len(rank1) == 3  # one encoder pass per step
    for step in range(3):
        assert rank0[step] != rank1[step], f"step {step}: both ranks dropped the same branches"


def test_a_resumed_run_continues_the_drop_path_draws(corpus, tmp_path):
    straight = _train(_overrides(corpus, tmp_path / "straight", steps=4))
    _train(_overrides(corpus, tmp_path / "resumed", steps=2))
    resumed = _train(_overrides(corpus, tmp_path / "resumed", steps=4))  # ckpt_path=last: from step 2
    assert len(straight) == 4 and len(resumed) == 2
    assert resumed == straight[2:], "the resumed steps drew other decisions than the same steps of an uninterrupted run"
    assert resumed != straight[:2], "the resumed run replayed the first steps' decisions"
    assert straight[0] != straight[1]


def test_activation_checkpointing_recomputes_with_the_same_drop_path():
    config = SamConfig(
        image_size=64, encoder_embed_dim=32, encoder_depth=3, encoder_num_heads=2, encoder_window_size=3,
        encoder_global_attn_indexes=(1,), prompt_embed_dim=32, decoder_mlp_dim=64, decoder_num_heads=4,
        iou_head_hidden_dim=32, encoder_drop_path_rate=0.5,
    )  # fmt: skip
    torch.manual_seed(0)
    encoder = build_sam(config).image_encoder.train()
    image = torch.randn(4, 3, 64, 64)
    grads = []
    for checkpointing in (False, True):
        encoder.activation_checkpointing = checkpointing
        encoder.zero_grad()
        encoder(image, generator=torch.Generator().manual_seed(3)).square().sum().backward()
        grads.append([p.grad.clone() for p in encoder.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain)
    scales = encoder.drop_path_scales(4, generator=torch.Generator().manual_seed(3), device=image.device, dtype=image.dtype)
    assert scales.shape == (3, 2, 4) and (scales[0] == 1).all() and (scales[2] == 0).any()  # rate 0 in the first block
