"""Run the image-to-image CPU quick start (docs/image_to_image.md) and measure what it achieves.

    python benchmarks/quickstart_pairs.py      # the quick start, then its evaluation and figure

Runs the commands of docs/image_to_image.md's "CPU quick start: 4x super-resolution" as listed (toy data ->
4x super-resolution teacher on the bridge path -> RealUID -> translations -> `eval_pairs.py`),
except that every path under runs/ moves below runs/bench_quickstart_pairs/ (the README's own
runs/ folders are never deleted or overwritten); times each, and draws docs/pairs_quickstart.png
from held-out pairs (the same noise for every model): rows source | one-step start
x0 + v*(0, x0, s) | RealUID one-step generator (EMA) | teacher with 20 Euler steps | target.
Writes benchmarks/results/quickstart_pairs_cpu.json (with the host and the date) and prints the
table of `eval_pairs.py` (PSNR to target, pixel FD to held-out targets).
"""
import json
import os
import sys

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import sample  # noqa: E402
import sampling  # noqa: E402
from benchmarks import measure  # noqa: E402
from benchmarks.quickstart import ROOT, TOY_NET, fresh, here, sh  # noqa: E402

# The image-to-image quick start of docs/image_to_image.md, verbatim (tests/test_pipeline.py checks that the two
# agree); they run with their runs/ paths moved below WORK (quickstart.here).
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
    "python eval_pairs.py --ckpt runs/sr4_distill/latest.pt --data runs/toy_heldout.npz "
    "--nfe 20 --out runs/sr4_scores.json",
]
WORK = "runs/bench_quickstart_pairs"  # the benchmark's own folder


def figure(path, work=WORK, n=8, nfe=20):
    """Rows source | start | generator | teacher | target for the first n held-out pairs of the
    runs in `work`."""
    j = lambda p: os.path.join(ROOT, work, p)  # noqa: E731
    teacher = sampling.load_model(j("sr4_teacher/latest.pt"), 0.995, None)
    gen = sampling.load_model(j("sr4_distill/latest.pt"), 0.95, None)
    src, targets, _ = sampling.held_out_pairs(j("toy_heldout.npz"), gen.coupling, (3, 16, 16), n,
                                            0)
    cpu = torch.device("cpu")
    amp = common.precision_context(cpu, "fp32")
    out = [sampling.translate(m, src, None, 1, 0, 64, cpu, amp, k)
           for m, k in ((teacher, 1), (gen, 1), (teacher, nfe))]
    # sources are floats in the network's range, the outputs and targets uint8
    rows = [common.to_uint8(src), *out, targets]
    common.save_grid(common.from_uint8(torch.cat(rows)), path, nrow=n)
    im = Image.open(path)
    im.resize((im.width * 3, im.height * 3), Image.NEAREST).save(path)


def main():
    fresh(WORK)
    times = {}
    for c in COMMANDS:
        times[c.split()[1]] = times.get(c.split()[1], 0) + sh(here(c, WORK))
    total = sum(times.values())
    with open(os.path.join(ROOT, WORK, "sr4_scores.json")) as f:
        scores = json.load(f)
    m = measure.machine()
    report = {"machine": m, "commands": COMMANDS, "ran_in": WORK, "seconds": times,
              "total_seconds": total, "scores": scores}
    out = os.path.join(ROOT, "benchmarks", "results", "quickstart_pairs_cpu.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    figure(os.path.join(ROOT, "docs", "pairs_quickstart.png"))
    print(f"\nimage-to-image quick start on {measure.host(m)}: {total:.0f} s in all "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in times.items())})")
    print("\n| model | PSNR to target (dB) | pixel FD to held-out targets |\n|---|---|---|")
    for name, r in scores["scores"].items():
        print(f"| {name} | {r['psnr_db']:.2f} | {r['pixel_fd']:.3f} |")
    print(f"\nwrote {out} and docs/pairs_quickstart.png")


if __name__ == "__main__":
    main()
