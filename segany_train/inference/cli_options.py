"""Command-line options shared by the inference commands (segany-eval, segany-amg): which model to
run and the automatic mask generator's settings (the official generator's keyword arguments)."""

import argparse
import tempfile
from dataclasses import fields
from pathlib import Path

import torch

from segany_train.amg.generator_settings import GeneratorSettings
from segany_train.inference.precision import PRECISIONS
from segany_train.model import SAM_CONFIGS, Sam, SamCheckpointError, build_sam_by_name, build_sam_from_checkpoint
from segany_train.model.checkpoint import load_checkpoint_file


def add_model_arguments(parser: argparse.ArgumentParser, *, device: bool = True) -> None:
    """--checkpoint, --model-type, --trust-checkpoint, --seed and (with `device`) --device and
    --precision; without it the model stays on the CPU in fp32 (an export traces there)."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--checkpoint",
        type=Path,
        help="official SAM .pth or segany-train .ckpt; the size is read from the file unless --model-type is given",
    )
    group.add_argument(
        "--model-type",
        choices=sorted(SAM_CONFIGS),
        help="SAM size; without --checkpoint the weights are random (for smoke tests)",
    )
    group.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="fully unpickle the checkpoint (it can run code); without it only tensors and plain containers load",
    )
    if device:
        group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        group.add_argument(
            "--precision",
            choices=PRECISIONS,
            default="fp32",
            help="bf16: the model runs under bfloat16 autocast (faster on CPUs with AVX512-BF16/AMX and on GPUs; "
            "masks within ~0.5%% IoU of fp32, docs/speed-and-memory.md)",
        )
    else:
        parser.set_defaults(device="cpu")
    group.add_argument("--seed", type=int, default=0, help="seed of random weights and of sampled subsets")


def load_model(args: argparse.Namespace) -> Sam:
    """The Sam the model options name, in eval mode on args.device.

    Raises FileNotFoundError / ValueError (SamCheckpointError) with a one-line message.
    """
    if args.checkpoint is None and args.model_type is None:
        raise ValueError("give --checkpoint, --model-type (random weights), or both")
    return build_model(args.checkpoint, args.model_type, trust=args.trust_checkpoint, seed=args.seed).to(args.device).eval()


def build_model(checkpoint: Path | None, model_type: str | None, *, trust: bool = False, seed: int = 0) -> Sam:
    """The checkpoint's Sam (its size read from the file, or `model_type` checked against it), or a
    `model_type` with random weights drawn from `seed`. Checkpoint errors are one line naming the file;
    the file is fully unpickled only when `trust` (see `load_checkpoint_file`)."""
    if checkpoint is None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return build_sam_by_name(model_type)
    source = load_checkpoint_file(Path(checkpoint), trust=trust)
    try:
        return build_sam_from_checkpoint(source) if model_type is None else build_sam_by_name(model_type, source)
    except SamCheckpointError as error:
        raise SamCheckpointError(f"{checkpoint}: {error}") from None


def describe_model(args: argparse.Namespace) -> str:
    if args.checkpoint is None:
        return f"{args.model_type} (random weights, seed {args.seed})"
    return str(args.checkpoint) + (f" as {args.model_type}" if args.model_type else "")


def add_generator_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per `GeneratorSettings` field, with its default."""
    group = parser.add_argument_group("automatic mask generator (official defaults)")
    for setting in fields(GeneratorSettings):
        kind = float if setting.default is None else type(setting.default)  # max_mask_area_fraction: off
        group.add_argument(
            f"--{setting.name.replace('_', '-')}", type=kind, default=setting.default, metavar=kind.__name__.upper()
        )


def generator_settings(args: argparse.Namespace) -> GeneratorSettings:
    """The generator settings the options set."""
    return GeneratorSettings(**{setting.name: getattr(args, setting.name) for setting in fields(GeneratorSettings)})


def prepare_output_directory(path: Path, option: str) -> None:
    """Creates the output directory `path` and writes a probe file in it, so that an output that
    cannot be written (a file in the way, a read-only place) fails before the work, not after it.
    ValueError in one line naming the option and the path."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ValueError(f"{option} {path} cannot be written: {error.strerror or error}") from None
