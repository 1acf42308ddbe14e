"""The Inception network of the FID and what it computes: features, statistics, the Frechet
distance, statistics files, and the in-training FID of the training scripts (fid.py is the
command that uses them).

Network: Inception-v3 in torchvision's Inception3 layout with 1008 classes and the FID blocks
(pooling branches of Mixed_5b..5d, 6b..6e, 7b average without the zero padding, 7c max-pools),
loaded from `pt_inception-2015-12-05-6726825d.pth` (the TF 2015-12-05 graph ported by
pytorch-fid). `--weights PATH` uses a local copy; otherwise the torch hub cache is used and the
file is downloaded from the pytorch-fid release only when it is absent (and refused unless its
SHA-256 starts with 6726825d). Features are the 2048-d pool outputs; statistics accumulate in
float64.

Preprocessing (`--mode`), same network either way:
  tf (default): float pixels 0..255, TF1 bilinear resize to 299 (source coordinate
      = x * in / out, no half-pixel offset, edges clamped), then (x - 128) / 128. This is what
      TTUR, clean-fid legacy_tensorflow and torch-fidelity compute, so it is the paper's FID.
  pytorch-fid: x / 255, F.interpolate(299, bilinear, align_corners=False), 2x - 1, which is
      pytorch-fid's pipeline. At 32x32 input the two modes' features differ by tens of percent,
      so statistics files record their mode and scores refuse to mix modes.

Statistics files are .npz with `mu`, `sigma` (plus `mode`, `n`, `weights` when written here);
files from pytorch-fid and clean-fid (e.g. cifar10_legacy_tensorflow_train_32.npz) are read too.
"""
import contextlib
import hashlib
import math
import os
import sys
import tempfile
import time
import warnings
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.inception import (BasicConv2d, InceptionA, InceptionB, InceptionC,
                                          InceptionD, InceptionE)

import checkpoints
import common


WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"


WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_NAME)


WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub convention: the file name carries its hash prefix


MODES = ("tf", "pytorch-fid")


FEATURE_DIM = 2048


class FIDError(common.RealUIDError, ValueError):
    """Bad input for the FID computation; the message names the problem and the fix."""


class FIDInceptionA(InceptionA):
    """Mixed_5b..5d: the pool branch averages over the valid pixels only (TF's avg_pool)."""

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1,
                                                    count_include_pad=False))
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)


class FIDInceptionC(InceptionC):
    """Mixed_6b..6e: the pool branch averages over the valid pixels only."""

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            branch7x7dbl = conv(branch7x7dbl)
        branch_pool = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1,
                                                    count_include_pad=False))
        return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], 1)


class FIDInceptionE(InceptionE):
    """Mixed_7b (pool="avg", valid pixels only) and Mixed_7c (pool="max", as in the TF
    graph)."""

    def __init__(self, in_channels, pool):
        super().__init__(in_channels)
        self.pool = pool

    def forward(self, x):
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl),
                                  self.branch3x3dbl_3b(branch3x3dbl)], 1)
        if self.pool == "avg":
            pooled = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        else:
            pooled = F.max_pool2d(x, 3, stride=1, padding=1)
        branch_pool = self.branch_pool(pooled)
        return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)


