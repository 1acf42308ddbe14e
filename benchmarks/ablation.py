"""A scaled-down Table 1 that runs on a laptop CPU: RealUID's alpha/beta ablation and convergence.

The paper (Kornilov et al., ICLR 2026, Table 1, section 3.4, Appendix A.1.2) claims that real data
fed through alpha != beta close to 1 gives better one-step samples than data-free distillation
(alpha = beta = 1) and gets there in fewer updates, that alpha = beta != 1 adds nothing, and that
settings far from the diagonal or with alpha = 1, beta < 1 are worse or unstable. This script
tests those claims at a size that runs in minutes, with the very losses of distill.py
(`distill.fake_model_loss`, `distill.generator_loss`), its generator `flow.generate` and the
teachers' `train_teacher.flow_matching_loss`:

    python benchmarks/ablation.py --quick --out results/ablation   # < 10 min on 2 CPU cores
    python benchmarks/ablation.py --full --out results/ablation_full  # hours (not run yet)
    python benchmarks/ablation.py --quick --problems analytic  # the closed-form figure, seconds
    python benchmarks/ablation.py --redraw --out results/ablation  # its figures again, seconds

What it does (every number goes to <out>/ablation.json, the tables to <out>/ablation.md, the
figures to <out>/*.png, drawn with matplotlib (`pip install matplotlib`); docs/ablation.md
discusses them):
1. ring: 2-D data, 8 Gaussians on a circle with unequal weights (2:1), MLP networks. Scenarios
   `weak-teacher` (the teacher is under-trained), `missing-modes` (a good teacher, but the
   generator starts from a data-free distillation of a teacher that never saw two of the modes:
   uncovered real points, Appendix A.1.2) and, with --full, `good-teacher` (the control: a good
   teacher, generator initialised from it as in the paper). Metrics against fresh data: sliced W2
   (512 projections; the main number), energy distance, mode coverage (mass per mode).
2. shapes: 8x8 grey images of four procedurally drawn shape classes (no download), the tiny U-Net
   of unet.py (~175k parameters). Metrics against held-out images: Frechet distance of pixels and
   of the 64-d features of a small classifier trained here (the main number), class-mass error.
3. The grid alpha, beta in {0.94, 0.96, 0.98, 1.0} plus alpha = beta = 0.9 (--full; --quick runs
   the seven settings that test the claims), each over --seeds: mean and std of the final metric
   of the EMA generator, its curve against generator updates, and as references the data's own
   noise floor, the teacher with Euler NFE = 100 and the one-step starting point.
4. analytic: 1-D Gaussians, closed-form flow fields and Lemma 2's optimal fake model; the density
   of the generator's loss over (t, x) for several (alpha, beta): which points each setting sees.

Legend (paper -> code): teacher v* -> `teacher`, fake model f -> `fake`, generator G -> `gen`,
x = z + G(0, z) (Appendix D) -> `flow.generate`, alpha/beta -> `alpha`/`beta` (eqs. 17-18),
p_d -> training set (real batches), p_G -> generated batches. One step = 5 fake-model updates and
one generator update, fresh z, x0, t and real batch for every update, x0 and t shared between the
generated and the real batch, Adam betas (0, 0.999), linear warm-up, gradient clipping at 1 and an
EMA of the generator: the paper's loop, scaled down (budgets below, fixed before the grid was run).
Data, teachers and the missing-modes initialisation use fixed seeds; --seeds vary everything of
the distillation (fake-model init, noise, real batches). Deterministic for given seeds on CPU.
"""
import concurrent.futures
import copy
import json
import math
import multiprocessing
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torchvision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import distill  # noqa: E402
import fid  # noqa: E402
import flow  # noqa: E402
import plot  # noqa: E402
import train_teacher  # noqa: E402
import training  # noqa: E402
import unet  # noqa: E402
from benchmarks import measure  # noqa: E402

GRID = (0.94, 0.96, 0.98, 1.0)
FULL_SETTINGS = [(a, b) for a in GRID for b in GRID] + [(0.9, 0.9)]
# --quick: data-free; the paper's best unconditional (0.94, 0.96) and conditional (0.98, 0.96);
# the diagonal (0.96, 0.96) and (0.9, 0.9); far from the diagonal (0.94, 1.0); alpha = 1 (1, 0.96).
QUICK_SETTINGS = [(1.0, 1.0), (0.94, 0.96), (0.98, 0.96), (0.96, 0.96), (0.9, 0.9), (0.94, 1.0),
                  (1.0, 0.96)]
PAPER = (0.94, 0.96)
FAKE_STEPS = 5          # fake-model updates per generator update (the official 5 + 1 cycle)
DATA_SEED, TEACHER_SEED, EVAL_SEED = 1000, 2000, 3000

# Budgets. Fixed from data-free runs alone before the grid was run (the README tells how),
# not retuned afterwards. --quick and --full use the same per-run budgets; --full adds settings
# and scenarios. "smoke" is the CI size: seconds, numbers meaningless.
RING = dict(width=64, depth=3, n_train=5000, batch=128, teacher_lr=1e-3, teacher_steps=3000,
            weak_teacher_steps=1000, init_steps=600, lr=3e-4, warmup=50, steps=800, ema=0.99,
            eval_every=50, n_eval=4096, n_energy=2048, clip=1.0)
SHAPES = dict(n_train=5000, batch=32, teacher_lr=1e-3, teacher_steps=600, classifier_steps=300,
              lr=3e-4, warmup=20, steps=150, ema=0.95, eval_every=25, n_eval=1000, n_ref=4000,
              nfe=100, clip=1.0)
SMOKE = dict(ring=dict(RING, n_train=256, batch=32, teacher_steps=8, weak_teacher_steps=4,
                       init_steps=2, warmup=1, steps=3, eval_every=2, n_eval=128, n_energy=64),
             shapes=dict(SHAPES, n_train=64, batch=4, teacher_steps=2, classifier_steps=2,
                         warmup=1, steps=2, eval_every=1, n_eval=16, n_ref=32, nfe=2))
TINY_UNET = dict(image_size=8, in_channels=1, num_channels=32, channel_mult=(1,), num_res_blocks=1,
                 attention_resolutions="8", num_heads=1, num_head_channels=-1)


# ---------------------------------------------------------------------------------------------
# Metrics: pure functions of two samples [n, d].

def sorted_projections(x, n_proj=512, seed=0):
    """<theta, x_i> for n_proj directions theta uniform on the unit sphere (fixed by `seed`),
    sorted over the sample: [n_proj, n] float64."""
    theta = torch.randn(n_proj, x.shape[1], generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float64)
    theta = theta / theta.norm(dim=1, keepdim=True)
    # Sorting along the contiguous last dimension is ~100x faster than along dim 0.
    return torch.sort(theta @ x.double().t(), dim=1).values


