"""Where the time of a RealUID update goes: measured updates against their unavoidable passes.

    python benchmarks/bench.py --device cpu --batch-size 8 --threads 1   # the README's figures
    python benchmarks/bench.py --device cuda --batch-size 256 --precision bf16

Runs the very update functions of distill.py / train_teacher.py on the paper's CIFAR-10
network (random weights, random uint8 data; nothing is downloaded) and reports, in one run:
- wall time of a fake-model update, a generator update and a full cycle (--fake-steps + 1);
- the wall time of each unavoidable pass measured on the same networks and batch, and their
  sum: a fake update needs G forward without graph at B + f forward and backward at 2B; a
  generator update needs G forward and backward + v* and f forward with a backward to their
  inputs only (see the README's cost model);
- FLOPs per update counted with torch.utils.flop_counter.FlopCounterMode, in units of one
  U-Net forward pass at batch B, beside the FLOPs of the unavoidable passes counted the same
  way (the minimum: 7 units each);
- peak memory, teacher training (one flow-matching update) and one-step sampling (images/s).
Prints a table and writes JSON (with the machine description) to --out.

Two suites run through this command, with the same measurement helpers (benchmarks/measure.py:
timing, FLOP counting, gradients, cosines):

    python benchmarks/bench.py --suite precision   # gradients at fp32/bf16/fp16/mixed vs fp32, fp64
    python benchmarks/bench.py --suite gpu         # precision x compile x batch on a GPU, < 8 min

documented in benchmarks/precision_study.py and benchmarks/gpu_suite.py
(`python benchmarks/bench.py --suite gpu --help` lists a suite's own flags).
"""
import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import coupling  # noqa: E402
import distill  # noqa: E402
import flow  # noqa: E402
import train_teacher  # noqa: E402
from benchmarks import gpu_suite, measure, precision_study  # noqa: E402

SUITES = {"precision": precision_study, "gpu": gpu_suite}


# ---------------------------------------------------------------------------------------------
# The default run: one configuration, its updates against their unavoidable passes.

