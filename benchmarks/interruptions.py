"""Interrupt distillation runs at random moments, resume them with `--resume RUN_DIR` alone, and
compare each with an uninterrupted run, bit for bit.

    python benchmarks/interruptions.py                    # 4 runs, seed 0: a few minutes on 2 cores
    python benchmarks/interruptions.py --runs 5 --seed 1

A tiny teacher is trained on 8x8 toy images once (under --work); then every run starts the
same 40-step RealUID command (saves every 7 steps, grids every 10, a snapshot at 20) and is hit,
after a random 0-12 s, by SIGINT, SIGTERM or kill -9, again and again: after each hit the run is
continued with `python distill.py --resume RUN_DIR` when it has a latest.pt, or started afresh
when it has none, until a command ends by itself. Its final latest.pt must equal the
uninterrupted run's (weights, optimizers, EMAs, RNG states, data position; not the saved flags).
Prints one line per run: EQUAL or DIFF, and every hit with its exit code and last stderr line.
"""
import os
import random
import shutil
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoints  # noqa: E402
import common  # noqa: E402
from benchmarks import measure  # noqa: E402

NET = ["--image-size", "8", "--num-channels", "32", "--channel-mult", "1", "--num-res-blocks",
       "1", "--attention-resolutions", "8", "--num-heads", "1", "--num-head-channels", "-1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def sh(argv):
    r = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True)
    if r.returncode:
        common.fail(f"{' '.join(map(str, argv))} failed: {r.stderr.strip().splitlines()[-1]}")


def distill_argv(work, out):
    return ["distill.py", "--teacher", f"{work}/teacher/latest.pt", "--data", f"{work}/d.npz",
            "--alpha", 0.94, "--beta", 0.96, "--batch-size", 16, "--steps", 40, "--lr", 1e-3,
            "--warmup", 5, "--ema", 0.95, "--log-every", 5, "--sample-every", 10,
            "--save-every", 7, "--snapshot-every", 20, "--out", out]


def state(path):
    """A checkpoint without its saved flags (--out differs between the runs)."""
    ckpt = checkpoints.load_checkpoint(path)
    ckpt["config"].pop("args")
    return ckpt


def interrupted_run(work, out, rng):
    """Hit the run until one command ends by itself; returns the hits and the final exit code."""
    shutil.rmtree(out, ignore_errors=True)
    hits, argv = [], distill_argv(work, out)
    while True:
        proc = subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait = rng.uniform(0, 12)
        sig = rng.choice([signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
        try:
            _, err = proc.communicate(timeout=wait)
            return hits, proc.returncode, (err.strip().splitlines() or [""])[-1]
        except subprocess.TimeoutExpired:
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=300)
            hits.append(f"{sig.name} at {wait:.1f} s -> exit {proc.returncode}: "
                        f"{(err.strip().splitlines() or [''])[-1][:90]}")
        argv = (["distill.py", "--resume", out] if os.path.exists(f"{out}/latest.pt")
                else distill_argv(work, out))


def main(args):
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    if not os.path.exists(f"{work}/teacher/latest.pt"):
        sh(["toy_data.py", "--out", f"{work}/d.npz", "--size", 8, "--n", 256])
        sh(["train_teacher.py", "--data", f"{work}/d.npz", *NET, "--batch-size", 16, "--steps",
            30, "--log-every", 10, "--sample-every", 0, "--out", f"{work}/teacher"])
    if not os.path.exists(f"{work}/straight/latest.pt"):
        shutil.rmtree(f"{work}/straight", ignore_errors=True)
        sh(distill_argv(work, f"{work}/straight"))
    reference = state(f"{work}/straight/latest.pt")
    rng = random.Random(args.seed)
    print(f"python benchmarks/interruptions.py --runs {args.runs} --seed {args.seed} | "
          f"{measure.host(measure.machine())}", flush=True)
    equal = 0
    for i in range(args.runs):
        out = f"{work}/run{i}"
        hits, code, last = interrupted_run(work, out, rng)
        # a command that ends by itself either finished the run or found it finished already
        diff = checkpoints.checkpoint_differences(reference, state(f"{out}/latest.pt"))
        equal += not diff
        print(f"run {i}: {'EQUAL' if not diff else f'DIFF in {len(diff)} entries'} after "
              f"{len(hits)} hits (last command: exit {code} {last[:80]})", flush=True)
        for h in hits:
            print(f"    {h}")
    print(f"{equal} of {args.runs} interrupted runs equal the uninterrupted one, bit for bit")
    if equal != args.runs:
        sys.exit(1)


def parse_args(argv=None):
    p = common.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=common.positive_int, default=4, help="interrupted runs")
    p.add_argument("--seed", type=int, default=0, help="seed of the moments and signals")
    p.add_argument("--work", default="runs/interruptions",
                   help="scratch folder (teacher and uninterrupted run reused when present)")
    return p.parse_args(argv)


if __name__ == "__main__":
    common.cli(main, parse_args)
