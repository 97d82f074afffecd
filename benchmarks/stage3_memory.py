"""Peak memory of `segany-stage3` over a shard of 100 and a shard of 400 SA-1B-sized images.

The images come from the synthetic generator, rendered at 2250x2250 and cut to 1500x2250 (SA-1B's
size; the generator draws squares), their masks cut with them. Rendering is the slow part and
stage 3's work per image does not depend on which image it is, so the 400-image shard holds the 100
images four times under distinct keys. Each shard goes through a fresh `segany-stage3 mode=task`
process on the CPU; its peak resident set size comes from the kernel (`wait4`'s ru_maxrss).

The model is a vit_t_256 SAM with seeded random weights: on these scenes the shipped seed model
returns only empty masks, a random one large masks. The generator keeps all 48 masks of a 4x4 point
grid (no thresholds, no NMS, no island removal), so every image carries the heaviest work of
encoding, the quality check and writing; the cycle's 16x16 grid would only make the run longer.
Prints both peaks and their ratio: a stage that streams image by image has a ratio near 1, one that
holds a shard's images and GT masks grows with the shard.

    python benchmarks/stage3_memory.py [--work /tmp/stage3_memory] [--images 100] [--repeat 4]
"""

import argparse
import os
import shutil
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from segany_train.model import build_sam_by_name
from segany_train.data.sa1b import annotation_from_rle, make_record, sample_key
from segany_train.data.shard_writer import SA1BShardWriter
from segany_train.data.synthetic import generate_image

HEIGHT, WIDTH = 1500, 2250


def sa1b_sized_image(index: int, min_objects: int, max_objects: int) -> tuple[bytes, list[dict]]:
    """(JPEG bytes, SA-1B annotations) of synthetic image `index`, cut to 1500x2250."""
    image, masks = generate_image(index, seed=0, size=WIDTH, min_objects=min_objects, max_objects=max_objects)
    stack = np.asfortranarray(np.stack([m[:HEIGHT] for m in masks if m[:HEIGHT].any()], axis=-1).astype(np.uint8))
    annotations = [annotation_from_rle(rle, annotation_id=k) for k, rle in enumerate(mask_utils.encode(stack))]
    buffer = BytesIO()
    Image.fromarray(image[:HEIGHT]).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue(), annotations


def write_shards(work: Path, images: int, repeat: int, min_objects: int, max_objects: int) -> tuple[Path, Path, float]:
    """(the shard of `images` images, the shard of them `repeat` times, mean masks per image); kept
    from an earlier run when complete."""
    small, large = work / "small" / "sa_000000.tar", work / "large" / "sa_000000.tar"
    masks_file = work / "masks_per_image.txt"
    if small.exists() and large.exists() and masks_file.exists():
        return small, large, float(masks_file.read_text())
    samples = [sa1b_sized_image(i, min_objects, max_objects) for i in range(images)]
    for path, copies in ((small, 1), (large, repeat)):
        with SA1BShardWriter(path.parent, max_samples_per_shard=images * copies) as writer:
            for copy in range(copies):
                for i, (jpeg, annotations) in enumerate(samples):
                    image_id = copy * images + i
                    record = make_record(image_id=image_id, width=WIDTH, height=HEIGHT, file_name=f"sa_{image_id}.jpg", annotations=annotations)
                    writer.write(sample_key(image_id), jpeg, record)
    masks_file.write_text(str(np.mean([len(a) for _, a in samples])))
    return small, large, float(masks_file.read_text())


def random_model(work: Path) -> Path:
    """A vit_t_256 checkpoint with seeded random weights."""
    path = work / "random_vit_t_256.pth"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(build_sam_by_name("vit_t_256").state_dict(), path)
    return path


def peak_rss_mib(shard: Path, run_dir: Path, checkpoint: Path) -> float:
    """Peak RSS of one `segany-stage3 mode=task` process over `shard`, in MiB."""
    shutil.rmtree(run_dir, ignore_errors=True)  # an output left by an earlier run would be skipped, not redone
    command = [
        sys.executable, "-m", "data_engine.distributed_stage3", "mode=task", f"checkpoint={checkpoint}",
        f"corpus.shards={shard}", f"run_dir={run_dir}", "task_id=0", "num_tasks=1", "device=cpu", "threads=1",
        "progress=false", "stage3.generator.points_per_side=4", "stage3.generator.pred_iou_thresh=0.0",
        "stage3.generator.stability_score_thresh=0.0", "stage3.generator.box_nms_thresh=1.0",
        "stage3.generator.min_mask_region_area=0",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"segany-stage3 failed on {shard}: {' '.join(command)}")
    return usage.ru_maxrss / 1024  # Linux reports kB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/stage3_memory"), help="shards and outputs go here")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=4, help="the large shard holds the images this many times")
    parser.add_argument("--min-objects", type=int, default=30)
    parser.add_argument("--max-objects", type=int, default=50)
    args = parser.parse_args()
    small, large, masks = write_shards(args.work, args.images, args.repeat, args.min_objects, args.max_objects)
    checkpoint = random_model(args.work)
    peaks = {name: peak_rss_mib(shard, args.work / f"run_{name}", checkpoint) for name, shard in (("small", small), ("large", large))}
    print(f"{args.images} images of {HEIGHT}x{WIDTH}, {masks:.0f} GT masks each on average")
    print(f"peak RSS, shard of {args.images}: {peaks['small']:.0f} MiB")
    print(f"peak RSS, shard of {args.images * args.repeat}: {peaks['large']:.0f} MiB")
    print(f"ratio: {peaks['large'] / peaks['small']:.3f}")


if __name__ == "__main__":
    main()
