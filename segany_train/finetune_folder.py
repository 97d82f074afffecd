"""Fine-tuning on a folder of one's own images and masks, measured before and after.

    segany-train experiment=finetune_folder data.folder=PATH [finetune.mode=decoder|lora|full]
    segany-finetune PATH [--mode lora] [--run-dir DIR] [hydra overrides ...]

Steps, each kept in the run directory so that the same command resumes:
1. the folder is converted once (`folder_conversion.convert_folder`, into `data.converted`, cached);
2. the starting model (`model.checkpoint`; `builtin` is the shipped seed model, hash-checked) is
   scored on the held-out split with the interactive protocol (`segany_train.evaluation.holdout.evaluate_holdout`:
   mIoU after 1 and 5 clicks, 95% bootstrap intervals over images) -> `finetune/before.json`;
3. `segany-train` trains as configured, with `finetune.mode` setting what trains: `decoder` (image
   and prompt encoders frozen), `lora` (encoders frozen, LoRA adapters on the encoder's attention
   qkv, and the decoder) or `full`;
4. the last checkpoint is scored the same way -> `finetune/after.json`, and `finetune/report.md`
   gets the table (with trainable parameters and peak RSS) and overlays of held-out images
   (GT | before | after, one click at each object's most interior point).
"""

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image
from pycocotools import mask as mask_utils

from segany_train.data.folder_conversion import FolderConversionReport, FolderSource, convert_folder
from segany_train.data.image_decoding import decode_record_image
from segany_train.data.pipeline import expand_shard_patterns, read_records
from segany_train.data.rle import pycocotools_rle
from segany_train.atomic_files import write_json_atomically
from segany_train.inference.overlay_panels import Panel, render_panels
from segany_train.inference.predictor import SamPredictor
from segany_train.model import Sam, build_sam_from_checkpoint
from segany_train.model.checkpoint import load_checkpoint_file
from segany_train.prompting.distance import distance_to_boundary

MODES = ("decoder", "lora", "full")
REPORT_DIRECTORY = "finetune"


class FinetuneConfigError(ValueError):
    """A finetune_folder setting that cannot work; the message names it."""


def apply_finetune_mode(cfg: DictConfig) -> None:
    """Sets `model.freeze` and `model.lora_rank` / `lora_alpha` from `finetune.mode`."""
    mode = cfg.finetune.mode
    if mode not in MODES:
        raise FinetuneConfigError(f"finetune.mode must be one of {MODES}, got {mode!r}")
    with open_dict(cfg):
        cfg.model.freeze = [] if mode == "full" else ["image_encoder", "prompt_encoder"]
        cfg.model.lora_rank = int(cfg.finetune.lora_rank) if mode == "lora" else 0
        cfg.model.lora_alpha = float(cfg.finetune.lora_alpha)


def folder_source(data_cfg: DictConfig) -> FolderSource:
    """The dataset `data.folder` names, its layout detected when `data.layout` is auto: a .csv file is
    csv; a folder with `labels/` is label-maps, with `masks/` holding sub-folders mask-folders, with
    `masks/` and a `data.mask_pattern` mask-pattern."""
    if data_cfg.get("folder") in (None, "???") or OmegaConf.is_missing(data_cfg, "folder"):
        raise FinetuneConfigError("set data.folder=PATH (your images and masks)")
    folder = Path(data_cfg.folder)
    if not folder.exists():
        raise FileNotFoundError(f"data.folder not found: {folder}")
    layout = data_cfg.layout
    images, labels, masks = folder / data_cfg.images, folder / data_cfg.labels, folder / data_cfg.masks
    if layout == "auto":
        if folder.is_file() and folder.suffix.lower() == ".csv":
            layout = "csv"
        elif labels.is_dir():
            layout = "label-maps"
        elif masks.is_dir() and data_cfg.mask_pattern:
            layout = "mask-pattern"
        elif masks.is_dir() and any(p.is_dir() for p in masks.iterdir()):
            layout = "mask-folders"
        else:
            raise FinetuneConfigError(
                f"cannot tell the layout of {folder}: expected a .csv file, or {data_cfg.images}/ with "
                f"{data_cfg.labels}/ (label maps) or {data_cfg.masks}/ (per-image mask folders, or data.mask_pattern)"
            )
    return FolderSource(
        layout=layout,
        images=images,
        labels=labels,
        masks=masks,
        pattern=data_cfg.mask_pattern,
        csv=folder if layout == "csv" else None,
        csv_masks_are_label_maps=data_cfg.csv_masks == "label-map",
    )


