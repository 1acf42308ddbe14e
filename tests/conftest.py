"""Shared fixtures: tiny data sets and tiny teachers made by the tests themselves (no download)."""
import os
import sys

# One thread per test process (and per command the tests start): the tiny networks gain
# nothing from more, and on a shared 2-core machine PyTorch's default threads oversubscribe
# the cores several times over.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoints  # noqa: E402
import inception  # noqa: E402
import train_teacher  # noqa: E402

# A tiny network: 8x8 images, one level of 32 channels, attention at 8x8 (~180k parameters).
TINY_NET = ["--image-size", "8", "--num-channels", "32", "--channel-mult", "1",
            "--num-res-blocks", "1", "--attention-resolutions", "8", "--num-heads", "1",
            "--num-head-channels", "-1"]
# Quiet, fast runs: no grids unless asked, a record every step.
FAST = ["--batch-size", "8", "--log-every", "1", "--sample-every", "0", "--device", "cpu",
        "--workers", "0"]


def run(module, argv):
    """Run a script's command line in-process: module.main(module.parse_args(argv))."""
    return module.main(module.parse_args([str(a) for a in argv]))


def shapes_dataset(n, size=8, channels=3, seed=0, classes=3):
    """Procedural images: a bright square of one of `classes` colours on a dark background."""
    rng = np.random.default_rng(seed)
    images = np.full((n, size, size, channels), 20, np.uint8)
    labels = rng.integers(0, classes, n)
    for i in range(n):
        s = rng.integers(2, size // 2 + 1)
        r, c = rng.integers(0, size - s + 1, 2)
        colour = np.full(channels, 60, np.uint8)
        colour[labels[i] % channels] = 230
        images[i, r:r + s, c:c + s] = colour
    return images, labels


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    images, labels = shapes_dataset(64)
    paths = {"uncond": d / "uncond.npz", "cond": d / "cond.npz"}
    np.savez(paths["uncond"], images=images)
    np.savez(paths["cond"], images=images, labels=labels)
    return paths


@pytest.fixture(scope="session")
def teachers(tmp_path_factory, tiny_data):
    """Tiny teachers (a few steps; good enough to distill from in a test)."""
    d = tmp_path_factory.mktemp("teachers")
    out = {}
    for kind in ("uncond", "cond"):
        run(train_teacher, ["--data", tiny_data[kind], "--out", d / kind, "--steps", 3,
                            "--lr", 1e-3, "--warmup", 0, *TINY_NET, *FAST]
            + (["--cond"] if kind == "cond" else []))
        out[kind] = d / kind / "latest.pt"
    return out


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def tensors_equal(a, b, path="ckpt"):
    """Recursively compare two checkpoint structures; returns a list of differing paths (the
    wall-clock training time `elapsed_s` is the one entry that may differ)."""
    return checkpoints.checkpoint_differences(a, b, path)


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    """A random-weights FID Inception file (the real one cannot be downloaded here)."""
    path = str(tmp_path_factory.mktemp("weights") / "random_inception.pth")
    torch.save(inception.random_inception_state_dict(), path)
    return path
