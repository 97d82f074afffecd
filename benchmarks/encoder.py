"""Image encoder latency for one 1024x1024 image, vit_b-shaped SAM with random weights, 2 threads, fp32.

Prints our forward time next to the official algorithm (benchmarks/official_style.py) run in the same
process on the same weights, the ratio, and the largest difference between the two embeddings.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import official_style  # noqa: E402
from timing import median_seconds  # noqa: E402

from segany_train.inference.cpu_allocator import retain_freed_memory  # noqa: E402
from segany_train.model import sam_model_registry  # noqa: E402

TARGET_S = 12.0  # from the issue; the official package measured 24 s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="vit_b")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    retain_freed_memory()  # what SamPredictor does on CPU
    torch.manual_seed(0)
    sam = sam_model_registry[args.model]().eval()
    with torch.no_grad():  # random relative-position tables, so the bias is not zero
        for block in sam.image_encoder.blocks:
            block.attn.rel_pos_h.normal_(std=0.02)
            block.attn.rel_pos_w.normal_(std=0.02)
    image = torch.randn(1, 3, 1024, 1024)
    with torch.inference_mode():
        ours_s = median_seconds(lambda: sam.image_encoder(image), args.repeats)
        base_s = median_seconds(lambda: official_style.encode(sam, image), 1, warmup=0)
        diff = (sam.image_encoder(image) - official_style.encode(sam, image)).abs().max().item()
    verdict = "ok" if ours_s <= TARGET_S else "MISSED"
    print(f"{args.model} image encoder, 1x3x1024x1024, {args.threads} threads, fp32, median of {args.repeats}")
    print(f"ours {ours_s:.2f} s (target {TARGET_S:.0f} s, {verdict}) | baseline {base_s:.2f} s | speed-up {base_s / ours_s:.2f}x | max |diff| {diff:.1e}")


if __name__ == "__main__":
    main()
