"""One training step's time and memory: the encoder once, the decoder once per rollout iteration.

For the tiny CPU config and for a vit_b-shaped model at 1024 px with 64 masks and 11 iterations,
prints seconds per step (the tiny config's: the median of 5), peak resident memory, and the decoder iterations' time as a ratio of the
encoder's forward + backward (the same step, the same process). Target there: ratio < 1, peak
memory <= 10 GiB. Random weights and random square masks: the cost does not depend on the content.

Before/after a change: run this file of each git ref against that ref's package (the script's API is
the ref's own), e.g. `git worktree add /tmp/before <ref>` and
`PYTHONPATH=/tmp/before python /tmp/before/benchmarks/train_step.py`, then the same here.
`--mask-size 1024` supervises at the input resolution (the GT masks and the loss at 1024x1024).

`--precision fp32 bf16` runs the step in each (bf16: under bfloat16 autocast, what Lightning's
`bf16-mixed` does) and prints images and masks per second and the fraction of the arithmetic floor:
the step's FLOPs (counted by `torch.utils.flop_counter` over the same step) over this machine's
matrix-product rate in that precision (`roofline.gemm_throughput`, measured in the same run).
"""

import argparse
import contextlib
import resource
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline import gemm_throughput  # noqa: E402

from segany_train.inference.cpu_allocator import retain_freed_memory
from segany_train.model import build_sam_by_name
from segany_train.prompting.rollout import RolloutConfig, run_rollout
from segany_train.training.losses import LossWeights, grouped_sam_loss


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def one_step(
    name: str,
    images: int,
    masks: int,
    iterations: int,
    clicks: int,
    checkpointing: bool,
    mask_size: int | None = None,
    decoder_only: bool = False,
    precision: str = "fp32",
    floor_gflops: dict[str, float] | None = None,
    repeats: int = 1,
) -> None:
    torch.manual_seed(0)
    sam = build_sam_by_name(name).train()
    sam.image_encoder.activation_checkpointing = checkpointing
    side, low = sam.image_encoder.img_size, mask_size or sam.prompt_encoder.mask_input_size[0]
    batch_images = torch.randint(0, 255, (images, 3, side, side), dtype=torch.uint8)
    input_size = torch.tensor([[side, side]] * images)
    gt = torch.zeros(images * masks, low, low, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    for i in range(gt.shape[0]):  # squares of varied sizes and places
        s = int(torch.randint(low // 16, low // 2, (1,), generator=gen))
        y, x = (int(v) for v in torch.randint(0, low - s, (2,), generator=gen))
        gt[i, y : y + s, x : x + s] = True
    image_index = torch.arange(images).repeat_interleave(masks)
    cfg = RolloutConfig(num_iterations=iterations, num_correction_clicks=clicks)
    before = peak_rss_gib()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    counter = FlopCounterMode(display=False) if floor_gflops else contextlib.nullcontext()
    with autocast:  # the median step of `repeats` (by total time)
        steps = sorted((_step(sam, batch_images, input_size, gt, image_index, cfg, gen, decoder_only) for _ in range(repeats)), key=sum)
    encoder_forward, decoder, encoder_backward = steps[len(steps) // 2]
    if floor_gflops:  # the same step again, counted (the counter slows it: not timed)
        torch.manual_seed(0)
        gen.manual_seed(0)
        with autocast, counter:
            _step(sam, batch_images, input_size, gt, image_index, cfg, gen, decoder_only)
    encoder = encoder_forward + encoder_backward
    total = encoder + decoder
    print(
        f"{name}, {precision}: {images} image(s) x {masks} masks x {iterations} iterations, activation checkpointing "
        f"{'on' if checkpointing else 'off'}, supervision {low}x{low}{', decoder only' if decoder_only else ''}\n"
        f"  step {total:.2f} s = encoder fwd {encoder_forward:.2f} s + bwd {encoder_backward:.2f} s "
        f"+ decoder iterations {decoder:.2f} s ({decoder / iterations:.2f} s each)\n"
        + ("  " if decoder_only else f"  decoder iterations / encoder fwd+bwd = {decoder / encoder:.2f} (target < 1); ")
        + f"peak RSS {peak_rss_gib():.2f} GiB (before the step {before:.2f} GiB; target <= 10)\n"
        + f"  {images / total:.3f} images/s, {images * masks / total:.2f} masks/s"
        + (
            f"; {counter.get_total_flops() / 1e9:.1f} GFLOP, floor {counter.get_total_flops() / 1e9 / floor_gflops[precision]:.2f} s"
            f" = {counter.get_total_flops() / 1e9 / floor_gflops[precision] / total:.2f} of the step"
            if floor_gflops
            else ""
        ),
        flush=True,
    )


def _step(sam, batch_images, input_size, gt, image_index, cfg, gen, decoder_only) -> tuple[float, float, float]:
    """One training step (encoder forward, the rollout with a backward per iteration, the encoder's
    backward); its three parts' seconds."""
    start = time.perf_counter()
    if decoder_only:  # random embeddings, no encoder graph: the rollout's own time and memory
        embeddings = torch.randn(len(batch_images), sam.prompt_encoder.embed_dim, *sam.prompt_encoder.image_embedding_size)
    else:
        embeddings = sam.image_encoder(sam.normalize_padded(batch_images, input_size))
    encoder_forward = time.perf_counter() - start
    leaf = embeddings.detach().requires_grad_()

    def on_iteration(out):
        grouped_sam_loss(out.groups, gt, LossWeights()).total.div(gt.shape[0]).backward()

    start = time.perf_counter()
    run_rollout(sam, leaf, gt, image_index, cfg, on_iteration, gen, host_image_index=image_index.numpy())
    decoder = time.perf_counter() - start
    start = time.perf_counter()
    if not decoder_only:
        embeddings.backward(leaf.grad)
    return encoder_forward, decoder, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-vit-b", action="store_true")
    parser.add_argument("--checkpointing", action="store_true", help="encoder activation checkpointing for vit_b")
    parser.add_argument("--mask-size", type=int, default=None, help="vit_b's supervision side (default: the decoder's 256)")
    parser.add_argument("--decoder-only", action="store_true", help="vit_b's rollout alone, on random embeddings")
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32"], help="one step in each")
    parser.add_argument("--floor", action="store_true", help="count the step's FLOPs (runs it once more) for its floor")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    retain_freed_memory()
    floor = None
    if args.floor:
        floor = {p: gemm_throughput(torch.float32 if p == "fp32" else torch.bfloat16, 5) for p in args.precision}
        print("matrix products at vit_b's shapes: " + ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in floor.items()))
    for precision in args.precision:
        one_step("vit_t_256_small_decoder", images=2, masks=16, iterations=6, clicks=4, checkpointing=False,
                 precision=precision, floor_gflops=floor, repeats=5)  # fmt: skip
    if not args.skip_vit_b:
        for precision in args.precision:
            one_step("vit_b", images=1, masks=64, iterations=11, clicks=8, checkpointing=args.checkpointing, mask_size=args.mask_size,
                     decoder_only=args.decoder_only, precision=precision, floor_gflops=floor)  # fmt: skip


if __name__ == "__main__":
    main()
