"""benchmarks/ablation.py: its metrics against closed forms or independent computations, the 1-D
analytic picture against Lemma 2 and losses.fake_model_loss, the batched 2-D runs against single
runs, and the quick mode end to end at CI size (--smoke) through the script's own entry point,
figures included (skipped without matplotlib, which the script then refuses in one line)."""
import json
import math
import sys

import numpy as np
import pytest
import scipy.spatial.distance
import scipy.stats
import torch
from PIL import Image

import common
import losses
from benchmarks import ablation
from conftest import run


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# --- metrics ---------------------------------------------------------------------------------

def test_sliced_w2_of_a_shift_is_the_mean_projected_shift():
    """Shifting a sample by delta shifts every projection by <theta, delta>: SW2^2 is the mean of
    <theta, delta>^2 over the directions, which tends to |delta|^2 / d."""
    x = torch.randn(3000, 2, generator=torch.Generator().manual_seed(0))
    delta = torch.tensor([0.3, -0.4])
    assert ablation.sliced_w2(x, x + delta, n_proj=20000) == pytest.approx(0.5 / math.sqrt(2),
                                                                           rel=0.01)
    assert ablation.sliced_w2(x, x) == 0


def test_sliced_w2_in_1d_and_gaussian_scale():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(500, 1, generator=g), 2 + 3 * torch.randn(500, 1, generator=g)
    exact = np.sqrt(np.mean((np.sort(x[:, 0].numpy()) - np.sort(y[:, 0].numpy())) ** 2))
    assert ablation.sliced_w2(x, y) == pytest.approx(exact, rel=1e-6)
    # N(0, I) against N(0, s^2 I): every projection is N(0, 1) against N(0, s^2), W2 = |1 - s|.
    x, y = torch.randn(100000, 3, generator=g), 0.5 * torch.randn(100000, 3, generator=g)
    assert ablation.sliced_w2(x, y, n_proj=64) == pytest.approx(0.5, abs=0.01)


def test_energy_distance_matches_scipy_and_cdist():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(300, 1, generator=g), 0.5 + torch.randn(200, 1, generator=g)
    assert ablation.energy_distance(x, y) == pytest.approx(
        scipy.stats.energy_distance(x[:, 0].numpy(), y[:, 0].numpy()), rel=1e-9)
    x, y = torch.randn(200, 2, generator=g), torch.randn(150, 2, generator=g) * 2
    a, b = x.double().numpy(), y.double().numpy()
    cd = scipy.spatial.distance.cdist
    expected = np.sqrt(2 * cd(a, b).mean() - cd(a, a).mean() - cd(b, b).mean())
    assert ablation.energy_distance(x, y) == pytest.approx(expected, rel=1e-9)
    # Two point masses a, b: 2 |a - b| - 0 - 0.
    p, q = torch.zeros(5, 2), torch.tensor([[3.0, 4.0]]).repeat(7, 1)
    assert ablation.energy_distance(p, q) == pytest.approx(math.sqrt(10))


def test_mode_masses_and_coverage_by_hand():
    centers = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    x = torch.tensor([[0.1, 0.0], [0.0, -0.2], [3.9, 0.1], [2.0, 2.0]])  # 2, 1, 0 and one off
    masses = ablation.mode_masses(x, centers, radius=0.5)
    assert masses.tolist() == [0.5, 0.25, 0.0, 0.25]
    truth = torch.tensor([0.4, 0.3, 0.3, 0.0], dtype=torch.float64)
    cov = ablation.mode_coverage(masses, truth)
    assert cov["mode_tv"] == pytest.approx(0.5 * (0.1 + 0.05 + 0.3 + 0.25))
    assert cov["modes_covered"] == 2 and cov["off_mode"] == 0.25


def test_ring_truth_masses_match_a_large_sample():
    centers, weights, std = ablation.ring_modes()
    truth = ablation.ring_truth_masses()
    assert truth.sum() == pytest.approx(1.0)
    masses = ablation.mode_masses(ablation.ring_sample(200000, 5), centers, 3 * std)
    assert ablation.mode_coverage(masses, truth)["mode_tv"] < 0.01
    kept = ablation.ring_sample(1000, 5, keep=[2, 3])
    assert ablation.mode_masses(kept, centers, 3 * std)[[0, 1, 4, 5, 6, 7]].sum() == 0


