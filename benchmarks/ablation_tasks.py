"""The experiment of benchmarks/ablation.py: its toy tasks, metrics, closed forms and jobs.

Everything a worker process runs, split from the command (benchmarks/ablation.py: the budgets and
settings, the command line, the runner, the summaries, the report and the figures), which imports
this module and never the other way round:
- metrics: pure functions of two samples (sliced W2, energy distance, mode coverage, Frechet);
- the 1-D closed forms: Gaussian and mixture flow fields, Lemma 2's loss density (the analytic
  picture);
- the two problems: the 2-D ring and the 8x8 shapes (data, networks, evaluation contexts);
- the jobs: flow-matching teachers, the shapes classifier, RealUID distillation (distill.py's
  losses) and the references, each a function of a spec dict returning plain data, and run_jobs,
  which runs them in spawned worker processes.
"""
import concurrent.futures
import copy
import math
import multiprocessing
import time

import numpy as np
import torch
import torch.nn as nn

import common
import distill
import fid
import inception
import flow
import losses
import players
import train_teacher
import unet

FAKE_STEPS = 5          # fake-model updates per generator update (the official 5 + 1 cycle)
DATA_SEED, TEACHER_SEED, EVAL_SEED = 1000, 2000, 3000
TINY_UNET = dict(image_size=8, in_channels=1, num_channels=32, channel_mult=(1,), num_res_blocks=1,
                 attention_resolutions="8", num_heads=1, num_head_channels=-1)


def key(a, b):
    """The name of an (alpha, beta) setting in the report (ablation.json, ablation.md)."""
    return f"alpha={a:g},beta={b:g}"


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
    covariance), via inception.frechet_distance (exact, float64)."""
    stats = []
    for a in (x, y):
        a = a.double().cpu().numpy()
        stats += [a.mean(0), np.atleast_2d(np.cov(a, rowvar=False))]
    return inception.frechet_distance(*stats)


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
    """A flow-matching teacher (losses.flow_matching_loss), Adam (0.9, 0.999), linear
    warm-up, clipping at 1; returns the EMA weights (the distillation uses the teacher's EMA)."""
    b, problem = spec["budget"], spec["problem"]
    data = train_set(problem, b, spec.get("keep"))
    torch.manual_seed(TEACHER_SEED)
    net = make_net(problem, b)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), b["teacher_lr"], betas=(0.9, 0.999), foreach=True)
    sched = players.warmup(opt, spec["steps"] // 10)
    g = torch.Generator().manual_seed(TEACHER_SEED)
    for _ in range(spec["steps"]):
        x1 = data[torch.randint(len(data), (b["batch"],), generator=g)]
        x0, t = torch.randn(x1.shape, generator=g), torch.rand(len(x1), generator=g)
        adam_update(net, opt, sched, losses.flow_matching_loss(net, x1, x0, t), b["clip"])
        players.ema_update(ema, net, spec["teacher_ema"])
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
    (parameters [n, ...]; n = 1 is torch's clip_grad_norm_: factor clip / (norm + 1e-6),
    at most 1)."""
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
    teacher, gen, fake = (build(problem, b, [m[k] for m in members]) if k
                          else build(problem, b, fresh)
                          for k in ("teacher", "gen_init", None))
    teacher.eval().requires_grad_(False)
    ema = copy.deepcopy(gen).eval().requires_grad_(False)
    opt_g = torch.optim.Adam(gen.parameters(), b["lr"], betas=(0.0, 0.999), foreach=True)
    opt_f = torch.optim.Adam(fake.parameters(), b["lr"], betas=(0.0, 0.999), foreach=True)
    sched_g, sched_f = players.warmup(opt_g, b["warmup"]), players.warmup(opt_f, b["warmup"])
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
            loss_f = n * losses.fake_model_loss(fake, x_g, x_d, x0, t, alpha=alpha, beta=beta)
            member_update(fake, opt_f, sched_f, loss_f, b["clip"], n)
        z, x0, t, _ = draw()
        fake.requires_grad_(False)
        loss_g = n * losses.generator_loss(teacher, fake, flow.generate(gen, z), x0, t,
                                            alpha=alpha, beta=beta)
        member_update(gen, opt_g, sched_g, loss_g, b["clip"], n)
        fake.requires_grad_(True)
        players.ema_update(ema, gen, b["ema"])
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
                 curve=curves[i], diverged_at=diverged[i],
                 seconds=(time.perf_counter() - t_start) / n,
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
