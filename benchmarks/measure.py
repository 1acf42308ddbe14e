"""What the benchmarks measure with: the machine, timing, FLOP counting, scratch runs on random
networks, distill.py's updates as callables, and gradient comparisons.

Shared by benchmarks/bench.py, its suites (gpu_suite.py, precision_study.py) and the other
benchmarks; it imports no benchmark, so that no two benchmarks import each other through it.
"""
import datetime
import math
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import coupling
import distill
import flow
import players
import unet


# ---------------------------------------------------------------------------------------------
# The machine.

def machine(device=None):
    """The host a measurement ran on: CPU model, cores, torch threads, versions, the date (and
    the GPU's properties for a CUDA `device`)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    m = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
         "torch": torch.__version__, "python": platform.python_version(),
         "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
         "date": datetime.date.today().isoformat()}
    if device is not None and device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        m["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}",
                    "memory_gb": p.total_memory / 2**30,
                    "multiprocessors": p.multi_processor_count,
                    "cuda_runtime": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    return m


def host(m):
    """One line naming the host and the date of a `machine()` record: 'AMD EPYC, 2 cores,
    2026-12-02' (the GPU first when there is one)."""
    gpu = (m.get("gpu") or {}).get("name")
    return ", ".join([*([gpu] if gpu else []), m["cpu"], f"{m['cores']} cores",
                      m.get("date", "date not recorded")])


# ---------------------------------------------------------------------------------------------
# Timing and counting.

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


# ---------------------------------------------------------------------------------------------
# Scratch runs: random networks, random data, distill.py's own set-up and updates.

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
    return dargs, distill.setup(dargs, players.Process(dargs.device))  # resolves --precision


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
            flow.generate(s.gen, z, y, src, s.t_g)
    return g_forward


# ---------------------------------------------------------------------------------------------
# Gradients.

def update_gradient(update, player, s, dargs, batch):
    """The flattened gradient (float64, on the CPU) that one of distill.py's updates
    (`distill.fake_update` with `s.fake_player`, `distill.generator_update` with
    `s.gen_player`) computes on `batch`, before clipping: the update runs with no clipping and
    with the player's step replaced by a read of the gradients, so the optimizer is not stepped
    (a generator update still moves its EMAs) and the gradients are cleared. With fp16 the
    update's gradient scale is undone by its own unscaling; after an overflow the scaler halves
    the scale and the update runs again, as between training updates. Returns (gradient,
    value of the objective, scale used)."""
    read = {}

    def read_gradient():
        read["grad"] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p))
                                  .flatten().double().cpu() for p in player.params])
        read["scale"] = player.scaler.get_scale() if player.scaler.is_enabled() else 1.0
        player.scaler.update()
        player.opt.zero_grad(set_to_none=True)

    clip, dargs.grad_clip, player.step = dargs.grad_clip, math.inf, read_gradient
    try:
        while True:
            terms, _ = update(s, dargs, batch)
            if torch.isfinite(read["grad"]).all() or read["scale"] <= 1:
                return read["grad"], float(sum(terms.values())), read["scale"]
    finally:
        dargs.grad_clip = clip
        del player.step  # the class's step again


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
