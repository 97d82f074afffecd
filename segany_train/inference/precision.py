"""Inference precision: `fp32` (the default) or `bf16`.

`bf16` runs the model under `torch.autocast` with bfloat16: matrix products, convolutions and
attention in bfloat16 (AVX512-BF16/AMX on recent x86 CPUs, tensor cores on GPUs), normalisations and
softmax statistics in float32, as autocast chooses per operation. The weights stay float32, so one
model serves both precisions. What comes out of a predictor (logits, IoU predictions, embeddings)
is float32 either way; docs/speed-and-memory.md has the measured quality of bf16 masks.
"""

import contextlib

import torch

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    """`precision` itself, or ValueError in one line naming the choices."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def inference_autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The context to run a forward in: bfloat16 autocast for `bf16`, nothing for `fp32`."""
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
