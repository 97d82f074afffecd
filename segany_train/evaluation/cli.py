"""segany-eval: interactive (click) and automatic-mask (COCO AP) evaluation of a SAM on SA-1B shards.

    segany-eval --checkpoint sam_vit_b_01ec64.pth --shards 'val/sa_{000000..000009}.tar' --out eval/
    segany-eval --model-type vit_t_256 --shards 'val/*.tar' --protocol interactive --max-images 10 --out eval/

Writes OUT/eval.json (every figure and the settings) and OUT/eval.md (the same as tables).
"""

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from segany_train.data.pipeline import expand_shard_patterns
from segany_train.atomic_files import finite_or_null, write_bytes_atomically
from segany_train.evaluation.automatic import evaluate_automatic_masks
from segany_train.evaluation.coco_ap import DEFAULT_MAX_DETS, check_max_dets
from segany_train.evaluation.interactive import IOU_RESOLUTIONS, InteractiveEvalConfig, evaluate_interactive
from segany_train.inference.automatic_mask_generator import SamAutomaticMaskGenerator
from segany_train.inference.precision import inference_autocast
from segany_train.inference.cli_options import (
    add_generator_arguments,
    add_model_arguments,
    describe_model,
    generator_settings,
    load_model,
    prepare_output_directory,
)
from segany_train.os_errors import describe_os_error

PROTOCOLS = ("interactive", "amg", "both")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segany-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", action="append", required=True, help="SA-1B shards: path, glob or brace pattern (repeatable)")
    parser.add_argument("--out", type=Path, required=True, help="directory for eval.json and eval.md")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="both")
    parser.add_argument("--max-images", type=int, help="evaluate at most this many images (per protocol)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (a line every --report-every images instead)")
    parser.add_argument(
        "--report-every", type=int, default=25, metavar="N", help="with --no-progress: a line on stderr every N images (0: none; default 25)"
    )
    add_model_arguments(parser)
    group = parser.add_argument_group("interactive protocol")
    default = InteractiveEvalConfig()
    group.add_argument(
        "--max-clicks", type=int, default=default.max_clicks, help="click cap (NoC counts it for masks never reaching the IoU)"
    )
    group.add_argument("--no-mask-feedback", action="store_true", help="do not feed the previous logits back as a mask prompt")
    group.add_argument("--max-masks-per-image", type=int, help="evaluate a seeded random subset of each image's masks")
    group.add_argument(
        "--max-area-fraction", type=float, default=default.max_area_fraction, help="leave out masks covering more of the image"
    )
    group.add_argument(
        "--iou-resolution",
        choices=IOU_RESOLUTIONS,
        default=default.iou_resolution,
        help="measure IoU at each image's own size (default, as the SAM paper) or in the decoder's low-res frame",
    )
    group.add_argument("--batch-size", type=int, default=default.batch_size, help="images per encoder batch")
    group.add_argument("--num-workers", type=int, default=default.num_workers, help="data loader worker processes")
    amg = parser.add_argument_group("automatic masks")
    amg.add_argument(
        "--max-dets",
        type=int,
        nargs=3,
        default=list(DEFAULT_MAX_DETS),
        metavar=("K1", "K2", "K3"),
        help="COCOeval's detections per image, ascending: AP counts the K3 best-scored masks of each image "
        f"(default: {' '.join(map(str, DEFAULT_MAX_DETS))}; COCO's own 1 10 100 caps SA-1B-like images)",
    )
    add_generator_arguments(parser)
    return parser


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _skips(skipped: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())) or "none"


def _iou_statement(inter: dict[str, Any]) -> str:
    side = "x".join(str(n) for n in inter["low_res_frame"])
    if inter["iou_resolution"] == "full":
        return f"IoU at each image's own resolution; clicks placed on the error in the {side} low-res frame."
    return f"IoU in the {side} low-res frame (not the image's resolution), where the clicks are placed too."


