"""Small SA-1B shards made inside tests: images with known rectangles and ellipses as masks."""

import json
import tarfile
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from segany_train.data.sa1b import annotation_from_mask, make_record, sample_key
from segany_train.data.shard_writer import SA1BShardWriter


def make_image(image_id: int, height: int = 60, width: int = 90, num_masks: int = 5):
    """(HxWx3 uint8 image, list of HxW bool masks): flat-coloured shapes on noise."""
    rng = np.random.default_rng(image_id)
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    masks = []
    for k in range(num_masks):
        cy, cx = rng.integers(0, height), rng.integers(0, width)
        ry, rx = rng.integers(3, height // 2), rng.integers(3, width // 2)
        if k % 2:
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            mask = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
        image[mask] = rng.integers(0, 255, 3)
        masks.append(mask)
    return image, masks


def jpeg_bytes(image: np.ndarray, quality: int = 95) -> bytes:
    buf = BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def record_for(image_id: int, image: np.ndarray, masks: list[np.ndarray]) -> dict:
    anns = [annotation_from_mask(m, annotation_id=image_id * 100 + k) for k, m in enumerate(masks)]
    return make_record(
        image_id=image_id, width=image.shape[1], height=image.shape[0], file_name=f"sa_{image_id}.jpg", annotations=anns
    )


def write_shards(directory: Path, num_images: int, per_shard: int, **image_kwargs) -> list[Path]:
    """Shards sa_000000.tar ... holding images 0..num_images-1."""
    with SA1BShardWriter(directory, max_samples_per_shard=per_shard) as writer:
        for i in range(num_images):
            image, masks = make_image(i, **image_kwargs)
            writer.write(sample_key(i), jpeg_bytes(image), record_for(i, image, masks))
    return writer.written


def release_record(image_id: int, image: np.ndarray, masks: list[np.ndarray]) -> dict:
    """The record as SA-1B releases it: bbox width and height one less than pycocotools' `toBbox` of
    the same RLE, given as ints for even annotations and floats for odd ones; predicted_iou above 1."""
    record = record_for(image_id, image, masks)
    for k, ann in enumerate(record["annotations"]):
        coco = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
        x, y, w, h = (float(v) for v in mask_utils.toBbox(coco))
        box = [x, y, w - 1, h - 1]
        ann["bbox"] = [int(v) for v in box] if k % 2 == 0 else box
        ann["predicted_iou"] = 1.02
    return record


def write_release_tars(directory: Path, sizes: list[int], first_id: int = 1, **image_kwargs) -> list[Path]:
    """Tars `sa_000000.tar`, ... laid out as SA-1B is downloaded: `sa_<id>.jpg` and `sa_<id>.json`
    members written with tarfile (no webdataset writer, no manifest); `sizes` images per tar."""
    directory.mkdir(parents=True, exist_ok=True)
    paths, image_id = [], first_id
    for index, count in enumerate(sizes):
        path = directory / f"sa_{index:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for _ in range(count):
                image, masks = make_image(image_id, **image_kwargs)
                record = release_record(image_id, image, masks)
                for name, data in ((f"sa_{image_id}.jpg", jpeg_bytes(image)), (f"sa_{image_id}.json", json.dumps(record).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, BytesIO(data))
                image_id += 1
        paths.append(path)
    return paths
