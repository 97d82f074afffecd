"""A synthetic SA-1B-style corpus: the built-in default dataset, generated locally from a seed.

Each image is a scene of 8-20 (configurable) objects painted in depth order over a textured
background, made so that a model has to segment rather than threshold colours:

- the background mixes smooth noise, stripes and a gradient (random weights per image) between
  colours of a per-image palette, plus pixel grain;
- objects (ellipses, rotated rectangles, regular polygons, stars, blobs) are filled with a flat,
  gradient, striped or noise texture between two colours of the *same* palette, with radial shading;
- some objects are a body with 1-3 sub-parts painted on top of it, so one click is ambiguous between
  the whole (body and parts) and a part, as in SAM's whole/part/subpart masks;
- later objects occlude earlier ones, and every ground-truth mask is the *visible* region.

Painting writes shape ids into a label map (0 = background). An object's body and its parts get
consecutive ids, so every ground-truth mask is an id range: the whole is [body, last part], a part is
[part, part]. Masks under MIN_VISIBLE_AREA pixels are dropped, and a whole whose only visible member
is one part is not repeated. Shapes are rasterised with numpy grids restricted to their bounding box,
and all masks are encoded in one pycocotools call on a Fortran-order stack, which keeps 1,000 images
of 512 px well under a minute on two cores.

Determinism: image i is drawn from its own generator seeded by (seed, i), so it does not depend on
other images (shards can be generated in any order, or resumed), and the same arguments always give
the same pixels, JPEG bytes and JSON. Command line: `python -m segany_train.data.synthetic --help`.
"""

import argparse
import json
import sys
import time
from collections.abc import Mapping
from functools import lru_cache
from io import BytesIO
from pathlib import Path
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from segany_train.data.directory_lock import lock_directory
from segany_train.data.sa1b import SHARD_SUFFIX, annotation_from_rle, make_record, sample_key
from segany_train.atomic_files import write_json_atomically
from segany_train.data.shard_writer import SA1BShardWriter, read_manifest
from segany_train.os_errors import describe_os_error

MIN_VISIBLE_AREA = 20  # pixels; smaller visible masks are dropped
JPEG_QUALITY = 90
ANNOTATIONS_PER_IMAGE = 1000  # annotation id = image id * ANNOTATIONS_PER_IMAGE + k
MAX_PARTS = 3
SHAPES = ("ellipse", "rectangle", "polygon", "star", "blob")
SHARD_PREFIX = "sa_"
FLUORESCENT_BACKGROUND = 0.1  # the fluorescent style's background brightness, relative to its objects
SETTINGS_NAME = "synthetic.json"  # the generation settings of a corpus directory, checked on resume