class FIDInceptionV3(nn.Module):
    """[B, 3, 299, 299] float in [-1, 1] -> [B, 2048] pool features. BatchNorm eps is 1e-3
    (torchvision's BasicConv2d); `fc` (1008 classes) is unused but keeps the 566 keys."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):
        for name, layer in self.named_children():
            if name == "fc":
                break
            x = layer(x)
        return x.flatten(1)


def resize_bilinear_tf1(x, size=299):
    """TF1 `tf.image.resize_bilinear(align_corners=False)` of float x [B, C, H, W] to
    [B, C, size, size]: output pixel j samples source coordinate j * in / out (float32, no
    half-pixel offset), lower index floor, upper index clamped to the edge, and TF's lerp order
    top + (bottom - top) * dy with top = left + (right - left) * dx."""

    def taps(n_in):
        src = (torch.arange(size, dtype=torch.float32)
               * torch.tensor(n_in / size, dtype=torch.float32))
        lo = src.floor().long()
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo.to(x.device), hi.to(x.device), (src - lo.float()).to(x.device, x.dtype)

    y_lo, y_hi, dy = taps(x.shape[2])
    x_lo, x_hi, dx = taps(x.shape[3])
    left, right = x[:, :, :, x_lo], x[:, :, :, x_hi]
    rows = left + (right - left) * dx  # [B, C, H, size]: every source row resampled along x
    top, bottom = rows[:, :, y_lo], rows[:, :, y_hi]
    return top + (bottom - top) * dy[:, None]


def preprocess(images, mode):
    """uint8 images [B, 3, H, W] -> Inception input [B, 3, 299, 299] in [-1, 1] for `mode`."""
    x = images.float()
    if mode == "tf":  # TTUR / clean-fid legacy_tensorflow / torch-fidelity
        return (resize_bilinear_tf1(x, 299) - 128) / 128
    if mode == "pytorch-fid":  # pytorch-fid: ToTensor, F.interpolate, 2x - 1
        x = F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False)
        return 2 * x - 1
    raise FIDError(f"unknown FID mode {mode!r}; use one of {', '.join(MODES)}")


def random_inception_state_dict(seed=0):
    """Random weights for tests and benchmarks (the real file cannot always be downloaded): FID
    Inception with He-initialised convolutions, random BatchNorm affine parameters and
    running statistics calibrated on a few smooth random images, so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.weight.data = (torch.randn(m.weight.shape, generator=g)
                             * math.sqrt(2 / m.weight[0].numel()))
        elif isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = 0.5 + torch.rand(m.weight.shape, generator=g)
            m.bias.data = 0.2 * torch.randn(m.bias.shape, generator=g)
            m.momentum = None  # running stats = plain average over the calibration pass
        elif isinstance(m, torch.nn.Linear):
            m.weight.data = 0.02 * torch.randn(m.weight.shape, generator=g)
            m.bias.data = 0.02 * torch.randn(m.bias.shape, generator=g)
    x = F.interpolate(torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, size=(299, 299),
                      mode="bilinear", align_corners=False)
    net.train()
    with torch.no_grad():
        net(x)
    return net.state_dict()


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _resolve_weights(path):
    """(path, sha256) of the weights file; see resolve_weights."""
    if path is not None:
        if not os.path.isfile(path):
            raise FIDError(f"weights file {path} not found; pass the path of {WEIGHTS_NAME} "
                           "to --weights")
        sha = sha256_file(path)
        if not sha.startswith(WEIGHTS_SHA256_PREFIX):
            warnings.warn(
                f"{path} has SHA-256 {sha[:8]}..., not {WEIGHTS_SHA256_PREFIX}...: it is not the "
                "standard FID Inception file, so scores computed with it are not comparable with "
                "published FIDs",
                stacklevel=3)
        return path, sha
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_NAME)
    if not os.path.isfile(cached):
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        partial = cached + f".partial{os.getpid()}"
        print(f"fid.py: downloading {WEIGHTS_URL} to {cached}", file=sys.stderr)
        try:
            torch.hub.download_url_to_file(WEIGHTS_URL, partial, progress=True)
        except Exception as e:  # no network, proxy, HTTP error: all end the same way
            if os.path.exists(partial):
                os.remove(partial)
            raise FIDError(f"could not download {WEIGHTS_URL} ({e}); download it by hand and "
                           "pass --weights PATH")
        sha = sha256_file(partial)
        if not sha.startswith(WEIGHTS_SHA256_PREFIX):
            os.remove(partial)
            raise FIDError(f"downloaded {WEIGHTS_NAME} has SHA-256 {sha[:8]}..., expected "
                           f"{WEIGHTS_SHA256_PREFIX}...; refusing it (retry, or download it by "
                           "hand and pass --weights PATH)")
        os.replace(partial, cached)
        return cached, sha
    sha = sha256_file(cached)
    if not sha.startswith(WEIGHTS_SHA256_PREFIX):
        raise FIDError(f"{cached} has SHA-256 {sha[:8]}..., expected {WEIGHTS_SHA256_PREFIX}...; "
                       "delete it to download it again, or pass --weights PATH")
    return cached, sha


def resolve_weights(path=None):
    """Path of the FID Inception weights: `path` if given (a non-standard hash only warns),
    else the torch hub cache (`<hub dir>/checkpoints/pt_inception-2015-12-05-6726825d.pth`),
    downloaded from the pytorch-fid release when absent and refused on a hash mismatch."""
    return _resolve_weights(path)[0]