def sliced_w2(x, y, n_proj=512, seed=0):
    """Sliced Wasserstein-2 distance sqrt(E_theta W2^2(<theta, x>, <theta, y>)) between
    equal-size samples x, y [n, d]: in 1-D, W2^2 of two empirical measures with n atoms each is
    the mean squared difference of the sorted values."""
    return sliced_w2_to(x, sorted_projections(y, n_proj, seed), seed)


def sliced_w2_to(x, y_sorted, seed=0):
    """sliced_w2(x, y) given y's sorted_projections (computed once for a fixed reference)."""
    return float((sorted_projections(x, len(y_sorted), seed) - y_sorted).pow(2).mean().sqrt())


def energy_distance(x, y):
    """Energy distance sqrt(2 E|X - Y| - E|X - X'| - E|Y - Y'|) (Szekely and Rizzo) with all pairs
    of both samples (V-statistics, diagonal included); scipy.stats.energy_distance in 1-D."""
    x, y = x.double(), y.double()
    xy, xx, yy = (torch.cdist(a, b).mean() for a, b in ((x, y), (x, x), (y, y)))
    return float((2 * xy - xx - yy).clamp(min=0).sqrt())


def mode_masses(x, centers, radius):
    """Share of the sample [n, d] nearest to each mode centre [K, d] and within `radius` of it,
    then the share farther than `radius` from every centre (off-mode): K + 1 numbers."""
    dist = torch.cdist(x.double(), centers.double())
    nearest = dist.argmin(1)
    inside = dist.min(1).values <= radius
    counts = torch.bincount(nearest[inside], minlength=len(centers)).double()
    return torch.cat([counts, (~inside).sum().double()[None]]) / len(x)


def mode_coverage(masses, truth, covered_share=0.2):
    """Mode-coverage summary: total variation between the mass vectors (K modes + off-mode) and
    the number of modes holding at least `covered_share` of their true mass."""
    return {"mode_tv": float(0.5 * (masses - truth).abs().sum()),
            "modes_covered": int((masses[:-1] >= covered_share * truth[:-1]).sum()),
            "off_mode": float(masses[-1])}


def frechet(x, y):
    """Frechet distance between Gaussians fitted to samples x, y [n, d] (mean, unbiased
    covariance), via fid.frechet_distance (exact, float64)."""
    stats = []
    for a in (x, y):
        a = a.double().cpu().numpy()
        stats += [a.mean(0), np.atleast_2d(np.cov(a, rowvar=False))]
    return fid.frechet_distance(*stats)


# ---------------------------------------------------------------------------------------------
# Closed forms in 1-D (item 4, Appendix A.1.2).

def gaussian_path(t, x, mu, s):
    """Data N(mu, s^2), noise N(0, 1) at t = 0, x_t = t x1 + (1 - t) x0. Returns the density of
    x_t ~ N(t mu, t^2 s^2 + (1 - t)^2) at x and the flow field E[x1 - x0 | x_t = x]
    = mu + k(t) (x - t mu), k(t) = Cov(x1 - x0, x_t) / Var(x_t) = (t s^2 - (1 - t)) / var_t."""
    var = t * t * s * s + (1 - t) ** 2
    dens = torch.exp(-(x - t * mu) ** 2 / (2 * var)) / torch.sqrt(2 * math.pi * var)
    return dens, mu + (t * s * s - (1 - t)) / var * (x - t * mu)


def mixture_path(t, x, components):
    """Density and flow field of x_t for a Gaussian mixture [(weight, mu, s), ...]: the marginal
    field is the posterior-weighted average of the components' fields,
    v = sum_k w_k p_k v_k / sum_k w_k p_k (the conditional expectation splits over components)."""
    parts = [(w * d, w * d * v) for w, mu, s in components for d, v in [gaussian_path(t, x, mu, s)]]
    dens = sum(p for p, _ in parts)
    return dens, sum(m for _, m in parts) / dens.clamp(min=1e-300)


def lemma2_density(p_g, v_g, p_d, v_d, alpha, beta):
    """Density over (t, x) of the generator's loss at the optimal fake model, for a perfect teacher
    v* = v_d. Per point, RealUM(f) of eq. (17) is w |f|^2 - 2 <f, m> with w = alpha p_g +
    (1 - alpha) p_d and m = beta p_g v_G + (1 - beta) p_d v_d (conditioning u on x_t turns u_g, u_d
    into the fields v_G, v_d), so Lemma 2's optimum is f* = m / w and the generator's loss
    RealUM(v*) - RealUM(f*) = int w |v* - f*|^2 dx dt. Its density is

        w |v_d - f*|^2 = |p_g (alpha v_d - beta v_G) + (beta - alpha) p_d v_d|^2 / w.

    Where the generator has no mass (p_g = 0, p_d > 0) this is (beta - alpha)^2 / (1 - alpha)
    p_d |v_d|^2: zero on the diagonal alpha = beta (data-free included), positive off it, and
    unbounded for alpha = 1 != beta (w = p_g -> 0: the instability of Table 1's last row). It
    vanishes everywhere iff p_g = p_d (then v_G = v_d)."""
    w = alpha * p_g + (1 - alpha) * p_d
    num = p_g * (alpha * v_d - beta * v_g) + (beta - alpha) * p_d * v_d
    return torch.where(w > 0, num * num / w.clamp(min=1e-300), torch.zeros_like(w))


def analytic_picture(settings, n_t=200, n_x=801):
    """Lemma 2 densities for data 0.5 N(-2, 0.4^2) + 0.5 N(2, 0.4^2) and a generator N(-2, 0.4^2)
    that covers only the left mode; t on a midpoint grid of (0, 1), x in [-4, 4]. Returns the
    grids, densities and per setting the share of the loss that comes from points the generator
    misses (p_g < 0.1% of p_d), with t from 0.5 on (before that both paths are mostly noise)."""
    t = ((torch.arange(n_t, dtype=torch.float64) + 0.5) / n_t)[:, None]
    x = torch.linspace(-4, 4, n_x, dtype=torch.float64)[None]
    p_d, v_d = mixture_path(t, x, [(0.5, -2.0, 0.4), (0.5, 2.0, 0.4)])
    p_g, v_g = gaussian_path(t, x, -2.0, 0.4)
    missed = (p_g < 1e-3 * p_d) & (t >= 0.5)
    out = {"t": t[:, 0], "x": x[0], "p_d": p_d, "p_g": p_g, "density": {}, "summary": {}}
    for a, b in settings:
        dens = lemma2_density(p_g, v_g, p_d, v_d, a, b)
        late = dens * (t >= 0.5)
        out["density"][(a, b)] = dens
        out["summary"][key(a, b)] = {
            "loss": float(dens.sum() / (n_t * n_x) * 8), "loss_t_ge_0.5": float(late.mean() * 8),
            "share_missed": float((late * missed).sum() / late.sum().clamp(min=1e-300))}
    return out


# ---------------------------------------------------------------------------------------------
# The two problems: data, networks.

