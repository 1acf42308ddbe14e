"""A scaled-down Table 1 that runs on a laptop CPU: RealUID's alpha/beta ablation and convergence.

The paper (Kornilov et al., ICLR 2026, Table 1, section 3.4, Appendix A.1.2) claims that real data
fed through alpha != beta close to 1 gives better one-step samples than data-free distillation
(alpha = beta = 1) and gets there in fewer updates, that alpha = beta != 1 adds nothing, and that
settings far from the diagonal or with alpha = 1, beta < 1 are worse or unstable. This script
tests those claims at a size that runs in minutes, with the very losses of losses.py
(`losses.fake_model_loss`, `losses.generator_loss`), its generator `flow.generate` and the
teachers' `losses.flow_matching_loss`:

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

Layout: this file holds the budgets and settings above, the command line, the runner (`main`),
the summaries, the report and the figures; the toy tasks, metrics, closed forms, networks and
the jobs that the workers run are in benchmarks/ablation_tasks.py, which imports nothing from
here (the names of it that tests/test_ablation.py reads are re-exported below).
"""
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch
import torchvision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import plot  # noqa: E402
from benchmarks import measure  # noqa: E402
from benchmarks.ablation_tasks import (  # noqa: E402
    PRIMARY, TEACHER_SEED, analytic_picture, final_samples, key, realuid, ring_modes, run_jobs)
# Re-exported: the experiment's names that tests/test_ablation.py reads from `ablation`.
from benchmarks.ablation_tasks import (  # noqa: E402, F401
    MLP, EnsembleMLP, clip_members, energy_distance, frechet, gaussian_path, lemma2_density,
    member_state, mixture_path, mode_coverage, mode_masses, ring_sample, ring_truth_masses,
    shapes_sample, sliced_w2, train_fm_teacher)

GRID = (0.94, 0.96, 0.98, 1.0)
FULL_SETTINGS = [(a, b) for a in GRID for b in GRID] + [(0.9, 0.9)]
# --quick: data-free; the paper's best unconditional (0.94, 0.96) and conditional (0.98, 0.96);
# the diagonal (0.96, 0.96) and (0.9, 0.9); far from the diagonal (0.94, 1.0); alpha = 1 (1, 0.96).
QUICK_SETTINGS = [(1.0, 1.0), (0.94, 0.96), (0.98, 0.96), (0.96, 0.96), (0.9, 0.9), (0.94, 1.0),
                  (1.0, 0.96)]
PAPER = (0.94, 0.96)

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


# ---------------------------------------------------------------------------------------------
# Summaries.

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
    scenarios = (["weak-teacher", "missing-modes"]
                 + (["good-teacher"] if args.mode == "full" else []))
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
                              scenario="init", seed=TEACHER_SEED,
                              teacher=trained["partial"]["state"],
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
        runs = [r for r in results
                if "final" in r and (r["problem"], r["scenario"]) == (problem, sc)]
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
