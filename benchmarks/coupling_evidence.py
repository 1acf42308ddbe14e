"""Image-to-image RealUID on a CPU: does real-pair supervision help a one-step restoration model?

    python benchmarks/coupling_evidence.py --phase budget   # data-free only, long: fixes BUDGET
    python benchmarks/coupling_evidence.py                  # every setting at the fixed budget

Problem: 4x super-resolution (--task sr4) of 8x8 procedural shapes (toy_data.py --size 8). A 2x2
source leaves shape, position and size ambiguous, so the posterior is multimodal, and the teacher
(bridge path, sigma_s 0.25) is deliberately under-trained (TEACHER["steps"]), so the real targets
carry information the teacher lacks: the situation in which RealUID's real-data terms should pay.
Everything runs through the command lines: toy_data.py, train_teacher.py, then distill.py for
every (alpha, beta) and seed with --snapshot-every, and every snapshot's EMA generator is scored
on 1,024 held-out pairs (sampling.held_out_pairs / sampling.translate, one output per source, fixed
noise): PSNR to the true target (coupling.psnr; rewards the posterior mean) and pixel-space
Frechet distance to the held-out targets (inception.pixel_frechet_distance; rewards realistic, diverse
outputs). References: the source itself, the one-step start x0 + v*(0, x0, s), the teacher with
50 Euler steps and, for the FD, the training targets (the data's own floor).

Settings: data-free (1, 1), IBMD's setting, which never reads the targets; the paper's
(0.94, 0.96); and off the diagonal (0.94, 1.0) and (0.98, 0.96). Seeds 0, 1, 2 vary the whole
distillation (fake-model initialisation, noise, data order) and pair across settings, so the
column "minus data-free, same seed" removes the seed-to-seed spread.

The budget (BUDGET: steps, snapshot interval) was fixed from the data-free runs alone
(`--phase budget`, committed with its curves) before any real-data setting was run. Outputs go
to --out (default results/coupling): evidence.json (every number), evidence.md (the tables),
curves.png and samples.png (matplotlib draws the curves: `pip install matplotlib`); the README's
image-to-image section quotes them. `--redraw` draws the curves again from the JSON alone.
"""
import concurrent.futures
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import coupling  # noqa: E402
import inception  # noqa: E402
import plot  # noqa: E402
import sample  # noqa: E402
import sampling  # noqa: E402
from benchmarks import measure  # noqa: E402

NET = ("--image-size 8 --num-channels 32 --channel-mult 1 --num-res-blocks 1 "
       "--attention-resolutions 8 --num-heads 1 --num-head-channels -1")
DATA = dict(n_train=4096, n_heldout=1024, size=8)
TEACHER = dict(steps=300, batch=64, lr=1e-3, warmup=50, ema=0.99, source_noise=0.25)
DISTILL = dict(batch=32, lr=2e-4, warmup=20, ema=0.95)
BUDGET_PHASE = dict(steps=1200, every=50)  # the long data-free runs that fix BUDGET
# Fixed from `--phase budget` (results/coupling/budget_*), before any other setting was run: the
# data-free curves flatten by about 200 steps (pixel FD 1.04 at the start, 0.51-0.53 from step
# 150 on, the teacher's 0.49); three times that, snapshots every 50.
BUDGET = dict(steps=600, every=50)
LATE = 300  # the second table's window (snapshots LATE..steps), chosen after the results
SETTINGS = [(1.0, 1.0), (0.94, 0.96), (0.94, 1.0), (0.98, 0.96)]
SEEDS = (0, 1, 2)
EVAL_SEED, NFE = 7, 50


def sh(command, threads=1):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    subprocess.run(command, shell=True, cwd=ROOT, check=True, env=env,
                   stdout=subprocess.DEVNULL)


def prepare(work):
    """Data and the under-trained teacher (skipped when already there)."""
    os.makedirs(work, exist_ok=True)
    if not os.path.exists(f"{work}/train.npz"):
        sh(f"python toy_data.py --out {work}/train.npz --size {DATA['size']} "
           f"--n {DATA['n_train']} --seed 0")
        sh(f"python toy_data.py --out {work}/heldout.npz --size {DATA['size']} "
           f"--n {DATA['n_heldout']} --seed 1")
    if not os.path.exists(f"{work}/teacher/latest.pt"):
        t = TEACHER
        sh(f"python train_teacher.py --data {work}/train.npz --task sr4 --path bridge "
           f"--source-noise {t['source_noise']} {NET} --batch-size {t['batch']} --lr {t['lr']} "
           f"--warmup {t['warmup']} --ema {t['ema']} --steps {t['steps']} --log-every 100 "
           f"--sample-every 0 --out {work}/teacher", threads=2)


