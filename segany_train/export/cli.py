"""`segany-export`: one checkpoint (a fine-tuning run's `.ckpt` with LoRA or frozen parts, an official
`.pth`, or a Hugging Face SamModel) written in the three formats other tools load:

    segany-export --checkpoint outputs/finetune_folder/checkpoints/last.ckpt --out exported/

- `exported/sam_official.pth`: the official state dict (`segment_anything.sam_model_registry[...]`
  and this project load it strictly); LoRA adapters merged;
- `exported/huggingface/`: config.json + model.safetensors (`transformers.SamModel.from_pretrained`);
- `exported/sam_decoder.onnx`: prompt encoder + mask decoder + postprocessing with the official ONNX
  inputs and outputs, checked in ONNX Runtime against PyTorch before the command ends.

The model is built once (`inference_options.build_model`: LoRA merged on load, the size read from
the checkpoint), and each format is written by its own writer (`save_official_checkpoint`,
`save_hf_checkpoint`, `export_onnx`).
"""

import argparse
import sys
from pathlib import Path

from segany_train.export.onnx_export import check_with_onnxruntime, export_onnx
from segany_train.inference.cli_options import build_model
from segany_train.model import SamCheckpointError
from segany_train.model.checkpoint import save_official_checkpoint
from segany_train.model.hf_layout import save_hf_checkpoint

FORMATS = ("official", "hf", "onnx")
OFFICIAL_NAME = "sam_official.pth"
HF_DIRECTORY = "huggingface"
ONNX_NAME = "sam_decoder.onnx"
ONNX_TOLERANCE = 1e-3  # largest ONNX Runtime vs PyTorch difference accepted


def export_all(
    checkpoint: Path, out_dir: Path, *, formats: tuple[str, ...] = FORMATS, trust: bool = False, overwrite: bool = False
) -> dict[str, Path]:
    """Writes `checkpoint`'s model in each of `formats` under `out_dir`; returns {format: path}.
    FileExistsError, before the checkpoint is read, when an earlier export is there and not `overwrite`;
    RuntimeError when the ONNX model differs from PyTorch by more than ONNX_TOLERANCE."""
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"formats must be among {FORMATS}, got {sorted(unknown)}")
    names = {"official": OFFICIAL_NAME, "hf": HF_DIRECTORY, "onnx": ONNX_NAME}
    earlier = [str(out_dir / names[kind]) for kind in formats if (out_dir / names[kind]).exists()]
    if earlier and not overwrite:
        raise FileExistsError(f"{', '.join(earlier)} already exist (an earlier export); pass --overwrite to replace it, or choose another --out")
    sam = build_model(checkpoint, None, trust=trust).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    if "official" in formats:
        written["official"] = save_official_checkpoint(sam, out_dir / OFFICIAL_NAME)
    if "hf" in formats:
        written["hf"] = save_hf_checkpoint(sam, out_dir / HF_DIRECTORY)
    if "onnx" in formats:
        path = export_onnx(sam, out_dir / ONNX_NAME)
        worst = max(check_with_onnxruntime(sam, path).values())
        if worst > ONNX_TOLERANCE:
            raise RuntimeError(f"{path}: ONNX Runtime differs from PyTorch by {worst:.1e} (> {ONNX_TOLERANCE:.0e})")
        written["onnx"] = path
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="segany-export", description="Write a SAM checkpoint as official .pth, Hugging Face and ONNX.")
    parser.add_argument("--checkpoint", required=True, type=Path, help="segany-train .ckpt, official .pth or Hugging Face folder/file")
    parser.add_argument("--out", required=True, type=Path, help=f"output folder ({OFFICIAL_NAME}, {HF_DIRECTORY}/, {ONNX_NAME})")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="fully unpickle the checkpoint (it can run code); without it only tensors and plain containers load",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out (refused without it)")
    args = parser.parse_args(argv)
    try:
        written = export_all(
            args.checkpoint, args.out, formats=tuple(args.formats), trust=args.trust_checkpoint, overwrite=args.overwrite
        )
    except (FileNotFoundError, SamCheckpointError, OSError, ImportError, RuntimeError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    for kind, path in written.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    sys.exit(main())