class InceptionFeatures(nn.Module):
    """uint8 images [B, 3, H, W] (any H, W) -> float32 [B, 2048] pool features, no grad.

    Build it once per run: it loads and hashes a 95 MB file. It stays in eval mode.
    """

    def __init__(self, weights=None, mode="tf", device="cpu"):
        super().__init__()
        if mode not in MODES:
            raise FIDError(f"unknown FID mode {mode!r}; use one of {', '.join(MODES)}")
        self.mode = mode
        self.weights_path, self.weights_sha256 = _resolve_weights(weights)
        with torch.device("meta"):  # no random initialisation: every tensor comes from the file
            self.net = FIDInceptionV3()
        try:
            checkpoints.check_zip_records(self.weights_path, "Inception weights")
            state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
            self.net.load_state_dict(state, strict=True, assign=True)
        except Exception as e:  # unpickling errors, missing/unexpected keys, wrong shapes
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FIDError(f"{self.weights_path} is not an FID Inception state dict with "
                           f"torchvision key names ({first_line}); pass {WEIGHTS_NAME} to "
                           "--weights")
        self.requires_grad_(False)
        self.train(False)
        self.to(device)
        if self.device.type == "cpu":  # oneDNN's NHWC convolutions: 1.4x faster here, within 1e-6
            self.net.to(memory_format=torch.channels_last)

    def train(self, mode=True):
        return super().train(False)  # BatchNorm must keep its running statistics

    @property
    def device(self):
        return self.net.fc.weight.device

    @torch.no_grad()
    def forward(self, images):
        if not (torch.is_tensor(images) and images.dtype == torch.uint8 and images.ndim == 4
                and images.shape[1] == 3):
            got = (f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images)
                   else type(images).__name__)
            raise FIDError(f"InceptionFeatures expects uint8 images [B, 3, H, W], got {got}; "
                           "quantise with "
                           "(x.clamp(-1, 1) * 127.5 + 128).clamp(0, 255).to(torch.uint8)")
        # float32 features even when called inside an autocast region
        device_type = self.device.type
        no_autocast = (torch.autocast(device_type, enabled=False)
                       if torch.amp.is_autocast_available(device_type)
                       else contextlib.nullcontext())
        with no_autocast:
            return self.net(preprocess(images.to(self.device), self.mode))


def feature_stats(batches, extractor, progress=False, total=None):
    """Mean and covariance of the features of `batches` (uint8 [B, 3, H, W] tensors).

    Returns (mu float64 [2048], sigma float64 [2048, 2048] with the n - 1 normalisation, n).
    Sums are float64 and shifted by the first batch's mean, so the one-pass covariance is
    stable. `total` (number of images, optional) gives the progress lines a percentage and ETA.
    """
    n, shift, s1, s2 = 0, None, None, None
    start = last_print = time.time()
    next_fraction = 0.1
    for images in batches:
        feats = extractor(images)
        # mps: no float64
        keep_on = feats.device if feats.device.type in ("cpu", "cuda") else torch.device("cpu")
        feats = feats.to(keep_on, torch.float64)
        if shift is None:
            shift = feats.mean(0)
            s1 = torch.zeros_like(shift)
            s2 = torch.zeros(len(shift), len(shift), dtype=torch.float64, device=keep_on)
        feats = feats - shift
        s1 += feats.sum(0)
        s2 += feats.T @ feats
        n += len(feats)
        now = time.time()
        fraction = n / total if total else 0.0
        if progress and (now - last_print >= 30 or (total and fraction >= next_fraction)):
            rate = n / max(now - start, 1e-9)
            if total:
                eta = (total - n) / rate
                print(f"fid.py: {n}/{total} images ({100 * fraction:.0f}%), {rate:.1f} img/s, "
                      f"ETA {eta:.0f} s", file=sys.stderr)
                next_fraction = math.floor(fraction * 10 + 1) / 10
            else:
                print(f"fid.py: {n} images, {rate:.1f} img/s", file=sys.stderr)
            last_print = now
    if n < 2:
        raise FIDError(f"got {n} image(s); a covariance needs at least 2 (the paper's protocol "
                       "uses 50,000)")
    mean = s1 / n
    mu = (shift + mean).cpu().numpy()
    sigma = ((s2 - n * torch.outer(mean, mean)) / (n - 1)).cpu().numpy()
    return mu, (sigma + sigma.T) / 2, n


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) of two Gaussians, float64.

    With S1 = V diag(w) V^T, S1 S2 is similar to the symmetric PSD matrix
    M = diag(w)^(1/2) V^T S2 V diag(w)^(1/2) (= V^T S1^(1/2) S2 S1^(1/2) V), so
    tr (S1 S2)^(1/2) = sum of the square roots of M's eigenvalues: two symmetric
    eigendecompositions, exact, no complex arithmetic, no scipy.linalg.sqrtm (2 s instead of
    26 s at d = 2048 on 2 CPU cores). Eigenvalues below the numerical rank tolerance
    (d * eps * largest) count as zero; M is formed on the range of S1 only, so singular
    covariances (fewer samples than dimensions) are handled exactly and faster.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise FIDError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                       f"{sigma2.shape}; both statistics must come from the same feature layer")
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise FIDError(f"{name} has NaN or inf entries; recompute the statistics")
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    eps = d * np.finfo(np.float64).eps  # relative numerical-rank tolerance
    w, v = np.linalg.eigh(sigma1)
    keep = w > max(w.max(), 0.0) * eps  # the range of sigma1 (all of it unless singular)
    v, sqrt_w = v[:, keep], np.sqrt(w[keep])
    m = sqrt_w[:, None] * ((v.T @ sigma2) @ v) * sqrt_w[None, :]
    ev = np.linalg.eigvalsh((m + m.T) / 2) if keep.any() else np.zeros(0)
    tr_sqrt = np.sqrt(ev[ev > max(ev.max(initial=0.0), 0.0) * eps]).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt)


