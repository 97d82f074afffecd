"""Prompt encoder + mask decoder latency, vit_b-shaped SAM with random weights, 2 threads, fp32.

For 1 and 64 single-point prompts on one 1x256x64x64 image embedding, in one process on the same
weights, the calls alternating round by round (the CPU may be shared):
- `fresh`: one decoder call that does everything, the image-side work included;
- `image set`: the call `SamPredictor` makes, whose image-side work (`prepare_shared_keys`) was done
  by `set_image`;
- `reference`: the official algorithm (the decoder's reference path, `MaskDecoder.predict_masks`);
each as the median time per prompt (min-max over the rounds), its multiple of the arithmetic floor
(the FLOPs `torch.utils.flop_counter` counts over that very call, at this machine's fp32 matrix-product
throughput measured in the same run, as `roofline.py` does), the speed-up over the reference, and the
largest difference between the fast and reference outputs.

    python benchmarks/decoder.py [--threads 2] [--repeats 7]
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline import counted_flops, gemm_throughput  # noqa: E402
from timing import interleaved_seconds  # noqa: E402

from segany_train.inference.cpu_allocator import retain_freed_memory  # noqa: E402
from segany_train.model import sam_model_registry  # noqa: E402

# from issue 23: one prompt within 20 ms once the image is set; 64 prompts within 2x the floor each
TARGET_MS_ONE_PROMPT = 20.0
TARGET_FLOOR_MULTIPLE = 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    retain_freed_memory()  # what SamPredictor does on CPU
    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]().eval()
    pe, dec = sam.prompt_encoder, sam.mask_decoder
    embedding = torch.randn(1, 256, 64, 64)
    gflops = gemm_throughput(torch.float32, 5)
    print(
        f"vit_b decoder, {args.threads} threads, fp32, multimask output; fp32 matrix products at "
        f"{gflops:.0f} GFLOP/s; ms per prompt, median (min-max) of {args.repeats} alternating rounds"
    )
    print(
        f"{'prompts':>7} | {'fresh':>18} | {'x floor':>7} | {'image set':>18} | {'x floor':>7} | "
        f"{'reference':>18} | {'speed-up':>8} | max |diff| | target"
    )
    for n in (1, 64):
        coords = torch.rand(n, 1, 2) * 1024
        labels = torch.ones(n, 1, dtype=torch.int)

        def decode(shared=None):
            sparse, dense = pe((coords, labels), None, None)
            return dec(embedding, pe.get_dense_pe(), sparse, dense, True, shared_keys=shared)

        def reference():
            sparse, dense = pe((coords, labels), None, None)
            with dec.reference_path():
                return dec(embedding, pe.get_dense_pe(), sparse, dense, True)

        with torch.inference_mode():
            shared = dec.prepare_shared_keys(embedding, pe.get_dense_pe(), pe.no_mask_dense(1)[:, :, :1, :1])
            fns = [decode, lambda: decode(shared), reference]
            floors = [counted_flops(fn) / n / (gflops * 1e9) for fn in fns[:2]]
            repeats = args.repeats if n == 1 else max(2, args.repeats // 3)
            times = [[t / n for t in spent] for spent in interleaved_seconds(fns, repeats, warmup=2)]
            (m1, i1), (m2, i2) = decode(), reference()
            diff = max((m1 - m2).abs().max().item(), (i1 - i2).abs().max().item())
        medians = [statistics.median(spent) for spent in times]
        cells = [f"{1000 * m:6.1f} ({1000 * min(s):5.1f}-{1000 * max(s):5.1f})" for m, s in zip(medians, times)]
        multiples = [medians[0] / floors[0], medians[1] / floors[1]]
        if n == 1:
            verdict = "ok" if 1000 * medians[1] <= TARGET_MS_ONE_PROMPT else "MISSED"
            target = f"image set <= {TARGET_MS_ONE_PROMPT:.0f} ms: {verdict}"
        else:
            verdict = "ok" if multiples[1] <= TARGET_FLOOR_MULTIPLE else "MISSED"
            target = f"image set <= {TARGET_FLOOR_MULTIPLE:.0f}x floor: {verdict}"
        print(
            f"{n:>7} | {cells[0]:>18} | {multiples[0]:>6.2f}x | {cells[1]:>18} | {multiples[1]:>6.2f}x | "
            f"{cells[2]:>18} | {medians[2] / medians[0]:>7.1f}x | {diff:.1e}    | {target}",
            flush=True,
        )


if __name__ == "__main__":
    main()
