"""Fine-tuning the shipped seed model on a new domain, in three modes, for one fixed wall-clock budget each.

    OMP_NUM_THREADS=1 python benchmarks/finetune_modes.py [--minutes 4] [--out outputs/finetune_demo]

The new domain: `--images` synthetic scenes in the fluorescent style (bright objects of one hue over
a dark background, 5-10 objects of radius 6-20% of the side: smaller and more numerous than the
seed's 2-4 textured ones), written as PNG images with 16-bit instance label maps, the layout
`segany-convert label-maps` reads. Each mode then runs, in a fresh process, exactly what a user
types:

    segany-finetune FOLDER --mode MODE --run-dir OUT/MODE +trainer.max_time=00:00:MM:00 data.num_workers=0 \
        data.val_fraction=0.3 callbacks.checkpoint_every_n_steps=10

(the budget stops training; the held-out split, 30% of the images, is scored before and after with
the interactive protocol and 95% bootstrap intervals over images). Prints the markdown table of
`OUT/MODE/finetune/summary.json`: trainable parameters, steps (of the last checkpoint, the one
scored: a run stopped by the budget keeps the weights saved at most 9 steps before), held-out mIoU after 1 and 5
clicks before and after, and the peak RSS of the run's process (data loading in that process).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from segany_train.data.synthetic import generate_label_map
from segany_train.finetune_folder import MODES

SCENE = {"size": 256, "min_objects": 5, "max_objects": 10, "min_radius": 0.06, "max_radius": 0.2, "style": "fluorescent"}
DATA_SEED = 2026


def write_domain(folder: Path, count: int) -> None:
    """`count` fluorescent scenes as folder/images/img<i>.png + folder/labels/img<i>.png (uint16 label maps)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(exist_ok=True)
    for i in range(count):
        image_path, label_path = folder / "images" / f"img{i:04d}.png", folder / "labels" / f"img{i:04d}.png"
        if image_path.exists() and label_path.exists():
            continue
        image, labels = generate_label_map(i, seed=DATA_SEED, **SCENE)
        Image.fromarray(image).save(image_path)
        Image.fromarray(labels).save(label_path)


def _ci(figures: dict, clicks: int) -> str:
    low, high = figures[f"miou_{clicks}_ci"]
    return f"{figures[f'miou_{clicks}']:.3f} [{low:.3f}-{high:.3f}]"


def table(summaries: dict[str, dict]) -> str:
    lines = [
        "| mode | trainable params | steps | mIoU@1 before [95%] | mIoU@1 after [95%] | mIoU@5 before [95%] | mIoU@5 after [95%] | peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, s in summaries.items():
        lines.append(
            f"| {mode} | {s['trainable_parameters']:,} of {s['total_parameters']:,} | {s['steps']} | {_ci(s['before'], 1)} | "
            f"{_ci(s['after'], 1)} | {_ci(s['before'], 5)} | {_ci(s['after'], 5)} | {s['peak_rss_mib']:.0f} MiB |"
        )
    any_summary = next(iter(summaries.values()))
    lines.append("")
    lines.append(f"Held-out: {any_summary['after']['eval_images']} images, {any_summary['after']['eval_masks']} masks.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=int, default=4, help="training budget per mode (wall clock)")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("outputs/finetune_demo"))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = parser.parse_args()
    folder = args.out / "fluorescent"
    write_domain(folder, args.images)
    summaries = {}
    for mode in args.modes:
        run_dir = args.out / mode
        command = [
            sys.executable, "-m", "segany_train.finetune_folder", str(folder), "--mode", mode, "--run-dir", str(run_dir),
            f"+trainer.max_time=00:00:{args.minutes:02d}:00", "trainer.max_steps=100000", "data.num_workers=0",
            "data.val_fraction=0.3", "callbacks.progress_bar=false",
            # a run stopped by its time budget keeps the weights of its last checkpoint: save often
            "callbacks.checkpoint_every_n_steps=10",
        ]
        began = time.perf_counter()
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}, stdout=subprocess.DEVNULL)
        print(f"{mode}: {time.perf_counter() - began:.0f} s", file=sys.stderr)
        summaries[mode] = json.loads((run_dir / "finetune" / "summary.json").read_text())
    print(table(summaries))


if __name__ == "__main__":
    main()
