"""The engine's overall progress: a line as each step starts (which step of how many, stage and round,
elapsed time, an estimate of the time left), a summary line as each round ends.

Lines go to the `data_engine` logger: under `segany-engine` (Hydra's job logging) to the console and
to `run_dir/engine.log`. The time left is estimated per kind of step from the wall seconds the
ledger recorded for that kind, in this run directory, this invocation or an earlier one: training
per optimiser step (retrains differ in length, the control is as long as the whole cycle), other
kinds per step. A kind not measured yet counts as the mean step measured so far; before any step is
measured there is no estimate.
"""

import logging
import time
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

log = logging.getLogger("data_engine")


@dataclass(frozen=True)
class PlannedStep:
    name: str  # the ledger's step name, e.g. "stage1/round2/train"
    units: int = 1  # optimiser steps for a training step, else 1


def _kind(step: str) -> str:
    return step.rsplit("/", 1)[-1]


def plan_cycle(cfg: DictConfig, *, train_seed: bool) -> list[PlannedStep]:
    """The steps `Engine.run` takes with `cfg`, in order (a step an edge case skips, such as a final
    retrain with nothing to train on, is simply never started)."""
    sweep = cfg.threshold_sweep.enabled
    steps = [PlannedStep("seed/train", cfg.seed_model.train_steps)] if train_seed else []
    steps.append(PlannedStep("seed/eval"))
    for stage in ("stage1", "stage2"):
        for r in range(1, cfg[stage].rounds + 1):
            prefix = f"{stage}/round{r}"
            if stage == "stage2":
                if r == 1 and sweep and cfg.stage1.rounds >= 2:
                    steps.append(PlannedStep("stage2/thresholds"))
                steps.append(PlannedStep(f"{prefix}/detector"))
            steps += [PlannedStep(f"{prefix}/annotate"), PlannedStep(f"{prefix}/train", cfg[stage].train_steps), PlannedStep(f"{prefix}/eval")]
    if sweep and cfg.stage1.rounds + cfg.stage2.rounds:
        steps.append(PlannedStep("stage3/thresholds"))
    steps.append(PlannedStep("stage3/generate"))
    if cfg.stage3.train_steps:
        steps += [PlannedStep("stage3/train", cfg.stage3.train_steps), PlannedStep("stage3/eval")]
    if cfg.control.enabled:
        cycle = cfg.stage1.rounds * cfg.stage1.train_steps + cfg.stage2.rounds * cfg.stage2.train_steps + cfg.stage3.train_steps
        steps += [PlannedStep("control/train", cycle), PlannedStep("control/eval")]
    return steps


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def describe_step(step: str, rounds: dict[str, int]) -> str:
    """"stage1/round2/train" -> "stage1 round 2/6: train"; "seed/eval" -> "seed: eval"."""
    parts = step.split("/")
    if len(parts) == 3 and parts[1].startswith("round") and parts[0] in rounds:
        return f"{parts[0]} round {parts[1].removeprefix('round')}/{rounds[parts[0]]}: {parts[2]}"
    return f"{parts[0]}: {'/'.join(parts[1:])}"


class CycleProgress:
    """Told by the ledger as each step starts (`RunLedger.run`); logs the progress line."""

    def __init__(self, plan: list[PlannedStep], wall_seconds: dict[str, float], done: set[str], rounds: dict[str, int]) -> None:
        self.plan = plan
        self.units = {p.name: p.units for p in plan}
        self.wall_seconds = wall_seconds  # the ledger's, updated as steps finish
        self.rounds = rounds
        self.began = time.perf_counter()
        finished = [p.name for p in plan if p.name in done]
        if finished:
            log.info("resuming: %d of %d steps were done before (%s)", len(finished), len(plan), ", ".join(finished[-3:]) + (" ..." if len(finished) > 3 else ""))

    def remaining_seconds(self, remaining: list[PlannedStep]) -> float | None:
        """The estimate for `remaining` from the recorded wall seconds, None before any is recorded."""
        per_unit: dict[str, list[float]] = {}
        for step, seconds in self.wall_seconds.items():
            per_unit.setdefault(_kind(step), []).append(seconds / max(self.units.get(step, 1), 1))
        if not per_unit:
            return None
        rate = {kind: sum(v) / len(v) for kind, v in per_unit.items()}
        fallback = sum(self.wall_seconds.values()) / len(self.wall_seconds)
        return sum(p.units * rate[_kind(p.name)] if _kind(p.name) in rate else fallback for p in remaining)

    def started(self, step: str) -> None:
        names = [p.name for p in self.plan]
        if step not in names:  # a step the plan did not foresee: counted from here on
            self.plan.append(PlannedStep(step))
            names.append(step)
        index = names.index(step)
        left = self.remaining_seconds([p for p in self.plan[index:] if p.name not in self.wall_seconds])
        eta = f"ETA ~{format_seconds(left)}" if left is not None else "ETA after the first step"
        what = describe_step(step, self.rounds)
        if _kind(step) == "train" and self.units.get(step, 1) > 1:
            what += f" ({self.units[step]} steps)"
        log.info(
            "[step %d/%d, %d%%] %s | %s elapsed, %s",
            index + 1, len(self.plan), 100 * index // len(self.plan), what, format_seconds(time.perf_counter() - self.began), eta,
        )


def _figure(row: dict[str, Any], key: str, fmt: str) -> str | None:
    value = row.get(key)
    if value is None or value != value:  # unknown (NaN or null): a real tool's round has no clicks
        return None
    return fmt.format(value)


def round_summary(row: dict[str, Any], seed: dict[str, Any] | None, rounds: dict[str, int]) -> str:
    """One line for a report row: the round's annotation figures and its held-out mIoU against the seed's."""
    name = row["stage"] if row["round"] is None else f"{row['stage']} round {row['round']}/{rounds.get(row['stage'], '?')}"
    figures = [
        _figure(row, "images", "{} images"),
        _figure(row, "masks_per_image", "{:.2f} masks/image"),
        _figure(row, "seconds_per_mask", "{:.1f} s/mask"),
        _figure(row, "clicks_per_mask", "{:.2f} clicks/mask"),
    ]
    if row["stage"] == "stage2":
        figures += [_figure(row, "prefilled_per_image", "{:.2f} pre-filled/image"), _figure(row, "prefilled_precision", "precision {:.2f}")]
    miou = _figure(row, "miou_1", "{:.3f}")
    if miou is not None:
        ci = row.get("miou_1_ci")
        held_out = f"held-out mIoU@1 {miou}" + (f" [{ci[0]:.3f}-{ci[1]:.3f}]" if ci else "")
        if seed is not None and row is not seed and seed.get("miou_1") is not None:
            held_out += f" (seed {seed['miou_1']:.3f}, {row['miou_1'] - seed['miou_1']:+.3f})"
        figures.append(held_out)
    return f"{name} done: " + ", ".join(f for f in figures if f)
