"""The engine's report: a markdown table of every round, PNG plots of the trends, automatic-mask overlays."""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from data_engine.targets import targets_table  # noqa: E402
from segany_train.inference.overlay_panels import Panel, match_to_objects, render_panels  # noqa: E402

COLUMNS = [
    ("stage", "stage", "{}"),
    ("round", "round", "{}"),
    ("images", "images", "{}"),
    ("masks_per_image", "masks/image", "{:.2f}"),
    ("seconds_per_mask", "s/mask", "{:.1f}"),
    ("clicks_per_mask", "clicks/mask", "{:.2f}"),
    ("brush_rate", "brush rate", "{:.2f}"),
    ("prefilled_per_image", "prefilled/image", "{:.2f}"),
    ("prefilled_precision", "prefilled precision", "{:.2f}"),
    ("miou_1", "held-out mIoU@1", "{:.3f}"),
    ("miou_1_ci", "95% interval", "{0[0]:.3f}-{0[1]:.3f}"),
    ("miou_5", "held-out mIoU@5", "{:.3f}"),
    ("iou_head_spearman", "IoU-head Spearman", "{:.2f}"),
]
# (row key, panel title, y-axis label, fixed y range or None: from 0 to above the highest value)
PLOTS = [
    ("masks_per_image", "masks per image", "masks per image", None),
    ("seconds_per_mask", "seconds per mask", "seconds per new mask", None),
    ("miou_1", "held-out mIoU after 1 click", "mIoU (0-1)", (0.0, 1.0)),
    ("miou_5", "held-out mIoU after 5 clicks", "mIoU (0-1)", (0.0, 1.0)),
]
STAGE_COLOURS = {"seed": "grey", "stage1": "tab:blue", "stage2": "tab:orange", "stage3": "tab:green", "final": "tab:green", "control": "tab:red"}
STAGE_NAMES = {
    "seed": "seed model",
    "stage1": "stage 1 (assisted-manual)",
    "stage2": "stage 2 (semi-automatic)",
    "stage3": "stage 3 / final retrain",
    "control": "control (seed split only)",
}


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_cell(row, key, fmt) for key, _, fmt in COLUMNS) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def trends_figure(rows: list[dict[str, Any]]) -> plt.Figure:
    """One panel per statistic, rounds in order along x, coloured by stage (legend below the panels).
    Each y axis starts at 0 (mIoU: 0 to 1), so a flat line looks flat: an axis scaled to the data's
    own range would show noise as movement."""
    fig, axes = plt.subplots(1, len(PLOTS), figsize=(4.4 * len(PLOTS), 4.0))
    labels = [r["stage"] if r["round"] is None else f"{r['stage']} r{r['round']}" for r in rows]
    for ax, (key, title, ylabel, limits) in zip(axes, PLOTS):
        xs = [i for i, r in enumerate(rows) if r.get(key) is not None and not math.isnan(r[key])]
        line = [i for i in xs if rows[i]["stage"] != "control"]  # the control is beside the cycle, not in it
        ax.plot(line, [rows[i][key] for i in line], color="lightgrey", zorder=1)
        ax.scatter(xs, [rows[i][key] for i in xs], c=[STAGE_COLOURS.get(rows[i]["stage"], "k") for i in xs], zorder=2)
        ci = [i for i in xs if rows[i].get(f"{key}_ci")]
        if ci:  # 95% bootstrap intervals
            low = [rows[i][key] - rows[i][f"{key}_ci"][0] for i in ci]
            high = [rows[i][f"{key}_ci"][1] - rows[i][key] for i in ci]
            ax.errorbar(ci, [rows[i][key] for i in ci], yerr=[low, high], fmt="none", ecolor="k", elinewidth=0.8, capsize=2, zorder=3)
        highest = max((rows[i][key] for i in xs), default=1.0)
        ax.set_ylim(limits or (0.0, max(highest, 1e-9) * 1.15))
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=7)
        ax.grid(alpha=0.3)
    shown = {r["stage"] if r["stage"] != "final" else "stage3" for r in rows}
    handles = [
        plt.Line2D([], [], marker="o", linestyle="", color=STAGE_COLOURS[stage], label=name)
        for stage, name in STAGE_NAMES.items()
        if stage in shown
    ]
    handles.append(plt.Line2D([], [], color="k", linewidth=0.8, label="95% interval over images"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def plot_trends(rows: list[dict[str, Any]], path: Path) -> Path:
    """trends_figure as a PNG."""
    fig = trends_figure(rows)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclass
class AutomaticExample:
    """One stage-3 image for the report: its automatic masks with their predicted IoUs, and the GT."""

    name: str
    image: np.ndarray
    gt_masks: list[np.ndarray]
    masks: list[np.ndarray]
    predicted_ious: list[float]


def save_overlays(examples: list[AutomaticExample], directory: Path) -> list[Path]:
    """One PNG per example: GT | automatic masks, each written with its predicted IoU; an automatic
    mask matching a GT object (IoU >= 0.5) has that object's colour."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for example in examples:
        gt = Panel(f"GT objects: {len(example.gt_masks)}" if example.gt_masks else "GT: none in the input", example.gt_masks)
        automatic = Panel(
            f"automatic masks: {len(example.masks)}, with predicted IoU",
            example.masks,
            objects=match_to_objects(example.masks, example.gt_masks),
            scores=example.predicted_ious,
        )
        path = directory / f"{example.name}.png"
        Image.fromarray(render_panels(example.image, [gt, automatic])).save(path)
        paths.append(path)
    return paths


def timing_table(wall_seconds: dict[str, float]) -> str:
    """Wall seconds per stage and kind of step ("stage1/round2/train" counts as stage1, train)."""
    totals: dict[tuple[str, str], float] = {}
    for step, seconds in wall_seconds.items():
        parts = step.split("/")
        key = (parts[0], parts[-1])
        totals[key] = totals.get(key, 0.0) + seconds
    lines = ["| stage | step | wall seconds |", "|---|---|---|"]
    lines += [f"| {stage} | {kind} | {seconds:.0f} |" for (stage, kind), seconds in totals.items()]
    lines.append(f"| all | | {sum(totals.values()):.0f} |")
    return "\n".join(lines)


def write_report(
    run_dir: Path,
    rows: list[dict[str, Any]],
    quality: dict[str, float] | None,
    overlays: list[Path],
    notes: list[str],
    wall_seconds: dict[str, float] | None = None,
    summary: dict[str, Any] | None = None,
) -> Path:
    """report.md (+ trends.png) in the run directory."""
    plot = plot_trends(rows, run_dir / "trends.png")
    lines = [
        "# Data engine report",
        "",
        "Rows are rounds in order: the seed model, stage 1 (assisted-manual), stage 2 (semi-automatic),",
        "stage 3 (fully automatic, then the final retrain). Seconds, clicks and brush rate are per new mask;",
        "held-out mIoU is the interactive protocol on the held-out shards after the round's retrain, with its",
        "95% bootstrap interval over images; the control trained as many steps as the cycle from the same seed,",
        "on the seed split alone.",
        "",
        markdown_table(rows),
        "",
        f"![trends]({plot.name})",
        "",
    ]
    if summary:
        lines += ["## Targets", "", targets_table(summary), ""]
    if quality:
        lines += [
            "## Stage 3 automatic masks against the GT",
            "",
            f"- {quality['masks']} masks on {quality['images']} images ({quality['masks_per_image']:.1f} per image)",
            f"- IoU > 0.90 with their best GT object: {quality['share_iou_above_90']:.1%} (SAM paper: 94% against professional corrections)",
            f"- IoU > 0.75 with their best GT object: {quality['share_iou_above_75']:.1%}",
            f"- GT objects recalled at IoU > 0.5: {quality['gt_recall_50']:.1%}; at IoU > 0.75: {quality['gt_recall_75']:.1%}",
            "",
        ]
    if overlays:
        lines += ["## Automatic masks", ""] + [f"![{p.stem}]({p.relative_to(run_dir)})" for p in overlays] + [""]
    if wall_seconds:
        lines += ["## Where the time went", "", "Steps run in this invocation or an earlier one of the same run.", "", timing_table(wall_seconds), ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
