"""Where the time of a RealUID update goes: measured updates against their unavoidable passes.

    python bench.py --device cpu --batch-size 8 --threads 1     # the figures quoted in README
    python bench.py --device cuda --batch-size 256 --precision bf16

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

Two suites share this file's measurement helpers (timing, FLOP counting, gradients, cosines):

    python bench.py --suite precision   # gradients at fp32/bf16/fp16/mixed vs fp32 and fp64, CPU
    python bench.py --suite gpu         # precision x compile x batch on the GPU, < 8 minutes

documented in benchmarks/precision_study.py and benchmarks/gpu_suite.py
(`python bench.py --suite gpu --help` lists a suite's own flags).
"""
import argparse
import importlib
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import common
import coupling
import distill
import train_teacher
import unet

SUITES = {"precision": "benchmarks.precision_study", "gpu": "benchmarks.gpu_suite"}


# ---------------------------------------------------------------------------------------------
# Measurement helpers, shared by the default run below and the suites in benchmarks/.

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    elif device.type == "npu":
        torch.npu.synchronize()


def timed(fn, device, repeats):
    """Median wall time of fn() over `repeats` calls (after the caller's warm-up)."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def flops(fn):
    """FLOPs of fn() counted by torch.utils.flop_counter (matrix products, convolutions,
    attention: the FLOPs that matter), in eager mode."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_rate(device, dtype, n=8192, repeats=10):
    """Measured FLOP/s of [n, n] x [n, n] matrix products in `dtype` (the device's practical
    matrix-multiply peak; TF32 follows torch.backends.cuda.matmul.allow_tf32)."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    return 2 * n ** 3 / timed(lambda: a @ b, device, repeats)


def machine(device=None):
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    m = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
         "torch": torch.__version__, "python": platform.python_version(),
         "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    if device is not None and device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        m["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}",
                    "memory_gb": p.total_memory / 2**30,
                    "multiprocessors": p.multi_processor_count,
                    "cuda_runtime": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    return m


def fill_zero_layers(net):
    """Give the zero-initialised layers (the last layer of every residual branch, the output
    conv) N(0, 0.02) weights from the global RNG, so that a random network computes something
    (a fresh U-Net outputs exactly 0). Drawn in logical order: the same weights in any memory
    format."""
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1 and p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, device=p.device, dtype=p.dtype) * 0.02)
    return net


def random_teacher(path, cond, net_config=None, task=None):
    """A teacher file with random weights (zero-initialised layers made non-zero so that every
    network computes something): the paper's network, or `net_config`'s (UNet keywords); with
    `task`, an image-to-image teacher of that task on the bridge path."""
    torch.manual_seed(0)
    cfg = dict(net_config or {}, num_classes=10 if cond else None)
    if task:
        cfg["cond_channels"] = cfg.get("in_channels", 3)
    net = fill_zero_layers(unet.UNet(**cfg))
    sd = net.state_dict()
    torch.save({"net_model": sd, "ema_models": {"0.999": sd}, "step": 0,
                "config": {"kind": "teacher", "net": net.config,
                           "coupling": coupling.describe(task, "bridge", 0.25) if task
                           else None}}, path)


def scratch_files(batch_size, cond, net_config=None, folder=None, task=None):
    """A folder (default: a new temporary one) with a random teacher (paper size unless
    `net_config`) and random uint8 data of its image size. Returns (folder, teacher path, data
    path)."""
    tmp = folder or tempfile.mkdtemp(prefix="realuid_bench_")
    os.makedirs(tmp, exist_ok=True)
    teacher_path, data_path = os.path.join(tmp, "teacher.pt"), os.path.join(tmp, "data.npz")
    random_teacher(teacher_path, cond, net_config, task)
    size = (net_config or {}).get("image_size", 32)
    rng = np.random.default_rng(0)
    n = max(4 * batch_size, 64)
    np.savez(data_path, images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
             labels=rng.integers(0, 10, n))
    return tmp, teacher_path, data_path


def distill_state(argv):
    """distill.py's own set-up for a command line: (args, state) as distill.main builds them,
    backends configured for the precision (no run folder is written)."""
    dargs = distill.parse_args([str(a) for a in argv])
    d = common.Dist(dargs.device)
    s = distill.setup(dargs, d)  # resolves --precision auto
    common.configure_backends(d.device, dargs.precision, dargs.deterministic)
    return dargs, s


def update_fns(s, dargs):
    """distill.py's fake-model update, generator update and cycle (--fake-steps + 1), each on
    fresh draws, as zero-argument callables."""
    def fake_update():
        distill.fake_update(s, dargs, distill.draw(s, dargs))

    def gen_update():
        distill.generator_update(s, dargs, distill.draw(s, dargs))

    def cycle():
        for _ in range(dargs.fake_steps):
            fake_update()
        gen_update()
    return fake_update, gen_update, cycle


def generator_forward(s, z, y, src=None):
    """G forward without a graph on (z, y[, source]): one pass of the cost model, the FLOP
    unit."""
    def g_forward():
        with torch.no_grad(), s.amp:
            distill.generate(s.gen, z, y, src)
    return g_forward


def objective_gradient(player, batch, amp):
    """The flattened gradient (float64, on the CPU) of one player's objective on one batch, as
    common.Player.update computes it: `player.run(batch)` under `amp`, backward, before
    clipping; the optimizer is not stepped and the gradients are cleared. With fp16 the loss
    goes through the player's gradient scale and back; a scale that overflows is halved, as
    GradScaler does between updates. Returns (gradient, objective value, scale used)."""
    scale = player.scaler.get_scale() if player.scaler.is_enabled() else 1.0
    while True:
        with amp:
            objective, _ = player.run(batch)
        (objective * scale).backward()
        grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                          .double().cpu() for p in player.params]) / scale
        player.opt.zero_grad(set_to_none=True)
        if torch.isfinite(grad).all() or scale <= 1:
            return grad, objective.item(), scale
        scale /= 2


def compare(g, ref):
    """Cosine similarity and relative error |g - ref| / |ref| of two flat gradients."""
    g, ref = g.double(), ref.double()
    return {"cosine": (g @ ref / (g.norm() * ref.norm())).item(),
            "rel_err": ((g - ref).norm() / ref.norm()).item()}


@torch.no_grad()
def approach_teacher(fake, teacher, eps):
    """Fake-model weights <- teacher + eps * (fake - teacher), in place (the fake model's
    frozen alias shares its storage). Both networks have one architecture; eps -> 0 takes f to
    v* in weight space, which emulates the end of training, where f approaches v*."""
    f_sd, t_sd = fake.state_dict(), teacher.state_dict()
    if set(f_sd) != set(t_sd):
        raise ValueError("the fake model and the teacher differ in architecture")
    for k, w in f_sd.items():
        if w.is_floating_point():
            w.copy_(t_sd[k] + eps * (w - t_sd[k]))


# ---------------------------------------------------------------------------------------------
# The default run: one configuration, its updates against their unavoidable passes.

def parse_args(argv=None):
    """The default run's flags; `--suite NAME ...` hands the remaining flags to that suite."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--suite", choices=list(SUITES))
    known, rest = pre.parse_known_args(argv)
    if known.suite:
        args = importlib.import_module(SUITES[known.suite]).parse_args(rest)
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
        return importlib.import_module(SUITES[args.suite]).main(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp, teacher_path, data_path = scratch_files(args.batch_size, args.cond, task=args.task)
    common_flags = ["--data", data_path, "--out", tmp, "--batch-size", args.batch_size,
                    "--precision", args.precision, "--workers", 0, "--warmup", 0]
    if args.device:
        common_flags += ["--device", args.device]
    if args.channels_last:
        common_flags.append("--channels-last")
    if args.compile:
        common_flags.append("--compile")
    dargs, s = distill_state(["--teacher", teacher_path, "--alpha", 0.94, "--beta", 0.96,
                              "--fake-steps", args.fake_steps, *common_flags])
    d, device = s.d, s.device
    B, R = args.batch_size, args.repeats
    fake_update, gen_update, cycle = update_fns(s, dargs)

    # The unavoidable passes, on the same networks and shapes (the README's cost model).
    batch = distill.draw(s, dargs)
    z, x0, t, y, src = batch["z"], batch["x0"], batch["t"], batch["y"], batch["s"]
    t_ = t.view(-1, 1, 1, 1)
    xt = t_ * batch["x_d"] + (1 - t_) * x0
    xt2, t2 = torch.cat([xt, xt]), torch.cat([t, t])
    y2, src2 = (None if v is None else torch.cat([v, v]) for v in (y, src))

    g_forward = generator_forward(s, z, y, src)

    def f_forward_backward_2b():
        with s.amp:
            out = distill.field(s.fake, t2, xt2, y2, src2)
        out.float().square().sum().backward()
        s.fake.zero_grad(set_to_none=True)

    def g_forward_backward():
        with s.amp:
            out = distill.generate(s.gen, z, y, src)
        out.square().sum().backward()
        s.gen.zero_grad(set_to_none=True)

    def input_backward(run):
        def pass_():
            x = xt.detach().requires_grad_(True)
            with s.amp:
                out = distill.field(run, t, x, y, src)
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
    t_fake, t_gen, t_cycle = timed(fake_update, device, R), timed(gen_update, device, R), \
        timed(cycle, device, R)
    peak = common.peak_memory_mb(device)
    t_pass = {k: timed(fn, device, R) for k, fn in passes.items()}
    fake_min = sum(t_pass[k] for k in fake_passes)
    gen_min = sum(t_pass[k] for k in gen_passes)
    cycle_min = args.fake_steps * fake_min + gen_min

    unit = flops(g_forward)  # one U-Net forward at batch B (plus the residual add: no FLOPs)
    f_fake, f_gen = flops(fake_update) / unit, flops(gen_update) / unit
    f_pass = {k: flops(fn) / unit for k, fn in passes.items()}
    f_fake_min = sum(f_pass[k] for k in fake_passes)
    f_gen_min = sum(f_pass[k] for k in gen_passes)

    # Teacher training (one flow-matching update at batch B, dropout 0.1 as in the paper) and
    # one-step sampling.
    targs = train_teacher.parse_args([str(a) for a in common_flags + (
        ["--cond"] if args.cond else []) + (["--task", args.task] if args.task else [])])
    ts = train_teacher.setup(targs, d)
    teacher_update = lambda: train_teacher.teacher_update(ts, targs,                # noqa: E731
                                                          train_teacher.draw(ts, targs))
    teacher_update()
    t_teacher = timed(teacher_update, device, R)
    f_teacher = flops(teacher_update) / unit
    s.gen.eval()
    t_sample = timed(g_forward, device, R)

    report = {
        "machine": machine(device), "device": str(device), "batch": B,
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
    print(f"{m['cpu']} | {device} | threads {m['threads']} | torch {m['torch']} | batch {B} | "
          f"{args.precision}")
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
