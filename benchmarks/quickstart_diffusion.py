"""Run the CPU quick start for a diffusion teacher (docs/diffusion.md) and measure what it achieves.

    python benchmarks/quickstart_diffusion.py   # about 20 min on 2 CPU cores, with the evaluation

Runs the commands of docs/diffusion.md ("CPU quick start: a diffusion teacher") verbatim except that every
run writes below runs/bench_diffusion/ (never into the README's own runs/ folders): toy data ->
an EDM-preconditioned denoiser trained with EDM's loss (train_teacher.py --param edm) ->
RealUID (0.94, 0.96) -> samples; then, on the same teacher and budget, SiD's configuration
(data-free, --gen-gamma 2.4) and RealUID without the diffusion defaults (uniform t, no
weights: the ablation behind them). Each is compared with 2,048 held-out
toy images (same law, another seed) by the Frechet distance in pixel space (16x16x3):
- the generator's start D(sigma_init z; sigma_init) (the teacher's denoiser at sigma 2.5),
- the distilled one-step generators (EMA), RealUID and SiD,
- the teacher with 20 Euler steps in t and with EDM's Heun sampler (35 evaluations).
Writes benchmarks/results/quickstart_diffusion_cpu.json, docs/quickstart_diffusion.png (the
RealUID run's grids at step 0 and at the end, same latents) and prints a Markdown table.
"""
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import inception  # noqa: E402
from benchmarks import measure  # noqa: E402
from benchmarks.quickstart import before_after, fresh, sh  # noqa: E402
from benchmarks.quickstart import here as moved  # noqa: E402

TOY_NET = ("--image-size 16 --num-channels 32 --channel-mult 1,2,2 --num-res-blocks 1 "
           "--attention-resolutions 8")
# The diffusion quick start of docs/diffusion.md, verbatim (tests/test_pipeline.py checks that they agree).
COMMANDS = [
    "python toy_data.py --out runs/toy.npz",
    f"python train_teacher.py --param edm --data runs/toy.npz {TOY_NET} --batch-size 64 "
    "--lr 1e-3 --warmup 50 --ema 0.995 --steps 500 --log-every 100 --sample-every 500 "
    "--sample-nfe 20 --out runs/toy_edm_teacher",
    "python distill.py --teacher runs/toy_edm_teacher/latest.pt --teacher-ema 0.995 "
    "--data runs/toy.npz --alpha 0.94 --beta 0.96 --batch-size 32 --lr 2e-4 --warmup 10 "
    "--ema 0.95 --steps 60 --log-every 10 --sample-every 20 --out runs/toy_edm_distill",
    "python sample.py --ckpt runs/toy_edm_distill/latest.pt --n 64 --out runs/toy_edm_samples.png",
]
# On the same teacher and budget (not in the README's quick start): SiD's configuration
# (data-free, alpha_SiD = 1.2; the laws and weights are the diffusion defaults), and RealUID
# without them (uniform t on the teacher's range, no weights), the ablation of those defaults.
SID = ("python distill.py --teacher runs/toy_edm_teacher/latest.pt --teacher-ema 0.995 "
       "--gen-gamma 2.4 --batch-size 32 --lr 2e-4 --warmup 10 --ema 0.95 --steps 60 "
       "--log-every 10 --sample-every 60 --out runs/toy_edm_sid")
PLAIN = ("python distill.py --teacher runs/toy_edm_teacher/latest.pt --teacher-ema 0.995 "
         "--data runs/toy.npz --alpha 0.94 --beta 0.96 --fake-t uniform --gen-t uniform "
         "--fake-weight none --gen-weight none --batch-size 32 --lr 2e-4 --warmup 10 --ema 0.95 "
         "--steps 60 --log-every 10 --sample-every 60 --out runs/toy_edm_plain")
UNIFORM = PLAIN.replace("--fake-weight none --gen-weight none ", "").replace(
    "toy_edm_plain", "toy_edm_uniform")  # the diffusion weights, with uniform t