def ring_modes(radius=2.0, std=0.2):
    """8 Gaussian modes on a circle; weights 2:1 alternating (the heavy ones at 0, 90, ... deg)."""
    angle = torch.arange(8) * (2 * math.pi / 8)
    centers = radius * torch.stack([angle.cos(), angle.sin()], 1)
    weights = torch.tensor([2.0, 1.0] * 4) / 12
    return centers, weights, std


def ring_sample(n, seed, keep=None):
    """n points of the ring mixture (optionally only modes in `keep`), float32 [n, 2]."""
    centers, weights, std = ring_modes()
    if keep is not None:
        weights = torch.zeros_like(weights).index_fill(0, torch.tensor(keep), 1.0) * weights
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(weights / weights.sum(), n, replacement=True, generator=g)
    return centers[k] + std * torch.randn(n, 2, generator=g)


def ring_truth_masses():
    """Exact K + 1 mass vector of the ring for mode_masses with radius 3 std: a 2-D Gaussian puts
    exp(-9/2) of its mass beyond 3 std (the modes are far enough apart that nothing else leaks)."""
    _, weights, _ = ring_modes()
    out = math.exp(-4.5)
    return torch.cat([weights * (1 - out), torch.tensor([out])]).double()


def shapes_sample(n, seed, size=8):
    """n grey size x size images (uint8 [n, 1, size, size]) and labels of four shape classes drawn
    procedurally, equally likely: 0 filled square (side 2-4), 1 square outline (side 4-6), 2 plus
    sign (arms 1-2), 3 diagonal line (length 4-7, either direction); background level 0-40, shape
    level 170-255, random position."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, 1, size, size), np.uint8)
    labels = rng.integers(0, 4, n)
    for i, k in enumerate(labels):
        bg, c = rng.integers(0, 41), rng.integers(170, 256)
        a = np.full((size, size), bg, np.uint8)
        if k == 0:
            s = rng.integers(2, 5)
            r, q = rng.integers(0, size - s + 1, 2)
            a[r:r + s, q:q + s] = c
        elif k == 1:
            s = rng.integers(4, 7)
            r, q = rng.integers(0, size - s + 1, 2)
            a[r:r + s, q:q + s] = c
            a[r + 1:r + s - 1, q + 1:q + s - 1] = bg
        elif k == 2:
            m = rng.integers(1, 3)
            r, q = rng.integers(m, size - m, 2)
            a[r - m:r + m + 1, q] = c
            a[r, q - m:q + m + 1] = c
        else:
            n_px = rng.integers(4, 8)
            r, q = rng.integers(0, size - n_px + 1, 2)
            j = np.arange(n_px)
            a[r + j, q + (j if rng.random() < 0.5 else n_px - 1 - j)] = c
        images[i, 0] = a
    return torch.from_numpy(images), torch.from_numpy(labels)


class MLP(nn.Module):
    """v(t, x) for 2-D points: [x, cos/sin(2^k pi t), k < 6] -> depth SiLU layers -> 2. Called as
    net(t, x, y) like the U-Net (y is ignored: the problems are unconditional)."""

    def __init__(self, width=128, depth=3, dim=2, n_freq=6):
        super().__init__()
        self.register_buffer("freq", math.pi * 2.0 ** torch.arange(n_freq), persistent=False)
        layers, d = [], dim + 2 * n_freq
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.SiLU()]
            d = width
        self.net = nn.Sequential(*layers, nn.Linear(d, dim))

    def forward(self, t, x, y=None):
        a = t.to(x.dtype)[:, None] * self.freq
        return self.net(torch.cat([x, a.cos(), a.sin()], 1))


class EnsembleMLP(nn.Module):
    """n independent MLPs in one batched call (torch.baddbmm): row r of x goes through member
    r % n (interleaved rows, so that the losses' concatenation of the generated and the real
    batch, and chunk(2) of the output, keep every row with its member). Built from n MLP state
    dicts; member_state gives one back."""

    def __init__(self, states, width, depth):
        super().__init__()
        ref = MLP(width, depth)
        self.register_buffer("freq", ref.freq.clone(), persistent=False)
        self.layers = [i for i, m in enumerate(ref.net) if isinstance(m, nn.Linear)]
        self.weight = nn.ParameterList(
            [nn.Parameter(torch.stack([s[f"net.{i}.weight"].t() for s in states]))
             for i in self.layers])
        self.bias = nn.ParameterList(
            [nn.Parameter(torch.stack([s[f"net.{i}.bias"][None] for s in states]))
             for i in self.layers])

    def forward(self, t, x, y=None):
        n = len(self.weight[0])
        a = t.to(x.dtype)[:, None] * self.freq
        h = torch.cat([x, a.cos(), a.sin()], 1).view(len(x) // n, n, -1).transpose(0, 1)
        for j, (w, b) in enumerate(zip(self.weight, self.bias)):
            h = torch.baddbmm(b, h, w)
            if j < len(self.layers) - 1:
                h = nn.functional.silu(h)
        return h.transpose(0, 1).reshape(len(x), -1)


def member_state(ens, i):
    """MLP state dict of member i of an EnsembleMLP."""
    return {k: v for l, w, b in zip(ens.layers, ens.weight, ens.bias)
            for k, v in ((f"net.{l}.weight", w[i].t().clone()), (f"net.{l}.bias", b[i, 0].clone()))}


class ShapeClassifier(nn.Module):
    """The small fixed feature network for the shapes: two convs, 64-d features, 4 logits."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.SiLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.SiLU())
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        return self.head(self.features(x))


def make_net(problem, b):
    return MLP(b["width"], b["depth"]) if problem == "ring" else unet.UNet(**TINY_UNET)


def build(problem, b, states):
    """The network of a run from per-member state dicts: an EnsembleMLP (2-D) or a U-Net (one)."""
    if problem == "ring":
        return EnsembleMLP(states, b["width"], b["depth"])
    net = make_net(problem, b)
    net.load_state_dict(states[0])
    return net


def train_set(problem, b, keep=None):
    """The training set (the real data of the distillation): fixed, DATA_SEED."""
    if problem == "ring":
        return ring_sample(b["n_train"], DATA_SEED, keep)
    return common.from_uint8(shapes_sample(b["n_train"], DATA_SEED)[0])


def eval_noise(problem, n):
    shape = (2,) if problem == "ring" else (1, 8, 8)
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(EVAL_SEED))


@torch.no_grad()
def run_net(fn, z, chunk=500):
    return torch.cat([fn(z[i:i + chunk]) for i in range(0, len(z), chunk)])


# ---------------------------------------------------------------------------------------------
# Evaluation contexts: everything a worker needs to score samples, rebuilt from small tensors.

def ring_context(b):
    centers, _, std = ring_modes()
    ref = ring_sample(b["n_eval"], EVAL_SEED + 1)
    return {"ref": ref, "ref_sorted": sorted_projections(ref), "centers": centers,
            "radius": 3 * std, "truth": ring_truth_masses(), "n_energy": b["n_energy"]}


