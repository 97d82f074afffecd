"""Where Hydra's configs are: one small module, so that what needs the path (the engine's entry
points, the training entry, tests) does not import Lightning and Hydra's training stack for it."""

from pathlib import Path


def _config_dir() -> Path:
    """Hydra's configs: `segany_train/conf` in an installed wheel (pyproject.toml ships the
    repository's conf/ there), else the repository's top-level conf/ beside this package (a checkout
    or an editable install, where conf/ is the copy to edit)."""
    package = Path(__file__).resolve().parent
    return package / "conf" if (package / "conf").is_dir() else package.parent / "conf"


CONFIG_DIR = str(_config_dir())