def parse_args(argv=None):
    """The default run's flags; `--suite NAME ...` hands the remaining flags to that suite."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--suite", choices=list(SUITES))
    known, rest = pre.parse_known_args(argv)
    if known.suite:
        args = SUITES[known.suite].parse_args(rest)
        args.suite = known.suite
        return args
    p = common.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=list(SUITES), default=None,
                   help="run a suite instead (precision: gradient precision study on CPU; gpu: "
                        "the GPU benchmark); `--suite NAME --help` lists its flags")
    p.add_argument("--device", default=None, help="cuda, npu, mps or cpu (default: the best)")
    p.add_argument("--batch-size", type=int, default=8, help="batch B of one update")
    p.add_argument("--precision", choices=list(common.PRECISIONS), default="fp32",
                   help="precision of the networks (distill.py's --precision)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (median)")
    p.add_argument("--fake-steps", type=int, default=5, help="fake updates per cycle")
    p.add_argument("--cond", action="store_true", help="class-conditional network")
    p.add_argument("--task", choices=coupling.TASKS, default=None,
                   help="an image-to-image teacher of this task (the source is one more "
                        "network input: the passes and FLOPs should stay those of the cost "
                        "model)")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each player's objective (distill.py --compile)")
    p.add_argument("--out", default="benchmarks/results/bench.json", help="JSON output")
    return p.parse_args(argv)


def main(args):
    if args.suite:
        return SUITES[args.suite].main(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp, teacher_path, data_path = measure.scratch_files(args.batch_size, args.cond,
                                                         task=args.task)
    common_flags = ["--data", data_path, "--out", tmp, "--batch-size", args.batch_size,
                    "--precision", args.precision, "--workers", 0, "--warmup", 0]
    if args.device:
        common_flags += ["--device", args.device]
    if args.channels_last:
        common_flags.append("--channels-last")
    if args.compile:
        common_flags.append("--compile")
    dargs, s = measure.distill_state(["--teacher", teacher_path, "--alpha", 0.94, "--beta",
                                      0.96, "--fake-steps", args.fake_steps, *common_flags])
    device = s.device
    B, R = args.batch_size, args.repeats
    fake_update, gen_update, cycle = measure.update_fns(s, dargs)

    # The unavoidable passes, on the same networks and shapes (the README's cost model).
    batch = distill.draw(s, dargs)
    z, x0, t, y, src = batch["z"], batch["x0"], batch["t"], batch["y"], batch["s"]
    t_ = t.view(-1, 1, 1, 1)
    xt = t_ * batch["x_d"] + (1 - t_) * x0
    xt2, t2 = torch.cat([xt, xt]), torch.cat([t, t])
    y2, src2 = (None if v is None else torch.cat([v, v]) for v in (y, src))

    g_forward = measure.generator_forward(s, z, y, src)

    def f_forward_backward_2b():
        with s.amp:
            out = flow.field(s.fake, t2, xt2, y2, src2)
        out.float().square().sum().backward()
        s.fake.zero_grad(set_to_none=True)

    def g_forward_backward():
        with s.amp:
            out = flow.generate(s.gen, z, y, src, s.t_g)
        out.square().sum().backward()
        s.gen.zero_grad(set_to_none=True)

    def input_backward(run):
        def pass_():
            x = xt.detach().requires_grad_(True)
            with s.amp:
                out = flow.field(run, t, x, y, src)
            out.float().square().sum().backward()  # parameters frozen: only x gets a gradient
        return pass_

    def frozen(fn):
        def pass_():
            s.fake.requires_grad_(False)
            fn()
            s.fake.requires_grad_(True)
        return pass_

    passes = {"G forward, no graph (B)": g_forward,
              "f forward + backward (2B)": f_forward_backward_2b,
              "G forward + backward (B)": g_forward_backward,
              "v* forward + input backward (B)": input_backward(s.teacher),
              "f forward + input backward (B)": frozen(input_backward(s.fake))}
    fake_passes = list(passes)[:2]
    gen_passes = list(passes)[2:]

    # warm-up (autotuning, allocator, compile)
    cycle()
    for fn in passes.values():
        fn()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_fake, t_gen, t_cycle = (measure.timed(fn, device, R)
                              for fn in (fake_update, gen_update, cycle))
    peak = common.peak_memory_mb(device)
    t_pass = {k: measure.timed(fn, device, R) for k, fn in passes.items()}
    fake_min = sum(t_pass[k] for k in fake_passes)
    gen_min = sum(t_pass[k] for k in gen_passes)
    cycle_min = args.fake_steps * fake_min + gen_min

    unit = measure.flops(g_forward)  # one U-Net forward at batch B (the residual add: no FLOPs)
    f_fake, f_gen = measure.flops(fake_update) / unit, measure.flops(gen_update) / unit
    f_pass = {k: measure.flops(fn) / unit for k, fn in passes.items()}
    f_fake_min = sum(f_pass[k] for k in fake_passes)
    f_gen_min = sum(f_pass[k] for k in gen_passes)

    # Teacher training (one flow-matching update at batch B, dropout 0.1 as in the paper) and
    # one-step sampling.
    targs = train_teacher.parse_args([str(a) for a in common_flags + (
        ["--cond"] if args.cond else []) + (["--task", args.task] if args.task else [])])
    ts = train_teacher.setup(targs, s.proc)
    teacher_update = lambda: train_teacher.teacher_update(ts, targs,                # noqa: E731
                                                          train_teacher.draw(ts, targs))
    teacher_update()
    t_teacher = measure.timed(teacher_update, device, R)
    f_teacher = measure.flops(teacher_update) / unit
    s.gen.eval()
    t_sample = measure.timed(g_forward, device, R)

    report = {
        "machine": measure.machine(device), "device": str(device), "batch": B,
        "precision": args.precision,
        "channels_last": args.channels_last, "compile": args.compile,
        "fake_steps": args.fake_steps, "repeats": R,
        "unit_gflops_forward_pass": unit / 1e9,
        "seconds": {"fake_update": t_fake, "generator_update": t_gen, "cycle": t_cycle,
                    "passes": t_pass, "fake_update_passes_sum": fake_min,
                    "generator_update_passes_sum": gen_min, "cycle_passes_sum": cycle_min,
                    "teacher_update": t_teacher, "one_step_sampling_batch": t_sample},
        "cycle_over_passes": t_cycle / cycle_min,
        "flops_in_forward_passes": {"fake_update": f_fake, "generator_update": f_gen,
                                    "passes": f_pass, "fake_update_minimum": f_fake_min,
                                    "generator_update_minimum": f_gen_min,
                                    "teacher_update": f_teacher},
        "flops_over_minimum": {"fake_update": f_fake / f_fake_min,
                               "generator_update": f_gen / f_gen_min},
        "peak_memory_mb": peak,
        "one_step_images_per_second": B / t_sample,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)

    m = report["machine"]
    print(f"{measure.host(m)} | {device} | threads {m['threads']} | torch {m['torch']} | "
          f"batch {B} | {args.precision}")
    print(f"one forward pass at batch {B}: {unit / 1e9:.1f} GFLOP")
    print(f"{'':34s}{'wall s':>9s}{'passes s':>10s}{'ratio':>7s}{'FLOPs':>8s}{'minimum':>9s}")
    rows = [("fake-model update", t_fake, fake_min, f_fake, f_fake_min),
            ("generator update", t_gen, gen_min, f_gen, f_gen_min),
            (f"cycle ({args.fake_steps} + 1)", t_cycle, cycle_min,
             args.fake_steps * f_fake + f_gen, args.fake_steps * f_fake_min + f_gen_min)]
    for name, wall, minimum, fl, fl_min in rows:
        print(f"{name:34s}{wall:9.3f}{minimum:10.3f}{wall / minimum:7.2f}{fl:8.2f}{fl_min:9.2f}")
    for name, sec in t_pass.items():
        print(f"  {name:32s}{sec:9.3f}{'':17s}{f_pass[name]:8.2f}")
    print(f"{'teacher update (flow matching)':34s}{t_teacher:9.3f}{'':17s}{f_teacher:8.2f}")
    print(f"one-step sampling: {B / t_sample:.1f} images/s; peak memory "
          f"{peak:.0f} MB" if peak else "")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(parse_args())
