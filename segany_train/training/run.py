"""`train(cfg)`: a training run from a composed config (model, data, logger, trainer built from it),
the plain function under `segany-train`'s `@hydra.main` (`segany_train/train.py`); tests and the data
engine call it directly."""

import pickle
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from segany_train.data.datamodule import SA1BDataModule
from segany_train.data.sam_sample import SamSampleConfig
from segany_train.model import Sam, SamCheckpointError, SamConfig, build_sam_by_name
from segany_train.model.attention_init import tie_cross_attention_queries_and_keys
from segany_train.model.checkpoint import _first_line, load_checkpoint_file
from segany_train.model.lora import add_lora_to_encoder_attention
from segany_train.model.mae import load_mae_encoder
from segany_train.model.sam_config import describe_size
from segany_train.prompting.rollout import RolloutConfig
from segany_train.training.checkpoint_io import AtomicCheckpointIO
from segany_train.training.lightning_warnings import lightning_warnings_filtered
from segany_train.training.losses import LossWeights
from segany_train.training.module import SamTrainingModule
from segany_train.training.optim import OptimConfig
from segany_train.training.overlays import MaskOverlayCallback

FREEZABLE = ("image_encoder", "prompt_encoder", "mask_decoder")


def _dataclass_from(cls, node: DictConfig | dict) -> Any:
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def optim_config(cfg: DictConfig) -> OptimConfig:
    """`cfg.optim` as an OptimConfig; a null `total_steps` (the default) is `trainer.max_steps`, so the
    cosine schedule ends where training does. An explicit one is kept (the data engine runs one
    schedule across many shorter retrains)."""
    optim = _dataclass_from(OptimConfig, cfg.optim)
    return optim if optim.total_steps is not None else replace(optim, total_steps=int(cfg.trainer.max_steps))


def build_model(model_cfg: DictConfig) -> Sam:
    """The SAM to train: a registry size with overrides, a checkpoint, frozen parts and LoRA."""
    overrides = dict(OmegaConf.to_container(model_cfg.overrides, resolve=True) or {})
    overrides.setdefault("encoder_drop_path_rate", model_cfg.drop_path)
    checkpoint = None
    if model_cfg.checkpoint is not None:
        # weights only unless the config says the file is trusted (a pickle can run code)
        checkpoint = load_checkpoint_file(Path(model_cfg.checkpoint), trust=bool(model_cfg.get("trust_checkpoint", False)))
    try:
        sam = build_sam_by_name(model_cfg.name, checkpoint=checkpoint, **overrides)
    except SamCheckpointError as error:
        raise SamCheckpointError(f"{model_cfg.checkpoint}: {error}") from None
    if model_cfg.get("mae_checkpoint") is not None:
        if checkpoint is not None:
            raise ValueError("model.mae_checkpoint initialises the encoder of a new model: set it or model.checkpoint, not both")
        mae = load_checkpoint_file(Path(model_cfg.mae_checkpoint), trust=bool(model_cfg.get("trust_checkpoint", False)))
        load_mae_encoder(sam.image_encoder, mae)
    for part in model_cfg.freeze:
        if part not in FREEZABLE:
            raise ValueError(f"model.freeze entries must be among {FREEZABLE}, got {part!r}")
        # eval mode too: a frozen encoder must not keep drop path on (SamTrainingModule.train keeps it so)
        getattr(sam, part).requires_grad_(False).eval()
    # recompute each encoder block's activations in the backward pass: memory for compute
    sam.image_encoder.activation_checkpointing = bool(model_cfg.get("activation_checkpointing", False))
    if model_cfg.tied_cross_attention_init > 0 and model_cfg.checkpoint is None:
        tie_cross_attention_queries_and_keys(sam.mask_decoder, scale=model_cfg.tied_cross_attention_init)
    if model_cfg.lora_rank > 0:
        add_lora_to_encoder_attention(sam.image_encoder, rank=model_cfg.lora_rank, alpha=model_cfg.lora_alpha)
    return sam


def _mask_size(value: int | str | None, image_size: int, patch_size: int) -> int:
    """`data.mask_size`: null is the decoder's low-res side (4x the embedding's: 256 for 1024 px with
    16-px patches), "input" the input resolution (SAM 2 supervises there), a number itself."""
    if value is None:
        return 4 * image_size // patch_size
    return image_size if value == "input" else value


