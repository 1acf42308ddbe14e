"""Every recipe of distill.py (recipes.py) on the same CPU toy teachers, data, budget and seeds.

    python benchmarks/methods.py            # 32 min on 2 busy CPU cores (docs/methods.md)
    python benchmarks/methods.py --smoke --work /tmp/m   # tiny networks, a few updates (tests)
    # skip training a teacher that the quick starts already trained (same commands):
    python benchmarks/methods.py --teacher-fm runs/bench_quickstart/toy_teacher/latest.pt \\
        --data runs/bench_quickstart/toy.npz

The two teachers are the CPU quick starts', trained with their commands verbatim
(benchmarks/quickstart.py: flow matching; benchmarks/quickstart_diffusion.py: an EDM denoiser,
`train_teacher.py --param edm`), on the same toy data (toy_data.py, 4,096 images 16x16), with
`--threads 1` added, in this benchmark's own folder runs/bench_methods/. Then every recipe
(METHODS: `realuid` with alpha, beta = 0.94, 0.96, and RealUID with --param-delta beta)
distils each teacher with the quick start's optimisation flags, the same for all recipes and
overriding the recipes' CIFAR-10 values (lr 2e-4, batch 32, warm-up 10, EMA decay 0.95 written
as its half-life so that it also replaces the `sid` recipes' half-life and ramp-up), and the
same budget in updates: --updates optimizer updates of either player per run, i.e. --updates /
(fake-steps + 1) steps (5 + 1 recipes: --updates / 6 steps; `sid`, `sid-real`, whose recipe
says 1 + 1: --updates / 2 steps). Everything else is the recipe's (and, for flags the recipe
leaves open, the teacher kind's, recipes.TEACHER_DEFAULTS).

Each run is distill.py's command line, run in a forked child of this process (os.fork, so
POSIX only; imports are shared, so no start-up; errors, exit codes as on the command line); its
seconds per update are
its training loop's (metrics.jsonl) over its updates, its peak memory the child's peak
resident set (the pages it touched, those of the imports it shares with this process included;
this process's own resident set at the fork, for scale: `rss_at_fork_mb`).
Scores: pixel-space Frechet distance (inception.pixel_frechet_distance, 16x16x3 = 768
dimensions) of --n one-step samples of the EMA generator (sample.py, --seed 7) to --n held-out
toy images (toy_data.py --seed 1), as the quick starts score; with references: training images,
each generator's start (the teacher's weights before any update), the teacher with 20 Euler
steps. Writes benchmarks/results/methods_cpu.json (host, date, commit, command, every run) and
docs/methods_samples.png (a row of samples per recipe, both teachers), and prints a Markdown
table. A failed run is recorded with its exit code and the benchmark goes on.
"""
import argparse
import importlib
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoints  # noqa: E402
import common  # noqa: E402
import distill  # noqa: E402
import inception  # noqa: E402
import plot  # noqa: E402
import recipes  # noqa: E402
import sample  # noqa: E402
import torch  # noqa: E402
from benchmarks import measure, quickstart, quickstart_diffusion  # noqa: E402

WORK = "runs/bench_methods"  # the benchmark's own folder (quickstart.fresh empties it)
DATA = quickstart.COMMANDS[0]            # python toy_data.py --out runs/toy.npz
TEACHERS = {"fm": quickstart.COMMANDS[1],                  # ... --out runs/toy_teacher
            "diffusion": quickstart_diffusion.COMMANDS[1]}  # --param edm ... runs/toy_edm_teacher
TEACHER_EMA = "0.995"  # the quick starts' teacher EMA
EMA = 0.95             # the quick starts' generator EMA, written as a half-life in Mimg:
HALFLIFE = 32 * math.log(2) / -math.log(EMA) / 1e6  # 0.5 ** (32 / halflife) = 0.95 at batch 32
# The flags every run gets: the quick start's optimisation, the same for all recipes. The
# ramp-up fraction 1e9 never binds (half-life <= 1e9 x images seen): no ramp-up, as --ema.
SHARED = (f"--teacher-ema {TEACHER_EMA} --batch-size 32 --lr 2e-4 --warmup 10 "
          f"--ema-halflife {HALFLIFE:.6g} --ema-rampup 1e9 --sample-every 0 --save-every 0 "
          "--save-minutes 0 --log-seconds 0 --threads 1")
