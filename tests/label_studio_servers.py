"""A real Label Studio and a real segany-serve on loopback, for tests and benchmarks/serve.py.

Label Studio is a separate server with a large dependency set (Django, cloud SDKs, pandas), so it
lives in its own virtual environment: created on first use under $SEGANY_LABEL_STUDIO_VENV or
~/.cache/segany/label-studio-venv (about 1.5 minutes with a network; 1 GB), reused afterwards. The
venv is built under a temporary name and renamed when complete, so a killed build is never taken for
a finished one, and a lock file makes concurrent test runs wait for one build.
"""

import fcntl
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

LABEL_STUDIO_VERSION = "1.23.2"
API_TOKEN = "5e9a" * 10  # the legacy token the test user gets (40 hex characters)
USER_EMAIL = "annotator@example.com"
USER_PASSWORD = "segany-test-password"
START_TIMEOUT_SECONDS = 240


def label_studio_venv() -> Path:
    """The venv holding label-studio==LABEL_STUDIO_VERSION, built if absent; returns its directory."""
    venv = Path(os.environ.get("SEGANY_LABEL_STUDIO_VENV", Path.home() / ".cache" / "segany" / "label-studio-venv"))
    marker = venv / f"segany-label-studio-{LABEL_STUDIO_VERSION}"
    if marker.exists():
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second run waits here for the first one's build
        if marker.exists():
            return venv
        building = venv.parent / f"{venv.name}.building"
        shutil.rmtree(building, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(building)], check=True)
        # pip's global constraints cap torch only; label-studio's own pins decide the rest
        subprocess.run(
            [str(building / "bin" / "python"), "-m", "pip", "install", "--quiet", f"label-studio=={LABEL_STUDIO_VERSION}"],
            check=True,
        )
        (building / marker.name).write_text(LABEL_STUDIO_VERSION)
        shutil.rmtree(venv, ignore_errors=True)  # an older version's venv
        building.rename(venv)  # the venv is run as `bin/python -m ...`, so the move is harmless
    return venv


def _data_template(venv: Path) -> Path:
    """A data directory migrated and holding the test user, made once per venv: a fresh data
    directory spends 40-100 s on 2 shared cores in Django migrations; a copy of this one starts in ~5 s."""
    template = venv / "segany-data-template"
    if (template / "complete").exists():
        return template
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (template / "complete").exists():
            shutil.rmtree(template, ignore_errors=True)
            _launch_label_studio(venv, template, port=free_port()).stop()
            (template / "label-studio.log").unlink(missing_ok=True)
            (template / "complete").write_text(LABEL_STUDIO_VERSION)
    return template


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    """A server process started here, its URL and its log file."""

    process: subprocess.Popen
    url: str
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


def _start(name: str, command: list[str], *, url: str, log: Path, env: dict[str, str], cwd: Path) -> RunningServer:
    handle = log.open("w")
    process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    server = RunningServer(process, url, log)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with status {process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"{name} did not answer {url}/health within {START_TIMEOUT_SECONDS} s:\n{server.log_tail()}")


def start_label_studio(venv: Path, data_dir: Path, *, port: int) -> RunningServer:
    """`label-studio start` on 127.0.0.1:`port` with SQLite in `data_dir` (a new directory, copied
    from the venv's migrated template), one user whose legacy API token is API_TOKEN; loopback ML
    backends allowed (ML_BLOCK_LOCAL_IP and SSRF protection off: everything is local)."""
    shutil.copytree(_data_template(venv), data_dir, ignore=shutil.ignore_patterns("complete"))
    return _launch_label_studio(venv, data_dir, port=port)


def _launch_label_studio(venv: Path, data_dir: Path, *, port: int) -> RunningServer:
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "SSRF_PROTECTION_ENABLED": "false",
        "ML_BLOCK_LOCAL_IP": "false",
        "OMP_NUM_THREADS": "1",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "COLLECT_ANALYTICS": "false",
    }
    command = [
        str(venv / "bin" / "python"), "-m", "label_studio.server", "start", "--no-browser",
        "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir),
        "--username", USER_EMAIL, "--password", USER_PASSWORD,
        "--user-token", API_TOKEN, "--enable-legacy-api-token",
    ]  # fmt: skip
    return _start("label-studio", command, url=f"http://127.0.0.1:{port}", log=data_dir / "label-studio.log", env=env, cwd=data_dir)


def start_segany_serve(model_args: list[str], *, port: int, label_studio_url: str, work_dir: Path) -> RunningServer:
    """segany-serve (this checkout's) on 127.0.0.1:`port`, fetching images from `label_studio_url`."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [
        sys.executable, "-m", "segany_train.label_studio.backend", *model_args, "--device", "cpu",
        "--host", "127.0.0.1", "--port", str(port),
        "--label-studio-url", label_studio_url, "--label-studio-api-key", API_TOKEN,
        "--events", str(work_dir / "events.jsonl"),
    ]  # fmt: skip
    return _start("segany-serve", command, url=f"http://127.0.0.1:{port}", log=work_dir / "segany-serve.log", env=env, cwd=work_dir)