def build_training_module(cfg: DictConfig, sam: Sam) -> SamTrainingModule:
    """The LightningModule a composed config describes, around `sam`."""
    return SamTrainingModule(
        sam,
        optim=optim_config(cfg),
        rollout=_dataclass_from(RolloutConfig, cfg.prompting),
        loss=_dataclass_from(LossWeights, cfg.loss),
        seed=cfg.seed,
        overlay_every_n_steps=cfg.logger.log_images_every_n_steps,
    )


def build_datamodule(cfg: DictConfig, sam: Sam) -> SA1BDataModule:
    """The DataModule of `cfg.data`, its random draws seeded by the run's `cfg.seed`; a synthetic
    corpus the config names is written in its `prepare_data` (one process, not every rank)."""
    data_cfg = cfg.data
    image_size = data_cfg.image_size or sam.image_encoder.img_size
    sample = SamSampleConfig(
        image_size=image_size,
        # the decoder's low-res logits: 4x the embedding's side (SAM: 256 for 1024 px with patch 16)
        mask_size=_mask_size(data_cfg.mask_size, image_size, sam.image_encoder.patch_size),
        max_masks=data_cfg.max_masks,
        max_area_fraction=data_cfg.max_area_fraction,
        min_mask_pixels=data_cfg.min_mask_pixels,
        large_scale_jitter=data_cfg.large_scale_jitter,
        horizontal_flip=data_cfg.horizontal_flip,
    )
    return SA1BDataModule(
        train_shards=data_cfg.train_shards,
        val_shards=data_cfg.val_shards,
        sample=sample,
        batch_size=data_cfg.batch_size,
        num_workers=data_cfg.num_workers,
        prefetch_factor=data_cfg.prefetch_factor,
        train_mode=data_cfg.train_mode,
        samples_per_epoch=data_cfg.samples_per_epoch,
        shuffle_buffer=data_cfg.shuffle_buffer,
        seed=cfg.seed,
        synthetic=OmegaConf.to_container(data_cfg.synthetic, resolve=True) if data_cfg.get("synthetic") else None,
        max_consecutive_skips=data_cfg.max_consecutive_skips,
    )


def build_logger(cfg: DictConfig, run_dir: Path):
    """wandb (offline unless logger.mode=online; the run id is kept in the run directory so a resumed
    run continues the same wandb run), CSV or TensorBoard."""
    kind = cfg.logger.kind
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else None
        logger = WandbLogger(
            project=cfg.logger.project, save_dir=str(run_dir), mode=cfg.logger.mode, id=run_id, resume="allow"
        )
        # rank_zero_only.rank reads RANK, LOCAL_RANK or SLURM_PROCID: under srun only the last is set
        if run_id is None and rank_zero_only.rank == 0:
            id_file.write_text(logger.experiment.id)
        return logger
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        # each launch its own csv/version_<n>/metrics.csv: Lightning rewrites an existing one on resume
        return CSVLogger(save_dir=str(run_dir), name="csv")
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=0)
    raise ValueError(f"logger.kind must be wandb, csv or tensorboard, got {kind!r}")


def _resume_path(cfg: DictConfig, run_dir: Path, checkpoint_dir: Path) -> str | None:
    """ckpt_path=last: the newer of checkpoints/last.ckpt and the highest hpc_ckpt_<n>.ckpt.

    Lightning writes hpc_ckpt_<n>.ckpt into the run directory on SLURM's requeue signal (SIGUSR1), but
    restores it by itself only when fit gets no ckpt_path, so with ckpt_path=last the choice is here.
    """
    if cfg.ckpt_path != "last":
        return cfg.ckpt_path
    candidates = [checkpoint_dir / "last.ckpt"]
    hpc = sorted(run_dir.glob("hpc_ckpt_*.ckpt"), key=lambda p: int(p.stem.removeprefix("hpc_ckpt_")))
    candidates += hpc[-1:]
    existing = [p for p in candidates if p.exists()]
    return str(max(existing, key=lambda p: p.stat().st_mtime_ns)) if existing else None


class RunConfigError(ValueError):
    """A run that cannot work as configured: a value out of range, or a run directory holding a run of
    another model than the config builds."""