# The methods: every recipe with the flags its recipe asks for (`realuid` leaves alpha and beta
# to the command line, and its default 1, 1 is `uid`: here the quick start's and the paper's
# unconditional CIFAR-10 values 0.94, 0.96), and one that is no recipe: RealUID with the ICLR
# version's delta = beta (v* - f) parameterisation (Appendix A.2), which has no per-sample
# weights (distill.py refuses the diffusion defaults' with it: no-ops for flow matching).
METHODS = {name: f"--recipe {name}" for name in recipes.RECIPES}
METHODS["realuid"] += " --alpha 0.94 --beta 0.96"
METHODS["realuid-delta"] = (f"{METHODS['realuid']} --param-delta beta --fake-weight none "
                            "--gen-weight none")
OVERRIDES = ("batch_size", "lr", "warmup", "ema", "ema_halflife", "ema_rampup", "steps", "seed")
EVAL_SEED = 7  # the quick starts' sampling seed
# --smoke: the same commands on tiny networks (one 8x8 level, no attention), tiny data and batches.
SMOKE_NET = (" --image-size 8 --channel-mult 1 --attention-resolutions '' --steps 2 --log-every 1 "
             "--sample-every 0")
SMOKE_DATA, SMOKE_BATCH = " --n 128 --size 8", " --batch-size 8"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--updates", type=int, default=36,
                   help="optimizer updates per run, fake model and generator together (the "
                        "same for every recipe; a multiple of 6 and of 2)")
    p.add_argument("--seeds-fm", default="42,43", help="distill.py --seed values, FM teacher")
    p.add_argument("--seeds-diffusion", default="42", help="... diffusion teacher")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma separated: recipes, and realuid-delta (--param-delta beta)")
    p.add_argument("--teachers", default="fm,diffusion", help="fm, diffusion or both")
    p.add_argument("--n", type=int, default=2048, help="samples and held-out images a side")
    p.add_argument("--teacher-fm", default=None,
                   help="use this flow-matching teacher instead of training it (same command "
                        "as the quick start's, or the results are another teacher's)")
    p.add_argument("--teacher-diffusion", default=None, help="... the diffusion teacher")
    p.add_argument("--data", default=None, help="use this toy .npz instead of writing it")
    p.add_argument("--work", default=WORK, help="the benchmark's own folder (emptied first)")
    p.add_argument("--json", default=None,
                   help="default: benchmarks/results/methods_cpu.json (--smoke: in --work)")
    p.add_argument("--figure", default=None,
                   help="default: docs/methods_samples.png (--smoke: in --work)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny networks, 2 teacher steps, 6 updates, 1 seed, 64 images (checks "
                        "that the benchmark runs; its numbers mean nothing)")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.smoke:
        args.updates, args.n = 6, 64
        args.seeds_fm = args.seeds_fm if "--seeds-fm" in args.argv else "42"
    smoke_out = lambda name: os.path.join(args.work, name) if args.smoke else None  # noqa: E731
    args.json = args.json or smoke_out("methods_cpu.json") or os.path.join(
        ROOT, "benchmarks", "results", "methods_cpu.json")
    args.figure = args.figure or smoke_out("methods_samples.png") or os.path.join(
        ROOT, "docs", "methods_samples.png")
    if args.updates % 6:
        p.error("--updates must be a multiple of 6 (5 + 1 and 1 + 1 steps both divide it)")
    return args


# ---------------------------------------------------------------------------------------------
# Running the scripts' command lines

