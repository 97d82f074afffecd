"""A non-editable install works away from the repository: the project is installed with pip into a
fresh virtual environment that sees this interpreter's packages (the ones the README's test command
installed: pip, setuptools and the dependencies, so nothing is downloaded), and every Hydra entry
point composes its config from another directory."""

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "segany_train", "data_engine", "conf")
HYDRA_ENTRY_POINTS = {"segany-train": "model:", "segany-engine": "stage3:", "segany-stage3": "mode: task"}


def _run(command: list, cwd: Path) -> str:
    result = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A virtual environment with the project installed from a copy of the sources, not editable."""
    root = tmp_path_factory.mktemp("install")
    (root / "src").mkdir()
    for name in SOURCES:  # a copy: the build writes build/ and egg-info next to the sources
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, root / "src" / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, root / "src" / name)
    # Not --system-site-packages: from inside a venv that would expose the *base* interpreter's
    # packages (an old setuptools without bdist_wheel, no torch), not what the test command installed.
    # A .pth naming this interpreter's site directories puts them after the new venv's own, so the
    # installed copy is the one imported (plain paths: the editable install's hook is not run).
    _run([sys.executable, "-m", "venv", "--without-pip", root / "venv"], root)
    venv_site = Path(_run([root / "venv" / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root).strip())
    here = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (venv_site / "test_interpreter_packages.pth").write_text("".join(f"{path}\n" for path in here))
    pip = [root / "venv" / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"]
    _run([*pip, root / "src"], root)
    return root / "venv"


def test_the_wheel_holds_every_module_and_every_config(venv, tmp_path):
    site = Path(_run([venv / "bin" / "python", "-c", "import segany_train, sys; print(segany_train.__file__)"], tmp_path).strip()).parent.parent
    assert site.is_relative_to(venv), f"imported {site}, not the installed copy"
    for package in ("segany_train", "data_engine"):
        source = {p.relative_to(ROOT) for p in (ROOT / package).rglob("*.py")}
        assert source <= {p.relative_to(site) for p in (site / package).rglob("*.py")}, package
    configs = {p.relative_to(ROOT / "conf") for p in (ROOT / "conf").rglob("*.yaml")}
    assert configs == {p.relative_to(site / "segany_train" / "conf") for p in (site / "segany_train" / "conf").rglob("*.yaml")}


def test_the_wheel_carries_the_engines_seed_model(venv, tmp_path):
    # segany-engine starts from it by default: the installed copy must hold it and pass its hash check
    output = _run([venv / "bin" / "python", "-m", "segany_train.model.seed_model", "check"], tmp_path)
    assert "(matches)" in output and str(venv) in output


@pytest.mark.parametrize("entry_point", sorted(HYDRA_ENTRY_POINTS))
def test_every_entry_point_composes_its_config_away_from_the_repository(venv, tmp_path, entry_point):
    output = _run([venv / "bin" / entry_point, "--cfg", "job"], tmp_path)
    assert HYDRA_ENTRY_POINTS[entry_point] in output