def ring_metrics(x, ctx, full=True):
    out = {"sw2": sliced_w2_to(x, ctx["ref_sorted"])}
    if full:
        n = ctx["n_energy"]
        out["energy"] = energy_distance(x[:n], ctx["ref"][:n])
        out.update(mode_coverage(mode_masses(x, ctx["centers"], ctx["radius"]), ctx["truth"]))
    return out


def shapes_context(b, classifier_sd):
    clf = ShapeClassifier()
    clf.load_state_dict(classifier_sd)
    clf.eval().requires_grad_(False)
    ref = common.from_uint8(shapes_sample(b["n_ref"], EVAL_SEED + 1)[0])
    return {"clf": clf, "ref_pix": ref.flatten(1), "ref_feat": run_net(clf.features, ref)}


def shapes_metrics(x, ctx, full=True):
    """Pixel and feature Frechet distances against the held-out images, and the total variation
    between the classifier's class shares and the truth (uniform). Samples are quantised to uint8
    first, as in the FID protocol (README, "FID: protocol and commands")."""
    x = common.from_uint8(common.to_uint8(x))
    feat = run_net(ctx["clf"].features, x)
    share = torch.bincount(ctx["clf"].head(feat).argmax(1), minlength=4).double() / len(x)
    out = {"fd_feat": frechet(feat, ctx["ref_feat"])}
    if full:
        out.update(fd_pix=frechet(x.flatten(1), ctx["ref_pix"]),
                   class_tv=float(0.5 * (share - 0.25).abs().sum()))
    return out


def context(spec):
    if spec["problem"] == "ring":
        return ring_context(spec["budget"])
    return shapes_context(spec["budget"], spec["classifier"])


def metrics(problem, x, ctx, full=True):
    """All metrics of a sample, or (full=False, for the curves) only the main one."""
    return (ring_metrics if problem == "ring" else shapes_metrics)(x, ctx, full)


PRIMARY = {"ring": "sw2", "shapes": "fd_feat"}


# ---------------------------------------------------------------------------------------------
# Training: each job takes a spec dict and returns plain data, so it runs in a worker process.

def adam_update(net, opt, sched, loss, clip):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), clip, foreach=True)
    opt.step()
    sched.step()


