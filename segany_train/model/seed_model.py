"""The shipped seed model (the data engine's first model, segany-finetune's default start): weights only,
checked by SHA-256 before they are used.

SAM's data engine started from a model trained on public segmentation data. The miniature ships the
same thing: `segany_train/model/seed/engine_seed.pt`, a SAM state dict in fp16 (no pickled objects, so it
loads with `weights_only=True`), trained by `segany-train experiment=engine_seed` on a synthetic
corpus in another style than the engine's pool. `export` writes such a file from a training
checkpoint and prints its hash:

    python -m segany_train.model.seed_model export outputs/engine_seed/checkpoints/last.ckpt
"""

import argparse
import hashlib
from pathlib import Path

import torch

from segany_train.model.checkpoint import read_state_dict

BUILTIN_PATH = Path(__file__).resolve().parent / "seed" / "engine_seed.pt"
BUILTIN_SHA256 = "2266fab9e19ddea3fceaaf3e98034f4816bf8688e1383049f389792dab152f1b"
BUILTIN = "builtin"  # the config value naming the shipped seed


class SeedModelError(ValueError):
    """The seed model file is missing or is not the file the config names."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_seed_checkpoint(checkpoint: str, sha256: str | None = None) -> Path:
    """The seed weights to start the engine from, after checking the file's SHA-256.

    checkpoint: "builtin" (the shipped file, checked against BUILTIN_SHA256) or a path; sha256: the
    expected hash of a path (None: not checked). A missing file or another hash is one clear error.
    """
    path, expected = (BUILTIN_PATH, BUILTIN_SHA256) if checkpoint == BUILTIN else (Path(checkpoint), sha256)
    if not path.is_file():
        raise SeedModelError(f"seed model not found: {path}")
    if expected is not None:
        found = file_sha256(path)
        if found != expected:
            raise SeedModelError(
                f"seed model {path} has SHA-256 {found}, expected {expected}: the file is corrupt or not the "
                "one this config names (re-fetch it, or set seed.sha256 for a seed of your own)"
            )
    return path


def export_seed_weights(checkpoint: str | Path, out: str | Path = BUILTIN_PATH) -> tuple[Path, str]:
    """Writes the SAM weights of a training checkpoint as an fp16 state dict; returns (path, SHA-256)."""
    weights = read_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    torch.save(half, out)
    return out, file_sha256(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The data engine's seed model file.")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write a training checkpoint's weights as the fp16 seed file")
    export.add_argument("checkpoint", type=Path)
    export.add_argument("--out", type=Path, default=BUILTIN_PATH)
    sub.add_parser("check", help="verify the shipped seed file's SHA-256")
    args = parser.parse_args(argv)
    if args.command == "export":
        path, digest = export_seed_weights(args.checkpoint, args.out)
        print(f"{path}: {path.stat().st_size / 2**20:.2f} MiB, sha256 {digest}")
    else:
        print(f"{resolve_seed_checkpoint(BUILTIN)}: sha256 {BUILTIN_SHA256} (matches)")


if __name__ == "__main__":
    main()
