"""ONNX Runtime latency of the exported prompt decoder for one prompt, vit_b-shaped SAM, 2 threads.

One point plus the "not a point" pad (what the official web demo sends) on a random 1x256x64x64 image
embedding, masks upscaled to a 1024x1024 original image, random weights. Prints the median ONNX
Runtime latency (fp32 with all mask tokens, fp32 with `return_single_mask`, and the dynamically
int8-quantised model) next to our PyTorch `SamPredictor.predict_torch` for the same prompt (3
multimask outputs, logits) in the same process and at the same thread count, their ratio, and the
largest difference between the ONNX and PyTorch outputs.
"""

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from segany_train import SamPredictor
from segany_train.export.onnx_export import export_onnx, quantize_onnx
from segany_train.model import sam_model_registry

ORIGINAL_SIZE = (1024, 1024)


def interleaved_median_seconds(fns: list[Callable[[], object]], repeats: int, warmup: int = 2) -> list[float]:
    """Median wall time of each function, the calls alternating so that all of them see the same
    load (the CPU is shared with other work)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


def onnx_single_prompt_latency(
    model_type: str = "vit_b",
    threads: int = 2,
    *,
    repeats: int = 20,
    return_single_mask: bool = False,
    quantize: bool = False,
) -> dict[str, float | int | str]:
    """Median latencies in ms of one prompt: ONNX Runtime ('onnx_ms') and `SamPredictor.predict_torch`
    ('torch_ms', always all three ambiguity masks), 'ratio' = onnx_ms / torch_ms, and 'max_abs_diff'
    between the ONNX masks and the matching PyTorch ones (int8 models excluded: they differ by design).
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            sam = sam_model_registry[model_type]().eval()
            h, w = sam.prompt_encoder.image_embedding_size
            embedding = torch.randn(1, sam.prompt_encoder.embed_dim, h, w)
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(sam, Path(tmp) / "decoder.onnx", return_single_mask=return_single_mask)
            if quantize:
                path = quantize_onnx(path, Path(tmp) / "decoder_int8.onnx")
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            # Idle ONNX Runtime workers spin for a while after each run, taking the cores from the
            # PyTorch runs interleaved with them; an application running ONNX Runtime alone may gain
            # a little with spinning on.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inputs = {
            "image_embeddings": embedding.numpy(),
            "point_coords": np.array([[[500.0, 375.0], [0.0, 0.0]]], np.float32),
            "point_labels": np.array([[1.0, -1.0]], np.float32),
            "mask_input": np.zeros((1, 1, 4 * h, 4 * w), np.float32),
            "has_mask_input": np.zeros(1, np.float32),
            "orig_im_size": np.array(ORIGINAL_SIZE, np.float32),
        }
        predictor = SamPredictor(sam)
        # The image encoder is not what is timed (and takes seconds): the predictor is given the
        # embedding as if set_image had computed it for a 1024x1024 image.
        predictor.features = embedding
        predictor.original_size = predictor.input_size = ORIGINAL_SIZE
        predictor.is_image_set = True
        point, labels = torch.tensor([[[500.0, 375.0]]]), torch.tensor([[1]])

        def onnx_prompt():
            return session.run(["masks"], inputs)[0]

        def torch_prompt():
            return predictor.predict_torch(point, labels, multimask_output=True, return_logits=True)

        onnx_s, torch_s = interleaved_median_seconds([onnx_prompt, torch_prompt], repeats)
        masks, iou, _ = torch_prompt()
        # one point + pad: all tokens, or with return_single_mask the best-scored ambiguity mask
        want = masks[:, iou[0].argmax()][:, None] if return_single_mask else masks
        diff = np.abs(onnx_prompt()[:, -want.shape[1] :] - want.numpy()).max()
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "model_type": model_type,
        "threads": threads,
        "onnx_ms": 1000 * onnx_s,
        "torch_ms": 1000 * torch_s,
        "ratio": onnx_s / torch_s,
        "max_abs_diff": float("nan") if quantize else float(diff),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(
        f"{args.model} prompt decoder, 1 point + pad, {ORIGINAL_SIZE[0]}x{ORIGINAL_SIZE[1]} output, "
        f"{args.threads} threads, median of {args.repeats}"
    )
    print(f"{'ONNX model':<24} | {'ONNX ms':>7} | {'PyTorch ms':>10} | {'ONNX/PyTorch':>12} | max |diff|")
    variants = {
        "fp32, 4 masks": {},
        "fp32, return_single_mask": {"return_single_mask": True},
        "int8 dynamic, 4 masks": {"quantize": True},
    }
    for name, options in variants.items():
        r = onnx_single_prompt_latency(args.model, args.threads, repeats=args.repeats, **options)
        print(
            f"{name:<24} | {r['onnx_ms']:>7.1f} | {r['torch_ms']:>10.1f} | {r['ratio']:>11.2f}x | "
            f"{r['max_abs_diff']:.1e}"
        )


if __name__ == "__main__":
    main()