def train_fm_teacher(spec):
    """A flow-matching teacher (train_teacher.flow_matching_loss), Adam (0.9, 0.999), linear
    warm-up, clipping at 1; returns the EMA weights (the distillation uses the teacher's EMA)."""
    b, problem = spec["budget"], spec["problem"]
    data = train_set(problem, b, spec.get("keep"))
    torch.manual_seed(TEACHER_SEED)
    net = make_net(problem, b)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), b["teacher_lr"], betas=(0.9, 0.999), foreach=True)
    sched = training.warmup(opt, spec["steps"] // 10)
    g = torch.Generator().manual_seed(TEACHER_SEED)
    for _ in range(spec["steps"]):
        x1 = data[torch.randint(len(data), (b["batch"],), generator=g)]
        x0, t = torch.randn(x1.shape, generator=g), torch.rand(len(x1), generator=g)
        adam_update(net, opt, sched, train_teacher.flow_matching_loss(net, x1, x0, t), b["clip"])
        training.ema_update(ema, net, spec["teacher_ema"])
    return {"name": spec["name"], "state": ema.state_dict()}


def train_classifier(spec):
    """The fixed feature network of the shapes metric: cross-entropy on the training classes."""
    b = spec["budget"]
    images, labels = shapes_sample(b["n_train"], DATA_SEED)
    x = common.from_uint8(images)
    torch.manual_seed(TEACHER_SEED)
    clf = ShapeClassifier()
    opt = torch.optim.Adam(clf.parameters(), 2e-3)
    g = torch.Generator().manual_seed(TEACHER_SEED)
    for _ in range(b["classifier_steps"]):
        i = torch.randint(len(x), (128,), generator=g)
        loss = nn.functional.cross_entropy(clf(x[i]), labels[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    held_x, held_y = shapes_sample(2000, EVAL_SEED + 2)
    with torch.no_grad():
        acc = (clf(common.from_uint8(held_x)).argmax(1) == held_y).double().mean()
    return {"name": "classifier", "state": clf.state_dict(), "accuracy": float(acc)}


def clip_members(params, clip, n):
    """Gradient-norm clipping at `clip` done separately for each of the n members of an ensemble
    (parameters [n, ...]; n = 1 is torch's clip_grad_norm_: factor clip / (norm + 1e-6), at most 1)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.stack([g.reshape(n, -1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
    factor = (clip / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(factor.view(-1, *[1] * (g.dim() - 1)) if n > 1 else factor)


def member_update(net, opt, sched, loss, clip, n):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    clip_members(list(net.parameters()), clip, n)
    opt.step()
    sched.step()


def realuid(spec):
    """RealUID distillation (eq. 18) with distill.py's losses, scaled down, for each member of
    spec["members"] (scenario, seed, teacher and generator-init weights) at spec's alpha, beta.
    2-D members run side by side in one EnsembleMLP (one process, independent runs: own noise,
    own real batches, own clipping; the summed loss gives each member exactly its own gradient);
    images run one member. Returns per member the curve of the EMA generator's main metric
    against generator updates, its final metrics and, if asked, its weights. A member whose
    weights turn non-finite is reported as diverged at that update."""
    t_start = time.perf_counter()
    problem, b, members = spec["problem"], spec["budget"], spec["members"]
    alpha, beta, n = spec["alpha"], spec["beta"], len(spec["members"])
    uses_real = (alpha, beta) != (1.0, 1.0)
    data = train_set(problem, b)
    ctx = context(spec)
    z_eval = eval_noise(problem, b["n_eval"])
    # Initialisation: teacher v* frozen; G from the given weights (the teacher's, or the
    # missing-modes generator); fake model f fresh (distillation from scratch) from each seed.
    fresh = []
    for m in members:
        torch.manual_seed(m["seed"])
        fresh.append(make_net(problem, b).state_dict())
    teacher, gen, fake = (build(problem, b, [m[k] for m in members]) if k else build(problem, b, fresh)
                          for k in ("teacher", "gen_init", None))
    teacher.eval().requires_grad_(False)
    ema = copy.deepcopy(gen).eval().requires_grad_(False)
    opt_g = torch.optim.Adam(gen.parameters(), b["lr"], betas=(0.0, 0.999), foreach=True)
    opt_f = torch.optim.Adam(fake.parameters(), b["lr"], betas=(0.0, 0.999), foreach=True)
    sched_g, sched_f = training.warmup(opt_g, b["warmup"]), training.warmup(opt_f, b["warmup"])
    gens = [torch.Generator().manual_seed(m["seed"]) for m in members]

    def draw():
        """Fresh z, x0, t (and a real batch) for every update, each member from its own seed."""
        parts = []
        for g in gens:
            z = torch.randn(b["batch"], *data.shape[1:], generator=g)
            x0, t = torch.randn(z.shape, generator=g), torch.rand(len(z), generator=g)
            i = torch.randint(len(data), (len(z),), generator=g) if uses_real else None
            parts.append((z, x0, t, None if i is None else data[i]))
        # Row r belongs to member r % n (see EnsembleMLP).
        return [None if p[0] is None else torch.stack(p, 1).flatten(0, 1) for p in zip(*parts)]

    def score(full=False):
        x = run_net(lambda z: flow.generate(ema, z), z_eval.repeat_interleave(n, 0),
                    chunk=len(z_eval) * n if problem == "ring" else 500)
        x = x.view(len(z_eval), n, *x.shape[1:])
        return [metrics(problem, x[:, i], ctx, full) for i in range(n)]

    def finite():
        return torch.stack([p.detach().reshape(n, -1).isfinite().all(1)
                            for p in [*gen.parameters(), *fake.parameters()]]).all(0)

    curves = [[(0, s[PRIMARY[problem]])] for s in score()]
    diverged = [None] * n
    gen.train(), fake.train()
    for step in range(1, b["steps"] + 1):
        for _ in range(FAKE_STEPS):
            z, x0, t, x_d = draw()
            with torch.no_grad():
                x_g = flow.generate(gen, z)
            # The losses average over all n * batch rows; times n, each member gets its own.
            loss_f = n * distill.fake_model_loss(fake, x_g, x_d, x0, t, alpha=alpha, beta=beta)
            member_update(fake, opt_f, sched_f, loss_f, b["clip"], n)
        z, x0, t, _ = draw()
        fake.requires_grad_(False)
        loss_g = n * distill.generator_loss(teacher, fake, flow.generate(gen, z), x0, t,
                                            alpha=alpha, beta=beta)
        member_update(gen, opt_g, sched_g, loss_g, b["clip"], n)
        fake.requires_grad_(True)
        training.ema_update(ema, gen, b["ema"])
        for i, ok in enumerate(finite().tolist()):
            if not ok and diverged[i] is None:
                diverged[i] = step
        if all(d is not None for d in diverged):
            break
        if step % b["eval_every"] == 0 or step == b["steps"]:
            for c, s, d in zip(curves, score(), diverged):
                c.append((step, s[PRIMARY[problem]] if d is None else float("nan")))
    finals = score(full=True)
    print(f"{problem} alpha={alpha:g} beta={beta:g} seeds {[m['seed'] for m in members]}: "
          f"{time.perf_counter() - t_start:.0f} s", flush=True)
    out = []
    for i, m in enumerate(members):
        r = dict(problem=problem, scenario=m["scenario"], alpha=alpha, beta=beta, seed=m["seed"],
                 curve=curves[i], diverged_at=diverged[i], seconds=(time.perf_counter() - t_start) / n,
                 final=finals[i] if diverged[i] is None else {k: float("nan") for k in finals[i]})
        if spec.get("return_state") is not None and m["seed"] == spec["return_state"]:
            r["state"] = member_state(ema, i) if problem == "ring" else ema.state_dict()
        out.append(r)
    return out


@torch.no_grad()
def reference_metrics(spec):
    """The references of a scenario: the data's own noise floor (fresh data against the
    reference), the teacher with Euler NFE = 100, and the one-step starting point z + G0(0, z)."""
    problem, b = spec["problem"], spec["budget"]
    ctx = context(spec)
    z = eval_noise(problem, b["n_eval"])
    teacher, gen = make_net(problem, b), make_net(problem, b)
    teacher.load_state_dict(spec["teacher"])
    gen.load_state_dict(spec["gen_init"])
    teacher.eval(), gen.eval()
    nfe = 100 if problem == "ring" else b["nfe"]
    if problem == "ring":
        fresh = ring_sample(b["n_eval"], EVAL_SEED + 2)
    else:
        fresh = common.from_uint8(shapes_sample(b["n_eval"], EVAL_SEED + 2)[0])
    samples = {"data": fresh, f"teacher_euler{nfe}": run_net(lambda x: flow.euler(teacher, x, None,
               nfe=nfe), z), "one_step_start": run_net(lambda x: flow.generate(gen, x), z)}
    return {"problem": problem, "scenario": spec["scenario"], "reference": {
        k: metrics(problem, v, ctx) for k, v in samples.items()},
        "samples": {k: v[:1024 if problem == "ring" else 64] for k, v in samples.items()}}


@torch.no_grad()
def final_samples(spec, state):
    """Samples of a distilled generator on the fixed evaluation noise (for the figures)."""
    gen = make_net(spec["problem"], spec["budget"])
    gen.load_state_dict(state)
    z = eval_noise(spec["problem"], 1024 if spec["problem"] == "ring" else 64)
    return run_net(lambda x: flow.generate(gen.eval(), x), z)


def run_job(job):
    kind, spec = job
    return {"teacher": train_fm_teacher, "classifier": train_classifier, "realuid": realuid,
            "reference": reference_metrics}[kind](spec)


def _init_worker(threads):
    torch.set_num_threads(threads)


def run_jobs(jobs, workers, threads):
    """Run jobs in `workers` spawned processes (results in job order), or in this process."""
    if workers <= 1 or len(jobs) <= 1:
        return [run_job(j) for j in jobs]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx,
                                                initializer=_init_worker,
                                                initargs=(threads,)) as pool:
        return list(pool.map(run_job, jobs))


# ---------------------------------------------------------------------------------------------
# Summaries.

def key(a, b):
    return f"alpha={a:g},beta={b:g}"


def summarise(runs, problem):
    """Per setting: mean and sample std (ddof 1) over seeds of each final metric, the number of
    diverged runs, and the mean curve of the main metric."""
    out = {}
    for run in runs:
        out.setdefault(key(run["alpha"], run["beta"]), []).append(run)
    table = {}
    for k, group in out.items():
        finals = {m: np.array([r["final"][m] for r in group], float) for m in group[0]["final"]}
        ok = [r for r in group if r["diverged_at"] is None]
        steps = [s for s, _ in group[0]["curve"]]
        curves = [np.array([v for _, v in r["curve"]]) for r in ok if len(r["curve"]) == len(steps)]
        table[k] = {
            "alpha": group[0]["alpha"], "beta": group[0]["beta"], "n": len(group),
            "diverged": len(group) - len(ok),
            "mean": {m: float(np.nanmean(v)) if len(ok) else float("nan")
                     for m, v in finals.items()},
            "std": {m: float(np.nanstd(v, ddof=1)) if len(ok) > 1 else float("nan")
                    for m, v in finals.items()},
            "curve_steps": steps,
            "curve_mean": np.mean(curves, 0).tolist() if curves else []}
    return table


def paired_differences(runs, metric):
    """Per setting, the final main metric minus the data-free run's with the same seed (same
    fake-model initialisation and noise stream), mean and std over seeds: the seed-to-seed
    spread of the runs themselves cancels, so small effects of alpha, beta show."""
    free = {r["seed"]: r["final"][metric] for r in runs if (r["alpha"], r["beta"]) == (1.0, 1.0)}
    out = {}
    for r in runs:
        if r["seed"] in free and (r["alpha"], r["beta"]) != (1.0, 1.0):
            out.setdefault(key(r["alpha"], r["beta"]), []).append(r["final"][metric] -
                                                                  free[r["seed"]])
    return {k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1
                else float("nan"), "n": len(v)} for k, v in out.items()}


def convergence(table, metric_final_key):
    """Data-free versus real data: the best real-data setting (post hoc, lowest mean final main
    metric, no divergence) and the paper's (0.94, 0.96); for each, the first evaluated generator
    update at which its mean curve reaches the data-free run's final mean value."""
    free = table.get(key(1.0, 1.0))
    if not free:
        return {}
    target = free["mean"][metric_final_key]
    real = {k: v for k, v in table.items() if (v["alpha"], v["beta"]) != (1.0, 1.0)
            and not v["diverged"] and np.isfinite(v["mean"][metric_final_key])}
    best = min(real, key=lambda k: real[k]["mean"][metric_final_key]) if real else None

    def reach(k):
        if k not in table or not table[k]["curve_mean"]:
            return None
        hit = [s for s, v in zip(table[k]["curve_steps"], table[k]["curve_mean"]) if v <= target]
        return hit[0] if hit else None
    return {"data_free_final": target, "best": best, "paper": key(*PAPER),
            "updates_to_data_free_final": {k: reach(k) for k in (key(1.0, 1.0), best,
                                                                  key(*PAPER)) if k}}


# ---------------------------------------------------------------------------------------------
# Figures (matplotlib through plot.new_figure: imported only when drawing).

ANALYTIC_SETTINGS = [(1.0, 1.0), (0.96, 0.96), (0.94, 0.96), (0.98, 0.96), (0.94, 1.0),
                     (1.0, 0.96)]
SAMPLE_PANEL = (280, 300)  # pixels of one panel of a samples figure


def analytic_figures(pic, out):
    """analytic_heatmaps.png: the Lemma 2 loss density over (t, x) of every setting, each time
    row scaled by its largest value over x and the bounded settings (so that the panels compare
    at every t; alpha = 1 != beta is unbounded and gets its own scale); analytic_t0.9.png: the
    densities at t = 0.9 beside p_d and p_g."""
    density = pic["density"]
    bounded = [d for (a, b), d in density.items() if a < 1 or b == 1]
    row_max = torch.stack([d.max(1).values for d in bounded]).max(0).values[:, None]
    fig = plot.new_figure(960, 520)
    axes = fig.subplots(2, 3, sharex=True, sharey=True).flatten()
    for ax, ((a, b), d) in zip(axes, density.items()):
        own = a == 1 and b < 1
        scaled = (d / (d.max(1, keepdim=True).values if own else row_max)).clamp(max=1)
        image = ax.imshow(scaled.numpy(), origin="lower", aspect="auto", cmap="Blues", vmin=0,
                          vmax=1, extent=(-4, 4, 0, 1), interpolation="bilinear")
        ax.set_title(f"alpha={a:g} beta={b:g}" + (" (unbounded: own scale)" if own else ""),
                     fontsize="medium")
    for ax in axes[3:]:
        ax.set_xlabel("x")
    for ax in axes[::3]:
        ax.set_ylabel("t")
    fig.colorbar(image, ax=axes, shrink=0.8, label="loss density / its row's maximum")
    fig.savefig(os.path.join(out, "analytic_heatmaps.png"))

    i = int(0.9 * len(pic["t"]))
    x = pic["x"].numpy()
    fig = plot.new_figure(760, 420)
    ax = fig.subplots()
    dens = {k: v[i] for k, v in density.items() if k != (1.0, 0.96)}
    top = max(float(v.max()) for v in dens.values())
    for (a, b), v in dens.items():
        ax.plot(x, (v / top).numpy(), label=f"alpha={a:g} beta={b:g}")
    for label, v, colour in (("p_d (data)", pic["p_d"][i], "black"),
                             ("p_g (generator)", pic["p_g"][i], "0.6")):
        ax.plot(x, (v / v.max()).numpy(), color=colour, linestyle="--", label=label)
    ax.set(title=f"Lemma 2 loss density at t = {pic['t'][i]:.2f} (scaled)", xlabel="x",
           ylabel="density / max")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small", frameon=False)
    fig.savefig(os.path.join(out, "analytic_t0.9.png"))


def curves_figure(path, problem, scenario, res):
    """The mean curve over seeds of the EMA generator's main metric against generator updates
    for data-free, the paper's setting and the best real-data setting, with the references
    (the data's own floor, the teacher, the one-step start) as dashed lines."""
    table, conv, metric = res["table"], res["convergence"], PRIMARY[problem]
    fig = plot.new_figure(760, 440)
    ax = fig.subplots()
    for k in dict.fromkeys([key(1.0, 1.0), key(*PAPER), conv.get("best")]):
        if k in table:
            ax.plot(table[k]["curve_steps"], table[k]["curve_mean"], marker="o", markersize=2,
                    label=k + (" (best)" if k == conv.get("best") else ""))
    for (name, v), colour in zip(res["reference"].items(), ("0.5", "tab:purple", "black")):
        ax.axhline(v[metric], color=colour, linestyle="--", linewidth=1, label=name)
    ax.set(title=f"{problem} / {scenario}: {metric} of the EMA generator (mean over seeds)",
           xlabel="generator updates", ylabel=metric)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small", frameon=False)
    fig.savefig(path)


def samples_figure(path, problem, panels, cols=3):
    """One panel per (title, samples): 2-D points as a scatter over the ring's modes (circles of
    radius 3 std), 8x8 images as a grid (uint8 quantised), `cols` panels a row."""
    rows = math.ceil(len(panels) / cols)
    fig = plot.new_figure(cols * SAMPLE_PANEL[0], rows * SAMPLE_PANEL[1])
    from matplotlib.patches import Circle  # there: plot.new_figure has imported matplotlib
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax, (title, x) in zip(axes, panels):
        if problem == "ring":
            centers, _, std = ring_modes()
            for c in centers.tolist():  # where mode_masses counts a point on its mode
                ax.add_patch(Circle(c, 3 * std, fill=False, color="0.75"))
            ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=1, alpha=0.5, linewidths=0)
            ax.set(xlim=(-3.2, 3.2), ylim=(-3.2, 3.2), aspect="equal", xticks=[], yticks=[])
        else:
            grid = torchvision.utils.make_grid(common.to_uint8(x), nrow=8, padding=1,
                                               pad_value=128)
            ax.imshow(grid[0].numpy(), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.axis("off")
        ax.set_title(title, fontsize="small")
    for ax in axes[len(panels):]:
        ax.remove()
    fig.savefig(path)


# ---------------------------------------------------------------------------------------------
# Markdown.

def fmt(mean, std):
    if not np.isfinite(mean):
        return "diverged"
    return f"{mean:.3g} ± {std:.2g}" if np.isfinite(std) else f"{mean:.3g}"


def grid_table(table, metric):
    """Rows alpha, columns beta (Table 1's layout); settings off the 4x4 grid listed after it."""
    cell = {(v["alpha"], v["beta"]): v for v in table.values()}

    def show(v):
        s = fmt(v["mean"][metric], v["std"][metric])
        return s + (f" ({v['diverged']}/{v['n']} diverged)" if 0 < v["diverged"] < v["n"] else "")
    lines = ["| alpha \\ beta | " + " | ".join(f"{b:g}" for b in GRID) + " |",
             "|---|" + "---|" * len(GRID)]
    for a in GRID:
        if any((a, b) in cell for b in GRID):
            lines.append(f"| {a:g} | " + " | ".join(show(cell[(a, b)]) if (a, b) in cell else "–"
                                                     for b in GRID) + " |")
    off = [v for (a, b), v in cell.items() if a not in GRID or b not in GRID]
    for v in off:
        lines.append(f"\nOff the grid: alpha = {v['alpha']:g}, beta = {v['beta']:g}: {show(v)}")
    return "\n".join(lines)


def scenario_markdown(name, res):
    table, refs, metric = res["table"], res["reference"], PRIMARY[res["problem"]]
    names = sorted({m for v in table.values() for m in v["mean"]})
    out = [f"### {name}\n", f"Main metric `{metric}` of the EMA generator after "
           f"{res['budget']['steps']} generator updates, mean ± std over {res['n_seeds']} seeds "
           "(lower is better):\n", grid_table(table, metric), "",
           "References: " + ", ".join(f"{k} {v[metric]:.3g}" for k, v in refs.items()) + ".\n",
           "| setting | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    paired = res["paired_vs_data_free"]
    out[-2] += f" {metric} minus data-free, same seed |"
    out[-1] += "---|"
    for k, v in table.items():
        d = paired.get(k)
        out.append(f"| {v['alpha']:g}, {v['beta']:g} | " + " | ".join(
            fmt(v["mean"][m], v["std"][m]) for m in names) + " | " +
            (fmt(d["mean"], d["std"]) if d else "") + " |")
    for k, v in refs.items():
        out.append(f"| *{k}* | " + " | ".join(f"{v[m]:.3g}" for m in names) + " | |")
    c = res["convergence"]
    if c:
        reach = ", ".join(f"{k}: {v if v is not None else 'never'}"
                          for k, v in c["updates_to_data_free_final"].items())
        out.append(f"\nGenerator updates until the mean curve first reaches the data-free "
                   f"final value {c['data_free_final']:.3g} (evaluated every "
                   f"{res['budget']['eval_every']}): {reach}. Best real-data setting (chosen "
                   f"after the fact): {c['best']}.\n")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------

def build_parser():
    p = common.Parser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="the seven settings that test the paper's claims, two 2-D scenarios, "
                           "images with data-free vs (0.94, 0.96): < 10 min on 2 cores")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="the 4x4 grid alpha, beta in {0.94, 0.96, 0.98, 1} plus (0.9, 0.9) "
                           "on every problem, and the good-teacher control: 1-2 h on 2 cores")
    mode.add_argument("--smoke", dest="mode", action="store_const", const="smoke",
                      help="the quick mode at CI size (seconds; the numbers mean nothing)")
    p.set_defaults(mode="quick")
    p.add_argument("--out", default="results/ablation", help="output folder (JSON, PNG, Markdown)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="distillation seeds (fake-model init, noise, real batches)")
    p.add_argument("--problems", nargs="+", default=["analytic", "ring", "shapes"],
                   choices=["analytic", "ring", "shapes"], help="which parts to run")
    p.add_argument("--settings", nargs="+", default=None, metavar="ALPHA,BETA",
                   help="override the (alpha, beta) list of the mode, e.g. 1,1 0.94,0.96")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="parallel worker processes (1: everything in this process)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--redraw", action="store_true",
                   help="only draw the figures again, from --out's ablation.json (the analytic "
                        "ones from the closed form); the sample panels need the trained "
                        "generators and are left as they are")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def plan(args):
    """Budgets, settings and scenarios of the chosen mode."""
    budgets = SMOKE if args.mode == "smoke" else {"ring": RING, "shapes": SHAPES}
    settings = {"ring": FULL_SETTINGS if args.mode == "full" else QUICK_SETTINGS,
                "shapes": FULL_SETTINGS if args.mode == "full" else [(1.0, 1.0), PAPER]}
    if args.settings:
        own = [tuple(float(v) for v in s.split(",")) for s in args.settings]
        settings = {"ring": own, "shapes": own}
    scenarios = ["weak-teacher", "missing-modes"] + (["good-teacher"] if args.mode == "full" else [])
    return budgets, settings, scenarios