def resolve_start_checkpoint(checkpoint: str) -> Path:
    """`builtin` -> the shipped seed model (its SHA-256 checked); anything else -> that path."""
    from segany_train.model.seed_model import BUILTIN, SeedModelError, resolve_seed_checkpoint

    try:
        return resolve_seed_checkpoint(BUILTIN) if checkpoint == BUILTIN else Path(checkpoint)
    except SeedModelError as error:
        raise FinetuneConfigError(str(error)) from None


def count_trainable_parameters(sam: torch.nn.Module) -> int:
    return sum(p.numel() for p in sam.parameters() if p.requires_grad)


def evaluate_split(sam: Sam, shards: list[str], *, max_images: int | None, batch_size: int, seed: int) -> dict[str, Any]:
    """`evaluate_holdout`'s figures (miou_1, miou_1_ci, miou_5, miou_5_ci, iou_head_spearman,
    eval_images, eval_masks) of `sam` on every mask of the shards' images."""
    from segany_train.evaluation.holdout import evaluate_holdout

    sam.eval()
    with torch.no_grad():
        return evaluate_holdout(sam, shards, max_images=max_images, max_masks_per_image=None, batch_size=batch_size, seed=seed, progress=False)


def _cached_json(path: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The JSON at `path`, or `compute()` written there atomically (a resumed run reuses it)."""
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(path, value)
    return value


def _one_click_masks(sam: Sam, image: np.ndarray, gt: list[np.ndarray]) -> tuple[list[np.ndarray], list[tuple[float, float, bool]]]:
    """Each GT mask's prediction from one click at its most interior point (the best of 3 by
    predicted IoU), and the clicks."""
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    out, clicks = [], []
    for mask in gt:
        distance = distance_to_boundary(torch.from_numpy(mask)[None])[0]
        y, x = np.unravel_index(int(distance.argmax()), mask.shape)
        masks, scores, _ = predictor.predict(point_coords=np.array([[x + 0.5, y + 0.5]]), point_labels=np.array([1]))
        out.append(masks[int(np.argmax(scores))])
        clicks.append((x + 0.5, y + 0.5, True))
    return out, clicks


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


def write_overlays(before: Sam, after: Sam, shards: list[str], out_dir: Path, *, count: int) -> list[Path]:
    """PNG per held-out image (the first `count`): GT | starting model | fine-tuned model, one click
    per object (drawn), each prediction in its object's colour and written with its IoU to the GT."""
    written: list[Path] = []
    if count <= 0:
        return written
    out_dir.mkdir(parents=True, exist_ok=True)
    for key, jpeg, record in read_records(shards):
        image = decode_record_image(jpeg, record)
        gt = [mask_utils.decode(pycocotools_rle(a["segmentation"])).astype(bool) for a in record["annotations"]]
        panels = [Panel(f"GT objects: {len(gt)}", gt)]
        for name, sam in (("before (start)", before), ("after (fine-tuned)", after)):
            masks, clicks = _one_click_masks(sam, image, gt)
            ious = [_mask_iou(m, g) for m, g in zip(masks, gt)]
            panels.append(Panel(f"{name}: mIoU {np.mean(ious):.2f}" if ious else name, masks, scores=ious, clicks=clicks))
        path = out_dir / f"{key}.png"
        Image.fromarray(render_panels(image, panels)).save(path)
        written.append(path)
        if len(written) >= count:
            break
    return written


def _interval(figures: dict[str, Any], clicks: int) -> str:
    ci = figures.get(f"miou_{clicks}_ci")
    value = figures.get(f"miou_{clicks}")
    if value is None:
        return "-"
    return f"{value:.3f} [{ci[0]:.3f}-{ci[1]:.3f}]" if ci else f"{value:.3f}"


