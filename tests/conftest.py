"""Shared fixtures: tiny data sets and tiny teachers made by the tests themselves (no download)."""
import math
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import fid  # noqa: E402
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
    """Recursively compare two checkpoint structures; returns a list of differing paths."""
    diffs = []
    if isinstance(a, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(set(a) ^ set(b))}"]
        for k in a:
            diffs += tensors_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            diffs += tensors_equal(x, y, f"{path}[{i}]")
    elif torch.is_tensor(a):
        if not torch.equal(a, b):
            diffs.append(path)
    elif a != b:
        diffs.append(path)
    return diffs


def random_inception_state_dict(seed=0):
    """FID Inception with He-initialised convolutions, random BatchNorm affine parameters and
    running statistics calibrated on a few smooth random images, so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    net = fid.FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.weight.data = torch.randn(m.weight.shape, generator=g) * math.sqrt(2 / m.weight[0].numel())
        elif isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = 0.5 + torch.rand(m.weight.shape, generator=g)
            m.bias.data = 0.2 * torch.randn(m.bias.shape, generator=g)
            m.momentum = None  # running stats = plain average over the calibration pass
        elif isinstance(m, torch.nn.Linear):
            m.weight.data = 0.02 * torch.randn(m.weight.shape, generator=g)
            m.bias.data = 0.02 * torch.randn(m.bias.shape, generator=g)
    x = torch.nn.functional.interpolate(torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, size=(299, 299),
                                        mode="bilinear", align_corners=False)
    net.train()
    with torch.no_grad():
        net(x)
    return net.state_dict()


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    """A random-weights FID Inception file (the real one cannot be downloaded here)."""
    path = str(tmp_path_factory.mktemp("weights") / "random_inception.pth")
    torch.save(random_inception_state_dict(), path)
    return path