WORK = "runs/bench_diffusion"  # the benchmark's own folder


def here(command):
    """The command with every runs/ path moved below WORK."""
    return moved(command, WORK)


def main():
    fresh(WORK)
    times = {c.split()[1]: sh(here(c)) for c in COMMANDS}
    times["distill.py (SiD)"] = sh(here(SID))
    times["distill.py (RealUID, uniform t, no weights)"] = sh(here(PLAIN))
    times["distill.py (RealUID, uniform t)"] = sh(here(UNIFORM))
    n = 2048
    sh(here(f"python toy_data.py --out runs/toy_heldout.npz --n {n} --seed 1"))
    heldout = np.load(os.path.join(ROOT, WORK, "toy_heldout.npz"))["images"]
    data = np.load(os.path.join(ROOT, WORK, "toy.npz"))["images"][:n]
    teacher = "--ckpt runs/toy_edm_teacher/latest.pt --ema 0.995"
    candidates = {
        "training images (another sample of the same law)": None,
        "one-step start D(2.5 z; 2.5) (the teacher's denoiser)":
            "--ckpt runs/toy_edm_distill/ckpt_start.pt --ema none",
        "RealUID (0.94, 0.96) one-step generator, EMA 0.95":
            "--ckpt runs/toy_edm_distill/latest.pt --ema 0.95",
        "SiD one-step generator (data-free), EMA 0.95":
            "--ckpt runs/toy_edm_sid/latest.pt --ema 0.95",
        "RealUID with uniform t (weights as default), EMA 0.95":
            "--ckpt runs/toy_edm_uniform/latest.pt --ema 0.95",
        "RealUID with uniform t and no weights (not the default), EMA 0.95":
            "--ckpt runs/toy_edm_plain/latest.pt --ema 0.95",
        "teacher, 20 Euler steps in t": f"{teacher} --nfe 20",
        "teacher, EDM's Heun sampler (35 evaluations)": f"{teacher} --nfe 35 --sampler heun",
    }
    # the start: the RealUID run's generator before any update (saved by a 0-update copy)
    start = os.path.join(ROOT, WORK, "toy_edm_distill", "ckpt_start.pt")
    make_start_checkpoint(start)
    results = {}
    for name, flags in candidates.items():
        if flags is None:
            images = data
        else:
            sh(here(f"python sample.py {flags} --n {n} --seed 7 --out runs/qs_eval.npz"))
            images = np.load(os.path.join(ROOT, WORK, "qs_eval.npz"))["images"]
        results[name] = inception.pixel_frechet_distance(images, heldout)
    report = {"machine": measure.machine(), "commands": COMMANDS, "sid_command": SID,
              "plain_command": PLAIN, "uniform_command": UNIFORM,
              "work_folder": WORK, "seconds": times, "pixel_fd_vs_heldout": results,
              "samples": n}
    out = os.path.join(ROOT, "benchmarks", "results", "quickstart_diffusion_cpu.json")
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print("\nseconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    print("\n| model | pixel-space FD to held-out (2,048 images) |\n|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:.2f} |")
    before_after(os.path.join(ROOT, "docs", "quickstart_diffusion.png"),
                 os.path.join(WORK, "toy_edm_distill"))
    print(f"\nwrote {out} and docs/quickstart_diffusion.png")


def make_start_checkpoint(path):
    """A copy of the RealUID run's checkpoint whose generator weights are the teacher's, i.e.
    the generator before its first update (x = D(sigma_init z; sigma_init))."""
    import torch
    ckpt = torch.load(os.path.join(os.path.dirname(path), "latest.pt"), map_location="cpu",
                      weights_only=True)
    teacher = torch.load(os.path.join(ROOT, WORK, "toy_edm_teacher", "latest.pt"),
                         map_location="cpu", weights_only=True)
    ckpt["gen"] = teacher["ema_models"]["0.995"]
    torch.save(ckpt, path)


if __name__ == "__main__":
    main()
