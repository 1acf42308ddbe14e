"""Run the README's CPU quick start and measure what it achieves.

    python benchmarks/quickstart.py   # the quick start (4-10 min on 2 CPU cores), then its scores

Runs the quick-start commands as README.md lists them (toy data -> teacher -> RealUID ->
samples), except that every path under runs/ moves below runs/bench_quickstart/ (`here`): the
benchmark starts from an empty folder of its own and never deletes or overwrites the README's
own runs/toy_teacher, runs/toy_distill, .... It times each command, then compares with
held-out toy images (same law, another seed) by the Frechet distance in pixel space
(16x16x3 = 768 dimensions, 2,048 images a side):
- the one-step starting point z + v*(0, z) (the teacher with one Euler step),
- the distilled one-step generator (raw weights and EMA),
- the teacher with 20 Euler steps, for reference.
Writes benchmarks/results/quickstart_cpu.json (with the host and the date),
docs/quickstart_before_after.png (the distillation's grids at step 0 and at the end, same
latents) and docs/quickstart_metrics.png (plot.py on the distillation's metrics; needs
matplotlib), and prints a Markdown table.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import inception  # noqa: E402
import plot  # noqa: E402
from benchmarks import measure  # noqa: E402

TOY_NET = ("--image-size 16 --num-channels 32 --channel-mult 1,2,2 --num-res-blocks 1 "
           "--attention-resolutions 8 --num-heads 1 --num-head-channels -1")
# The README's quick start, verbatim (tests/test_pipeline.py checks that the two agree); they run
# with their runs/ paths moved below WORK (`here`).
COMMANDS = [
    "python toy_data.py --out runs/toy.npz",
    f"python train_teacher.py --data runs/toy.npz {TOY_NET} --batch-size 64 --lr 1e-3 "
    "--warmup 50 --ema 0.995 --steps 500 --log-every 100 --sample-every 500 --sample-nfe 50 "
    "--out runs/toy_teacher",
    "python distill.py --teacher runs/toy_teacher/latest.pt --teacher-ema 0.995 "
    "--data runs/toy.npz --alpha 0.94 --beta 0.96 --batch-size 32 --lr 2e-4 --warmup 10 "
    "--ema 0.95 --steps 60 --log-every 10 --sample-every 20 --out runs/toy_distill",
    "python sample.py --ckpt runs/toy_distill/latest.pt --n 64 --out runs/toy_samples.png",
]


WORK = "runs/bench_quickstart"  # the benchmark's own folder


def here(command, work=WORK):
    """The command with every runs/ path moved below `work`, the benchmark's own folder."""
    return command.replace("runs/", f"{work}/")


def fresh(work):
    """Remove the benchmark's own folder (a training script refuses to start a new run over an
    existing one), so that a rerun measures the same thing from scratch."""
    if not work.startswith("runs/bench_"):
        raise ValueError(f"{work} is not a benchmark's own folder (runs/bench_*)")
    shutil.rmtree(os.path.join(ROOT, work), ignore_errors=True)


def sh(command):
    start = time.perf_counter()
    subprocess.run(command, shell=True, cwd=ROOT, check=True)
    return time.perf_counter() - start


def before_after(out, run=os.path.join(WORK, "toy_distill")):
    """The distillation's own grids (same latents): step 0 = its start (here z + v*(0, z)), and
    step 60."""
    from PIL import Image
    grids = os.path.join(ROOT, run, "samples")
    a = Image.open(os.path.join(grids, "0000000_gen.png"))
    b = Image.open(os.path.join(grids, "0000060_ema0.95.png"))
    im = Image.new("RGB", (2 * a.width + 8, a.height), "white")
    im.paste(a, (0, 0))
    im.paste(b, (a.width + 8, 0))
    im.resize((3 * im.width, 3 * im.height), Image.NEAREST).save(out)  # readable at 16x16


def main():
    plot.new_figure(1, 1)  # without matplotlib: fail now in one line, not after the runs
    fresh(WORK)
    times = {c.split()[1]: sh(here(c)) for c in COMMANDS}
    total = sum(times.values())
    n = 2048
    sh(here(f"python toy_data.py --out runs/toy_heldout.npz --n {n} --seed 1"))
    heldout = np.load(os.path.join(ROOT, WORK, "toy_heldout.npz"))["images"]
    data = np.load(os.path.join(ROOT, WORK, "toy.npz"))["images"][:n]
    candidates = {
        "training images (another sample of the same law)": None,
        "one-step start z + v*(0, z) (teacher, 1 Euler step)":
            "--ckpt runs/toy_teacher/latest.pt --ema 0.995 --nfe 1",
        "RealUID one-step generator, raw weights": "--ckpt runs/toy_distill/latest.pt --ema none",
        "RealUID one-step generator, EMA 0.95": "--ckpt runs/toy_distill/latest.pt --ema 0.95",
        "teacher, 20 Euler steps": "--ckpt runs/toy_teacher/latest.pt --ema 0.995 --nfe 20",
    }
    results = {}
    for name, flags in candidates.items():
        if flags is None:
            images = data
        else:
            sh(here(f"python sample.py {flags} --n {n} --seed 7 --out runs/qs_eval.npz"))
            images = np.load(os.path.join(ROOT, WORK, "qs_eval.npz"))["images"]
        results[name] = inception.pixel_frechet_distance(images, heldout)
    m = measure.machine()
    report = {"machine": m, "commands": COMMANDS, "ran_in": WORK, "seconds": times,
              "total_seconds": total, "pixel_fd_vs_heldout": results, "samples": n}
    out = os.path.join(ROOT, "benchmarks", "results", "quickstart_cpu.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nquick start on {measure.host(m)}: {total:.0f} s in all "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in times.items())})")
    print("\n| model | pixel-space FD to held-out (2,048 images) |\n|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:.2f} |")
    before_after(os.path.join(ROOT, "docs", "quickstart_before_after.png"))
    sh(f"python plot.py {WORK}/toy_distill --out docs/quickstart_metrics.png")
    print(f"\nwrote {out}, docs/quickstart_before_after.png and docs/quickstart_metrics.png")


if __name__ == "__main__":
    main()
