"""Seconds to write one training checkpoint: the weights and AdamW's two moments, as Lightning's
ModelCheckpoint writes them (`torch.save` of the state dicts), for a model of the registry (vit_b by
default), and the same time projected to vit_h by size at the measured write rate.

This sizes SLURM's warning signal (`--signal=SIGUSR1@<s>` in slurm/train.sbatch): the job must finish
the step in flight and the save before the time limit. Prints one table: size, seconds to return from
`torch.save`, seconds until the bytes are on disk (fsync), and the vit_h projection of both.

    python benchmarks/checkpoint_save.py --dir /path/on/the/checkpoint/filesystem
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from segany_train.model import build_sam_by_name
from segany_train.training.optim import OptimConfig, build_optimizer


def checkpoint_bytes_of(name: str) -> int:
    """Weights plus AdamW's two moments, fp32, of a registry model (built on the meta device)."""
    with torch.device("meta"):
        sam = build_sam_by_name(name)
    return 3 * 4 * sum(p.numel() for p in sam.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_b")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    sam = build_sam_by_name(args.model)
    optimizer, _ = build_optimizer(sam, OptimConfig(), sam.config.encoder_depth)
    for p in sam.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # AdamW's moments now exist, as in any checkpoint taken during training
    state = {"state_dict": sam.state_dict(), "optimizer_states": [optimizer.state_dict()]}
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        path = Path(directory) / "checkpoint.ckpt"
        returned, synced = [], []
        for _ in range(args.repeats):
            path.unlink(missing_ok=True)
            start = time.perf_counter()
            with open(path, "wb") as f:
                torch.save(state, f)
                returned.append(time.perf_counter() - start)
                f.flush()
                os.fsync(f.fileno())
            synced.append(time.perf_counter() - start)
        size = path.stat().st_size
    save_s, sync_s = statistics.median(returned), statistics.median(synced)
    scale = checkpoint_bytes_of("vit_h") / size
    print("| model | checkpoint GB | torch.save s | on disk (fsync) s | MB/s on disk |")
    print("|---|---:|---:|---:|---:|")
    print(f"| {args.model} (measured, median of {args.repeats}) | {size / 1e9:.2f} | {save_s:.2f} | {sync_s:.2f} | {size / 1e6 / sync_s:.0f} |")
    print(f"| vit_h (projected by size) | {size * scale / 1e9:.2f} | {save_s * scale:.1f} | {sync_s * scale:.1f} | |")


if __name__ == "__main__":
    main()
