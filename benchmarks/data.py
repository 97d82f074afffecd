"""Data loading speed on SA-1B-like samples (1500x2250 JPEG, ~100 RLE masks), one worker.

Prints samples per second for (a) our pipeline producing a 1024-px training sample with 64 masks,
(b) a naive loader in the same run (full JPEG decode, every mask decoded at full resolution with
pycocotools, torch resizing), and (c) the floor: only the reduced-scale JPEG decode and resize.
"""

import argparse
import json
import sys
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_seconds  # noqa: E402

from segany_train.data.image_decoding import decode_jpeg_resized  # noqa: E402
from segany_train.data.sa1b import annotation_from_mask, decode_sample, encode_sample, make_record  # noqa: E402
from segany_train.data.sam_sample import SamSampleConfig, build_sam_sample  # noqa: E402
from segany_train.model.transforms import ResizeLongestSide  # noqa: E402

HEIGHT, WIDTH = 1500, 2250


def make_sa1b_like_sample(seed: int, num_masks: int = 100) -> dict:
    """A raw shard sample: a textured photo-like JPEG and masks whose areas span 0.01%-40% of it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:HEIGHT, :WIDTH].astype(np.float32)
    base = np.stack([np.sin(xx / rng.uniform(40, 200) + c) * np.cos(yy / rng.uniform(40, 200)) for c in range(3)], -1)
    image = (base * 60 + 128 + rng.normal(0, 12, (HEIGHT, WIDTH, 3))).clip(0, 255).astype(np.uint8)
    annotations = []
    for k in range(num_masks):
        area = HEIGHT * WIDTH * 10 ** rng.uniform(-4, np.log10(0.4))
        ry = np.sqrt(area / np.pi) * rng.uniform(0.5, 2.0)
        rx = area / np.pi / ry
        cy, cx = rng.uniform(0, HEIGHT), rng.uniform(0, WIDTH)
        y0, y1 = int(max(cy - ry, 0)), int(min(cy + ry + 1, HEIGHT))
        x0, x1 = int(max(cx - rx, 0)), int(min(cx + rx + 1, WIDTH))
        mask = np.zeros((HEIGHT, WIDTH), bool)
        mask[y0:y1, x0:x1] = ((yy[y0:y1, x0:x1] - cy) / ry) ** 2 + ((xx[y0:y1, x0:x1] - cx) / rx) ** 2 <= 1
        if mask.any():
            image[mask] = (image[mask] * 0.6 + rng.integers(0, 255, 3) * 0.4).astype(np.uint8)
            annotations.append(annotation_from_mask(mask, annotation_id=seed * 1000 + k))
    buf = BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    record = make_record(image_id=seed, width=WIDTH, height=HEIGHT, file_name=f"sa_{seed}.jpg", annotations=annotations)
    return encode_sample(f"sa_{seed}", buf.getvalue(), record)


def ours(raw: dict, cfg: SamSampleConfig, rng: np.random.Generator) -> dict:
    key, jpeg, record = decode_sample(raw)
    return build_sam_sample(key, jpeg, record, cfg, rng)


def naive(raw: dict, cfg: SamSampleConfig, rng: np.random.Generator) -> dict:
    record = json.loads(raw["json"])
    pixels = torch.from_numpy(np.array(Image.open(BytesIO(raw["jpg"])).convert("RGB"))).permute(2, 0, 1).float()
    h, w = ResizeLongestSide.get_preprocess_shape(HEIGHT, WIDTH, cfg.image_size)
    image = F.interpolate(pixels[None], (h, w), mode="bilinear", antialias=True)[0]
    masks = torch.from_numpy(
        np.stack([mask_utils.decode({**a["segmentation"], "counts": a["segmentation"]["counts"].encode()}) for a in record["annotations"]])
    )
    keep = torch.tensor([a["area"] <= cfg.max_area_fraction * HEIGHT * WIDTH for a in record["annotations"]])
    masks = masks[keep][torch.from_numpy(rng.permutation(int(keep.sum()))[: cfg.max_masks])]
    mh, mw = ResizeLongestSide.get_preprocess_shape(HEIGHT, WIDTH, cfg.mask_size)
    return {"image": image, "masks": F.interpolate(masks[None], (mh, mw), mode="nearest")[0] > 0}


def floor(raw: dict, cfg: SamSampleConfig, rng: np.random.Generator) -> np.ndarray:
    return decode_jpeg_resized(raw["jpg"], *ResizeLongestSide.get_preprocess_shape(HEIGHT, WIDTH, cfg.image_size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4, help="distinct SA-1B-like samples to cycle through")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one loader worker
    cfg = SamSampleConfig(image_size=1024, mask_size=256, max_masks=64)
    print(f"building {args.samples} SA-1B-like samples ({HEIGHT}x{WIDTH} JPEG, ~100 masks)...", flush=True)
    raws = [make_sa1b_like_sample(s) for s in range(args.samples)]
    masks = np.mean([len(json.loads(r["json"])["annotations"]) for r in raws])
    print(f"mean {masks:.0f} masks per image, JPEG {np.mean([len(r['jpg']) for r in raws]) / 1e6:.2f} MB")
    rates = {}
    for name, fn in (("ours", ours), ("naive", naive), ("floor", floor)):
        rng = np.random.default_rng(0)
        seconds = median_seconds(lambda: [fn(r, cfg, rng) for r in raws], args.repeats) / len(raws)
        rates[name] = 1.0 / seconds
        print(f"{name:>6}: {rates[name]:6.2f} samples/s ({1000 * seconds:6.1f} ms per sample)", flush=True)
    speedup, vs_floor = rates["ours"] / rates["naive"], rates["floor"] / rates["ours"]
    print(
        f"ours vs naive: {speedup:.1f}x faster (target >= 10x, {'ok' if speedup >= 10 else 'MISSED'}); "
        f"ours vs floor: {vs_floor:.2f}x the floor's time (target <= 2x, {'ok' if vs_floor <= 2 else 'MISSED'})"
    )


if __name__ == "__main__":
    main()