def run_name(alpha, beta, seed):
    return f"a{alpha}_b{beta}_s{seed}"


def distill_run(work, alpha, beta, seed, steps, every):
    """One distillation through the command line, snapshots every `every` steps (skipped when
    a run of the same setting and seed already reached `steps`, resumed when it stopped
    before)."""
    out = f"{work}/runs/{run_name(alpha, beta, seed)}"
    if os.path.exists(f"{out}/ckpt_{steps:07d}.pt"):
        return out
    if os.path.exists(f"{out}/latest.pt"):  # an interrupted run: resume it (bit-identical on CPU)
        sh(f"python distill.py --resume {out}")
        return out
    d = DISTILL
    sh(f"python distill.py --teacher {work}/teacher/latest.pt --teacher-ema {TEACHER['ema']} "
       f"--data {work}/train.npz --alpha {alpha} --beta {beta} --batch-size {d['batch']} "
       f"--lr {d['lr']} --warmup {d['warmup']} --ema {d['ema']} --steps {steps} "
       f"--snapshot-every {every} --save-every {every} --sample-every 0 --log-every 100 "
       f"--seed {seed} --out {out}")
    return out


def heldout(work, teacher):
    shape = (3, DATA["size"], DATA["size"])
    return sampling.held_out_pairs(f"{work}/heldout.npz", teacher.coupling, shape, None,
                                 EVAL_SEED)


def translate(model, src, nfe=NFE):
    """One output per held-out source, the same noise for every model (seed EVAL_SEED)."""
    cpu = torch.device("cpu")
    return sampling.translate(model, src, None, 1, EVAL_SEED, 512, cpu,
                            common.precision_context(cpu, "fp32"), nfe)


def scores(out, targets):
    return {"psnr": coupling.psnr(out, targets),
            "pixel_fd": float(inception.pixel_frechet_distance(out, targets))}


def evaluate_run(work, out, steps):
    """Scores of the EMA generator of every snapshot of a run up to `steps` (a longer run of
    the same setting and seed is identical up to there): {step: {psnr, pixel_fd}}."""
    teacher = sampling.load_model(f"{work}/teacher/latest.pt", TEACHER["ema"], None)
    src, targets, _ = heldout(work, teacher)
    curve = {}
    for path in sorted(glob.glob(f"{out}/ckpt_*.pt")):
        step = int(os.path.basename(path)[5:12])
        if step <= steps:
            model = sampling.load_model(path, DISTILL["ema"], None)
            curve[step] = scores(translate(model, src), targets)
    return curve


def references(work):
    teacher = sampling.load_model(f"{work}/teacher/latest.pt", TEACHER["ema"], None)
    src, targets, _ = heldout(work, teacher)
    train = torch.from_numpy(np.load(f"{work}/train.npz")["images"][:len(targets)])
    return {"source itself": scores(common.to_uint8(src), targets),  # src: the network's range
            "one-step start x0 + v*(0, x0, s)": scores(translate(teacher, src, 1), targets),
            f"teacher, {NFE} Euler steps": scores(translate(teacher, src), targets),
            "training targets (the data's floor)": {
                "psnr": None,
                "pixel_fd": float(inception.pixel_frechet_distance(train.permute(0, 3, 1, 2),
                                                             targets))}}


