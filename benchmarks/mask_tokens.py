"""How many embedding tokens a ground-truth mask covers: the engine's miniature against its old geometry.

SAM sees a 1024-px image as a 64x64 grid of 16-px tokens, so a typical SA-1B object spans tens of
tokens. A miniature whose objects cover one or two tokens is far harder per object than SA-1B is
for SAM. This prints the distribution of mask areas in tokens (16-px patches, the 16x16 embedding of
a 256-px image) for the engine's pool (scenes of 2-4 objects with radii 10-35% of the side) and for
the geometry the engine used before (3-8 objects with radii 4-22%), and the ratio of the medians.

    python benchmarks/mask_tokens.py [--images 100]
"""

import argparse

import numpy as np

from segany_train.data.synthetic import generate_image

GEOMETRIES = {
    "engine pool": (16, dict(size=256, min_objects=2, max_objects=4, min_radius=0.1, max_radius=0.35, style="tinted")),
    "old engine corpus (patch 16)": (16, dict(size=256, min_objects=3, max_objects=8)),
}


def tokens_per_mask(patch: int, scene: dict, images: int, seed: int) -> np.ndarray:
    return np.array([m.sum() / patch**2 for i in range(images) for m in generate_image(i, seed=seed, **scene)[1]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    medians = {}
    for name, (patch, scene) in GEOMETRIES.items():
        tokens = tokens_per_mask(patch, scene, args.images, args.seed)
        medians[name] = float(np.median(tokens))
        print(
            f"{name:30s} {tokens.size / args.images:.1f} masks/image; tokens per mask: median {medians[name]:.1f}, "
            f"quartiles {np.percentile(tokens, 25):.1f}-{np.percentile(tokens, 75):.1f}; "
            f"under 1 token {np.mean(tokens < 1):.0%}, under 4 {np.mean(tokens < 4):.0%}"
        )
    new, old = medians.values()
    # the old corpus's relative sizes at SAM's 64x64 grid: 16x the tokens of a 16x16 grid
    print(f"median tokens per mask, engine pool / old corpus: {new / old:.1f}x "
          f"(the old corpus's objects at 1024 px would span {16 * old:.0f})")


if __name__ == "__main__":
    main()