def check_training_values(cfg: DictConfig) -> None:
    """RunConfigError naming the first value that cannot work, before anything is built or written
    (a string or a fraction where a count goes failed 7-24 s later, inside Lightning, with a traceback)."""
    max_steps = cfg.trainer.get("max_steps", -1)
    if not _is_integer(max_steps) or max_steps == 0 or max_steps < -1:  # -1: Lightning's "no step limit"
        raise RunConfigError(f"trainer.max_steps must be a positive integer (or -1 for no limit), got {max_steps!r}")
    if cfg.callbacks.save_last not in (True, False, "link"):
        raise RunConfigError(f"callbacks.save_last must be link, true or false, got {cfg.callbacks.save_last!r}")
    mask_size = cfg.data.get("mask_size")
    if mask_size not in (None, "input") and (not _is_integer(mask_size) or mask_size < 1):
        raise RunConfigError(f"data.mask_size must be null, input or a positive integer, got {mask_size!r}")
    for key in ("batch_size", "max_masks"):
        if not _is_integer(cfg.data[key]) or cfg.data[key] < 1:
            raise RunConfigError(f"data.{key} must be an integer of at least 1, got {cfg.data[key]!r}")
    for section, cls in (("prompting", RolloutConfig), ("loss", LossWeights)):
        try:
            _dataclass_from(cls, cfg[section])
        except (TypeError, ValueError) as error:
            raise RunConfigError(f"{section}: {error}") from None
    try:
        optim_config(cfg)
    except (TypeError, ValueError) as error:
        raise RunConfigError(str(error) if str(error).startswith("optim.") else f"optim: {error}") from None


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_resumable(checkpoint: Path, sam: Sam) -> None:
    """RunConfigError when `checkpoint` (a run's own, to resume from) is not a readable Lightning
    checkpoint, or was trained with another SAM architecture than `sam`'s. Only the hyper-parameters
    are read (the tensors are memory-mapped)."""
    try:
        loaded = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, KeyError, OSError, AttributeError, IndexError, TypeError) as error:
        raise RunConfigError(_unresumable(checkpoint, f"it is not a readable checkpoint: {_first_line(error)}")) from None
    if not isinstance(loaded, dict) or not isinstance(loaded.get("state_dict"), dict):
        raise RunConfigError(_unresumable(checkpoint, "it is not a Lightning checkpoint of a segany-train run (no state_dict)"))
    saved = loaded.get("hyper_parameters", {}).get("sam")
    if not saved:
        return
    found = SamConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    expected = sam.config
    if replace(found, encoder_drop_path_rate=expected.encoder_drop_path_rate) != expected:
        raise RunConfigError(
            f"{checkpoint} is a run of {describe_size(found)} but the config builds {describe_size(expected)}; "
            "use another run_dir for another model"
        )


def _unresumable(checkpoint: Path, why: str) -> str:
    return (
        f"cannot resume from {checkpoint}: {why}; move it out of the run directory (or delete it) and rerun "
        "(the run then resumes from its newest hpc_ckpt_<n>.ckpt, if any, or starts afresh), or set ckpt_path=<a good checkpoint>"
    )


def train(cfg: DictConfig) -> dict[str, float]:
    """Trains as configured; returns the final logged metrics. Re-running the same config resumes."""
    check_training_values(cfg)
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.run_dir)
    sam = build_model(cfg.model)
    checkpoint_dir = run_dir / "checkpoints"
    fast = bool(cfg.trainer.fast_dev_run)
    resume = None if fast else _resume_path(cfg, run_dir, checkpoint_dir)
    if resume is not None:
        check_resumable(Path(resume), sam)  # before anything in the run directory is written
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    module = build_training_module(cfg, sam)
    datamodule = build_datamodule(cfg, sam)
    callbacks = [] if fast else [
        ModelCheckpoint(
            dirpath=checkpoint_dir,
            every_n_train_steps=cfg.callbacks.checkpoint_every_n_steps,
            save_last=cfg.callbacks.save_last,
        )
    ]
    if cfg.logger.log_images_every_n_steps and not fast:
        callbacks.append(MaskOverlayCallback(cfg.logger.log_images_every_n_steps, run_dir / "overlays"))
    if cfg.callbacks.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=1))
    trainer_cfg = instantiate(cfg.trainer, _convert_="all")  # a strategy or plugin may be a _target_ object
    plugins = trainer_cfg.pop("plugins", None) or []
    with lightning_warnings_filtered():  # what does not apply to this training (lightning_warnings.py)
        trainer = L.Trainer(
            **trainer_cfg,
            plugins=[*(plugins if isinstance(plugins, list) else [plugins]), AtomicCheckpointIO()],  # no half-written checkpoint
            default_root_dir=str(run_dir),
            logger=False if fast else build_logger(cfg, run_dir),
            callbacks=callbacks,
            enable_progress_bar=bool(cfg.callbacks.progress_bar),
        )
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
