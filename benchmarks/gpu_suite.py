"""The GPU benchmark: precision x torch.compile x batch in one table, in under 8 minutes.

    python benchmarks/bench.py --suite gpu   # any CUDA device; benchmarks/results/gpu_<name>.json

On the paper's network (unet.UNet() defaults, 35.7M parameters) with random weights and random
uint8 data (measure.scratch_files; nothing is downloaded), for fp32, tf32, bf16 and mixed,
eager and compiled (distill.py --compile), at batch 256 and 64, it runs distill.py's own
updates and reports per configuration:
- the wall time of one fake-model update, one generator update and one 5 + 1 cycle (median
  of --repeats after a warm-up cycle, torch.cuda.synchronize around each);
- images/s: the cycle's 6 B freshly drawn images over its time;
- counted FLOPs per second: torch.utils.flop_counter counts the eager fp32 updates once per
  batch size (every precision runs the same operations), divided by the measured times, and
  their fraction of the device's bf16 matrix-multiply rate, measured here with [8192, 8192]
  bf16 products (fp32 and tf32 rates too, in the JSON);
- peak memory (torch.cuda.max_memory_allocated after reset_peak_memory_stats);
- the projected wall time of the paper's 400k updates, cycle time x 400,000 / 6;
- the cosine of the generator's gradient against eager fp32 on one fixed batch, same weights,
  for two fake models: f random (a random network, independent of v*) and f close to v*
  (v* + 1e-3 (f - v*) in weight space, which emulates late training, f -> v*: the gradient is
  then a small difference of two vector-Jacobian products; see the precision suite);
- the compile time (first cycle minus a timed one; Inductor's on-disk cache may shorten it);
- whether the gradients are finite (torch 2.14's Inductor on a CPU returned NaN from the U-Net's
  attention in bf16, so compiled bf16 and mixed gave NaN gradients there).

Time budget (--budget-s, 420 s from the start of the suite: with start-up and the final table
the command ends within 8 minutes). The configurations run in order of importance: eager fp32
at batch 256 first (the cosine reference; it counts the FLOPs), then eager bf16, mixed, tf32;
the same at batch 64; then compiled bf16, mixed, tf32, fp32 at 256, then at 64. Before each,
its time is estimated from what has run: set-up time, the per-update time of the same
precision (else the slowest seen at that batch, else the other batch scaled by size) times
the updates it will run, plus for compiled ones the largest compile time seen
(--compile-estimate-s before any). One that would end past the budget is skipped; a SIGALRM
at the budget stops one that overruns. Skipped, stopped and failed configurations stay rows of
the table and entries of the JSON, which is rewritten after every configuration.
torch._dynamo.reset() runs before every compiled configuration.

Tested on a CPU by tests/test_bench.py: `--device cpu --tiny --batch-sizes 4 2 --repeats 1`,
with torch.compile monkeypatched to a non-Inductor backend.
"""
import gc
import json
import os
import re
import signal
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import distill  # noqa: E402
from benchmarks import measure  # noqa: E402

# --tiny: the tests' network (8x8 images, one level of 32 channels, ~180k parameters).
TINY_NET = dict(image_size=8, num_channels=32, channel_mult=[1], num_res_blocks=1,
                attention_resolutions=[8], num_heads=1, num_head_channels=-1)
EAGER_ORDER = ["fp32", "bf16", "mixed", "tf32"]  # fp32 first: the reference and FLOP count
COMPILED_ORDER = ["bf16", "mixed", "tf32", "fp32"]
UPDATES = 400_000
STATES = {"f random": None, "f near v*": 1e-3}  # fake model: eps of measure.approach_teacher


class OutOfTime(BaseException):
    """The budget ran out (a BaseException, like KeyboardInterrupt, so that no library's
    `except Exception` swallows it)."""


class Budget:
    """A wall-clock budget. A SIGALRM at the deadline raises OutOfTime inside `run(fn)` (a
    configuration) and elsewhere only marks the budget spent. Without SIGALRM (not the main
    thread, or not POSIX) only the estimates guard the budget."""

    def __init__(self, seconds):
        self.deadline = time.perf_counter() + seconds
        self.spent, self.guarding = seconds <= 0, False
        if not self.spent and hasattr(signal, "setitimer"):
            try:
                self.previous = signal.signal(signal.SIGALRM, self._alarm)
            except ValueError:  # not the main thread
                return
            signal.setitimer(signal.ITIMER_REAL, seconds)

    def _alarm(self, signum, frame):
        self.spent = True
        if self.guarding:
            raise OutOfTime()

    def left(self):
        return self.deadline - time.perf_counter()

    def run(self, fn):
        self.guarding = True
        try:
            return fn()
        finally:
            self.guarding = False

    def close(self):
        if hasattr(self, "previous"):
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)