def run_command(command):
    """Run one of the scripts' command lines ('python X.py ...') as it would run from ROOT, in a
    forked child of this process (common.cli: errors are one line, exit codes as on the command
    line; the imports are shared, so it has no start-up). Returns (exit code, seconds, the
    child's peak resident set in MB, this process's resident set at the fork in MB)."""
    argv = shlex.split(command)
    if argv[0] != "python" or not argv[1].endswith(".py"):
        raise ValueError(f"not a script's command line: {command}")
    module = importlib.import_module(argv[1][:-3])
    print(f"\n$ {command}", flush=True)
    sys.stderr.flush()
    rss = resident_mb()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: the command line, then exit without running the parent's hooks
        code = 1
        try:
            os.chdir(ROOT)
            sys.argv = argv[1:]
            common.cli(module.main, module.parse_args)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: B036 (the child must never return into the parent's code)
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status, usage = os.wait4(pid, 0)
    return (os.waitstatus_to_exitcode(status), time.perf_counter() - start,
            usage.ru_maxrss / 1024, rss)


def resident_mb():
    """This process's resident set now, in MB (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def check(command):
    code, seconds, _, _ = run_command(command)
    if code:
        raise SystemExit(f"failed (exit {code}): {command}")
    return seconds


def path(p):
    return os.path.join(ROOT, p)


def commit():
    """HEAD and the tracked files that differ from it (the run measures the working tree), as
    the run starts (its code is imported then)."""
    def git(*a):
        out = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.rstrip() if out.returncode == 0 else None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"head": git("rev-parse", "HEAD"),
            "uncommitted_changes": None if status is None else
            sorted(line[3:] for line in status.splitlines() if line.strip())}


# ---------------------------------------------------------------------------------------------
# The runs

def distill_command(teacher, data, method, updates, seed, out):
    """distill.py's command line for one run of METHODS[method], and its fake-model updates per
    step (as the recipe resolves them)."""
    flags = f"{METHODS[method]} --teacher {teacher} --data {data} {SHARED} --seed {seed}"
    fake_steps = distill.parse_args([*shlex.split(flags), "--out", path(out)]).fake_steps
    steps = updates // (fake_steps + 1)
    if steps * (fake_steps + 1) != updates:
        raise ValueError(f"{updates} updates are not whole steps of {fake_steps} + 1 ({method})")
    return (f"python distill.py {flags} --steps {steps} --log-every {steps} --out {out}",
            fake_steps, steps)


def recipe_of(method):
    return shlex.split(METHODS[method])[1]


def overridden(method, work):
    """The recipe's own values that the shared flags replace: {flag: [recipe's, used]}."""
    used = vars(distill.parse_args([*shlex.split(f"{METHODS[method]} --teacher x {SHARED}"),
                                    "--out", path(os.path.join(work, "parse_only"))]))
    return {k: [v, used[k]] for k, v in recipes.RECIPES[recipe_of(method)]["settings"].items()
            if k in OVERRIDES and v != used[k]}


def train_loop_seconds(out):
    """The run's training time at its last record (metrics.jsonl's elapsed_s: the loop, from
    before its first update to its last one, without set-up and the final save)."""
    with open(path(os.path.join(out, "metrics.jsonl"))) as f:
        return json.loads(f.read().splitlines()[-1])["elapsed_s"]


def samples(flags, n, out):
    """n uint8 images from sample.py's own code (in this process), --seed EVAL_SEED."""
    sample.main(sample.parse_args([*shlex.split(flags), "--n", str(n), "--seed", str(EVAL_SEED),
                                   "--out", out, "--batch-size", "256", "--threads", "1"]))
    return np.load(out)["images"]


def start_checkpoint(run_ckpt, teacher, out):
    """A copy of a run's checkpoint whose generator (raw and EMA) is the teacher's EMA: the
    generator before its first update, with the run's own start t_g."""
    ckpt = torch.load(run_ckpt, map_location="cpu", weights_only=True)
    weights = checkpoints.load_checkpoint(teacher, "teacher")["ema_models"][TEACHER_EMA]
    ckpt["gen"] = weights
    ckpt["ema_gens"] = {k: weights for k in ckpt["ema_gens"]}
    torch.save(ckpt, out)
    return float(ckpt["config"]["t_g"])


