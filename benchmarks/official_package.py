"""Our predictor and automatic mask generator against the official `segment-anything` package, in one
process, on the same weights, fp32 (and our bf16), the calls alternating round by round.

The official package is not a dependency of this project: this script runs in a venv of its own,
with the project imported from this checkout (the guide's venv, plus what the project imports):

    python -m venv /tmp/official
    /tmp/official/bin/pip install torch==2.14.1 torchvision==0.29.1 segment-anything \
        opencv-python-headless pycocotools braceexpand webdataset pillow tqdm scipy
    /tmp/official/bin/python benchmarks/official_package.py [--threads 2] [--rounds 5]

Rows (median (min-max) over the rounds, and its multiple of the arithmetic floor: the FLOPs
`torch.utils.flop_counter` counts over our call, at this machine's matrix-product throughput measured
in the same run, as `roofline.py` does):
- `set_image`: the encoder on a 1024x1024 image (vit_b, random weights), ours fp32 and bf16;
- `1 prompt`: `predict` with one point after `set_image` (multimask, masks at image size);
- `64 prompts`: one `predict_torch` call with 64 single points, per prompt;
- `AMG`: `generate` with the shipped engine seed (a 256-px model), crops on (`crop_n_layers=1`), 32x32
  points, on a 512x512 synthetic fluorescent image; the thresholds lowered to predicted IoU 0.5 and
  stability 0.7 (the miniature seed scores below the official 0.88, which keeps no mask); the masks
  of the two are matched one-to-one (IoU, pycocotools).
"""

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

try:
    from segment_anything import SamAutomaticMaskGenerator as OfficialGenerator
    from segment_anything import SamPredictor as OfficialPredictor
    from segment_anything import sam_model_registry as official_registry
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
except ImportError:
    sys.exit("the official package is missing: run this script in the venv its docstring describes")

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
from amg import test_image  # noqa: E402
from roofline import counted_flops, gemm_throughput  # noqa: E402
from timing import interleaved_seconds  # noqa: E402

from segany_train.data.synthetic import generate_image  # noqa: E402
from segany_train.inference.automatic_mask_generator import SamAutomaticMaskGenerator  # noqa: E402
from segany_train.inference.cli_options import build_model  # noqa: E402
from segany_train.inference.predictor import SamPredictor  # noqa: E402
from segany_train.model import build_sam_by_name  # noqa: E402
from segany_train.model.sam_config import SamConfig  # noqa: E402
from segany_train.model.seed_model import BUILTIN, resolve_seed_checkpoint  # noqa: E402

# from issue 23's "done when": speed-ups over the official package
TARGETS = {"set_image fp32": 2.0, "set_image bf16": 3.5, "1 prompt": 2.5, "64 prompts": 6.0, "AMG": 5.0}
POOL_SCENE = dict(size=512, min_objects=5, max_objects=10, min_radius=0.06, max_radius=0.2, style="fluorescent", part_masks=False)


def official_sam(config: SamConfig) -> Sam:
    """The official modules at `config`'s sizes (its registry knows only vit_h/l/b at 1024 px)."""
    embedding = config.image_size // config.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=config.image_size,
            patch_size=config.patch_size,
            embed_dim=config.encoder_embed_dim,
            depth=config.encoder_depth,
            num_heads=config.encoder_num_heads,
            mlp_ratio=config.encoder_mlp_ratio,
            out_chans=config.prompt_embed_dim,
            qkv_bias=True,
            norm_layer=lambda dim: torch.nn.LayerNorm(dim, eps=1e-6),
            use_rel_pos=True,
            window_size=config.encoder_window_size,
            global_attn_indexes=tuple(config.encoder_global_attn_indexes),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=config.prompt_embed_dim,
            image_embedding_size=(embedding, embedding),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=config.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=config.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=config.decoder_depth,
                embedding_dim=config.prompt_embed_dim,
                mlp_dim=config.decoder_mlp_dim,
                num_heads=config.decoder_num_heads,
            ),
            transformer_dim=config.prompt_embed_dim,
            iou_head_depth=config.iou_head_depth,
            iou_head_hidden_dim=config.iou_head_hidden_dim,
        ),
    ).eval()


def matched_masks(ours: list[dict], theirs: list[dict]) -> tuple[int, float]:
    """Masks matched one-to-one (greedy by IoU, IoU > 0.5) and their mean IoU."""
    if not ours or not theirs:
        return 0, float("nan")
    encode = lambda records: [mask_utils.encode(np.asfortranarray(r["segmentation"].astype(np.uint8))) for r in records]  # noqa: E731
    ious = mask_utils.iou(encode(ours), encode(theirs), [0] * len(theirs))
    matched = []
    while ious.size and ious.max() > 0.5:
        i, j = np.unravel_index(np.argmax(ious), ious.shape)
        matched.append(ious[i, j])
        ious[i, :], ious[:, j] = -1, -1
    return len(matched), float(np.mean(matched)) if matched else float("nan")