def summarise(curves, steps, first=None):
    """Per setting: scores at `steps` (mean, std over seeds) and paired differences to
    data-free; with `first`, each seed's mean over the snapshots first..steps instead."""
    def score(curve, metric):
        if first is None:
            return curve[steps][metric]
        return float(np.mean([v[metric] for k, v in curve.items() if first <= k <= steps]))
    table = {}
    for (alpha, beta) in SETTINGS:
        runs = {seed: curves.get(run_name(alpha, beta, seed)) for seed in SEEDS}
        if not all(runs.values()):
            continue
        row = {}
        for metric in ("psnr", "pixel_fd"):
            final = [score(runs[seed], metric) for seed in SEEDS]
            row[metric] = {"mean": float(np.mean(final)), "std": float(np.std(final, ddof=1))}
            free = [score(curves[run_name(1.0, 1.0, seed)], metric) for seed in SEEDS]
            diff = np.subtract(final, free)
            row[metric + "_minus_data_free"] = {"mean": float(diff.mean()),
                                                "std": float(diff.std(ddof=1)),
                                                "per_seed": diff.tolist()}
        table[f"{alpha}, {beta}"] = row
    return table


REFERENCE_LINES = {"one-step start x0 + v*(0, x0, s)": "one-step start",
                   f"teacher, {NFE} Euler steps": f"teacher, {NFE} steps",
                   "training targets (the data's floor)": "data's floor"}


def curves_figure(curves, refs, path):
    """PSNR and pixel FD of the EMA generator against generator updates, mean of the seeds per
    setting, references as dashed lines; two panels, one above the other."""
    fig = plot.new_figure(760, 760)
    for ax, (metric, label) in zip(fig.subplots(2, 1, sharex=True), (
            ("psnr", "PSNR to target (dB), higher is better"),
            ("pixel_fd", "pixel FD to held-out targets, lower is better"))):
        for alpha, beta in SETTINGS:
            runs = [curves.get(run_name(alpha, beta, seed)) for seed in SEEDS]
            if not all(runs):
                continue
            steps = sorted(runs[0])
            ax.plot(steps, [float(np.mean([r[k][metric] for r in runs])) for k in steps],
                    marker="o", markersize=2, label=f"{alpha}, {beta}")
        # the source itself (PSNR 13, FD 9) would squash the curves: it is in the table only
        for (name, short), colour in zip(REFERENCE_LINES.items(), ("tab:purple", "0.5", "black")):
            if refs[name][metric] is not None:
                ax.axhline(refs[name][metric], color=colour, linestyle="--", linewidth=1,
                           label=short)
        ax.set(title=f"{label}, mean of {len(SEEDS)} seeds", ylabel=metric)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small", frameon=False)
    ax.set_xlabel("generator updates (steps)")
    fig.savefig(path)


def samples_figure(work, steps, path, n=10):
    """Seed 0: rows source | one-step start | teacher | data-free | (0.94, 0.96) | target."""
    teacher = sampling.load_model(f"{work}/teacher/latest.pt", TEACHER["ema"], None)
    src, targets, _ = heldout(work, teacher)
    src, targets = src[:n], targets[:n]
    rows = [common.to_uint8(src), translate(teacher, src, 1), translate(teacher, src)]
    for alpha, beta in SETTINGS[:2]:
        ckpt = f"{work}/runs/{run_name(alpha, beta, 0)}/ckpt_{steps:07d}.pt"
        rows.append(translate(sampling.load_model(ckpt, DISTILL["ema"], None), src))
    rows.append(targets)
    grid = torch.cat(rows)
    common.save_grid(common.from_uint8(grid), path, nrow=n)
    from PIL import Image
    im = Image.open(path)
    im.resize((im.width * 4, im.height * 4), Image.NEAREST).save(path)


def markdown(report):
    lines = [f"Budget: {report['steps']} generator updates ({report['steps'] * 6} updates in "
             f"all), EMA {DISTILL['ema']}, {len(SEEDS)} seeds, {DATA['n_heldout']} held-out "
             "pairs; mean +- std over seeds; paired: the same seed's data-free run subtracted "
             "(per seed in evidence.json)."]
    for key, what in (("table", f"At step {report['steps']} (the measure fixed in advance):"),
                      ("table_late", f"Mean over the snapshots from step {LATE} to "
                                     f"{report['steps']} of each run (added after the "
                                     "results: a single snapshot fluctuates by about 0.03 in "
                                     "pixel FD):")):
        lines += ["", what, "",
                  "| alpha, beta | PSNR (dB) | minus data-free, same seed | pixel FD | minus "
                  "data-free, same seed |", "|---|---|---|---|---|"]
        for name, row in report.get(key, {}).items():
            p, f = row["psnr"], row["pixel_fd"]
            dp, df = row["psnr_minus_data_free"], row["pixel_fd_minus_data_free"]
            paired = (lambda d: "" if name == "1.0, 1.0" else
                      f"{d['mean']:+.3f} +- {d['std']:.3f}")
            lines.append(f"| {name} | {p['mean']:.2f} +- {p['std']:.2f} | {paired(dp)} | "
                         f"{f['mean']:.3f} +- {f['std']:.3f} | {paired(df)} |")
    lines += ["", "| reference | PSNR (dB) | pixel FD |", "|---|---|---|"]
    for name, r in report["references"].items():
        psnr = "" if r["psnr"] is None else f"{r['psnr']:.2f}"
        lines.append(f"| {name} | {psnr} | {r['pixel_fd']:.3f} |")
    lines += ["", f"Host: {measure.host(report['machine'])}."]
    return "\n".join(lines) + "\n"