def redraw(out):
    """The analytic and curve figures of a finished run folder, from its ablation.json."""
    path = os.path.join(out, "ablation.json")
    if not os.path.isfile(path):
        common.fail(f"{path} not found: --redraw draws the figures of a finished run's --out")
    with open(path) as f:
        report = json.load(f)
    for name, res in report["problems"].items():
        if name == "analytic":
            analytic_figures(analytic_picture(ANALYTIC_SETTINGS), out)
        elif "/" in name:
            problem, scenario = name.split("/")
            curves_figure(os.path.join(out, f"{problem}_{scenario}_curves.png"), problem,
                          scenario, res)
    print(f"redrew the analytic and curve figures in {out} from {path}")


def main(args):
    if args.redraw:
        return redraw(args.out)
    plot.new_figure(1, 1)  # without matplotlib: fail now in one line, not after the runs
    t_start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    budgets, settings, scenarios = plan(args)
    host = dict(measure.machine(), platform=platform.platform(),
                load_average_at_start=os.getloadavg())
    report = {"mode": args.mode, "seeds": args.seeds, "machine": host,
              "args": common.json_safe(vars(args)), "stages": {}, "problems": {}}
    md = [f"<!-- written by benchmarks/ablation.py --{args.mode}; do not edit by hand -->"]

    if "analytic" in args.problems:
        t0 = time.perf_counter()
        pic = analytic_picture(ANALYTIC_SETTINGS)
        analytic_figures(pic, args.out)
        report["problems"]["analytic"] = {
            "data": "0.5 N(-2, 0.4^2) + 0.5 N(2, 0.4^2)", "generator": "N(-2, 0.4^2)",
            "summary": pic["summary"]}
        report["stages"]["analytic_seconds"] = time.perf_counter() - t0
        md += ["### Analytic picture (1-D, closed form)\n",
               "Data 0.5 N(-2, 0.4²) + 0.5 N(2, 0.4²), generator N(-2, 0.4²) (misses the right "
               "mode), perfect teacher. Loss at Lemma 2's optimal fake model (t ≥ 0.5) and the "
               "share of it coming from points the generator misses (p_g < 0.1% p_d):\n",
               "| alpha, beta | loss (t ≥ 0.5) | share from missed points |", "|---|---|---|"]
        md += [f"| {k} | {v['loss_t_ge_0.5']:.3g} | {v['share_missed']:.3f} |"
               for k, v in pic["summary"].items()]
        md.append("")

    # Stage 1: teachers (and the classifier), all independent.
    jobs = []
    if "ring" in args.problems:
        b = budgets["ring"]
        # The partial teacher never sees modes 0 and 1 (one heavy, one light).
        for name, steps, keep in (("good", b["teacher_steps"], None),
                                  ("weak", b["weak_teacher_steps"], None),
                                  ("partial", b["teacher_steps"], [2, 3, 4, 5, 6, 7])):
            jobs.append(("teacher", dict(problem="ring", budget=b, name=name, steps=steps,
                                         keep=keep, teacher_ema=0.99)))
    if "shapes" in args.problems:
        b = budgets["shapes"]
        jobs += [("teacher", dict(problem="shapes", budget=b, name="shapes",
                                  steps=b["teacher_steps"], teacher_ema=0.99)),
                 ("classifier", dict(budget=b))]
    t0 = time.perf_counter()
    trained = {r["name"]: r for r in run_jobs(jobs, args.workers, args.threads)}
    report["stages"]["teachers_seconds"] = time.perf_counter() - t0
    print(f"teachers: {report['stages']['teachers_seconds']:.0f} s", flush=True)

    # Stage 2: the missing-modes initialisation, a data-free distillation of the partial teacher.
    specs = {}
    if "ring" in args.problems:
        b = budgets["ring"]
        t0 = time.perf_counter()
        g0 = realuid(dict(problem="ring", budget=dict(b, steps=b["init_steps"]), alpha=1.0,
                          beta=1.0, return_state=TEACHER_SEED, members=[dict(
                              scenario="init", seed=TEACHER_SEED, teacher=trained["partial"]["state"],
                              gen_init=trained["partial"]["state"])]))[0]
        report["stages"]["missing_modes_init_seconds"] = time.perf_counter() - t0
        for sc in scenarios:
            teacher = trained["weak" if sc == "weak-teacher" else "good"]["state"]
            init = g0["state"] if sc == "missing-modes" else teacher
            specs[("ring", sc)] = dict(problem="ring", scenario=sc, budget=b, teacher=teacher,
                                       gen_init=init)
    if "shapes" in args.problems:
        s = trained["shapes"]["state"]
        specs[("shapes", "imperfect-teacher")] = dict(
            problem="shapes", scenario="imperfect-teacher", budget=budgets["shapes"], teacher=s,
            gen_init=s, classifier=trained["classifier"]["state"])
        report["problems"]["shapes_classifier_accuracy"] = trained["classifier"]["accuracy"]

    # Stage 3: references and the grid in one pool, the long image runs first. A 2-D job runs
    # one (alpha, beta) for all scenarios and seeds side by side; an image job one seed.
    jobs = [("reference", sp) for sp in specs.values()]
    for problem in ("shapes", "ring"):
        own = {sc: sp for (p, sc), sp in specs.items() if p == problem}
        groups = [[(sc, seed)] for sc in own for seed in args.seeds] if problem == "shapes" \
            else [[(sc, seed) for sc in own for seed in args.seeds]] if own else []
        for a, b in settings[problem]:
            for group in groups:
                sp = own[group[0][0]]
                members = [dict(scenario=sc, seed=seed, teacher=own[sc]["teacher"],
                                gen_init=own[sc]["gen_init"]) for sc, seed in group]
                jobs.append(("realuid", dict(sp, alpha=a, beta=b, members=members,
                                             return_state=args.seeds[0])))
    jobs = jobs[len(specs):] + jobs[:len(specs)]
    t0 = time.perf_counter()
    results = []
    for r in run_jobs(jobs, args.workers, args.threads):
        results += r if isinstance(r, list) else [r]
    report["stages"]["grid_seconds"] = time.perf_counter() - t0

    for (problem, sc), sp in specs.items():
        runs = [r for r in results if "final" in r and (r["problem"], r["scenario"]) == (problem, sc)]
        ref = next(r for r in results if "reference" in r and (r["problem"], r["scenario"]) ==
                   (problem, sc))
        table = summarise(runs, problem)
        res = {"problem": problem, "budget": sp["budget"], "n_seeds": len(args.seeds),
               "reference": ref["reference"], "table": table,
               "paired_vs_data_free": paired_differences(runs, PRIMARY[problem]),
               "convergence": convergence(table, PRIMARY[problem]),
               "runs": [{k: v for k, v in r.items() if k != "state"} for r in runs]}
        if sc == "missing-modes":
            res["init_curve"] = g0["curve"]
        report["problems"][f"{problem}/{sc}"] = res
        md.append(scenario_markdown(f"{problem} / {sc}", res))
        figures(args.out, problem, sc, sp, res, ref, runs)

    report["wall_seconds"] = time.perf_counter() - t_start
    report["machine"]["load_average_at_end"] = os.getloadavg()
    md.append(f"\nMachine: {measure.host(report['machine'])}, torch "
              f"{report['machine']['torch']}, {args.workers} worker(s) x {args.threads} thread(s); "
              f"wall time {report['wall_seconds'] / 60:.1f} min (load average at start "
              f"{report['machine']['load_average_at_start'][0]:.1f}: shared machine, timings "
              "are noisy).")
    with open(os.path.join(args.out, "ablation.json"), "w") as f:
        json.dump(report, f, indent=1, default=float)
    with open(os.path.join(args.out, "ablation.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print(f"wrote {args.out}/ablation.json, ablation.md and figures in "
          f"{report['wall_seconds']:.0f} s")
    torch.set_num_threads(threads)
    return report


def figures(out, problem, sc, spec, res, ref, runs):
    """The curves, and the samples of the references and of the first seed's generators of the
    settings in the curves."""
    name = f"{problem}_{sc}"
    curves_figure(os.path.join(out, f"{name}_curves.png"), problem, sc, res)
    conv = res["convergence"]
    shown = dict.fromkeys([key(1.0, 1.0), key(*PAPER), conv.get("best")])
    seed0 = {key(r["alpha"], r["beta"]): r for r in runs if "state" in r}
    panels = list(ref["samples"].items()) + [
        (f"{k} (seed {seed0[k]['seed']})", final_samples(spec, seed0[k]["state"]))
        for k in shown if k in seed0]
    samples_figure(os.path.join(out, f"{name}_samples.png"), problem, panels)


if __name__ == "__main__":
    common.cli(main, parse_args)