class _Shape(NamedTuple):
    """A rasterised shape: its bounding box in the image, its h x w bool mask there, and per-pixel
    coordinates of its n mask pixels (float32, in radii) that textures and shading are made of."""

    box: tuple[slice, slice]
    mask: np.ndarray  # h x w bool
    u: np.ndarray  # n: coordinate along the shape's rotated axis
    rho: np.ndarray  # n: distance from the centre


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (size x 1 and 1 x size float32), broadcast instead of materialised."""
    axis = np.arange(size, dtype=np.float32) + 0.5
    return axis[:, None], axis[None, :]


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """size x size float32 noise in [0, 1]: a cells x cells random grid upsampled bicubically."""
    coarse = Image.fromarray(rng.random((cells, cells), dtype=np.float32), mode="F")
    return np.clip(np.asarray(coarse.resize((size, size), Image.BICUBIC)), 0.0, 1.0)


def _background_field(rng: np.random.Generator, size: int) -> np.ndarray:
    """size x size float32 in [0, 1]: a random blend of smooth noise, stripes and a gradient."""
    yy, xx = _grid(size)
    angle = rng.uniform(0, 2 * np.pi)
    along = xx * np.float32(np.cos(angle)) + yy * np.float32(np.sin(angle))  # size x size
    noise = _smooth_noise(rng, size, int(rng.integers(3, 12)))
    stripes = 0.5 + 0.5 * np.sin(along * np.float32(2 * np.pi / rng.uniform(8, 64)))
    gradient = along / np.float32(size * 1.5) + 0.5
    w = rng.dirichlet(np.ones(3)).astype(np.float32)
    return w[0] * noise + w[1] * stripes + w[2] * gradient


def _colours(rng: np.random.Generator, palette: np.ndarray, count: int) -> np.ndarray:
    """count x 3 float32 colours: palette entries with a small jitter, so objects and background share hues."""
    picked = palette[rng.integers(len(palette), size=count)]
    return picked + rng.normal(0, 12, (count, 3)).astype(np.float32)


def _background(rng: np.random.Generator, size: int, palette: np.ndarray) -> np.ndarray:
    """3 x size x size float32 (channel-planar, so per-pixel arithmetic runs over long contiguous rows):
    two blend fields over three palette colours."""
    c = _colours(rng, palette, 3)[:, :, None, None]
    t1, t2 = _background_field(rng, size), _background_field(rng, size)
    return c[0] + t1 * (c[1] - c[0]) + t2 * (c[2] - c[0]) * np.float32(0.5)


def _radius_profile(rng: np.random.Generator, kind: str, phi: np.ndarray) -> np.ndarray:
    """The boundary radius (in radii, at most 1.5) of a star-shaped outline at polar angles phi."""
    if kind == "polygon":
        n = int(rng.integers(3, 9))
        sector = 2 * np.pi / n
        return np.float32(np.cos(np.pi / n)) / np.cos(np.mod(phi, sector) - np.float32(np.pi / n))
    if kind == "star":
        n, inner = int(rng.integers(4, 9)), np.float32(rng.uniform(0.35, 0.6))
        tooth = np.abs(np.mod(phi * np.float32(n / (2 * np.pi)), 1) * 2 - 1)  # 1 at tips, 0 between
        return inner + (1 - inner) * tooth
    amplitudes, phases = rng.uniform(0, 0.125, 4), rng.uniform(0, 2 * np.pi, 4)  # blob: at most 1.5
    return 1 + sum(np.float32(a) * np.cos(k * phi + np.float32(p)) for k, a, p in zip(range(2, 6), amplitudes, phases))


def _shape(rng: np.random.Generator, kind: str, cy: float, cx: float, radius: float, size: int) -> _Shape | None:
    """Rasterises a randomly rotated and squashed shape inside its bounding box; None if off-image."""
    reach = 1.5 * radius  # every outline lies within 1.5 radii of the centre
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, size)
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, size)
    if y0 >= y1 or x0 >= x1:
        return None
    dy = (np.arange(y0, y1, dtype=np.float32) + np.float32(0.5 - cy))[:, None] / np.float32(radius)
    dx = (np.arange(x0, x1, dtype=np.float32) + np.float32(0.5 - cx))[None, :] / np.float32(radius)
    angle, aspect = rng.uniform(0, 2 * np.pi), rng.uniform(0.45, 1.0)
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u, v = dx * cos + dy * sin, (dy * cos - dx * sin) / np.float32(aspect)
    rho = np.hypot(u, v)
    if kind == "ellipse":
        mask = rho <= 1
    elif kind == "rectangle":
        mask = np.maximum(np.abs(u), np.abs(v)) <= 0.75
    else:
        mask = rho <= _radius_profile(rng, kind, np.arctan2(v, u))
    return _Shape((slice(y0, y1), slice(x0, x1)), mask, u[mask], rho[mask])


def _fill(rng: np.random.Generator, shape: _Shape, palette: np.ndarray, texture: np.ndarray) -> np.ndarray:
    """3 x n float32 paint for a shape's n pixels: flat, gradient, stripes or noise, radially shaded."""
    c0, c1 = _colours(rng, palette, 2)[:, :, None]
    style = rng.integers(4)
    if style == 0:
        t = np.zeros_like(shape.u)
    elif style == 1:
        t = np.clip(shape.u * np.float32(0.5) + np.float32(0.5), 0, 1)
    elif style == 2:
        t = np.float32(0.5) + np.float32(0.5) * np.sin(shape.u * np.float32(rng.uniform(4, 14)))
    else:
        t = texture[shape.box][shape.mask]
    shade = 1 - np.float32(rng.uniform(0, 0.5)) * np.minimum(shape.rho, 1) ** 2
    return (c0 + t * (c1 - c0)) * shade


def _paint(canvas: np.ndarray, labels: np.ndarray, shape: _Shape, paint: np.ndarray, label: int) -> None:
    """Draws a shape over everything painted before it (this is what makes occlusion)."""
    canvas[:, shape.box[0], shape.box[1]][:, shape.mask] = paint
    labels[shape.box][shape.mask] = label


