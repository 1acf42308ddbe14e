"""One way to load a teacher: `load_teacher(path)` is the flow field v*(t, x, y) of any matching
model this repository reads, in its own convention (t = 0 noise, t = 1 data,
x_t = t x1 + (1 - t) x0, x0 ~ N(0, I)):

- our train_teacher.py checkpoints and the authors' teacher files (flow matching: the U-Net
  is the field itself);
- EDM's network pickles (`edm-cifar10-32x32-{uncond,cond}-vp.pkl`, `edm-{ffhq,afhqv2}-64x64-
  uncond-vp.pkl`, `edm-imagenet-64x64-cond-adm.pkl`, the `baseline-*` VP / VE pickles and
  `network-snapshot-*.pkl` of EDM's training loop) and EDM2's (`edm2-img64-*.pkl`; the
  latent `edm2-img512-*.pkl`, whose field works on VAE latents: latents.py), read by
  net_pickles.py without their code and without executing anything from the file, and
  diffusion teachers trained here (train_teacher.py --param edm): denoisers D(x; sigma, y),
  turned into flow fields by networks.DenoiserField;
- diffusers folders (a UNet2DModel with a DDPM / DDIM scheduler, safetensors weights only),
  turned into flow fields by matching signal-to-noise ratios (diffusers_teacher.py).

EDM's and EDM2's weights are CC BY-NC-SA 4.0 (NVlabs/edm, NVlabs/edm2): models distilled from
them inherit that license. google/ddpm-* weights are Apache-2.0.
"""
import math

import torch

import checkpoints
import diffusers_teacher
import latents
import net_pickles
import networks
import unet

EDM_SUFFIXES = (".pkl",)


def load_teacher(path, ema=None, device="cpu", fallback=None):
    """The teacher in `path` as a flow field module: forward(t, x, y=None) = v*(t, x, y) (an
    image-to-image teacher also takes its source s), in eval mode, without gradients, on
    `device`.

    ema: None for the file's default weights (the first EMA of our and the authors' files,
    0.999 for theirs), a decay for that EMA, or "raw" for the raw weights; an EDM pickle holds
    one network, its EMA under the key `ema`, whatever `ema` says. fallback: the U-Net config
    of an authors' file (no config inside; default: the paper network at 32x32). The module
    carries `config` (to rebuild it), `coupling` (image-to-image teachers) and, for denoisers,
    `t_min`, `t_max` and `latents` (what decodes a latent network's outputs, else None).
    """
    path = str(path)
    if path.endswith(EDM_SUFFIXES):  # EDM keeps one network, its EMA, under `ema`: `ema` n/a
        data = net_pickles.load_edm_pickle(path)
        net = networks.DenoiserField(net_pickles.network_in(data, path),
                                     latents=latents.latent_settings(data.get("encoder"), path))
        net.coupling = None
        return net.to(device).eval().requires_grad_(False)
    if diffusers_teacher.is_diffusers_folder(path):  # a run folder has no config.json
        net = diffusers_teacher.load_diffusers_teacher(path)
        return net.to(device).eval().requires_grad_(False)
    ckpt = checkpoints.load_checkpoint(path, "teacher checkpoint")  # a run folder: its latest.pt
    return teacher_from_checkpoint(ckpt, path, ema, fallback).to(device)


def teacher_from_checkpoint(ckpt, path, ema=None, fallback=None):
    """load_teacher for a checkpoint already read (ours or the authors'), on the CPU."""
    checkpoints.require_kind(ckpt, "teacher", path)
    if ema is None:
        ema = checkpoints.first_ema(ckpt)
    sd = checkpoints.pick_weights(ckpt, None if ema == "raw" else ema, path)
    cfg = networks.net_config_from(ckpt, sd, fallback or unet.PAPER_CONFIG)
    net = networks.build_network(cfg, sd, dropout=0.0, what=f"teacher weights in {path}")
    net.coupling = ckpt.get("config", {}).get("coupling")
    return net.eval().requires_grad_(False)


@torch.no_grad()
def edm_heun(net, z, y=None, steps=18, rho=7.0, sigma_min=0.002, sigma_max=80.0):
    """EDM's deterministic sampler (Karras et al. 2022, Algorithm 1) for a DenoiserField: Heun's
    method on dx/dsigma = (x - D(x; sigma)) / sigma over the noise levels
    sigma_i = (sigma_max^(1/rho) + i / (steps - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
    i < steps, then sigma_steps = 0, from x = sigma_0 z; 2 steps - 1 evaluations (EDM's
    CIFAR-10 setting: 18 steps, 35 evaluations). The range is clipped to the denoiser's own,
    and each sigma_i is rounded to a level the denoiser supports (its round_sigma, as EDM's
    generate.py does: iDDPM's networks know only their M + 1 levels u_j; the others' is the
    identity). A diffusers teacher's field (diffusers_teacher.DiffusersField) is its own
    denoiser, with its schedule's sigma range."""
    d = getattr(net, "denoiser", net)
    sigma_min = max(sigma_min, float(getattr(d, "sigma_min", 0.0)))
    sigma_max = min(sigma_max, float(getattr(d, "sigma_max", math.inf)))
    i = torch.arange(steps, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + i / max(steps - 1, 1) *
              (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    round_sigma = getattr(d, "round_sigma", None)
    if round_sigma is not None:
        sigmas = torch.as_tensor(round_sigma(sigmas), dtype=torch.float64).cpu()
    sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)]).tolist()

    def slope(x, sigma):
        s = torch.full((len(x),), sigma, device=x.device)
        return (x - net.denoise(x, s, y)) / sigma

    x = z.double() * sigmas[0]
    for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
        d_cur = slope(x.float(), s_cur).double()
        x_next = x + (s_next - s_cur) * d_cur
        if s_next > 0:
            d_next = slope(x_next.float(), s_next).double()
            x_next = x + (s_next - s_cur) * (d_cur + d_next) / 2
        x = x_next
    return x.float()
