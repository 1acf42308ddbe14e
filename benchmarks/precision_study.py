"""How precise are the two players' gradients at each --precision? Measured on a CPU.

    python benchmarks/bench.py --suite precision --threads 1   # 6 min on a busy 2-core VM

(no download; measured: teacher 156 s, RealUID 135 s, gradients 63 s; one thread per process
is much faster than two when other processes share the two cores).

1. Builds a partly trained small run through the command lines, in a scratch folder
   (--workdir; a folder that already holds the run is reused): toy_data.py, train_teacher.py
   with the quick start's 16x16 network (1.1M parameters, --teacher-steps), distill.py
   (alpha 0.94, beta 0.96, --distill-steps).
2. On one fixed batch of 64, for each precision, sets the run up with distill.setup (generator
   and fake model from the run's checkpoint, `--init-from ... --fake-init init-from`) and
   runs distill.py's own generator and fake-model updates without their optimizer steps
   (measure.update_gradient): the generator gradient and the fake model's gradient before
   clipping, flattened.
3. Compares bf16, mixed and, with --precisions, fp16 with fp32 (cosine similarity and
   relative error |g - g_ref| / |g_ref|), and fp32 with float64 computed the same way (the
   floor of the comparison). float64: every network in float64, except the sinusoidal
   embedding of t, which the U-Net computes in float32 for every precision (the same input
   everywhere), cast to float64 before the embedding MLP; GroupNorm32's float32 upcast is
   skipped.

fp16 on a CPU is opt-in (`--precisions bf16 fp16 mixed`): torch 2.14's CPU autocast does run
convolutions in float16, but the weight gradient of a float16 convolution takes a slow path
there (4.3 s for one 64-channel 3x3 convolution at batch 64, 16x16, against 0.017 s in
float32 and 0.01 s in bf16 on a 2-core Xeon VM with AMX), and the gradient scaler's back-off
(measure.update_gradient) repeats the backward pass: the fp16 rows of one state did not
finish in 20 minutes there. float64 convolutions are slow on CPUs too (0.6 s for that one):
the fp64 reference takes half of the default run's gradient time.

States of the fake model f: (a) the run as trained; (b) late in training, f close to v*: f's
weights replaced by v* + eps (f - v*) in weight space (f and v* share the architecture) for
eps = 1e-2 and 1e-3. (b) emulates f -> v*, which RealUID drives f to: the generator's gradient
is then the small difference of two vector-Jacobian products, teacher minus fake model, and
rounding errors of the two no longer cancel. ("mixed" runs exactly those two in float32.)

Writes benchmarks/results/precision_cpu.json and prints a Markdown table. Legend: teacher v*
`teacher`, fake model f `fake`, generator G `gen`.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import distill  # noqa: E402
import unet  # noqa: E402
from benchmarks import measure  # noqa: E402
from benchmarks.quickstart import TOY_NET  # noqa: E402

REFERENCES = {"fp64": None, "fp32": "fp64", "bf16": "fp32", "fp16": "fp32", "mixed": "fp32"}


def autocast_fp16_works(device):
    """Whether autocast on `device` runs convolutions in float16 (CPU autocast gained fp16
    late; if it silently ran float32, the fp16 rows would measure fp32)."""
    try:
        with torch.autocast(device.type, dtype=torch.float16):
            out = torch.nn.functional.conv2d(torch.randn(1, 3, 8, 8, device=device),
                                             torch.randn(4, 3, 3, 3, device=device))
        return out.dtype == torch.float16
    except RuntimeError:
        return False


def to_float64(net):
    """`net` in float64 throughout (see the module docstring): parameters cast, GroupNorm32
    without its float32 upcast, the float32 time embedding cast before the MLP."""
    net.double()
    for m in net.modules():
        if isinstance(m, unet.GroupNorm32):
            m.forward = types.MethodType(torch.nn.GroupNorm.forward, m)
    net.time_embed.register_forward_pre_hook(lambda m, inputs: tuple(x.double() for x in inputs))
    return net


def parse_args(argv=None):
    p = common.Parser(prog="bench.py --suite precision",
                      description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=None,
                   help="folder of the small run (default: a new temporary folder); reused if "
                        "it already holds distill/latest.pt")
    p.add_argument("--teacher-steps", type=int, default=200, help="teacher steps at batch 64")
    p.add_argument("--distill-steps", type=int, default=30,
                   help="RealUID steps (5 + 1 updates each) at batch 32")
    p.add_argument("--batch-size", type=int, default=64, help="the fixed batch")
    p.add_argument("--eps", type=float, nargs="*", default=[1e-2, 1e-3],
                   help="f <- v* + eps (f - v*): late-training states")
    p.add_argument("--precisions", nargs="+", choices=["bf16", "fp16", "mixed"],
                   default=["bf16", "mixed"],
                   help="compared with fp32 (fp32 and its float64 reference always run)")
    p.add_argument("--alpha", type=float, default=0.94, help="alpha")
    p.add_argument("--beta", type=float, default=0.96, help="beta")
    p.add_argument("--device", default="cpu", help="device of the gradients")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads here and in the training commands (None: torch's)")
    p.add_argument("--out", default="benchmarks/results/precision_cpu.json", help="JSON output")
    return p.parse_args(argv)


def build_run(args, work):
    """toy data -> teacher -> RealUID, through the command lines; returns the paths."""
    paths = {"data": os.path.join(work, "toy.npz"),
             "teacher": os.path.join(work, "teacher", "latest.pt"),
             "distill": os.path.join(work, "distill", "latest.pt")}
    if os.path.isfile(paths["distill"]):
        print(f"reusing the run in {work}")
        return paths, {}
    quiet = "--device cpu --workers 0 --sample-every 0 --save-minutes 0"
    commands = {
        "data": f"toy_data.py --out {paths['data']}",
        "teacher": f"train_teacher.py --data {paths['data']} {TOY_NET} --batch-size 64 "
                   f"--lr 1e-3 --warmup 50 --ema 0.995 --steps {args.teacher_steps} "
                   f"--log-every 50 {quiet} --out {os.path.dirname(paths['teacher'])}",
        "distill": f"distill.py --teacher {paths['teacher']} --teacher-ema 0.995 "
                   f"--data {paths['data']} --alpha {args.alpha} --beta {args.beta} "
                   f"--batch-size 32 --lr 2e-4 --warmup 10 --ema 0.95 "
                   f"--steps {args.distill_steps} --log-every 10 {quiet} "
                   f"--out {os.path.dirname(paths['distill'])}"}
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    seconds = {}
    for name, command in commands.items():
        print(f"python {command}", flush=True)
        start = time.perf_counter()
        with open(os.path.join(work, f"{name}.log"), "w") as log:
            subprocess.run([sys.executable, *command.split()], cwd=ROOT, check=True,
                           stdout=log, stderr=subprocess.STDOUT, env=env)
        seconds[name] = time.perf_counter() - start
        print(f"  {seconds[name]:.0f} s", flush=True)
    return paths, seconds


def gradients(argv, precision, eps, batch):
    """Generator and fake-model gradients of the run at `precision` (fp64: see to_float64),
    with f moved towards v* by `eps` (None: as trained)."""
    dargs, s = measure.distill_state([*argv, "--precision",
                                    "fp32" if precision == "fp64" else precision])
    if eps is not None:
        measure.approach_teacher(s.fake, s.teacher, eps)
    if precision == "fp64":
        # the frozen aliases hold their own copies; the EMAs follow the generator update
        for net in (s.teacher, s.gen, s.fake, s.gen_frozen, s.fake_frozen, *s.emas.values()):
            to_float64(net)
        batch = {k: v.double() if v is not None and v.is_floating_point() else v
                 for k, v in batch.items()}
    g_gen, loss_gen, scale_gen = measure.update_gradient(distill.generator_update, s.gen_player,
                                                         s, dargs, batch)
    g_fake, loss_fake, scale_fake = measure.update_gradient(distill.fake_update, s.fake_player,
                                                            s, dargs, batch)
    return {"generator": g_gen, "fake": g_fake, "loss_gen": loss_gen, "loss_fake": loss_fake,
            "scale": {"generator": scale_gen, "fake": scale_fake}}


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    work = args.workdir or tempfile.mkdtemp(prefix="realuid_precision_")
    os.makedirs(work, exist_ok=True)
    paths, seconds = build_run(args, work)
    reused = not seconds
    argv = ["--teacher", paths["teacher"], "--teacher-ema", 0.995, "--data", paths["data"],
            "--alpha", args.alpha, "--beta", args.beta, "--init-from", paths["distill"],
            "--init-ema", "none", "--fake-init", "init-from", "--batch-size", args.batch_size,
            "--device", args.device, "--workers", 0, "--out", os.path.join(work, "probe")]
    fp16 = autocast_fp16_works(device)
    if "fp16" in args.precisions and not fp16:
        print(f"autocast on {device.type} does not run float16: no fp16 rows")
    precisions = [p for p in REFERENCES if p in ("fp64", "fp32") or p in args.precisions
                  and (p != "fp16" or fp16)]
    dargs, s = measure.distill_state([*argv, "--precision", "fp32"])
    batch = distill.draw(s, dargs)  # the one fixed batch of every comparison

    start = time.perf_counter()
    rows = []
    for eps in [None, *args.eps]:
        grads = {}
        for p in precisions:
            t0 = time.perf_counter()
            grads[p] = gradients(argv, p, eps, batch)
            print(f"f {'as trained' if eps is None else f'eps {eps:g}'}, {p}: gradients in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        for p in precisions[1:]:
            ref = grads[REFERENCES[p]]
            rows.append({"f": "as trained" if eps is None else "v* + eps (f - v*)", "eps": eps,
                         "precision": p, "reference": REFERENCES[p],
                         "generator": measure.compare(grads[p]["generator"], ref["generator"]),
                         "fake": measure.compare(grads[p]["fake"], ref["fake"]),
                         "reference_norm": {k: ref[k].norm().item()
                                            for k in ("generator", "fake")},
                         "loss_gen": grads[p]["loss_gen"], "loss_fake": grads[p]["loss_fake"],
                         "fp16_loss_scale": grads[p]["scale"] if p == "fp16" else None})
    seconds["gradients"] = time.perf_counter() - start

    report = {"machine": measure.machine(device), "device": str(device), "batch": args.batch_size,
              "alpha": args.alpha, "beta": args.beta, "teacher_steps": args.teacher_steps,
              "distill_steps": args.distill_steps, "run": work, "reused_run": reused,
              "network": s.cfg,
              "autocast_fp16_on_device": fp16, "seconds": seconds, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)

    m = report["machine"]
    print(f"\n{measure.host(m)} | {device} | threads {m['threads']} | torch {m['torch']} | batch "
          f"{args.batch_size} | alpha {args.alpha} beta {args.beta} | autocast fp16 on "
          f"{device.type}: {'yes' if fp16 else 'no'}\n")
    print("| f | precision | against | \\|grad G\\| | G cosine | G rel. error | "
          "\\|grad f\\| | f cosine | f rel. error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        state = "as trained" if r["eps"] is None else f"v* + {r['eps']:g} (f - v*)"
        g, f = r["generator"], r["fake"]
        print(f"| {state} | {r['precision']} | {r['reference']} | "
              f"{r['reference_norm']['generator']:.3g} | {g['cosine']:.6f} | "
              f"{g['rel_err']:.2e} | {r['reference_norm']['fake']:.3g} | {f['cosine']:.6f} | "
              f"{f['rel_err']:.2e} |")
    print(f"\nwrote {args.out}")