def _palette(rng: np.random.Generator, style: str) -> np.ndarray:
    """6 x 3 float32 colours an image is painted with.

    textured: any colours (uniform RGB), so most boundaries have a colour contrast; tinted: one hue
    at six lightness levels, like a stained microscopy slide, so boundaries are lightness and
    texture only. The two styles are the built-in "public data" and "new domain" of the engine.
    fluorescent: one hue at six bright levels for the objects over a background darkened to about a
    tenth of them (`_render_scene`), like a fluorescence micrograph: the new domain of the fine-tuning
    demonstration (docs/finetuning.md) and of the engine's pool, which the seed never saw.
    """
    if style == "textured":
        return rng.uniform(0, 255, (6, 3)).astype(np.float32)
    hue = rng.uniform(0.25, 1.0, 3)
    hue /= hue.max()
    low = 120 if style == "fluorescent" else 40
    return (hue[None, :] * rng.uniform(low, 255, (6, 1))).astype(np.float32)


def _render_scene(
    rng: np.random.Generator, scene: "SceneSettings"
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """(size x size x 3 uint8 image, size x size uint16 label map, the (body id, last part id) of each object)."""
    size = scene.size
    palette = _palette(rng, scene.style)
    canvas = _background(rng, size, palette * np.float32(FLUORESCENT_BACKGROUND) if scene.style == "fluorescent" else palette)
    texture = _smooth_noise(rng, size, int(rng.integers(12, 40)))
    labels = np.zeros((size, size), np.uint16)
    objects: list[tuple[int, int]] = []
    next_id = 1
    for _ in range(int(rng.integers(scene.min_objects, scene.max_objects + 1))):
        radius = size * np.exp(rng.uniform(np.log(scene.min_radius), np.log(scene.max_radius)))
        body = _shape(rng, rng.choice(SHAPES), rng.uniform(0, size), rng.uniform(0, size), radius, size)
        if body is None or not body.mask.any():
            continue
        first = last = next_id
        _paint(canvas, labels, body, _fill(rng, body, palette, texture), first)
        inside = np.flatnonzero(body.mask)
        for _ in range(int(rng.integers(1, MAX_PARTS + 1)) if rng.random() < 0.4 else 0):
            # a part is centred on a pixel of its body, so it overlaps it and reads as a sub-part
            y, x = np.unravel_index(inside[rng.integers(inside.size)], body.mask.shape)
            cy, cx = body.box[0].start + y + 0.5, body.box[1].start + x + 0.5
            part = _shape(rng, rng.choice(SHAPES), cy, cx, radius * rng.uniform(0.2, 0.45), size)
            if part is not None and part.mask.any():
                last += 1
                _paint(canvas, labels, part, _fill(rng, part, palette, texture), last)
        objects.append((first, last))
        next_id = last + 1
    canvas += (rng.random((size, size), dtype=np.float32) - np.float32(0.5)) * np.float32(rng.uniform(6, 16))  # grain
    np.clip(canvas, 0, 255, out=canvas)
    return canvas.astype(np.uint8).transpose(1, 2, 0), labels, objects


def _mask_ranges(labels: np.ndarray, objects: list[tuple[int, int]], part_masks: bool = True) -> list[tuple[int, int]]:
    """The label-id range of every kept ground-truth mask: each whole, then its parts (part_masks)."""
    area = np.bincount(labels.ravel(), minlength=objects[-1][1] + 1 if objects else 1)
    ranges = []
    for first, last in objects:
        members = area[first : last + 1]
        # a whole whose one visible member is a part is that part's mask; listed once, as the part
        only_a_part = part_masks and last > first and members[0] == 0 and np.count_nonzero(members) == 1
        if members.sum() >= MIN_VISIBLE_AREA and not only_a_part:
            ranges.append((first, last))
        if part_masks:
            ranges.extend((p, p) for p in range(first + 1, last + 1) if area[p] >= MIN_VISIBLE_AREA)
    return ranges


def _mask_stack(labels: np.ndarray, ranges: list[tuple[int, int]]) -> np.ndarray:
    """H x W x N uint8 masks in Fortran order, the layout pycocotools encodes without copying."""
    stack = np.zeros((*labels.shape, len(ranges)), np.uint8, order="F")
    labels_t = np.ascontiguousarray(labels.T)  # W x H: a mask's transpose is a C-contiguous slice of the stack
    for k, (first, last) in enumerate(ranges):
        # first <= id <= last in one comparison: uint16 subtraction wraps ids below `first` to large values
        np.less_equal(labels_t - np.uint16(first), last - first, out=stack[:, :, k].T)
    return stack


STYLES = ("textured", "tinted", "fluorescent")


@dataclass(frozen=True)
class SceneSettings:
    """What a corpus's scenes look like: image side, objects per image, object radii as fractions of
    the side (log-uniform between the two), and the colour style (see `_palette`)."""

    size: int = 512
    min_objects: int = 8
    max_objects: int = 20
    min_radius: float = 0.04
    max_radius: float = 0.22
    style: str = "textured"
    # sub-parts are painted either way; False: only whole objects are GT masks (one click, one object,
    # as in an instance label map), True: each visible part is a mask of its own too (ambiguity)
    part_masks: bool = True

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ValueError(f"size must be at least 16, got {self.size}")
        if not 0 <= self.min_objects <= self.max_objects or (MAX_PARTS + 1) * self.max_objects >= ANNOTATIONS_PER_IMAGE:
            raise ValueError(f"need 0 <= min_objects <= max_objects < 250, got {self.min_objects}, {self.max_objects}")
        if not 0 < self.min_radius <= self.max_radius <= 1:
            raise ValueError(f"need 0 < min_radius <= max_radius <= 1, got {self.min_radius}, {self.max_radius}")
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {self.style!r}")

    def recorded(self) -> dict[str, Any]:
        """The settings a corpus directory records; fields at their defaults are left out, so a
        corpus written before a field existed still matches."""
        default = SceneSettings()
        keep = ("size", "min_objects", "max_objects")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in keep or getattr(self, f.name) != getattr(default, f.name)}