def spread(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def main(args):
    common.set_threads(1)
    plot.new_figure(1, 1)  # without matplotlib: fail now, not after the runs
    git_state = commit()
    work = args.work
    if work.startswith("runs/bench_"):
        quickstart.fresh(work)
    elif os.path.exists(path(work)) and os.listdir(path(work)):
        raise SystemExit(f"--work {work} is not empty: give a new folder")
    os.makedirs(path(work), exist_ok=True)
    here = lambda c: quickstart.here(c, work)  # noqa: E731
    net = SMOKE_NET if args.smoke else ""
    wall = time.perf_counter()
    names = args.methods.split(",")
    seeds = {"fm": [int(s) for s in args.seeds_fm.split(",")],
             "diffusion": [int(s) for s in args.seeds_diffusion.split(",")]}
    kinds = args.teachers.split(",")

    data = args.data or here("runs/toy.npz")
    seconds = {}
    if not args.data:
        seconds["toy_data.py"] = check(here(DATA) + (SMOKE_DATA if args.smoke else ""))
    heldout_cmd = here(f"python toy_data.py --out runs/toy_heldout.npz --n {args.n} --seed 1"
                       + (" --size 8" if args.smoke else ""))
    check(heldout_cmd)
    heldout = np.load(path(here("runs/toy_heldout.npz")))["images"]
    teachers, teacher_cmds = {}, {}
    runs = []
    for kind in kinds:
        given = getattr(args, f"teacher_{kind}")
        cmd = here(TEACHERS[kind]) + " --threads 1" + net
        if given:
            teachers[kind], teacher_cmds[kind] = given, f"given: {given}"
        else:
            cmd = cmd.replace(f"--data {here('runs/toy.npz')}", f"--data {data}")
            seconds[f"teacher {kind}"] = check(cmd)
            out = shlex.split(cmd)[shlex.split(cmd).index("--out") + 1]
            teachers[kind], teacher_cmds[kind] = os.path.join(out, "latest.pt"), cmd
        for seed in seeds[kind]:
            for method in names:
                out = os.path.join(work, f"{kind}_{method}_s{seed}")
                cmd, fake_steps, steps = distill_command(teachers[kind], data, method,
                                                         args.updates, seed, out)
                cmd += SMOKE_BATCH if args.smoke else ""
                code, secs, rss, rss0 = run_command(cmd)
                r = {"teacher": kind, "method": method, "seed": seed, "command": cmd,
                     "fake_steps": fake_steps, "steps": steps, "updates": args.updates,
                     "exit_code": code, "seconds": secs, "peak_rss_mb": rss,
                     "rss_at_fork_mb": rss0, "out": out}
                if code == 0:
                    r["train_loop_seconds"] = train_loop_seconds(out)
                    r["sec_per_update"] = r["train_loop_seconds"] / args.updates
                runs.append(r)
                print(f"[{time.perf_counter() - wall:.0f} s] {kind} {method} seed {seed}: "
                      f"exit {code}, {secs:.0f} s", flush=True)

    # Scores (after all runs, so that every child forked from the same small process).
    evals = path(os.path.join(work, "eval.npz"))
    train_images = np.load(path(data))["images"][:args.n]
    refs = {kind: {"training images (another sample of the same law)":
                   inception.pixel_frechet_distance(train_images, heldout)} for kind in kinds}
    grids = {kind: {"teacher": [], "start": [], "runs": []} for kind in kinds}  # figure rows
    for kind in kinds:
        images = samples(f"--ckpt {teachers[kind]} --ema {TEACHER_EMA} --nfe 20", args.n, evals)
        fd = refs[kind]["teacher, 20 Euler steps"] = inception.pixel_frechet_distance(images,
                                                                                      heldout)
        grids[kind]["teacher"].append(("teacher, 20 steps", images[:10], fd))
    starts = {}
    for r in runs:
        if r["exit_code"]:
            continue
        ckpt = path(os.path.join(r["out"], "latest.pt"))
        images = samples(f"--ckpt {ckpt} --ema first", args.n, evals)  # its one EMA
        r["pixel_fd_ema"] = inception.pixel_frechet_distance(images, heldout)
        if r["seed"] == seeds[r["teacher"]][0]:
            grids[r["teacher"]]["runs"].append((r["method"], images[:10], None))
        start = path(os.path.join(work, "start.pt"))
        t_g = start_checkpoint(ckpt, teachers[r["teacher"]], start)
        key = (r["teacher"], round(t_g, 9))
        if key not in starts:
            images = samples(f"--ckpt {start} --ema none", args.n, evals)
            starts[key] = inception.pixel_frechet_distance(images, heldout)
            refs[r["teacher"]][f"start (teacher's weights, one step from t_g = {t_g:.4g})"] = \
                starts[key]
            grids[r["teacher"]]["start"].append((f"start, t_g {t_g:.3g}", images[:10],
                                                 starts[key]))
        os.remove(start)
        r["t_g"], r["pixel_fd_start"] = t_g, starts[key]
        print(f"{r['teacher']} {r['method']} seed {r['seed']}: FD {r['pixel_fd_ema']:.2f} "
              f"(start {starts[key]:.2f})", flush=True)

    summary = {kind: {} for kind in kinds}
    for kind in kinds:
        for method in names:
            rs = [r for r in runs if r["teacher"] == kind and r["method"] == method]
            fd, fd_sd = spread([r.get("pixel_fd_ema") for r in rs])
            spu, _ = spread([r.get("sec_per_update") for r in rs])
            summary[kind][method] = {
                "pixel_fd_ema_mean": fd, "pixel_fd_ema_sd": fd_sd,
                "pixel_fd_ema": [r.get("pixel_fd_ema") for r in rs],
                "pixel_fd_start": rs[0].get("pixel_fd_start") if rs else None,
                "sec_per_update_mean": spu,
                "peak_rss_mb_max": max((r["peak_rss_mb"] for r in rs), default=None),
                "failed_seeds": [r["seed"] for r in rs if r["exit_code"]]}
    m = measure.machine()
    report = {
        "machine": m, "host": measure.host(m), "date": m["date"], "commit": git_state,
        "command": " ".join(["python benchmarks/methods.py", *map(shlex.quote, args.argv)]),
        "smoke": args.smoke, "work_folder": work,
        "budget": {"updates_per_run": args.updates, "batch_size": 32,
                   "unit": "one optimizer update of either player (fake model or generator) "
                           "on a batch of 32; steps = updates / (fake_steps + 1)"},
        "shared_flags": SHARED, "method_flags": {name: METHODS[name] for name in names},
        "overridden_recipe_settings": {name: overridden(name, work) for name in names},
        "recipe_differs": {name: recipes.RECIPES[recipe_of(name)]["differs"] for name in names},
        "samples": args.n, "eval_seed": EVAL_SEED, "seeds": {k: seeds[k] for k in kinds},
        "data_command": DATA if not args.data else f"given: {args.data}",
        "heldout_command": heldout_cmd, "teacher_commands": teacher_cmds,
        "seconds": seconds, "references": refs,
        "summary": summary, "runs": runs, "total_seconds": time.perf_counter() - wall}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    figure(grids, summary, args.figure)
    print_table(report)
    print(f"\nwrote {args.json} and {args.figure} ({report['total_seconds']:.0f} s in all)")
    os.remove(evals)
    return report


def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def print_table(report):
    print(f"\n{report['budget']['updates_per_run']} updates per run, {report['samples']} "
          f"images a side, on {report['host']}")
    for kind, rows in report["summary"].items():
        print(f"\n{kind} teacher: " + "; ".join(f"{k} {v:.2f}"
                                                for k, v in report["references"][kind].items()))
        print("\n| method | pixel FD, EMA (mean +- sd over seeds) | per seed | start | "
              "s / update | peak RSS, MB |\n|---|---|---|---|---|---|")
        for method, s in rows.items():
            fd = fmt(s["pixel_fd_ema_mean"]) + (f" +- {s['pixel_fd_ema_sd']:.2f}"
                                                if s["pixel_fd_ema_sd"] is not None else "")
            seeds = ", ".join(fmt(v) for v in s["pixel_fd_ema"])
            failed = f" (failed: seeds {s['failed_seeds']})" if s["failed_seeds"] else ""
            print(f"| {method} | {fd}{failed} | {seeds} | {fmt(s['pixel_fd_start'])} | "
                  f"{fmt(s['sec_per_update_mean'], '.3f')} | {fmt(s['peak_rss_mb_max'], '.0f')} |")


def figure(grids, summary, out):
    """One panel per teacher: the teacher's own 20-step samples, the generators' starts, then a
    row of 10 samples per recipe (EMA, the first seed), all from the same latents; the row's
    pixel FD (a recipe's: mean over seeds) in brackets."""
    kinds = list(grids)
    rows = {k: [*g["teacher"], *g["start"],
                *[(n, im, summary[k][n]["pixel_fd_ema_mean"]) for n, im, _ in g["runs"]]]
            for k, g in grids.items()}
    fig = plot.new_figure(520 * len(kinds), 60 + 40 * max(len(r) for r in rows.values()))
    for ax, kind in zip(fig.subplots(1, len(kinds), squeeze=False)[0], kinds):
        strips = []
        for _, images, _ in rows[kind]:
            pad = np.full((len(images), images.shape[1], 2, 3), 255, np.uint8)
            strips.append(np.concatenate(list(np.concatenate([images, pad], 2)), 1))
        h = strips[0].shape[0] + 2
        grid = np.full((h * len(strips), strips[0].shape[1], 3), 255, np.uint8)
        for i, strip in enumerate(strips):
            grid[i * h:i * h + strip.shape[0]] = strip
        ax.imshow(grid, interpolation="nearest")
        ax.set_yticks([i * h + h / 2 - 1 for i in range(len(strips))],
                      [f"{name} ({fmt(fd)})" for name, _, fd in rows[kind]], fontsize=8)
        ax.set_xticks([])
        ax.set_title(f"{kind} teacher, same latents (pixel FD)", fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out)


if __name__ == "__main__":
    main(parse_args())