def redraw(out, phase):
    """The curves figure of a finished phase, from its JSON."""
    tag = "budget_" if phase == "budget" else ""
    path = f"{out}/{tag}evidence.json"
    if not os.path.isfile(path):
        common.fail(f"{path} not found: --redraw draws the figure of a finished --phase {phase}")
    with open(path) as f:
        report = json.load(f)
    curves = {k: {int(s): v for s, v in c.items()} for k, c in report["curves"].items()}
    curves_figure(curves, report["references"], f"{out}/{tag}curves.png")
    print(f"wrote {out}/{tag}curves.png from {path}")


def main(args):
    if args.redraw:
        return redraw(args.out, args.phase)
    plot.new_figure(1, 1)  # without matplotlib: fail now in one line, not after the runs
    start = time.time()
    work = os.path.abspath(args.work)
    prepare(work)
    budget = BUDGET_PHASE if args.phase == "budget" else BUDGET
    if budget is None:
        common.fail("BUDGET is not fixed yet: run --phase budget first and set it")
    settings = SETTINGS[:1] if args.phase == "budget" else SETTINGS
    jobs = [(a, b, seed) for a, b in settings for seed in SEEDS]
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:  # each a 1-thread process
        outs = list(pool.map(lambda j: distill_run(work, *j, budget["steps"], budget["every"]),
                             jobs))
    curves = {run_name(*j): evaluate_run(work, o, budget["steps"]) for j, o in zip(jobs, outs)}
    refs = references(work)
    report = {"phase": args.phase, "machine": measure.machine(), "data": DATA, "teacher": TEACHER,
              "distill": DISTILL, "budget": budget, "steps": budget["steps"],
              "settings": settings, "seeds": SEEDS, "references": refs,
              "table": summarise(curves, budget["steps"]),
              "table_late": summarise(curves, budget["steps"], LATE),
              "curves": {k: {str(s): v for s, v in c.items()} for k, c in curves.items()},
              "wall_minutes": (time.time() - start) / 60}
    os.makedirs(args.out, exist_ok=True)
    tag = "budget_" if args.phase == "budget" else ""
    with open(f"{args.out}/{tag}evidence.json", "w") as f:
        json.dump(report, f, indent=1)
    with open(f"{args.out}/{tag}evidence.md", "w") as f:
        f.write(markdown(report))
    curves_figure(curves, refs, f"{args.out}/{tag}curves.png")
    if args.phase != "budget":
        samples_figure(work, budget["steps"], f"{args.out}/samples.png")
    print(markdown(report))
    print(f"{report['wall_minutes']:.1f} min; wrote {args.out}/{tag}evidence.json")


def parse_args(argv=None):
    p = common.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phase", choices=["budget", "all"], default="all",
                   help="budget: the data-free runs alone, long, to fix BUDGET; all: every "
                        "setting at BUDGET")
    p.add_argument("--work", default="runs/coupling_evidence",
                   help="scratch folder (data, teacher, runs; reused when present)")
    p.add_argument("--out", default="results/coupling", help="results folder")
    p.add_argument("--workers", type=common.positive_int, default=2,
                   help="distillation runs in parallel (one thread each)")
    p.add_argument("--redraw", action="store_true",
                   help="only draw the curves figure of --phase again, from its JSON in --out "
                        "(samples.png needs the runs and is left as it is)")
    return p.parse_args(argv)


if __name__ == "__main__":
    common.cli(main, parse_args)
