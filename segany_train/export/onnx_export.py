"""ONNX export of SAM's prompt encoder + mask decoder + mask postprocessing, and `segany-export-onnx`.

The exported graph has the official model's input and output names, shapes and semantics (see
`SamOnnxModel`), so applications written for the official `sam_onnx_example.onnx` run it unchanged:
the image embedding comes from the PyTorch image encoder (`SamPredictor.get_image_embedding()`), the
prompts are decoded by ONNX Runtime.
"""

import argparse
import copy
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from segany_train.export.onnx_model import SamOnnxModel
from segany_train.inference.cli_options import add_model_arguments, load_model
from segany_train.model import Sam

INPUT_NAMES = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size")
OUTPUT_NAMES = ("masks", "iou_predictions", "low_res_masks")
DYNAMIC_AXES = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}
# scaled_dot_product_attention, used by the decoder's attention, has an ONNX form from opset 14 on.
MIN_OPSET = 14


def example_inputs(sam: Sam, *, num_points: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs of the exported model's shapes (random prompts, a mask prompt, a 1500x2250 image)."""
    gen = torch.Generator().manual_seed(seed)
    h, w = sam.prompt_encoder.image_embedding_size
    return {
        "image_embeddings": torch.randn(1, sam.prompt_encoder.embed_dim, h, w, generator=gen),
        "point_coords": torch.randint(0, sam.img_size, (1, num_points, 2), generator=gen).float(),
        "point_labels": torch.randint(0, 4, (1, num_points), generator=gen).float(),
        "mask_input": torch.randn(1, 1, 4 * h, 4 * w, generator=gen),
        "has_mask_input": torch.tensor([1.0]),
        "orig_im_size": torch.tensor([1500.0, 2250.0]),
    }


def onnx_module(
    sam: Sam, *, return_single_mask: bool, use_stability_score: bool = False, gelu_approximate: bool = False
) -> SamOnnxModel:
    """The module that is exported: a copy of the prompt encoder and mask decoder (small next to the
    image encoder), on the CPU in float32 and eval mode, so that `sam` itself is left as it was.

    gelu_approximate: GELU as its tanh approximation (for runtimes with a slow or missing erf).
    """
    model = SamOnnxModel(sam, return_single_mask=return_single_mask, use_stability_score=use_stability_score)
    model = copy.deepcopy(model).cpu().float().eval()
    if gelu_approximate:
        for module in model.modules():
            if isinstance(module, torch.nn.GELU):
                module.approximate = "tanh"
    return model


def export_onnx(
    sam: Sam,
    output: str | Path,
    *,
    opset: int = 17,
    return_single_mask: bool = False,
    use_stability_score: bool = False,
    gelu_approximate: bool = False,
) -> Path:
    """Writes the prompt encoder + mask decoder + postprocessing of `sam` as an ONNX model.

    The number of points is a dynamic axis; the output size follows orig_im_size at run time. The
    options are the official exporter's (see `onnx_module`).
    """
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET} (attention export), got {opset}")
    model = onnx_module(
        sam,
        return_single_mask=return_single_mask,
        use_stability_score=use_stability_score,
        gelu_approximate=gelu_approximate,
    )
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # The legacy (TorchScript) exporter is chosen on purpose: the torch.export one needs onnxscript
        # and data-dependent output sizes. Shape checks in our modules trace as constants, which is
        # right here: the embedding and mask-prompt shapes are fixed inputs of the exported graph.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            tuple(example_inputs(sam).values()),
            str(output),
            dynamo=False,
            export_params=True,
            opset_version=opset,
            do_constant_folding=True,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=DYNAMIC_AXES,
        )
    return output


def quantize_onnx(model_path: str | Path, output: str | Path) -> Path:
    """Dynamic int8 quantisation of an exported model (uint8 weights, per-tensor, as officially)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(
        model_input=str(model_path),
        model_output=str(output),
        per_channel=False,
        reduce_range=False,
        weight_type=QuantType.QUInt8,
    )
    return output


def check_with_onnxruntime(
    sam: Sam,
    model_path: str | Path,
    *,
    return_single_mask: bool = False,
    use_stability_score: bool = False,
    gelu_approximate: bool = False,
) -> dict[str, float]:
    """Runs an exported model in ONNX Runtime on `example_inputs` with 5 and 2 points and returns, per
    output, the largest absolute difference from the PyTorch module it was exported from (the same
    options). Raises RuntimeError when an output's shape differs."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    reference = onnx_module(
        sam,
        return_single_mask=return_single_mask,
        use_stability_score=use_stability_score,
        gelu_approximate=gelu_approximate,
    )
    worst = dict.fromkeys(OUTPUT_NAMES, 0.0)
    for num_points in (5, 2):
        inputs = example_inputs(sam, num_points=num_points, seed=num_points)
        outputs = session.run(list(OUTPUT_NAMES), {k: v.numpy() for k, v in inputs.items()})
        for name, got, want in zip(OUTPUT_NAMES, outputs, reference(**inputs)):
            if got.shape != tuple(want.shape):
                raise RuntimeError(f"ONNX output {name} has shape {got.shape}, PyTorch {tuple(want.shape)}")
            worst[name] = max(worst[name], float(np.abs(got - want.numpy()).max()))
    return worst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="segany-export-onnx",
        description="Export SAM's prompt encoder and mask decoder (with mask postprocessing) to ONNX.",
    )
    add_model_arguments(parser, device=False)
    parser.add_argument("--output", required=True, help="where to write the .onnx model")
    parser.add_argument("--opset", type=int, default=17, help=f"ONNX opset (>= {MIN_OPSET}; default 17)")
    parser.add_argument(
        "--return-single-mask",
        action="store_true",
        help="return only the best mask (fewer masks to upscale for large images)",
    )
    parser.add_argument("--quantize-out", help="also write a dynamically int8-quantised model here")
    parser.add_argument("--gelu-approximate", action="store_true", help="GELU as its tanh approximation")
    parser.add_argument(
        "--use-stability-score",
        action="store_true",
        help="report the stability score of the low-res masks (offset 1.0) instead of the predicted IoU",
    )
    args = parser.parse_args(argv)
    if args.opset < MIN_OPSET:
        parser.error(f"--opset must be >= {MIN_OPSET}, got {args.opset}")
    try:
        sam = load_model(args)
    except (FileNotFoundError, ValueError) as error:  # SamCheckpointError is a ValueError
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    options = {
        "return_single_mask": args.return_single_mask,
        "use_stability_score": args.use_stability_score,
        "gelu_approximate": args.gelu_approximate,
    }
    path = export_onnx(sam, args.output, opset=args.opset, **options)
    diffs = check_with_onnxruntime(sam, path, **options)
    summary = ", ".join(f"{name} {diff:.1e}" for name, diff in diffs.items())
    print(f"wrote {path}; ONNX Runtime vs PyTorch, max |difference|: {summary}")
    if args.quantize_out:
        print(f"wrote {quantize_onnx(path, args.quantize_out)} (dynamic int8 quantisation)")


if __name__ == "__main__":
    sys.exit(main())
