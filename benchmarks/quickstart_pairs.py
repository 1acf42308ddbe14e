"""Run the README's image-to-image CPU quick start and measure what it achieves.

    python benchmarks/quickstart_pairs.py      # the quick start, then its evaluation and figure

Runs the commands of README.md's "Image-to-image quick start" exactly as listed (toy data ->
4x super-resolution teacher on the bridge path -> RealUID -> translations -> `fid.py pairs`),
times each, and draws docs/pairs_quickstart.png from held-out pairs (the same noise for every
model): rows source | one-step start x0 + v*(0, x0, s) | RealUID one-step generator (EMA) |
teacher with 20 Euler steps | target. Writes benchmarks/results/quickstart_pairs_cpu.json and
prints the table of `fid.py pairs` (PSNR to target, pixel FD to held-out targets).
"""
import json
import os
import sys

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import sample  # noqa: E402
from benchmarks import measure  # noqa: E402
from benchmarks.quickstart import ROOT, TOY_NET, fresh, sh  # noqa: E402  (the same network, runner)

# The README's image-to-image quick start, verbatim (tests/test_pipeline.py checks that the two
# agree).
COMMANDS = [
    "python toy_data.py --out runs/toy.npz",
    "python toy_data.py --out runs/toy_heldout.npz --n 1024 --seed 1",
    f"python train_teacher.py --data runs/toy.npz --task sr4 --path bridge {TOY_NET} "
    "--batch-size 64 --lr 1e-3 --warmup 50 --ema 0.995 --steps 500 --log-every 100 "
    "--sample-every 500 --sample-nfe 20 --out runs/sr4_teacher",
    "python distill.py --teacher runs/sr4_teacher/latest.pt --teacher-ema 0.995 "
    "--data runs/toy.npz --alpha 0.94 --beta 0.96 --batch-size 32 --lr 2e-4 --warmup 10 "
    "--ema 0.95 --steps 60 --log-every 10 --sample-every 20 --out runs/sr4_distill",
    "python sample.py --ckpt runs/sr4_distill/latest.pt --data runs/toy_heldout.npz --n 16 "
    "--per-source 2 --out runs/sr4_samples.png",
    "python fid.py pairs --ckpt runs/sr4_distill/latest.pt --data runs/toy_heldout.npz "
    "--nfe 20 --out runs/sr4_scores.json",
]


def figure(path, n=8, nfe=20):
    """Rows source | start | generator | teacher | target for the first n held-out pairs."""
    j = lambda p: os.path.join(ROOT, p)  # noqa: E731
    teacher = sample.load_model(j("runs/sr4_teacher/latest.pt"), 0.995, None)
    gen = sample.load_model(j("runs/sr4_distill/latest.pt"), 0.95, None)
    src, targets, _ = sample.held_out_pairs(j("runs/toy_heldout.npz"), gen.coupling,
                                            (3, 16, 16), n, 0)
    cpu = torch.device("cpu")
    amp = common.precision_context(cpu, "fp32")
    out = [sample.translate(m, src, None, 1, 0, 64, cpu, amp, k)
           for m, k in ((teacher, 1), (gen, 1), (teacher, nfe))]
    common.save_grid(common.from_uint8(torch.cat([src, *out, targets])), path, nrow=n)
    im = Image.open(path)
    im.resize((im.width * 3, im.height * 3), Image.NEAREST).save(path)


def main():
    fresh(COMMANDS)
    times = {}
    for c in COMMANDS:
        name = " ".join(c.split()[1:3]) if c.split()[1] == "fid.py" else c.split()[1]
        times[name] = times.get(name, 0) + sh(c)
    total = sum(times.values())
    with open(os.path.join(ROOT, "runs/sr4_scores.json")) as f:
        scores = json.load(f)
    report = {"machine": measure.machine(), "commands": COMMANDS, "seconds": times,
              "total_seconds": total, "scores": scores}
    out = os.path.join(ROOT, "benchmarks", "results", "quickstart_pairs_cpu.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    figure(os.path.join(ROOT, "docs", "pairs_quickstart.png"))
    print(f"\nimage-to-image quick start: {total:.0f} s in all "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in times.items())})")
    print("\n| model | PSNR to target (dB) | pixel FD to held-out targets |\n|---|---|---|")
    for name, r in scores["scores"].items():
        print(f"| {name} | {r['psnr_db']:.2f} | {r['pixel_fd']:.3f} |")
    print(f"\nwrote {out} and docs/pairs_quickstart.png")


if __name__ == "__main__":
    main()