def plan(args):
    """The configurations (mode, batch, precision), most important first."""
    configs = []
    for mode, order in (("eager", EAGER_ORDER), ("compiled", COMPILED_ORDER)):
        if mode in args.modes:
            configs += [(mode, B, p) for B in args.batch_sizes for p in order
                        if p in args.precisions]
    return configs


def estimate(config, rows, args):
    """Seconds a configuration should take, from the rows that ran; None before any."""
    mode, B, precision = config
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return None
    cycle = args.fake_steps + 1
    same = [r["seconds"]["cycle"] for r in ok if r["batch"] == B]
    exact = [r["seconds"]["cycle"] for r in ok if r["batch"] == B
             and r["precision"] == precision]
    other = [r["seconds"]["cycle"] * B / r["batch"] for r in ok]
    per_update = (min(exact) if exact else max(same) if same else max(other)) / cycle
    updates = cycle * (1 + 2 * args.repeats) + 2 * args.repeats + 2 * 2 * len(STATES) + 3
    compile_s = 0.0
    if mode == "compiled":
        seen = [r["seconds"]["compile"] for r in ok if r["mode"] == "compiled"]
        compile_s = max(seen) if seen else args.compile_estimate_s
    return max(r["seconds"]["setup"] for r in ok) + updates * per_update + compile_s


def measure_config(config, args, files, shared):
    """One configuration: set-up, warm-up, timings, FLOPs (first eager run of a batch size),
    memory, gradient cosines. Returns its row."""
    mode, B, precision = config
    tmp, teacher, data = files
    flags = ["--teacher", teacher, "--data", data, "--out", tmp, "--alpha", 0.94, "--beta", 0.96,
             "--fake-steps", args.fake_steps, "--batch-size", B, "--precision", precision,
             "--workers", 0, "--warmup", 0]
    if args.device:
        flags += ["--device", args.device]
    if args.channels_last:
        flags.append("--channels-last")
    if mode == "compiled":
        torch._dynamo.reset()
        flags += ["--compile", "--compile-mode", args.compile_mode]
    start = time.perf_counter()
    dargs, s = measure.distill_state(flags)
    device, R = s.device, args.repeats
    torch.manual_seed(1)
    measure.fill_zero_layers(s.fake)  # a random fake model that computes something
    initial = [{k: v.to("cpu", copy=True) for k, v in net.state_dict().items()}
               for net in (s.gen, s.fake)]  # on the host: not part of the peak memory
    batch = shared["batches"].setdefault(B, distill.draw(s, dargs))
    fake_update, gen_update, cycle = measure.update_fns(s, dargs)
    measure.sync(device)
    seconds = {"setup": time.perf_counter() - start}

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    cycle()  # warm-up: compilation, cuDNN autotuning, the allocator
    measure.sync(device)
    seconds["first_cycle"] = time.perf_counter() - start
    seconds["fake_update"] = measure.timed(fake_update, device, R)
    seconds["generator_update"] = measure.timed(gen_update, device, R)
    seconds["cycle"] = measure.timed(cycle, device, R)
    seconds["compile"] = max(0.0, seconds["first_cycle"] - seconds["cycle"])
    peak = common.peak_memory_mb(device)
    if B not in shared["flops"] and mode == "eager":
        unit = measure.flops(measure.generator_forward(s, batch["z"], batch["y"]))
        shared["flops"][B] = {"unit_forward_pass": unit, "fake_update": measure.flops(fake_update),
                              "generator_update": measure.flops(gen_update)}

    cosines, finite = {}, True
    for state, eps in STATES.items():
        for net, sd in zip((s.gen, s.fake), initial):
            net.load_state_dict(sd)  # in place: the frozen alias of f follows
        if eps is not None:
            measure.approach_teacher(s.fake, s.teacher, eps)
        grads = {"generator": measure.update_gradient(distill.generator_update, s.gen_player,
                                                      s, dargs, batch)[0],
                 "fake": measure.update_gradient(distill.fake_update, s.fake_player, s, dargs,
                                                 batch)[0]}
        finite = finite and all(torch.isfinite(g).all() for g in grads.values())
        if (mode, precision) == ("eager", "fp32"):
            shared["reference"][B, state] = grads
        ref = shared["reference"].get((B, state))
        cosines[state] = {k: measure.compare(g, ref[k]) if ref else None
                          for k, g in grads.items()}

    row = {"mode": mode, "batch": B, "precision": precision, "status": "ok",
           "seconds": seconds, "peak_memory_mb": peak,
           "images_per_second": (args.fake_steps + 1) * B / seconds["cycle"],
           "projected_hours_400k_updates": seconds["cycle"] * UPDATES / (args.fake_steps + 1)
           / 3600, "gradient_vs_eager_fp32": cosines, "finite_gradients": finite}
    count = shared["flops"].get(B)
    if count:
        per_cycle = args.fake_steps * count["fake_update"] + count["generator_update"]
        row.update(
            flops_per_cycle=per_cycle,
            flops_in_forward_passes={k: count[k] / count["unit_forward_pass"]
                                     for k in ("fake_update", "generator_update")},
            flop_per_second=per_cycle / seconds["cycle"],
            fraction_of_bf16_matmul=per_cycle / seconds["cycle"] / shared["matmul"]["bf16"])
    return row


