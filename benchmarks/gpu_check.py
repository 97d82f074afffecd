"""The GPU check: what only CUDA shows about training, in one short run that prints one table.

    python benchmarks/gpu_check.py          # a machine with CUDA: under 8 minutes on one GPU
    python benchmarks/gpu_check.py --cpu    # the reduced form on CPU (tests/test_gpu_check.py runs it)

Rows: 2-process DDP for 3 steps (parameters equal on both ranks, drop path drawn apart per rank; on
CPU processes with gloo unless 2 GPUs are visible: one GPU cannot hold two NCCL ranks); no host sync
in a training step (`torch.cuda.set_sync_debug_mode("error")`; on CPU, the syncing operations
counted); fp16 (16-mixed) gradients against fp32's; a killed run resumed against an uninterrupted
one (optimizer step count, lr, weights); SDPA on the flash or memory-efficient kernels, not the math
fallback (CUDA only); and one training step of vit_b at 1024 px with 64 masks and 11 iterations (bf16):
time and peak memory, with and without activation checkpointing and with `data.mask_size=1024`.
The reduced form runs the same checks on a tiny model with fewer masks.

Not yet run on a GPU: none was lent to the session that wrote it.
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import torch
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils._python_dispatch import TorchDispatchMode

from segany_train.config_paths import CONFIG_DIR
from segany_train.data.synthetic import write_synthetic_corpus
from segany_train.model import build_sam_by_name
from segany_train.model.image_encoder import ImageEncoderViT
from segany_train.model.vit_block import ViTBlock
from segany_train.prompting.rollout import RolloutConfig, run_rollout
from segany_train.training.losses import LossWeights, grouped_sam_loss
from segany_train.training.module import SamTrainingModule
from segany_train.training.run import _dataclass_from, build_datamodule, build_model, optim_config, train

Row = tuple[str, str, str]  # check, result (ok, FAIL or skip), figures


def _overrides(corpus: Path, run_dir: Path, *, gpu: bool, steps: int) -> list[str]:
    """The tiny synthetic recipe, shrunk: SAM's 11-iteration rollout, 8 masks per image."""
    return [
        "experiment=tiny_synthetic_cpu", f"data.synthetic.directory={corpus}", "data.synthetic.num_images=16",
        "data.synthetic.size=128", "data.synthetic.images_per_shard=2", "data.num_workers=0", "data.max_masks=8",
        "prompting.num_iterations=11", "prompting.num_correction_clicks=8", "model.drop_path=0.4",
        "trainer.limit_val_batches=0", f"trainer.max_steps={steps}", "callbacks.checkpoint_every_n_steps=2",
        "callbacks.progress_bar=false", "logger.log_images_every_n_steps=0", f"run_dir={run_dir}",
        *(["trainer=gpu", "trainer.devices=1"] if gpu else []),
    ]  # fmt: skip


def _compose(overrides: list[str]):
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        return compose("train", overrides=overrides)


def _module(cfg) -> tuple[SamTrainingModule, L.LightningDataModule]:
    L.seed_everything(0)
    sam = build_model(cfg.model)
    rollout, loss = _dataclass_from(RolloutConfig, cfg.prompting), _dataclass_from(LossWeights, cfg.loss)
    return SamTrainingModule(sam, optim=optim_config(cfg), rollout=rollout, loss=loss, seed=cfg.seed), build_datamodule(cfg, sam)


def _trainer(gpu: bool, callbacks: list, plugins: list | None = None, precision: str | None = None) -> L.Trainer:
    """A one-step Trainer; an explicit precision plugin replaces the precision flag."""
    return L.Trainer(
        accelerator="gpu" if gpu else "cpu", devices=1, max_steps=1, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        plugins=plugins, precision=None if plugins else precision or ("bf16-mixed" if gpu else "32-true"),
    )  # fmt: skip


def _ddp_rank(rank: int, corpus: str, run_dir: str, out: str, port: int, gpus: int) -> None:
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    scales: list[list[float]] = []  # per dropping block and step: the drop path factors drawn
    weights: list[float] = []  # per step: the encoder's weights summed, as that step starts

    def record(module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, ViTBlock) and module.training and module.drop_path > 0 and len(args) > 1:
            scales.append(args[1].flatten().tolist())
        elif isinstance(module, ImageEncoderViT) and module.training:
            weights.append(float(sum(p.detach().double().sum() for p in module.parameters())))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    trainer = ["trainer=ddp", "trainer.devices=2", "trainer.num_nodes=1"] if gpus >= 2 else ["trainer=ddp_cpu"]
    cfg = _compose(_overrides(Path(corpus), Path(run_dir), gpu=False, steps=3) + trainer)
    try:
        train(cfg)
    finally:
        handle.remove()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"scales": scales, "weights": weights}))