def test_frechet_of_an_affine_copy_is_exact():
    """y = c x + m: the fitted covariance of y is c^2 S, so the Frechet distance is
    |mean(y) - mean(x)|^2 + tr(S + c^2 S - 2 c S) = |dmu|^2 + (1 - c)^2 tr S, whatever x is."""
    x = torch.rand(400, 5, generator=torch.Generator().manual_seed(3)) ** 3
    c, m = 0.6, torch.tensor([0.5, -1.0, 0.0, 2.0, 0.1])
    y = c * x + m
    s = np.cov(x.double().numpy(), rowvar=False)
    dmu = (y.double().mean(0) - x.double().mean(0)).numpy()
    expected = dmu @ dmu + (1 - c) ** 2 * np.trace(s)
    assert ablation.frechet(x, y) == pytest.approx(expected, rel=1e-6)
    # 1-D Gaussians: (mu1 - mu2)^2 + (s1 - s2)^2.
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(200000, 1, generator=g), 1 + 2 * torch.randn(200000, 1, generator=g)
    assert ablation.frechet(a, b) == pytest.approx(2.0, abs=0.03)


# --- the 1-D analytic picture ------------------------------------------------------------------

def test_gaussian_path_is_the_conditional_mean(float64):
    """E[x1 - x0 | x_t] by least squares on samples equals the closed-form affine field."""
    g = torch.Generator().manual_seed(5)
    mu, s, t = 1.5, 0.7, 0.6
    x1, x0 = mu + s * torch.randn(400000, generator=g), torch.randn(400000, generator=g)
    xt = t * x1 + (1 - t) * x0
    slope, intercept = np.polyfit(xt.numpy(), (x1 - x0).numpy(), 1)
    _, v = ablation.gaussian_path(torch.tensor(t), torch.tensor([0.0, 1.0]), mu, s)
    assert float(v[0]) == pytest.approx(intercept, abs=0.01)
    assert float(v[1] - v[0]) == pytest.approx(slope, abs=0.01)
    dens, _ = ablation.gaussian_path(torch.tensor(t), torch.tensor(t * mu), mu, s)
    assert float(dens) == pytest.approx(1 / math.sqrt(2 * math.pi * xt.var().item()), rel=0.01)


def test_mixture_path_of_equal_components_is_one_gaussian(float64):
    t, x = torch.tensor([[0.3], [0.9]]), torch.linspace(-3, 3, 7)[None]
    d1, v1 = ablation.mixture_path(t, x, [(0.25, 1.0, 0.5), (0.75, 1.0, 0.5)])
    d2, v2 = ablation.gaussian_path(t, x, 1.0, 0.5)
    torch.testing.assert_close(d1, d2)
    torch.testing.assert_close(v1, v2)


def test_lemma2_density_special_cases(float64):
    p_g, p_d = torch.tensor([0.3, 0.0, 0.2]), torch.tensor([0.1, 0.4, 0.2])
    v_g, v_d = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([-1.0, 2.0, 2.0])
    free = ablation.lemma2_density(p_g, v_g, p_d, v_d, 1.0, 1.0)
    torch.testing.assert_close(free, p_g * (v_d - v_g) ** 2)  # UID: p_g |v* - v_G|^2
    a, b = 0.94, 0.96
    dens = ablation.lemma2_density(p_g, v_g, p_d, v_d, a, b)
    assert float(dens[1]) == pytest.approx((b - a) ** 2 / (1 - a) * 0.4 * 4.0)  # p_g = 0
    assert float(dens[2]) == 0  # p_g = p_d and v_G = v_d
    assert float(ablation.lemma2_density(p_g, v_g, p_d, v_d, 0.96, 0.96)[1]) == 0  # diagonal


def test_lemma2_optimum_minimises_distill_fake_model_loss(float64):
    """Lemma 2's f* = (beta p_g v_G + (1 - beta) p_d v*) / (alpha p_g + (1 - alpha) p_d) minimises
    losses.fake_model_loss: on fixed samples the loss of f* + c h is a quadratic in c, whose
    minimiser -B / 2A must be 0 up to Monte Carlo error (and is not for f = v* or f = v_G)."""
    g = torch.Generator().manual_seed(6)
    n, alpha, beta = 400000, 0.9, 0.95
    (mg, sg), (md, sd) = (-0.5, 0.6), (1.0, 1.2)
    x_g, x_d = mg + sg * torch.randn(n, 1, generator=g), md + sd * torch.randn(n, 1, generator=g)
    x0, t = torch.randn(n, 1, generator=g), torch.rand(n, generator=g)

    def field(kind):
        def f(t, x, y=None):
            t = t[:, None]
            p_g, v_g = ablation.gaussian_path(t, x, mg, sg)
            p_d, v_d = ablation.gaussian_path(t, x, md, sd)
            return {"opt": (beta * p_g * v_g + (1 - beta) * p_d * v_d) /
                           (alpha * p_g + (1 - alpha) * p_d),
                    "teacher": v_d, "gen": v_g}[kind]
        return f

    def argmin(kind):
        h = lambda t, x: 1 + 0.5 * x  # noqa: E731
        loss = [float(losses.fake_model_loss(lambda t, x, y: field(kind)(t, x) + c * h(t, x),
                                              x_g, x_d, x0, t, alpha=alpha, beta=beta))
                for c in (-1.0, 0.0, 1.0)]
        return -(loss[2] - loss[0]) / 2 / (loss[2] + loss[0] - 2 * loss[1])

    assert abs(argmin("opt")) < 0.01
    assert abs(argmin("teacher")) > 0.05 and abs(argmin("gen")) > 0.05