def parse_args(argv=None):
    p = common.Parser(prog="bench.py --suite gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="None: the best (CUDA)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 64], help="batches B")
    p.add_argument("--precisions", nargs="+", choices=EAGER_ORDER, default=EAGER_ORDER,
                   help="distill.py --precision values")
    p.add_argument("--modes", nargs="+", choices=["eager", "compiled"],
                   default=["eager", "compiled"], help="compiled: distill.py --compile")
    p.add_argument("--compile-mode", default="default", help="distill.py --compile-mode")
    p.add_argument("--channels-last", action="store_true", help="distill.py --channels-last")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (median)")
    p.add_argument("--fake-steps", type=int, default=5, help="fake updates per cycle")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="wall-clock budget of the configurations; the rest are skipped")
    p.add_argument("--compile-estimate-s", type=float, default=180.0,
                   help="compile time assumed for the budget until one has been measured")
    p.add_argument("--tiny", action="store_true",
                   help="the tests' tiny network and small matrix products (a CPU test)")
    p.add_argument("--matmul-size", type=int, default=None,
                   help="side of the timed square matmuls (default 8192; 256 with --tiny)")
    p.add_argument("--out", default=None,
                   help="JSON output (default benchmarks/results/gpu_<device name>.json)")
    return p.parse_args(argv)


def fmt(value, spec, scale=1.0):
    return "n/a" if value is None else format(value * scale, spec)


def table(report):
    """The Markdown table of a report (header lines, then one row per configuration)."""
    mm = report["matmul_tflop_per_second"]
    lines = [f"{measure.host(report['machine'])} | torch {report['machine']['torch']} | bf16 "
             f"matmul {mm['bf16']:.3g} TFLOP/s (tf32 {mm['tf32']:.3g}, fp32 {mm['fp32']:.3g}) | "
             f"budget {report['budget_s']:.0f} s, used {report['seconds_used']:.0f} s",
             "peak memory: " + ("torch.cuda.max_memory_allocated per configuration"
                                if report["device"].startswith("cuda")
                                else "the process's peak resident set so far"), ""]
    for B, c in report["flops_counted"].items():
        lines.append(f"batch {B}: one forward pass {c['unit_forward_pass'] / 1e9:.1f} GFLOP; "
                     f"fake update {c['fake_update'] / c['unit_forward_pass']:.2f}, generator "
                     f"update {c['generator_update'] / c['unit_forward_pass']:.2f} passes")
    lines += ["", "| precision | mode | B | fake upd (ms) | gen upd (ms) | cycle 5+1 (ms) | "
              "img/s | TFLOP/s | of bf16 mm | peak (GB) | 400k upd (h) | compile (s) | "
              "cos G, f random | cos G, f near v* | status |",
              "|" + "---|" * 15]
    for r in report["rows"]:
        sec = r.get("seconds", {})
        cos = [(r.get("gradient_vs_eager_fp32", {}).get(state) or {}).get("generator")
               for state in STATES]
        lines.append(
            f"| {r['precision']} | {r['mode']} | {r['batch']} | "
            f"{fmt(sec.get('fake_update'), '.1f', 1e3)} | "
            f"{fmt(sec.get('generator_update'), '.1f', 1e3)} | "
            f"{fmt(sec.get('cycle'), '.1f', 1e3)} | {fmt(r.get('images_per_second'), '.0f')} | "
            f"{fmt(r.get('flop_per_second'), '.3g', 1e-12)} | "
            f"{fmt(r.get('fraction_of_bf16_matmul'), '.1%')} | "
            f"{fmt(r.get('peak_memory_mb'), '.2f', 1 / 1024)} | "
            f"{fmt(r.get('projected_hours_400k_updates'), '.1f')} | "
            f"{fmt(sec.get('compile') if r['mode'] == 'compiled' else None, '.0f')} | "
            + " | ".join(fmt(c and c["cosine"], ".6f") for c in cos) + f" | {r['status']}"
            + ("" if r.get("finite_gradients", True) else ", NaN/inf in the gradients") + " |")
    return "\n".join(lines)