def check_ddp(corpus: Path, work: Path) -> Row:
    """2-process DDP, 3 steps: the same weights on both ranks at every step, drop path drawn apart."""
    gpus = torch.cuda.device_count()
    out = work / "ddp_out"
    out.mkdir()
    mp.spawn(_ddp_rank, args=(str(corpus), str(work / "ddp"), str(out), 29700 + os.getpid() % 500, gpus), nprocs=2, join=True)
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    apart = r0["scales"] != r1["scales"] and len(r0["scales"]) == len(r1["scales"]) > 0
    same = len(r0["weights"]) == 3 and r0["weights"] == r1["weights"]
    where = "2 GPUs, NCCL" if gpus >= 2 else "2 CPU processes, gloo"
    figures = f"{where}; weights equal on both ranks at each step: {same}; drop path drawn apart: {apart}"
    return "DDP 3 steps, drop path per rank", "ok" if apart and same else "FAIL", figures


class _SyncCounter(TorchDispatchMode):
    SYNCING = {torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero, torch.ops.aten._unique2, torch.ops.aten.masked_select}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket in self.SYNCING
        return func(*args, **(kwargs or {}))


class _StepWindow(L.Callback):
    """From the batch's start to the optimiser step: the sync debug mode on CUDA, a sync count on CPU."""

    def __init__(self, gpu: bool) -> None:
        self.gpu, self.counter, self.syncs = gpu, _SyncCounter(), None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self.gpu:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        else:
            self.counter.__enter__()

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        if self.gpu:
            torch.cuda.set_sync_debug_mode("default")
            self.syncs = 0
        else:
            self.counter.__exit__(None, None, None)
            self.syncs = self.counter.count


def check_syncs(corpus: Path, work: Path, gpu: bool) -> Row:
    module, data = _module(_compose(_overrides(corpus, work / "syncs", gpu=gpu, steps=1)))
    window = _StepWindow(gpu)
    try:
        _trainer(gpu, [window]).fit(module, datamodule=data)
    except RuntimeError as error:  # the sync debug mode's error
        return "no host sync in a training step", "FAIL", str(error).splitlines()[0][:120]
    finally:
        if gpu:
            torch.cuda.set_sync_debug_mode("default")
    how = "set_sync_debug_mode('error')" if gpu else "syncing ops counted"
    return "no host sync in a training step", "ok" if window.syncs == 0 else "FAIL", f"{how}: {window.syncs}"


class _Grads(L.Callback):
    def __init__(self) -> None:
        self.norms: dict[str, float] = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        for part in ("image_encoder", "mask_decoder"):
            grads = [p.grad.float().flatten() for n, p in module.sam.named_parameters() if n.startswith(part) and p.grad is not None]
            self.norms[part] = float(torch.cat(grads).norm())


def check_fp16(corpus: Path, work: Path, gpu: bool) -> Row:
    norms = []
    for fp16 in (False, True):
        module, data = _module(_compose(_overrides(corpus, work / f"fp16_{fp16}", gpu=gpu, steps=1)))
        grads = _Grads()
        # Lightning's own 16-mixed plugin, with a scaler that starts at 256 (the default 65536 may skip
        # the one step on overflow); on CPU Lightning would turn the 16-mixed flag into bf16
        device = "cuda" if gpu else "cpu"
        plugins = [MixedPrecision("16-mixed", device, scaler=torch.amp.GradScaler(device, init_scale=256.0))] if fp16 else None
        _trainer(gpu, [grads], plugins=plugins, precision="32-true").fit(module, datamodule=data)
        norms.append(grads.norms)
    ratios = {part: norms[1][part] / norms[0][part] for part in norms[0]}
    ok = all(abs(r - 1) < 0.05 for r in ratios.values())
    return "16-mixed gradients vs fp32", "ok" if ok else "FAIL", ", ".join(f"{p} x{r:.3f}" for p, r in ratios.items())


def check_resume(corpus: Path, work: Path, gpu: bool) -> Row:
    """4 steps straight against 2 and a resume to 4 (a new Trainer from last.ckpt): the optimizer's
    step count and the lr must agree; the weights differ by design (a resumed run reads new samples)."""
    results = []
    for name, stops in (("straight", (4,)), ("resumed", (2, 4))):
        for steps in stops:
            train(_compose(_overrides(corpus, work / name, gpu=gpu, steps=steps)))
        results.append(torch.load(work / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True))
    a, b = results
    steps = [r["optimizer_states"][0]["state"][0]["step"] for r in results]
    lrs = [r["lr_schedulers"][0]["_last_lr"] for r in results]
    diff = max(float((a["state_dict"][k].float() - b["state_dict"][k].float()).abs().max()) for k in a["state_dict"])
    ok = bool(steps[0] == steps[1]) and lrs[0] == lrs[1]
    return "stop and resume vs uninterrupted", "ok" if ok else "FAIL", f"AdamW step {float(steps[1]):g}, lr equal {lrs[0] == lrs[1]}, max weight diff {diff:.2e}"


