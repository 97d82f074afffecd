"""How close inference runs to this machine's arithmetic floor, fp32 and bf16, vit_b at 1024 px.

In one run: this machine's matrix-product throughput (GFLOP/s) at the image encoder's own shapes, in
fp32 and in bf16; the FLOPs of the encoder and of the prompt encoder + mask decoder (1 and 64 prompts,
after the image-side work a predictor caches), counted by `torch.utils.flop_counter` over the real
forward; each part's measured time; and its floor (FLOPs / throughput) as a fraction of that time.
The floor counts matrix products only: layer norms, softmax, GELU and copies are what the rest is.

    python benchmarks/roofline.py [--threads 2] [--repeats 3]
"""

import argparse
import sys
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_seconds  # noqa: E402

from segany_train.inference.cpu_allocator import retain_freed_memory  # noqa: E402
from segany_train.inference.precision import inference_autocast  # noqa: E402
from segany_train.model import sam_model_registry  # noqa: E402

CPU = torch.device("cpu")
# (tokens, in, out) of vit_b's linear layers at 64x64 tokens: qkv, attention proj, MLP up, MLP down
ENCODER_GEMMS = ((4096, 768, 2304), (4096, 768, 768), (4096, 768, 3072), (4096, 3072, 768))


def gemm_throughput(dtype: torch.dtype, repeats: int) -> float:
    """GFLOP/s of `F.linear` over the encoder's shapes (FLOP-weighted: total FLOPs / total time)."""
    flops = seconds = 0.0
    for tokens, fan_in, fan_out in ENCODER_GEMMS:
        x, w = torch.randn(tokens, fan_in, dtype=dtype), torch.randn(fan_out, fan_in, dtype=dtype)
        seconds += median_seconds(lambda: F.linear(x, w), repeats)
        flops += 2 * tokens * fan_in * fan_out
    return flops / seconds / 1e9


def _baddbmm_flops(input_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """The batched product's FLOPs (the addition is not counted, as for aten.baddbmm): a BxMxK, b BxKxN."""
    batch, m, k = a_shape
    return 2 * batch * m * k * b_shape[-1]


def _linear_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """A linear layer's FLOPs: x ...xI, weight OxI."""
    rows = 1
    for size in x_shape[:-1]:
        rows *= size
    return 2 * rows * weight_shape[0] * weight_shape[1]


# ops the decoder's fast path calls that the counter's registry leaves out (they would count as 0):
# the in-place accumulation of the image->token update and oneDNN's matmul with a fused GELU
UNREGISTERED_FLOPS = {
    torch.ops.aten.baddbmm_: _baddbmm_flops,
    torch.ops.mkldnn._linear_pointwise: _linear_flops,
}


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False, custom_mapping=UNREGISTERED_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    retain_freed_memory()
    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]().eval()
    pe, dec = sam.prompt_encoder, sam.mask_decoder
    image = torch.randn(1, 3, 1024, 1024)
    embedding = torch.randn(1, 256, 64, 64)
    throughput = {name: gemm_throughput(dtype, 5) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print(f"vit_b, {args.threads} threads, median of {args.repeats}; matrix products at the encoder's shapes: "
          f"fp32 {throughput['fp32']:.0f} GFLOP/s, bf16 {throughput['bf16']:.0f} GFLOP/s "
          f"({throughput['bf16'] / throughput['fp32']:.1f}x)")  # fmt: skip
    print(f"{'part':>22} | {'precision':>9} | {'GFLOP':>7} | {'measured':>10} | {'floor':>9} | fraction of floor")
    rows = []
    with torch.inference_mode():
        rows.append(("encoder", lambda: sam.image_encoder(image), 1))
        for n in (1, 64):
            coords, labels = torch.rand(n, 1, 2) * 1024, torch.ones(n, 1, dtype=torch.int)
            shared = dec.prepare_shared_keys(embedding, pe.get_dense_pe(), pe.no_mask_dense(1)[:, :, :1, :1])

            def decode(coords=coords, labels=labels, shared=shared):
                sparse, dense = pe((coords, labels), None, None)
                return dec(embedding, pe.get_dense_pe(), sparse, dense, True, shared_keys=shared)

            rows.append((f"decoder, {n} prompt{'s' if n > 1 else ''}", decode, n))
        for name, fn, prompts in rows:
            gflop = counted_flops(fn) / 1e9
            for precision in ("fp32", "bf16"):
                with inference_autocast(CPU, precision):
                    seconds = median_seconds(fn, args.repeats)
                floor = gflop / throughput[precision]
                unit, scale = ("s", 1.0) if name == "encoder" else ("ms/prompt", 1000.0 / prompts)
                print(
                    f"{name:>22} | {precision:>9} | {gflop:>7.2f} | {seconds * scale:>6.1f} {unit} | "
                    f"{floor * scale:>5.1f} {unit} | {floor / seconds:.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
