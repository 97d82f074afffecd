"""benchmarks/gpu_check.py in its reduced CPU form: every check runs and passes, and the table names
them all (the GPU form has not yet run on a GPU)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_on_cpu_in_its_reduced_form():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu"], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    names = [row.split("|")[1].strip() for row in rows]
    results = {row.split("|")[1].strip(): row.split("|")[2].strip() for row in rows}
    for check in ("DDP 3 steps, drop path per rank", "no host sync in a training step", "16-mixed gradients vs fp32",
                  "stop and resume vs uninterrupted"):  # fmt: skip
        assert results[check] == "ok", result.stdout
    assert results["SDPA off the math backend"] == "skip"
    assert sum("step" in name and "checkpointing" in name for name in names) == 2