def check_sdpa(gpu: bool) -> Row:
    if not gpu:
        return "SDPA off the math backend", "skip", "CUDA only"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sam = build_sam_by_name("vit_b").cuda().eval()
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            embeddings = sam.image_encoder(torch.randn(1, 3, 1024, 1024, device="cuda"))
            sam.decode(embeddings, image_index=None, point_coords=torch.rand(8, 2, 2, device="cuda") * 1024,
                       point_labels=torch.ones(8, 2, dtype=torch.long, device="cuda"), multimask_output=True)  # fmt: skip
    except RuntimeError as error:
        return "SDPA off the math backend", "FAIL", str(error).splitlines()[0][:120]
    return "SDPA off the math backend", "ok", "encoder and decoder ran with flash/efficient kernels only"


def step_cost(name: str, *, gpu: bool, masks: int, iterations: int, checkpointing: bool, mask_size: int | None) -> Row:
    """One training step (encoder, rollout with its loss, backward) of a registry model, bf16 on CUDA."""
    device = torch.device("cuda" if gpu else "cpu")
    torch.manual_seed(0)
    sam = build_sam_by_name(name).to(device).train()
    sam.image_encoder.activation_checkpointing = checkpointing
    side = sam.image_encoder.img_size
    size = mask_size or sam.prompt_encoder.mask_input_size[0]
    gt = torch.zeros(masks, size, size, dtype=torch.bool, device=device)
    for i in range(masks):  # squares of varied sizes and places
        s, y, x = size // 16 + (i * 7) % (size // 3), (i * 13) % (size // 2), (i * 29) % (size // 2)
        gt[i, y : y + s, x : x + s] = True
    images = torch.randint(0, 255, (1, 3, side, side), dtype=torch.uint8, device=device)
    input_size = torch.tensor([[side, side]], device=device)
    cfg = RolloutConfig(num_iterations=iterations, num_correction_clicks=iterations - 3)
    image_index = torch.zeros(masks, dtype=torch.long, device=device)

    def step() -> None:
        sam.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16) if gpu else nullcontext():
            embeddings = sam.image_encoder(sam.normalize_padded(images, input_size))
            leaf = embeddings.detach().requires_grad_()
            run_rollout(sam, leaf, gt, image_index, cfg,
                        lambda out: grouped_sam_loss(out.groups, gt, LossWeights()).total.div(masks).backward(),
                        torch.Generator(device=device).manual_seed(0), host_image_index=torch.zeros(masks, dtype=torch.long).numpy())  # fmt: skip
            embeddings.backward(leaf.grad)

    if gpu:
        step()  # warm-up: kernels chosen, allocator grown
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step()
    if gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    label = f"{name} step, {masks} masks x {iterations} its, checkpointing {'on' if checkpointing else 'off'}, supervision {size}px"
    return label, "ok", f"{seconds:.2f} s, peak {'GPU' if gpu else 'RSS'} {peak:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="the reduced form on CPU (tiny model, 16 masks)")
    args = parser.parse_args()
    gpu = not args.cpu
    if gpu and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device; --cpu runs the reduced form")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        corpus = work / "corpus"
        write_synthetic_corpus(corpus, num_images=16, size=128, images_per_shard=2, min_objects=3, max_objects=8, progress=False)
        for check in (
            lambda: check_ddp(corpus, work),
            lambda: check_syncs(corpus, work, gpu),
            lambda: check_fp16(corpus, work, gpu),
            lambda: check_resume(corpus, work, gpu),
            lambda: check_sdpa(gpu),
        ):
            rows.append(check())
    if gpu:
        for checkpointing, mask_size in ((False, None), (True, None), (True, 1024), (False, 1024)):
            try:
                rows.append(step_cost("vit_b", gpu=True, masks=64, iterations=11, checkpointing=checkpointing, mask_size=mask_size))
            except torch.OutOfMemoryError:
                rows.append((f"vit_b step, checkpointing {checkpointing}, supervision {mask_size}", "FAIL", "out of memory"))
                torch.cuda.empty_cache()
    else:
        for checkpointing in (False, True):
            rows.append(step_cost("vit_t_256_small_decoder", gpu=False, masks=16, iterations=4, checkpointing=checkpointing, mask_size=None))
    width = max(len(r[0]) for r in rows)
    print(f"| {'check'.ljust(width)} | result | figures |")
    print(f"|{'-' * (width + 2)}|--------|---------|")
    for name, result, figures in rows:
        print(f"| {name.ljust(width)} | {result.ljust(6)} | {figures} |")
    if any(r[1] == "FAIL" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
