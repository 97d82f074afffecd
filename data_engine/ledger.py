"""The engine's run directory manifest: which steps are finished and what each produced.

`engine.json` maps step names ("stage1/round2/annotate", ...) to their results (checkpoint path,
shard list, statistics). A step is recorded only after everything it wrote is complete, and the file
is replaced atomically, so a run killed at any moment and started again redoes at most the step it
was in. Steps resume inside themselves too (annotation per shard, training from its last checkpoint).
"""

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from segany_train.atomic_files import write_bytes_atomically, write_json_atomically

MANIFEST = "engine.json"
# settings that change how a run is shown, not what it computes: resuming with another value is fine
PRESENTATION_KEYS = ("progress", "threads")


class ConfigChangedError(RuntimeError):
    """The run directory was started with another configuration."""


def _without_tool_connection(config: dict[str, Any]) -> dict[str, Any]:
    """The config without where the annotation tool runs and how to log in (annotator.label_studio):
    neither changes what a run computes, a new address or key must not stop a resume, and the key
    is a secret that engine_config.json must not hold."""
    annotator = config.get("annotator")
    if not isinstance(annotator, dict) or "label_studio" not in annotator:
        return config
    return {**config, "annotator": {k: v for k, v in annotator.items() if k != "label_studio"}}


class RunLedger:
    """engine.json in `run_dir`: {"config_digest": str, "steps": {name: result}, "order": [name, ...]}."""

    def __init__(self, run_dir: str | Path, config: dict[str, Any]) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / MANIFEST
        self.on_start: Callable[[str], None] | None = None  # told each step's name as it starts (progress.py)
        config = _without_tool_connection(config)
        computed = {k: v for k, v in config.items() if k not in PRESENTATION_KEYS}
        digest = hashlib.sha256(json.dumps(computed, sort_keys=True, default=str).encode()).hexdigest()[:16]
        if self.path.exists():
            self.state = json.loads(self.path.read_text())
            if self.state["config_digest"] != digest:
                raise ConfigChangedError(
                    f"{self.run_dir} was started with another engine configuration (digest "
                    f"{self.state['config_digest']}, now {digest}); use a new run_dir or restore the settings"
                )
        else:
            self.state = {"config_digest": digest, "steps": {}, "order": []}
            write_bytes_atomically(self.run_dir / "engine_config.json", json.dumps(config, indent=1, sort_keys=True, default=str).encode())
            self._save()

    def _save(self) -> None:
        write_json_atomically(self.path, self.state)

    def result(self, step: str) -> dict[str, Any] | None:
        """The recorded result of a finished step, or None."""
        return self.state["steps"].get(step)

    def finish(self, step: str, result: dict[str, Any]) -> None:
        """Records a step as finished (atomically)."""
        self.state["steps"][step] = result
        if step not in self.state["order"]:
            self.state["order"].append(step)
        self._save()

    def run(self, step: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The step's recorded result, running `work` first when the step is not finished yet."""
        done = self.result(step)
        if done is not None:
            return done
        if self.on_start is not None:
            self.on_start(step)
        start = time.perf_counter()
        result = work()
        # wall time of the run that finished the step (a resumed step counts its last attempt only)
        self.state.setdefault("wall_seconds", {})[step] = round(time.perf_counter() - start, 2)
        self.finish(step, result)
        return result

    def record_summary(self, summary: dict[str, Any]) -> None:
        """The run's headline figures and target checks, under "summary" (stable keys for scripts)."""
        self.state["summary"] = summary
        self._save()

    def step_dir(self, step: str) -> Path:
        """The directory a step writes into (created)."""
        path = self.run_dir / step
        path.mkdir(parents=True, exist_ok=True)
        return path