def row(name: str, ours: list[float], theirs: list[float], floor_s: float | None, per: int = 1) -> str:
    ours_ms, theirs_ms = [1000 * t / per for t in ours], [1000 * t / per for t in theirs]
    mo, mt = statistics.median(ours_ms), statistics.median(theirs_ms)
    multiple = f"{mo / (1000 * floor_s):7.2f}" if floor_s else f"{'-':>7}"
    target = TARGETS[name]
    verdict = "met" if mt / mo >= target else "missed"
    return (
        f"{name:>15} | {mo:9.1f} ({min(ours_ms):.1f}-{max(ours_ms):.1f}) | {multiple} | "
        f"{mt:9.1f} ({min(theirs_ms):.1f}-{max(theirs_ms):.1f}) | {mt / mo:6.2f}x | >= {target}x {verdict}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fp32_gflops, bf16_gflops = gemm_throughput(torch.float32, 5), gemm_throughput(torch.bfloat16, 5)
    print(
        f"torch {torch.__version__}, {args.threads} threads; matrix products fp32 {fp32_gflops:.0f}, bf16 "
        f"{bf16_gflops:.0f} GFLOP/s; ms, median (min-max) of {args.rounds} alternating rounds"
    )
    print(f"{'':>15} | {'ours ms':>20} | x floor | {'official ms':>20} | speed-up | target")

    torch.manual_seed(0)
    theirs_model = official_registry["vit_b"]().eval()
    ours_model = build_sam_by_name("vit_b").eval()
    ours_model.load_state_dict(theirs_model.state_dict())
    theirs, ours, ours_bf16 = OfficialPredictor(theirs_model), SamPredictor(ours_model), SamPredictor(ours_model, precision="bf16")
    image = test_image(1024)
    with torch.inference_mode():
        encoder_flops = counted_flops(lambda: ours.set_image(image))
        spent = interleaved_seconds([lambda: ours.set_image(image), lambda: theirs.set_image(image), lambda: ours_bf16.set_image(image)], args.rounds)
        diff = (ours.get_image_embedding() - theirs.get_image_embedding()).abs().max().item()
        print(row("set_image fp32", spent[0], spent[1], encoder_flops / (fp32_gflops * 1e9)))
        print(row("set_image bf16", spent[2], spent[1], encoder_flops / (bf16_gflops * 1e9)))

        point, label = np.array([[412.0, 618.0]]), np.array([1])
        one = dict(point_coords=point, point_labels=label, multimask_output=True)
        one_flops = counted_flops(lambda: ours.predict(**one))
        spent = interleaved_seconds([lambda: ours.predict(**one), lambda: theirs.predict(**one)], 4 * args.rounds, warmup=3)
        (m1, s1, _), (m2, s2, _) = ours.predict(**one), theirs.predict(**one)
        print(row("1 prompt", spent[0], spent[1], one_flops / (fp32_gflops * 1e9)))

        coords = torch.as_tensor(ours.transform.apply_coords(np.random.default_rng(0).random((64, 2)) * 1024, (1024, 1024)), dtype=torch.float)[:, None]
        labels = torch.ones(64, 1, dtype=torch.int)
        many = lambda predictor: predictor.predict_torch(coords, labels, multimask_output=True)  # noqa: E731
        many_flops = counted_flops(lambda: many(ours))
        spent = interleaved_seconds([lambda: many(ours), lambda: many(theirs)], args.rounds, warmup=1)
        (mm1, ms1, _), (mm2, ms2, _) = many(ours), many(theirs)
        print(row("64 prompts", spent[0], spent[1], many_flops / 64 / (fp32_gflops * 1e9), per=64))
    print(
        f"outputs: embedding max |diff| {diff:.1e}; 1 prompt: {int((m1 != m2).sum())} of {m1.size} mask pixels differ, "
        f"IoU predictions max |diff| {abs(s1 - s2).max():.1e}; 64 prompts: {int((mm1 != mm2).sum())} of {mm1.numel()} "
        f"pixels differ, IoU max |diff| {(ms1 - ms2).abs().max().item():.1e}"
    )

    seed = build_model(resolve_seed_checkpoint(BUILTIN), None).eval()
    seed_official = official_sam(seed.config)
    seed_official.load_state_dict(seed.state_dict())
    settings = dict(points_per_side=32, crop_n_layers=1, pred_iou_thresh=0.5, stability_score_thresh=0.7)
    ours_gen, theirs_gen = SamAutomaticMaskGenerator(seed, **settings), OfficialGenerator(seed_official, **settings)
    image, _ = generate_image(100_000, seed=7, **POOL_SCENE)
    spent = interleaved_seconds([lambda: ours_gen.generate(image), lambda: theirs_gen.generate(image)], args.rounds)
    a, b = ours_gen.generate(image), theirs_gen.generate(image)
    print(row("AMG", spent[0], spent[1], None))
    count, mean_iou = matched_masks(a, b)
    print(f"AMG masks: ours {len(a)}, official {len(b)}, matched {count} (IoU > 0.5, one-to-one), mean IoU of matched {mean_iou:.4f}")


if __name__ == "__main__":
    main()