def _render(index: int, seed: int, scene: SceneSettings) -> tuple[np.ndarray, np.ndarray]:
    """(size x size x 3 uint8 image, size x size x N uint8 Fortran-order visible masks) of image `index`."""
    rng = np.random.default_rng([seed, index])  # one stream per image: independent of every other image
    image, labels, objects = _render_scene(rng, scene)
    return image, _mask_stack(labels, _mask_ranges(labels, objects, scene.part_masks))


def generate_image(index: int, *, seed: int = 0, **scene: Any) -> tuple[np.ndarray, list[np.ndarray]]:
    """Image `index` of the corpus for `seed`: (size x size x 3 uint8, list of size x size bool visible masks).

    scene: `SceneSettings` fields (size, min_objects, max_objects, min_radius, max_radius, style).
    Masks come per object in depth order: the whole (body and parts), then each of its parts.
    """
    image, stack = _render(index, seed, SceneSettings(**scene))
    return image, [np.ascontiguousarray(stack[:, :, k], dtype=bool) for k in range(stack.shape[2])]


def generate_label_map(index: int, *, seed: int = 0, **scene: Any) -> tuple[np.ndarray, np.ndarray]:
    """Image `index` as (size x size x 3 uint8 image, size x size uint16 instance label map): each
    object (its body and parts together) one id 1..N in depth order, its visible pixels only, 0 the
    background; objects with fewer than MIN_VISIBLE_AREA visible pixels are background. The layout
    microscopy tools write (and `segany-convert label-maps` reads); parts are not separate objects."""
    rng = np.random.default_rng([seed, index])  # the same stream as `generate_image`: the same scene
    image, labels, objects = _render_scene(rng, SceneSettings(**scene))
    instances = np.zeros(labels.shape, np.uint16)
    next_id = 1
    for first, last in objects:
        visible = (labels >= first) & (labels <= last)
        if np.count_nonzero(visible) >= MIN_VISIBLE_AREA:
            instances[visible] = next_id
            next_id += 1
    return image, instances


def _sample(index: int, seed: int, scene: SceneSettings) -> tuple[str, bytes, dict[str, Any]]:
    """(key, JPEG bytes, SA-1B record) of image `index`; the image id is the corpus-wide index."""
    image, stack = _render(index, seed, scene)
    buffer = BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    rles = mask_utils.encode(stack) if stack.shape[2] else []
    annotations = [annotation_from_rle(r, annotation_id=index * ANNOTATIONS_PER_IMAGE + k) for k, r in enumerate(rles)]
    size = scene.size
    record = make_record(image_id=index, width=size, height=size, file_name=f"sa_{index}.jpg", annotations=annotations)
    return sample_key(index), buffer.getvalue(), record


def _claim_directory(directory: Path, settings: dict[str, Any]) -> None:
    """Records the generation settings, refusing a directory that holds shards made any other way."""
    path = directory / SETTINGS_NAME
    if path.exists():
        found = json.loads(path.read_text())
        if found != settings:
            raise ValueError(f"{directory} holds a synthetic corpus made with {found}, not {settings}")
    elif read_manifest(directory)["shards"]:
        raise ValueError(f"{directory} already holds shards that are not a synthetic corpus")
    else:
        directory.mkdir(parents=True, exist_ok=True)
        write_json_atomically(path, settings)


