"""One training step's time and memory: the encoder once, the decoder once per rollout iteration.

For the tiny CPU config and for a vit_b-shaped model at 1024 px with 64 masks and 11 iterations,
prints seconds per step, peak resident memory, and the decoder iterations' time as a ratio of the
encoder's forward + backward (the same step, the same process). Target there: ratio < 1, peak
memory <= 10 GiB. Random weights and random square masks: the cost does not depend on the content.
"""

import argparse
import resource
import time

import torch

from segany_train.inference.cpu_allocator import retain_freed_memory
from segany_train.model import build_sam_by_name
from segany_train.prompting.rollout import RolloutConfig, run_rollout
from segany_train.training.losses import LossWeights, grouped_sam_loss


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def one_step(name: str, images: int, masks: int, iterations: int, clicks: int, checkpointing: bool) -> None:
    torch.manual_seed(0)
    sam = build_sam_by_name(name).train()
    sam.image_encoder.activation_checkpointing = checkpointing
    side, low = sam.image_encoder.img_size, sam.prompt_encoder.mask_input_size[0]
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

    start = time.perf_counter()
    embeddings = sam.image_encoder(sam.normalize_padded(batch_images, input_size))
    encoder_forward = time.perf_counter() - start
    leaf = embeddings.detach().requires_grad_()

    def on_iteration(out):
        grouped_sam_loss(out.groups, gt, LossWeights()).total.div(gt.shape[0]).backward()

    start = time.perf_counter()
    run_rollout(sam, leaf, gt, image_index, cfg, on_iteration, gen)
    decoder = time.perf_counter() - start
    start = time.perf_counter()
    embeddings.backward(leaf.grad)
    encoder_backward = time.perf_counter() - start
    encoder = encoder_forward + encoder_backward
    total = encoder + decoder
    print(
        f"{name}: {images} image(s) x {masks} masks x {iterations} iterations, activation checkpointing "
        f"{'on' if checkpointing else 'off'}\n"
        f"  step {total:.2f} s = encoder fwd {encoder_forward:.2f} s + bwd {encoder_backward:.2f} s "
        f"+ decoder iterations {decoder:.2f} s ({decoder / iterations:.2f} s each)\n"
        f"  decoder iterations / encoder fwd+bwd = {decoder / encoder:.2f} (target < 1); "
        f"peak RSS {peak_rss_gib():.2f} GiB (before the step {before:.2f} GiB; target <= 10)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-vit-b", action="store_true")
    parser.add_argument("--checkpointing", action="store_true", help="encoder activation checkpointing for vit_b")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    retain_freed_memory()
    one_step("vit_t_256_small_decoder", images=2, masks=16, iterations=6, clicks=4, checkpointing=False)
    if not args.skip_vit_b:
        one_step("vit_b", images=1, masks=64, iterations=11, clicks=8, checkpointing=args.checkpointing)


if __name__ == "__main__":
    main()
