"""Check diffusers_teacher.py against diffusers itself (a local check: needs
`pip install diffusers safetensors`, which CI does not install).

    python benchmarks/check_diffusers.py                  # tiny random UNets, every schedule
                                                          # and prediction type (~15 s, 2 cores)
    python benchmarks/check_diffusers.py FOLDER [...]     # local diffusers folders, e.g. a
                                                          # DDPMPipeline with safetensors weights

For each model:
- field: our field at integer timesteps against diffusers' own UNet (UNet2DModel.from_pretrained
  of the local folder, never a hub id) converted by DDIM's formulas (v = x1^ - eps^);
- ddim-grid: DDIM (eta 0, clip_sample off) from diffusers' DDIMScheduler against Euler's method
  in t of our field on DDIM's grid of t, from the same noise: equal up to float32 rounding
  (diffusers_teacher's docstring);
- uniform (with --uniform-nfe N): flow.euler with N uniform steps from t_min to t_max against
  DDIM over all training timesteps: both first-order, so they differ by discretization errors
  (tiny random UNets, 500 steps: 7e-4 .. 2e-2 for epsilon and v_prediction; up to 0.14 for
  sample, whose random prediction changes fast in k near the data, where DDIM's grid is coarse
  in t).
Relative errors are max |ours - theirs| / max |theirs|. Exits 1 if field or ddim-grid exceeds
--tolerance.
"""
import argparse
import math
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import diffusers_teacher as dt  # noqa: E402
from flow import euler  # noqa: E402


def relative(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def tiny_models(folder):
    """Random tiny UNets saved as DDPM pipelines: each schedule with each prediction type."""
    from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel
    schedules = {"linear": {}, "squaredcos_cap_v2": {},
                 "scaled_linear": dict(beta_start=0.00085, beta_end=0.012)}
    for i, (name, kw) in enumerate(schedules.items()):
        for kind in dt.PREDICTION_TYPES:
            torch.manual_seed(i)
            unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
                               down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                               up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                               norm_num_groups=4, attention_head_dim=8)
            path = os.path.join(folder, f"{name}-{kind}")
            scheduler = DDIMScheduler(beta_schedule=name, prediction_type=kind, **kw)
            DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
            yield path


@torch.no_grad()
def check(path, args, device):
    from diffusers import DDIMScheduler, UNet2DModel
    field = dt.load_diffusers_teacher(path).to(device)
    unet_dir, _ = dt.diffusers_paths(path)
    theirs = UNet2DModel.from_pretrained(os.path.abspath(unet_dir), use_safetensors=True,
                                         low_cpu_mem_usage=False, torch_dtype=torch.float32)
    theirs = theirs.to(device).eval()
    scheduler = DDIMScheduler.from_config(field.config["scheduler"], clip_sample=False,
                                          thresholding=False, set_alpha_to_one=True)
    abar = scheduler.alphas_cumprod.double()
    T = len(abar)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, *field.image_shape)
    y = torch.randint(0, field.label_dim, (args.batch,), generator=g).to(device) \
        if field.label_dim else None

    def net(x, k):
        return theirs(x, k, class_labels=y).sample

    # field at integer timesteps
    k = torch.linspace(0, T - 1, args.batch).round().long()
    a = abar[k].view(-1, 1, 1, 1).sqrt()
    b = (1 - a ** 2).sqrt()
    t = a / (a + b)
    x_t = torch.randn(shape, generator=g, dtype=torch.float64)
    x_k = x_t / (t ** 2 + (1 - t) ** 2).sqrt()
    out = net(x_k.float().to(device), k.to(device)).double().cpu()
    kind = field.prediction_type
    x1, eps = {"epsilon": lambda: ((x_k - b * out) / a, out),
               "sample": lambda: (out, (x_k - a * out) / b),
               "v_prediction": lambda: (a * x_k - b * out, a * out + b * x_k)}[kind]()
    ours = field(t.flatten().float().to(device), x_t.float().to(device), y).cpu()
    row = {"field": relative(ours, x1 - eps)}

    def ddim(steps):
        scheduler.set_timesteps(steps)
        x = z.clone()
        for kk in scheduler.timesteps:
            x = scheduler.step(net(x, kk.to(device)), kk, x, eta=0.0).prev_sample
        return x

    z = torch.randn(shape, generator=g).to(device)
    start = time.time()
    ref = ddim(args.steps)
    ts = dt.t_of_alpha_bar(abar[scheduler.timesteps]).tolist() + [1.0]
    x = z * math.sqrt(ts[0] ** 2 + (1 - ts[0]) ** 2)
    for t0, t1 in zip(ts[:-1], ts[1:]):
        x = x + (t1 - t0) * field(torch.full((len(z),), t0, device=device), x, y)
    row["ddim-grid"] = relative(x, ref)
    if args.uniform_nfe:
        ref = ddim(T)
        s0 = math.sqrt(field.t_min ** 2 + (1 - field.t_min) ** 2)
        x = euler(field, z * s0 / (1 - field.t_min), y, nfe=args.uniform_nfe, t0=field.t_min,
                  t1=field.t_max)
        row["uniform"] = relative(x, ref)
    row["seconds"] = time.time() - start
    return field, row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="*", help="local diffusers folders (default: tiny random)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of the ddim-grid check")
    p.add_argument("--uniform-nfe", type=int, default=0,
                   help="also compare flow.euler with this many uniform steps to DDIM over all "
                        "timesteps (slow for a real model)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    dt.require_diffusers("this check")
    device = torch.device(args.device)
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.folders or tiny_models(tmp):
            field, row = check(path, args, device)
            worst = max(worst, row["field"], row["ddim-grid"])
            cells = "  ".join(f"{k} {v:.2e}" if k != "seconds" else f"{v:.1f} s"
                              for k, v in row.items())
            print(f"{os.path.basename(path.rstrip('/')):32s} {field.prediction_type:12s} "
                  f"t in [{field.t_min:.5f}, {field.t_max:.5f}]  {cells}")
    print(f"worst relative error {worst:.2e} (tolerance {args.tolerance:.0e})")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