def test_analytic_picture_data_free_ignores_missed_points():
    pic = ablation.analytic_picture([(1.0, 1.0), (0.96, 0.96), (0.94, 0.96)], n_t=40, n_x=201)
    share = {k: v["share_missed"] for k, v in pic["summary"].items()}
    assert share[ablation.key(0.94, 0.96)] > 5 * share[ablation.key(1.0, 1.0)]
    assert share[ablation.key(0.94, 0.96)] > 5 * share[ablation.key(0.96, 0.96)]


# --- batched 2-D runs ----------------------------------------------------------------------------

def test_ensemble_mlp_matches_its_members():
    states = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        states.append(ablation.MLP(32, 2).state_dict())
    ens = ablation.EnsembleMLP(states, 32, 2)
    x, t = torch.randn(3 * 5, 2), torch.rand(3 * 5)
    out = ens(t, x)
    for i, s in enumerate(states):
        mlp = ablation.MLP(32, 2)
        mlp.load_state_dict(s)
        torch.testing.assert_close(out[i::3], mlp(t[i::3], x[i::3]))  # row r -> member r % 3
        assert all(torch.equal(v, s[k]) for k, v in ablation.member_state(ens, i).items())


def test_clip_members_is_clip_grad_norm_per_member():
    w = torch.nn.Parameter(torch.zeros(2, 3))
    w.grad = torch.tensor([[3.0, 4.0, 0.0], [0.1, 0.0, 0.0]])
    ablation.clip_members([w], 1.0, 2)
    torch.testing.assert_close(w.grad, torch.tensor([[3.0, 4.0, 0.0], [0.1, 0.0, 0.0]]) *
                               torch.tensor([[1 / (5 + 1e-6)], [1.0]]))
    p, q = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    p.grad, q.grad = torch.tensor([1.0, 2.0, 2.0]), torch.tensor([1.0, 2.0, 2.0])
    ablation.clip_members([p], 0.5, 1)
    torch.nn.utils.clip_grad_norm_([q], 0.5)
    torch.testing.assert_close(p.grad, q.grad)


def test_batched_runs_equal_single_runs(float64):
    """Two seeds side by side in one EnsembleMLP give exactly the runs of each seed alone."""
    b = dict(ablation.SMOKE["ring"], steps=3, eval_every=3)
    teacher = ablation.train_fm_teacher(dict(problem="ring", budget=b, name="t", steps=10,
                                             teacher_ema=0.9))["state"]

    def runs(seeds, alpha, beta):
        return ablation.realuid(dict(problem="ring", budget=b, alpha=alpha, beta=beta,
                                     return_state=1, members=[dict(
                                         scenario="x", seed=s, teacher=teacher,
                                         gen_init=teacher) for s in seeds]))
    for alpha, beta in ((0.94, 0.96), (1.0, 1.0)):
        both, alone = runs([0, 1], alpha, beta)[1], runs([1], alpha, beta)[0]
        assert both["final"] == alone["final"] and both["curve"] == alone["curve"]
        for k, v in alone["state"].items():
            torch.testing.assert_close(both["state"][k], v, rtol=1e-12, atol=1e-12)


def test_shapes_are_deterministic_and_in_range():
    a, la = ablation.shapes_sample(50, 7)
    b, lb = ablation.shapes_sample(50, 7)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert a.shape == (50, 1, 8, 8) and a.dtype == torch.uint8 and set(la.tolist()) <= {0, 1, 2, 3}
    assert (a.flatten(1).max(1).values >= 170).all()  # every image has a shape


# --- the script end to end -----------------------------------------------------------------------

