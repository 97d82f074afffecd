"""The gradient all-reduce: 2-process DDP (real Lightning, real gloo) and one process on the same
global batch take the same 3 optimiser steps, parameters equal within float tolerance.

Prompts that do not depend on which rank draws them (noise-free boxes, center clicks, no refinement
iteration to place) make the two runs comparable. Box prompts never use the decoder's 3 ambiguity
outputs: those parameters get no gradient anywhere, and one process leaves them to AdamW untouched;
the all-reduce must too (it zero-filled them, and AdamW's weight decay then moved them).
"""

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp

from segany_train.data.pipeline import collate_sam_samples, sam_sample_pipeline
from segany_train.data.sam_sample import SamSampleConfig
from segany_train.data.synthetic import write_synthetic_corpus
from segany_train.model import build_sam
from segany_train.prompting.rollout import RolloutConfig
from segany_train.training.module import SamTrainingModule
from segany_train.training.optim import OptimConfig
from tests.conftest import TINY, randomized

STEPS = 3
ROLLOUT = RolloutConfig(num_iterations=3, num_correction_clicks=2, box_probability=1.0, box_noise_fraction=0.0, click_mode="center")


def _samples(corpus: str) -> list[dict]:
    cfg = SamSampleConfig(image_size=128, mask_size=32, max_masks=3)
    samples = list(sam_sample_pipeline([str(p) for p in sorted(Path(corpus).glob("*.tar"))], cfg, mode="once"))
    return samples[: 2 * STEPS]


def _fit(batches: list[dict], out: Path, **trainer_kwargs) -> None:
    torch.manual_seed(0)
    sam = randomized(build_sam(TINY), seed=3)
    module = SamTrainingModule(sam, optim=OptimConfig(lr=1e-3, warmup_steps=0, weight_decay=0.1), rollout=ROLLOUT)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=STEPS, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False, **trainer_kwargs,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    if trainer.global_rank == 0:
        torch.save({k: v.detach().clone() for k, v in module.sam.state_dict().items()}, out)


def _rank_main(rank: int, corpus: str, out: str, port: int) -> None:
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    samples = _samples(corpus)
    # rank r's step s: sample 2s + r; the single process's step s: both
    _fit([collate_sam_samples([{**samples[2 * s + rank]}]) for s in range(STEPS)], Path(out), strategy="ddp", devices=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("synthetic")
    write_synthetic_corpus(directory, num_images=8, size=128, images_per_shard=4, min_objects=3, max_objects=6, progress=False)
    return directory


def test_two_process_ddp_takes_the_single_process_steps(corpus, tmp_path):
    samples = _samples(str(corpus))
    assert len(samples) == 2 * STEPS
    _fit([collate_sam_samples(samples[2 * s : 2 * s + 2]) for s in range(STEPS)], tmp_path / "single.pt", devices=1)
    port = 29900 + os.getpid() % 500
    mp.spawn(_rank_main, args=(str(corpus), str(tmp_path / "ddp.pt"), port), nprocs=2, join=True)
    single, ddp = torch.load(tmp_path / "single.pt"), torch.load(tmp_path / "ddp.pt")
    untouched = [k for k in single if "output_hypernetworks_mlps.1." in k]
    assert untouched  # the ambiguity outputs' heads: no gradient with box prompts
    initial = randomized(build_sam(TINY), seed=3).state_dict()
    for key in untouched:
        torch.testing.assert_close(single[key], initial[key], rtol=0, atol=0)
    moved = {key: float((ddp[key] - single[key]).abs().max()) for key in single if not torch.equal(ddp[key], single[key])}
    worst = max(moved.items(), key=lambda item: item[1], default=("", 0.0))
    assert worst[1] < 1e-5, f"{len(moved)} tensors differ; the most: {worst[0]} by {worst[1]:.2e}"


def _buckets_rank(rank: int, init_file: str, out: str) -> None:
    from segany_train.training.gradient_all_reduce import GradientAllReduce

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        before = torch.nn.Linear(4, 4)  # gradients final before the pass below
        chain = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(6)))  # finished by the pass
        only_rank0, unused = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        x = torch.full((3, 4), float(rank + 1))
        before(x).square().sum().backward()
        hidden = chain(x)
        loss = hidden.square().sum() + (only_rank0(hidden).sum() if rank == 0 else 0)
        reduce = GradientAllReduce(2, bucket_bytes=64)  # a bucket per tensor or two: several in flight
        reduce.send(list(before.parameters()))
        sent_before = len(reduce.sent)
        # registration order: backward reaches them the other way round, so the chain's buckets go first
        with reduce.during_backward([*unused.parameters(), *only_rank0.parameters(), *chain.parameters()]):
            loss.backward()
            sent_in_backward = len(reduce.sent) - sent_before
        reduce.finish()
        modules = {"before": before, "chain": chain, "only_rank0": only_rank0, "unused": unused}
        grads = {f"{name}.{k}": (None if p.grad is None else p.grad.tolist()) for name, m in modules.items() for k, p in m.named_parameters()}
        Path(out, f"rank{rank}.json").write_text(json.dumps({"grads": grads, "sent_in_backward": sent_in_backward}))
    finally:
        torch.distributed.destroy_process_group()


def test_buckets_sent_from_the_backward_pass_average_the_ranks_gradients(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_buckets_rank, args=(str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    # buckets left the backward pass as it finished them (the chain's on both ranks)
    assert r0["sent_in_backward"] > 0 and r1["sent_in_backward"] > 0
    r0, r1 = r0["grads"], r1["grads"]
    assert r0 == r1  # every rank holds the average
    # what each rank computed alone, averaged: the reference
    local = []
    for rank in (0, 1):
        torch.manual_seed(0)
        before, chain = torch.nn.Linear(4, 4), torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(6)))
        only_rank0 = torch.nn.Linear(4, 4)
        x = torch.full((3, 4), float(rank + 1))
        before(x).square().sum().backward()
        hidden = chain(x)
        (hidden.square().sum() + (only_rank0(hidden).sum() if rank == 0 else 0)).backward()
        local.append({f"{n}.{k}": p.grad for n, m in (("before", before), ("chain", chain), ("only_rank0", only_rank0))
                      for k, p in m.named_parameters() if p.grad is not None})  # fmt: skip
    for name, grad in r0.items():
        if name.startswith("unused"):
            assert grad is None  # no rank had one: none, as in one process
        elif name.startswith("only_rank0"):
            torch.testing.assert_close(torch.tensor(grad), local[0][name] / 2)  # rank 1 counted as zeros
        else:
            torch.testing.assert_close(torch.tensor(grad), (local[0][name] + local[1][name]) / 2)