def pixel_frechet_distance(a, b):
    """Frechet distance between two uint8 image sets ([N, ...], any layout) in pixel space:
    each image a vector of C*H*W values in [0, 1], means and covariances in float64. A cheap,
    Inception-free distance for small images (16x16x3 = 768 dimensions)."""
    stats = []
    for x in (a, b):
        x = np.asarray(x).reshape(len(x), -1).astype(np.float64) / 255
        stats += [x.mean(0), np.cov(x, rowvar=False)]
    return frechet_distance(*stats)


def local_weights(path=None):
    """The Inception weights file if it is here (--weights, or the torch hub cache), else None:
    never downloads (for scores that are optional, such as eval_pairs.py's FID)."""
    if path is not None:
        return path
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_NAME)
    return cached if os.path.isfile(cached) else None


def save_stats(path, mu, sigma, mode, n, weights=None):
    """Write mu, sigma (float64), mode, n (and the weights' SHA-256 if given) to the .npz `path`,
    atomically (temporary file in the same directory, then os.replace)."""
    if mode not in MODES:
        raise FIDError(f"unknown FID mode {mode!r}; use one of {', '.join(MODES)}")
    fields = dict(mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
                  mode=np.array(mode), n=np.array(int(n)))
    if weights is not None:
        fields["weights"] = np.array(weights)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fid-", suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **fields)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _open_npz(path):
    try:
        f = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise FIDError(f"cannot read {path} as an .npz file ({e}); write it with numpy.savez")
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise FIDError(f"{path} holds a single .npy array, not an .npz archive; write it with "
                       "numpy.savez")
    return f


def load_stats(path):
    """dict(mu, sigma, mode, n, weights) from a statistics .npz; mode, n and weights are None in
    files written by pytorch-fid or clean-fid, which only hold `mu` and `sigma`."""
    if not os.path.isfile(path):
        raise FIDError(f"statistics file {path} not found; create it with `python fid.py ref`")
    with _open_npz(path) as f:
        if "mu" not in f.files or "sigma" not in f.files:
            raise FIDError(f"{path} has keys {f.files}, not the 'mu' and 'sigma' of a statistics "
                           "file; create one with `python fid.py ref`")
        stats = dict(mu=f["mu"].astype(np.float64), sigma=f["sigma"].astype(np.float64),
                     mode=str(f["mode"]) if "mode" in f.files else None,
                     n=int(f["n"]) if "n" in f.files else None,
                     weights=str(f["weights"]) if "weights" in f.files else None)
    d = stats["mu"].shape[0] if stats["mu"].ndim == 1 else -1
    if d < 1 or stats["sigma"].shape != (d, d):
        raise FIDError(f"{path}: mu {stats['mu'].shape} and sigma {stats['sigma'].shape} do not "
                       "fit together")
    return stats


