"""Write a small procedural image data set (no download) for quick starts and tests.

    python toy_data.py --out toy.npz                 # 4,096 RGB 16x16 images, 4 classes
    python toy_data.py --out toy_test.npz --seed 1   # held-out images from the same law

Each image is one filled shape (square, disc, plus or triangle: the class label) in one of six
colours, at a random size and position, on a dark background with a little pixel noise. The
.npz holds uint8 `images` [N, H, W, 3] and int64 `labels` [N], the format every script reads.
"""
import startup  # noqa: F401  (first: Ctrl-C works while torch loads)
import os

import numpy as np

import common

COLOURS = np.array([[230, 60, 60], [60, 200, 80], [70, 110, 240], [240, 210, 60],
                    [200, 80, 220], [80, 220, 220]], np.float32)
SHAPES = ("square", "disc", "plus", "triangle")


def shape_mask(kind, size, r, cy, cx):
    """Boolean [size, size] mask of one shape of radius r centred at (cy, cx)."""
    y, x = np.mgrid[:size, :size] + 0.5
    dy, dx = y - cy, x - cx
    if kind == "square":
        return (np.abs(dy) <= r) & (np.abs(dx) <= r)
    if kind == "disc":
        return dy**2 + dx**2 <= r**2
    if kind == "plus":
        return ((np.abs(dy) <= r / 3) & (np.abs(dx) <= r)) | ((np.abs(dx) <= r / 3) &
                                                              (np.abs(dy) <= r))
    return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)  # triangle, apex up


def toy_images(n, size=16, seed=0):
    """n images [n, size, size, 3] uint8 and their shape labels [n]."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(SHAPES), n)
    images = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        r = rng.uniform(0.2, 0.4) * size
        cy, cx = rng.uniform(r, size - r, 2)
        mask = shape_mask(SHAPES[labels[i]], size, r, cy, cx)
        img = np.full((size, size, 3), 25.0) + rng.normal(0, 6, (size, size, 3))
        img[mask] = COLOURS[rng.integers(len(COLOURS))] + rng.normal(0, 6, (mask.sum(), 3))
        images[i] = np.clip(img, 0, 255).round().astype(np.uint8)
    return images, labels


def main(args):
    images, labels = toy_images(args.n, args.size, args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez(args.out, images=images, labels=labels)
    print(f"wrote {args.out}: {args.n} images {args.size}x{args.size}, "
          f"{len(SHAPES)} classes ({', '.join(SHAPES)})")


def parse_args(argv=None):
    p = common.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="toy.npz", help="output .npz")
    p.add_argument("--n", type=common.positive_int, default=4096, help="number of images")
    p.add_argument("--size", type=common.positive_int, default=16, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed (use another for held-out)")
    common.add_threads_arg(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    common.cli(main, parse_args)