def main(args):
    start = time.perf_counter()
    budget = Budget(args.budget_s)
    try:
        device = common.pick_device(args.device)
        if device.type != "cuda" and not args.tiny:
            print(f"note: no CUDA device, running on {device}; this suite is sized for a GPU")
        files = measure.scratch_files(max(args.batch_sizes), cond=False,
                                    net_config=TINY_NET if args.tiny else None)
        n = args.matmul_size or (256 if args.tiny else 8192)
        common.configure_backends(device, "fp32")
        matmul = {"bf16": measure.matmul_rate(device, torch.bfloat16, n),
                  "fp32": measure.matmul_rate(device, torch.float32, n)}
        common.configure_backends(device, "tf32")
        matmul["tf32"] = measure.matmul_rate(device, torch.float32, n)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
        out = args.out or os.path.join(ROOT, "benchmarks", "results", "gpu_" + re.sub(
            r"[^A-Za-z0-9]+", "_", name).strip("_") + ("_tiny" if args.tiny else "") + ".json")
        report = {"machine": measure.machine(device), "device": str(device), "device_name": name,
                  "network": "tiny (tests)" if args.tiny else "paper (unet.UNet() defaults)",
                  "args": vars(args), "budget_s": args.budget_s, "matmul_size": n,
                  "matmul_tflop_per_second": {k: v / 1e12 for k, v in matmul.items()},
                  "flops_counted": {}, "rows": [], "seconds_used": 0.0}
        shared = {"batches": {}, "flops": report["flops_counted"], "reference": {},
                  "matmul": matmul}
        for config in plan(args):
            mode, B, precision = config
            row = {"mode": mode, "batch": B, "precision": precision}
            need = estimate(config, report["rows"], args)
            if budget.spent:
                row["status"] = "skipped: the time budget is spent"
            elif need is not None and need > budget.left():
                row["status"] = (f"skipped: needs about {need:.0f} s, {max(0, budget.left()):.0f}"
                                 f" s of the budget left")
            else:
                try:
                    row = budget.run(lambda: measure_config(config, args, files, shared))
                except OutOfTime:
                    row["status"] = "stopped: the time budget ran out during this configuration"
                except Exception as e:  # one failing configuration must not sink the suite
                    row["status"] = ("stopped: the time budget ran out during this "
                                     "configuration" if budget.spent else
                                     f"failed: {type(e).__name__}: "
                                     f"{(str(e).splitlines() or [''])[0][:160]}")
                torch._dynamo.reset()  # compiled code holds on to the configuration's state
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            report["rows"].append(row)
            report["seconds_used"] = time.perf_counter() - start
            print(f"{precision} {mode} B={B}: {row['status']}"
                  + (f", cycle {row['seconds']['cycle'] * 1e3:.1f} ms" if "seconds" in row
                     else ""), flush=True)
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            with open(out, "w") as f:
                json.dump(report, f, indent=2)
    finally:
        budget.close()
    print("\n" + table(report))
    print(f"\nwrote {out}")
    return report