def test_quick_mode_at_ci_size_writes_json_markdown_and_figures(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "ablation"
    report = run(ablation, ["--smoke", "--out", out, "--workers", 1, "--seeds", 0, 1])
    data = json.loads((out / "ablation.json").read_text())
    assert data["mode"] == "smoke" and data["seeds"] == [0, 1]
    assert data["machine"]["cores"] >= 1 and data["wall_seconds"] > 0
    assert set(data["problems"]) >= {"analytic", "ring/weak-teacher", "ring/missing-modes",
                                     "shapes/imperfect-teacher"}
    ring = data["problems"]["ring/weak-teacher"]
    assert len(ring["runs"]) == len(ablation.QUICK_SETTINGS) * 2
    free = ring["table"][ablation.key(1.0, 1.0)]
    assert free["n"] == 2 and np.isfinite(free["mean"]["sw2"]) and free["curve_mean"]
    assert {"data", "teacher_euler100", "one_step_start"} <= set(ring["reference"])
    shapes = data["problems"]["shapes/imperfect-teacher"]
    assert set(shapes["table"]) == {ablation.key(1.0, 1.0), ablation.key(*ablation.PAPER)}
    assert report["wall_seconds"] == data["wall_seconds"]
    md = (out / "ablation.md").read_text()
    assert "| alpha \\ beta | 0.94 | 0.96 | 0.98 | 1 |" in md and "ring / missing-modes" in md
    assert "sw2 minus data-free, same seed" in md
    assert ablation.key(*ablation.PAPER) in ring["paired_vs_data_free"]
    # Sample figures: the 3 references in a first row, the distilled generators (seed 0) of the
    # settings in the curves in a second; the other figures at their sizes, none blank.
    w, h = ablation.SAMPLE_PANEL
    sizes = {"analytic_heatmaps": (960, 520), "analytic_t0.9": (760, 420),
             "ring_weak-teacher_curves": (760, 440), "ring_missing-modes_samples": (3 * w, 2 * h),
             "shapes_imperfect-teacher_samples": (3 * w, 2 * h)}
    for name, size in sizes.items():
        with Image.open(out / f"{name}.png") as im:
            pixels = np.asarray(im.convert("L"))
            assert im.size == size and (pixels < 128).mean() > 0.005, name

    # --redraw draws the analytic and curve figures again from ablation.json alone
    figures = sorted(p.name for p in out.glob("*.png"))
    for name in ("analytic_heatmaps.png", "ring_weak-teacher_curves.png"):
        (out / name).unlink()
    samples = (out / "ring_missing-modes_samples.png").stat().st_mtime_ns
    run(ablation, ["--redraw", "--out", out])
    assert sorted(p.name for p in out.glob("*.png")) == figures
    assert (out / "ring_missing-modes_samples.png").stat().st_mtime_ns == samples
    with Image.open(out / "ring_weak-teacher_curves.png") as im:
        assert im.size == sizes["ring_weak-teacher_curves"]
    with pytest.raises(common.RealUIDError, match="ablation.json not found"):
        run(ablation, ["--redraw", "--out", tmp_path / "empty"])


def test_without_matplotlib_it_fails_before_any_run(tmp_path, monkeypatch):
    for name in ["matplotlib", *(m for m in sys.modules if m.startswith("matplotlib."))]:
        monkeypatch.setitem(sys.modules, name, None)  # importing any of them fails
    with pytest.raises(common.RealUIDError, match="pip install matplotlib") as e:
        run(ablation, ["--smoke", "--out", tmp_path / "a", "--workers", 1])
    assert "\n" not in str(e.value) and not (tmp_path / "a" / "ablation.json").exists()


def test_paired_differences_by_hand():
    runs = [dict(alpha=a, beta=b, seed=s, final={"sw2": v}) for a, b, s, v in (
        (1.0, 1.0, 0, 1.0), (1.0, 1.0, 1, 2.0), (0.94, 0.96, 0, 0.5), (0.94, 0.96, 1, 2.5))]
    d = ablation.paired_differences(runs, "sw2")
    assert list(d) == [ablation.key(0.94, 0.96)]
    assert d[ablation.key(0.94, 0.96)]["mean"] == pytest.approx(0.0)
    assert d[ablation.key(0.94, 0.96)]["std"] == pytest.approx(np.std([-0.5, 0.5], ddof=1))


def test_full_mode_plans_the_whole_grid():
    budgets, settings, scenarios = ablation.plan(ablation.parse_args(["--full"]))
    grid = {(a, b) for a in (0.94, 0.96, 0.98, 1.0) for b in (0.94, 0.96, 0.98, 1.0)}
    for problem in ("ring", "shapes"):
        assert set(settings[problem]) == grid | {(0.9, 0.9)}
    assert "good-teacher" in scenarios and budgets["ring"] is ablation.RING
    _, quick, _ = ablation.plan(ablation.parse_args([]))
    assert (1.0, 1.0) in quick["ring"] and ablation.PAPER in quick["shapes"]