def render_report(summary: dict[str, Any]) -> str:
    """The markdown report of a finetune_folder run."""
    before, after = summary["before"], summary["after"]
    lines = [
        f"# Fine-tuning on {summary['folder']}",
        "",
        f"Mode **{summary['mode']}** from `{summary['start_checkpoint']}`: {summary['trainable_parameters']:,} trainable "
        f"parameters of {summary['total_parameters']:,}; {summary['steps']} steps in {summary['train_seconds']:.0f} s; "
        f"peak RSS of the run's process {summary['peak_rss_mib']:.0f} MiB.",
        f"Data: {summary['conversion']}.",
        f"Held-out split: {after['eval_images']} images, {after['eval_masks']} masks, every mask; interactive protocol "
        "(first click at the object's most interior point, each next in the largest error region), 95% bootstrap "
        "intervals over images.",
        "",
        "| model | mIoU@1 [95%] | mIoU@5 [95%] | IoU-head Spearman |",
        "|---|---|---|---|",
    ]
    for name, figures in (("before (start)", before), ("after (fine-tuned)", after)):
        spearman = figures.get("iou_head_spearman")
        lines.append(f"| {name} | {_interval(figures, 1)} | {_interval(figures, 5)} | {'-' if spearman is None else f'{spearman:.2f}'} |")
    lines += ["", "Overlays: GT | before | after, one click per object (green dot), each mask in its object's colour with its IoU to the GT:", ""]
    lines += [f"![{Path(p).stem}]({Path(p).relative_to(Path(summary['report_dir'])).as_posix()})" for p in summary["overlays"]]
    return "\n".join(lines) + "\n"


def finetune_folder(cfg: DictConfig) -> dict[str, Any]:
    """Runs the four steps of the module docstring; returns the summary also written to
    `run_dir/finetune/summary.json` (keys: before, after, mode, trainable_parameters, steps, ...)."""
    from segany_train.training.run import build_model, train

    apply_finetune_mode(cfg)
    source = folder_source(cfg.data)
    run_dir = Path(cfg.run_dir)
    report_dir = run_dir / REPORT_DIRECTORY
    start = resolve_start_checkpoint(str(cfg.model.checkpoint))
    with open_dict(cfg):
        cfg.model.checkpoint = str(start)
    try:
        conversion: FolderConversionReport = convert_folder(
            source, cfg.data.converted, val_fraction=float(cfg.data.val_fraction), seed=int(cfg.data.split_seed),
            progress=bool(cfg.callbacks.progress_bar),
        )
    except (ValueError, FileExistsError) as error:  # a folder with no image, two images of one name, ...
        raise FinetuneConfigError(f"data.folder {cfg.data.folder}: {error}") from None
    usable = {name: r.images_written + r.images_resumed for name, r in conversion.splits.items()}
    if not any(usable.values()):
        raise FinetuneConfigError(f"data.folder {cfg.data.folder}: no usable image ({conversion.summary()})")
    if not all(usable.values()):  # nothing to train on, or nothing held out to score before and after
        raise FinetuneConfigError(
            f"data.folder {cfg.data.folder}: too few images: {sum(usable.values())} usable, {usable['train']} to train on and "
            f"{usable['val']} held out ({conversion.summary()}); fine-tuning needs at least one of each, so at least 2 usable "
            f"images and data.val_fraction above 0 (it is {cfg.data.val_fraction})"
        )
    val_shards = expand_shard_patterns([str(cfg.data.val_shards)])
    evaluation = {"max_images": cfg.finetune.eval_max_images, "batch_size": int(cfg.finetune.eval_batch_size), "seed": int(cfg.seed)}
    before = _cached_json(
        report_dir / "before.json", lambda: evaluate_split(build_sam_from_checkpoint(load_checkpoint_file(start)), val_shards, **evaluation)
    )
    trainable = build_model(cfg.model)  # as train() builds it: what the mode freezes and adds
    trainable_parameters, total_parameters = count_trainable_parameters(trainable), sum(p.numel() for p in trainable.parameters())
    del trainable  # no model but train()'s is held while it trains
    began = time.perf_counter()
    train(cfg)
    train_seconds = time.perf_counter() - began
    last = run_dir / "checkpoints" / "last.ckpt"
    finished = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
    tuned = build_sam_from_checkpoint(finished)
    after = evaluate_split(tuned, val_shards, **evaluation)
    write_json_atomically(report_dir / "after.json", after)
    start_model = build_sam_from_checkpoint(load_checkpoint_file(start))
    overlays = write_overlays(start_model.eval(), tuned.eval(), val_shards, report_dir / "overlays", count=int(cfg.finetune.overlays))
    summary = {
        "folder": str(cfg.data.folder),
        "mode": cfg.finetune.mode,
        "start_checkpoint": str(start),
        "checkpoint": str(last),
        "trainable_parameters": trainable_parameters,
        "total_parameters": total_parameters,
        "steps": int(finished.get("global_step", 0)),
        "train_seconds": train_seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "conversion": conversion.summary(),
        "before": before,
        "after": after,
        "overlays": [str(p) for p in overlays],
        "report_dir": str(report_dir),
    }
    write_json_atomically(report_dir / "summary.json", summary)
    (report_dir / "report.md").write_text(render_report(summary))
    return summary