def is_stats_file(path):
    if not (path.endswith(".npz") and os.path.isfile(path)):
        return False
    with _open_npz(path) as f:
        return "mu" in f.files and "sigma" in f.files


def check_compatible(stats, path, mode, weights_sha256=None):
    """Refuse statistics computed in another mode (or with other weights); warn when unknown."""
    if stats["mode"] is None:
        warnings.warn(f"{path} does not record its preprocessing mode (pytorch-fid / clean-fid "
                      f"file?); assuming --mode {mode}. clean-fid legacy_tensorflow and TTUR files "
                      "are 'tf', pytorch-fid files are 'pytorch-fid'", stacklevel=2)
    elif stats["mode"] != mode:
        raise FIDError(f"{path} was computed with --mode {stats['mode']}, these features with "
                       f"--mode {mode}; FIDs across modes are meaningless: rerun with --mode "
                       f"{stats['mode']} or recompute {path}")
    if weights_sha256 and stats["weights"] and stats["weights"] != weights_sha256:
        raise FIDError(f"{path} was computed with Inception weights {stats['weights'][:8]}..., "
                       f"these with {weights_sha256[:8]}...; use the same --weights for both")


def iter_batches(images, batch_size):
    """uint8 [N, H, W, 3] numpy -> uint8 [B, 3, H, W] tensors."""
    for i in range(0, len(images), batch_size):
        yield torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).permute(0, 3, 1, 2)


class InTrainingFID:
    """FID of a model every N steps of a training run on `n` samples: the Inception network and
    the reference statistics are loaded once per run; the latents and labels are the same at
    every evaluation (balanced labels arange(n) % classes), so that scores are comparable
    across steps. Cheap and labelled as such; final numbers come from `fid.py calc`."""

    def __init__(self, ref, weights, mode, device, shape, num_classes, n=10_000, batch=250):
        if not ref:
            raise FIDError("--fid-every needs --fid-ref, statistics from `python fid.py ref`")
        self.ref = load_stats(ref)
        self.extractor = InceptionFeatures(weights, mode, device)
        check_compatible(self.ref, ref, self.extractor.mode, self.extractor.weights_sha256)
        self.device, self.shape, self.num_classes = device, shape, num_classes
        self.n, self.batch = n, batch

    @torch.no_grad()
    def __call__(self, sample):
        """FID of sample(z, y) -> images in [-1, 1] against the reference statistics."""
        gen = torch.Generator().manual_seed(1234)

        def batches():
            for lo in range(0, self.n, self.batch):
                m = min(self.batch, self.n - lo)
                z = torch.randn(m, *self.shape, generator=gen).to(self.device)
                y = None if self.num_classes is None else \
                    (torch.arange(lo, lo + m) % self.num_classes).to(self.device)
                x = common.to_uint8(sample(z, y).float())
                yield x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # gray -> RGB
        mu, sigma, _ = feature_stats(batches(), self.extractor)
        return frechet_distance(mu, sigma, self.ref["mu"], self.ref["sigma"])


def add_feature_args(parser):
    """The flags of Inception feature extraction (shared with eval_pairs.py)."""
    g = parser.add_argument_group("feature extraction")
    g.add_argument("--mode", choices=MODES, default="tf",
                   help="preprocessing: 'tf' = TensorFlow FID as in the paper (clean-fid "
                        "legacy_tensorflow, TTUR, torch-fidelity); 'pytorch-fid' = pytorch-fid's "
                        "resize")
    g.add_argument("--weights", default=None, metavar="PATH",
                   help=f"local {WEIGHTS_NAME}; default: the torch hub cache, downloaded there "
                        "once if absent")
    g.add_argument("--batch-size", type=common.positive_int, default=100,
                   help="images per Inception forward")
    g.add_argument("--device", default=None,
                   help="torch device (default: cuda if available, else npu, else mps, else cpu)")
    g.add_argument("--workers", type=common.positive_int, default=8,
                   help="threads decoding image folders")
    common.add_threads_arg(g)
    return g