def write_synthetic_corpus(
    directory: str | Path,
    *,
    num_images: int,
    seed: int = 0,
    images_per_shard: int = 100,
    progress: bool = True,
    **scene: Any,
) -> list[Path]:
    """Writes images 0..num_images-1 as shards sa_000000.tar, ... in `directory`; returns every shard's path.

    scene: `SceneSettings` fields (size, min_objects, max_objects, min_radius, max_radius, style).
    A shard already in the directory's manifest with its full sample count is kept as it is, so an
    interrupted run resumes where it stopped, and a larger `num_images` extends a smaller corpus.
    A second process writing the same directory waits for the first, then finds its shards done.
    """
    settings = SceneSettings(**scene)
    if images_per_shard < 1:
        raise ValueError(f"images_per_shard must be positive, got {images_per_shard}")
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    with lock_directory(directory, wait=True):
        return _write_corpus(Path(directory), num_images, seed, images_per_shard, settings, progress)


def _write_corpus(
    directory: Path, num_images: int, seed: int, images_per_shard: int, settings: SceneSettings, progress: bool
) -> list[Path]:
    # shard boundaries depend on images_per_shard, so it is part of what a resumed run must match
    _claim_directory(directory, dict(seed=seed, images_per_shard=images_per_shard, **settings.recorded()))
    done = read_manifest(directory)["shards"]
    paths = []
    with tqdm(total=num_images, unit="img", disable=not progress) as bar:
        for shard, first in enumerate(range(0, num_images, images_per_shard)):
            stop = min(first + images_per_shard, num_images)
            path = directory / f"{SHARD_PREFIX}{shard:06d}{SHARD_SUFFIX}"
            # a shard holding more images than asked is kept whole: configs share a corpus as a prefix
            if path.exists() and done.get(path.name, {}).get("samples", 0) >= stop - first:
                paths.append(path)
                bar.update(stop - first)
                continue
            writer = SA1BShardWriter(
                directory, prefix=SHARD_PREFIX, start_index=shard, max_samples_per_shard=images_per_shard
            )
            with writer:
                for index in range(first, stop):
                    writer.write(*_sample(index, seed, settings))
                    bar.update(1)
            paths.extend(writer.written)
    return paths


def write_configured_corpus(settings: Mapping[str, Any], *, progress: bool = True) -> list[Path]:
    """`write_synthetic_corpus` from a config's `synthetic` section (directory, num_images, seed,
    images_per_shard and any `SceneSettings` field), as segany-train and segany-engine give it."""
    scene = {f.name: settings[f.name] for f in fields(SceneSettings) if settings.get(f.name) is not None}
    return write_synthetic_corpus(
        settings["directory"],
        num_images=settings["num_images"],
        seed=settings["seed"],
        images_per_shard=settings["images_per_shard"],
        progress=progress,
        **scene,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic SA-1B-style corpus as webdataset shards.")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--num-images", type=int, required=True)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images-per-shard", type=int, default=100)
    parser.add_argument("--min-objects", type=int, default=8)
    parser.add_argument("--max-objects", type=int, default=20)
    parser.add_argument("--min-radius", type=float, default=0.04, help="smallest object radius, a fraction of the side")
    parser.add_argument("--max-radius", type=float, default=0.22, help="largest object radius, a fraction of the side")
    parser.add_argument("--style", choices=STYLES, default="textured", help="colour style (see the module docstring)")
    parser.add_argument("--no-part-masks", action="store_true", help="whole objects only as masks, not their sub-parts too")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    held = read_manifest(args.out).get("total_samples", 0)
    if 0 < args.num_images < held:  # the command writes exactly its --num-images, and deletes nothing
        sys.exit(f"segany-synth: error: {args.out} holds {held} images, more than --num-images {args.num_images}; use another --out")
    start = time.perf_counter()
    try:
        paths = write_synthetic_corpus(
            args.out,
            num_images=args.num_images,
            seed=args.seed,
            size=args.size,
            images_per_shard=args.images_per_shard,
            min_objects=args.min_objects,
            max_objects=args.max_objects,
            min_radius=args.min_radius,
            max_radius=args.max_radius,
            style=args.style,
            part_masks=not args.no_part_masks,
            progress=not args.no_progress,
        )
    except ValueError as error:
        sys.exit(f"segany-synth: error: {error}")
    except OSError as error:  # a full disk: complete shards are kept
        sys.exit(f"segany-synth: error: {describe_os_error(error, rerun='complete shards are kept')}")
    print(f"{args.num_images} images in {len(paths)} shards in {args.out} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
