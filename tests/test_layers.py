"""The layers of docs/layout.md, read from the imports of every module (module level and inside
functions alike): nothing under segany_train/ imports data_engine, each layer of segany_train imports
only the layers listed above it, evaluation/ does not import training/, and model/ and prompting/
import no framework (Lightning, Hydra, OmegaConf)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "segany_train"
# docs/layout.md's order: a layer may import the layers before it (config_paths.py, os_errors.py,
# atomic_files.py and the package's __init__ from anywhere); the entry points are one layer
LAYERS = [
    {"model"},
    {"data"},
    {"prompting"},
    {"amg"},
    {"inference"},
    {"training"},
    {"evaluation"},
    {"export"},
    {"box_detection"},
    {"label_studio"},
    {"train", "finetune_folder"},
]
ANYWHERE = {"config_paths", "os_errors", "atomic_files", "__init__"}
FRAMEWORKS = ("lightning", "pytorch_lightning", "hydra", "omegaconf")
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "conf" not in p.relative_to(PACKAGE).parts)


def imported_modules(source: str) -> list[str]:
    """Every absolute module name an import statement of the source names, wherever it stands."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def layer_of(name: str) -> int | None:
    """The index in LAYERS of a segany_train part (a subpackage or a top-level module)."""
    return next((i for i, layer in enumerate(LAYERS) if name in layer), None)


def part(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def test_the_walk_sees_imports_wherever_they_stand():
    source = "import os\nfrom data_engine.engine import main\ndef f():\n    import data_engine.ledger as l\n    from . import x\n"
    assert imported_modules(source) == ["os", "data_engine.engine", "data_engine.ledger"]


def test_every_part_of_the_package_has_a_layer():
    unknown = sorted({part(p) for p in MODULES} - ANYWHERE - set().union(*LAYERS))
    assert not unknown, f"segany_train parts without a layer in docs/layout.md and LAYERS: {unknown}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_downward_only(path):
    where = path.relative_to(ROOT)
    imports = imported_modules(path.read_text())
    upward = [n for n in imports if n.split(".")[0] == "data_engine"]
    assert not upward, f"{where} imports {upward}: segany_train must not depend on the data engine built on it"
    if part(path) in ANYWHERE:
        return
    own = layer_of(part(path))
    inner = {n.split(".")[1] for n in imports if n.startswith("segany_train.")} - ANYWHERE
    above = sorted(name for name in inner if (layer_of(name) or 0) > own)
    assert not above, f"{where} ({part(path)}) imports layers listed after it in docs/layout.md: {above}"
    if part(path) == "evaluation":
        assert "training" not in inner, f"{where}: evaluation/ imports training/"
    if part(path) in ("model", "prompting"):
        frameworks = [n for n in imports if n.split(".")[0] in FRAMEWORKS]
        assert not frameworks, f"{where} imports {frameworks}: model/ and prompting/ stay plain torch"


def test_the_data_engine_does_use_the_package():
    """A positive control for the walk: the engine's modules do import segany_train."""
    engine = (ROOT / "data_engine" / "engine.py").read_text()
    assert any(n.startswith("segany_train.") for n in imported_modules(engine))