CHECKPOINT_EVERY = 50  # experiment=finetune_folder's callbacks.checkpoint_every_n_steps, said in --help


def max_time(value: str) -> str:
    """A `--max-time` value, DD:HH:MM:SS as Lightning's Trainer(max_time) takes it, checked here so
    that a typo fails at once rather than after the conversion and the first evaluation."""
    parts = value.split(":")
    limits = (None, 24, 60, 60)
    if len(parts) != 4 or not all(p.isdigit() for p in parts) or any(limit and int(p) >= limit for p, limit in zip(parts, limits)):
        raise argparse.ArgumentTypeError(f"expected DD:HH:MM:SS (e.g. 00:01:30:00 for an hour and a half), got {value!r}")
    if not any(int(p) for p in parts):
        raise argparse.ArgumentTypeError("a --max-time of 00:00:00:00 leaves no time to train")
    return value


def main(argv: list[str] | None = None) -> None:
    """`segany-finetune PATH`: `segany-train experiment=finetune_folder data.folder=PATH` with a few options."""
    from hydra import compose, initialize_config_dir

    from segany_train.config_paths import CONFIG_DIR

    parser = argparse.ArgumentParser(prog="segany-finetune", description="Fine-tune SAM on a folder of images and masks, measured before and after.")
    parser.add_argument("folder", help="images/ + labels/ (label maps) or masks/, or a CSV of image,mask rows")
    parser.add_argument("--mode", choices=MODES, default="decoder")
    parser.add_argument("--checkpoint", default="builtin", help="starting model (default: the shipped seed model)")
    parser.add_argument("--run-dir", type=Path, help="default: outputs/finetune_<folder name>_<mode>; the model is <run dir>/checkpoints/last.ckpt")
    parser.add_argument("--max-steps", type=int, help="optimiser steps to train (default 300, experiment=finetune_folder's trainer.max_steps)")
    parser.add_argument(
        "--max-time",
        type=max_time,
        metavar="DD:HH:MM:SS",
        help="also stop training after this wall-clock time, days:hours:minutes:seconds (00:00:10:00 is 10 minutes); "
        f"the last checkpoint written (every {CHECKPOINT_EVERY} steps) is the one scored",
    )
    parser.add_argument("overrides", nargs="*", help="further segany-train overrides, e.g. optim.lr=1e-4")
    args = parser.parse_intermixed_args(argv)
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps must be at least 1, got {args.max_steps}")
    run_dir = args.run_dir or Path("outputs") / f"finetune_{Path(args.folder).stem}_{args.mode}"
    overrides = [
        "experiment=finetune_folder",
        f"data.folder={args.folder}",
        f"finetune.mode={args.mode}",
        f"model.checkpoint={args.checkpoint}",
        f"run_dir={run_dir}",
        *([f"trainer.max_steps={args.max_steps}"] if args.max_steps is not None else []),
        *([f"+trainer.max_time='{args.max_time}'"] if args.max_time is not None else []),
        *args.overrides,
    ]
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("train", overrides=overrides)
    try:
        summary = finetune_folder(cfg)
    except (FinetuneConfigError, FileNotFoundError, ValueError) as error:
        sys.exit(f"segany-finetune: error: {error}")
    print((Path(summary["report_dir"]) / "report.md").read_text())


if __name__ == "__main__":
    main()