def render_markdown(result: dict[str, Any]) -> str:
    """eval.json's content as markdown tables."""
    lines = ["# segany evaluation", "", f"- model: {result['model']}", f"- shards: {len(result['shards'])} file(s)", ""]
    inter = result.get("interactive")
    if inter is not None:
        lines += [
            f"## Interactive (center clicks, up to {inter['max_clicks']})",
            "",
            "| clicks | mIoU | oracle mIoU | mIoU, every mask (vanished ones 0) |",
            "|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {k} | {_fmt(inter['miou'][k])} | {_fmt(inter['oracle_miou'][k])} | {_fmt(inter['miou_every_mask'][k])} |"
            for k in inter["miou"]
        ]
        thresholds = list(inter["noc"])
        lines += [
            "",
            "| " + " | ".join(f"NoC@{t}" for t in thresholds) + " | " + " | ".join(f"NoF@{t}" for t in thresholds) + " |",
            "|" + "---:|" * (2 * len(thresholds)),
            "| " + " | ".join(_fmt(inter["noc"][t], 2) for t in thresholds) + " | "
            + " | ".join(str(inter["nof"][t]) for t in thresholds) + " |",
            "",
            f"Images evaluated: {inter['images']} (skipped: {_skips(inter['images_skipped'])}). "
            f"Masks evaluated: {inter['masks']} of {inter['masks_in_images']} (left out: {inter['masks_skipped']}, of which "
            f"{inter['masks_vanished']} without a pixel in the low-res frame: the last column counts them 0). "
            f"{_iou_statement(inter)} The shown mask is the "
            "output of highest predicted IoU, the oracle the best of the outputs (the model returns 3 for "
            "one click and 1 for more, so both agree after the first click). NoC counts the cap for masks "
            "that never reach the IoU; NoF counts those masks.",
            "",
        ]
    amg = result.get("amg")
    if amg is not None:
        names = list(amg["stats"])
        lines += [
            "## Automatic masks (COCO segm, class-agnostic)",
            "",
            "| " + " | ".join(names) + " |",
            "|" + "---:|" * len(names),
            "| " + " | ".join(_fmt(amg["stats"][name], 3) for name in names) + " |",
            "",
            f"Images evaluated: {amg['images']} (skipped: {_skips(amg['images_skipped'])}); GT masks: "
            f"{amg['gt_masks']}, predicted masks: {amg['predicted_masks']}. Score = predicted IoU; -1 = no GT "
            f"mask in that size range; at most {amg['max_dets'][-1]} masks per image counted (COCOeval maxDets "
            f"{amg['max_dets']}).",
            "",
            "Generator: " + ", ".join(f"{k}={'off' if v is None else format(v, 'g')}" for k, v in amg["generator"].items()),
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.report_every < 0:
            raise ValueError(f"--report-every must be at least 0, got {args.report_every}")
        if args.max_images is not None and args.max_images < 0:
            raise ValueError(f"--max-images must be at least 0, got {args.max_images}")
        check_max_dets(args.max_dets)
        urls = expand_shard_patterns(args.shards)
        interactive_cfg = InteractiveEvalConfig(
            max_clicks=args.max_clicks,
            mask_feedback=not args.no_mask_feedback,
            max_masks_per_image=args.max_masks_per_image,
            max_area_fraction=args.max_area_fraction,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            seed=args.seed,
            iou_resolution=args.iou_resolution,
        )
        sam = load_model(args)
        generator = None
        if args.protocol in ("amg", "both"):  # built now so that bad settings fail before any work
            generator = SamAutomaticMaskGenerator.from_settings(sam, generator_settings(args), output_mode="coco_rle", precision=args.precision)
        prepare_output_directory(args.out, "--out")  # eval.json is written at the end: fail now, not then
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"segany-eval: error: {error}")
    result: dict[str, Any] = {
        "model": describe_model(args),
        "model_config": asdict(sam.config),
        "shards": urls,
        "protocol": args.protocol,
        "max_images": args.max_images,
        "precision": args.precision,
    }
    progress = not args.no_progress
    report_every = args.report_every if args.no_progress else 0  # the bars say it otherwise
    if args.protocol in ("interactive", "both"):
        start = time.perf_counter()
        with inference_autocast(torch.device(args.device), args.precision):
            result["interactive"] = evaluate_interactive(
                sam, urls, interactive_cfg, max_images=args.max_images, progress=progress, report_every=report_every
            )
        result["interactive"].update(settings=asdict(interactive_cfg), seconds=round(time.perf_counter() - start, 3))
    if generator is not None:
        start = time.perf_counter()
        with torch.inference_mode():
            result["amg"] = evaluate_automatic_masks(
                generator,
                urls,
                max_images=args.max_images,
                progress=progress,
                max_dets=tuple(args.max_dets),
                report_every=report_every,
            )
        result["amg"].update(generator=generator_settings(args).as_kwargs(), seconds=round(time.perf_counter() - start, 3))
    try:  # whole files or none: a full disk fails here, after the work, in one line
        args.out.mkdir(parents=True, exist_ok=True)
        write_bytes_atomically(args.out / "eval.json", (json.dumps(finite_or_null(result), indent=1, allow_nan=False) + "\n").encode())
        write_bytes_atomically(args.out / "eval.md", render_markdown(result).encode())
    except OSError as error:
        sys.exit(f"segany-eval: error: {describe_os_error(error, rerun='segany-eval evaluates again')}")
    print(f"wrote {args.out / 'eval.json'} and {args.out / 'eval.md'}")
    for protocol in ("interactive", "amg"):  # figures over no image are not a result: say so, exit 1
        part = result.get(protocol)
        if part is not None and part["images"] == 0 and args.max_images != 0:
            sys.exit(f"segany-eval: error: no image was evaluated ({protocol}; skipped: {_skips(part['images_skipped'])}); see the warnings above")


if __name__ == "__main__":
    main()
