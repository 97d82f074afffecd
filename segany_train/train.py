"""Training entry point: `segany-train [hydra overrides]`. The work is `train(cfg)` in
`segany_train/training/run.py`; `experiment=finetune_folder` runs the fine-tuning flow instead."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from segany_train.config_paths import CONFIG_DIR
from segany_train.data.pipeline import NoUsableSamples
from segany_train.model import SamCheckpointError
from segany_train.os_errors import describe_os_error
from segany_train.training.run import RunConfigError, train

# how a worker's traceback names the error on its last line
_NO_USABLE_SAMPLES_PREFIX = f"{NoUsableSamples.__module__}.{NoUsableSamples.__name__}: "


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    from segany_train.finetune_folder import FinetuneConfigError, finetune_folder

    try:
        if cfg.get("finetune") is not None:  # experiment=finetune_folder: convert, score, train, score, report
            summary = finetune_folder(cfg)
            print(Path(summary["report_dir"], "report.md").read_text())
            return
        metrics = train(cfg)
    except (SamCheckpointError, FileNotFoundError, RunConfigError, FinetuneConfigError) as error:
        sys.exit(f"segany-train: error: {error}")
    except OSError as error:  # a full disk, a read-only run directory
        sys.exit(f"segany-train: error: {describe_os_error(error, rerun='the run resumes from its last complete checkpoint')}")
    except NoUsableSamples as error:
        # from a DataLoader worker the message carries the worker's traceback; its last line is ours
        sys.exit(f"segany-train: error: {str(error).strip().splitlines()[-1].removeprefix(_NO_USABLE_SAMPLES_PREFIX)}")
    for key in sorted(metrics):
        if key.startswith("val/"):
            print(f"{key}: {metrics[key]:.4f}")


if __name__ == "__main__":
    main()
