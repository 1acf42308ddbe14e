"""Running a trained model: load any checkpoint this repository reads as a field, draw seeded
latents, one sampling pass (one step, Euler or EDM's Heun), and the held-out pairs and
translations of an image-to-image model. sample.py and eval_pairs.py are the commands.
"""
import argparse
import os

import numpy as np
import torch

import checkpoints
import common
import coupling
import diffusers_teacher
import image_data
import networks
import teachers
from flow import euler, generate


def latents(seed, start, n, shape):
    """Noise for images start..start+n-1; image i's noise depends only on (seed, i)."""
    out = torch.empty(n, *shape)
    for j in range(n):
        s = np.random.SeedSequence([seed, start + j]).generate_state(1, np.uint64)[0]
        out[j] = torch.randn(shape, generator=torch.Generator().manual_seed(int(s)))
    return out


def load_model(path, ema, fallback_cfg):
    """A checkpoint's network, ours, the authors' or an EDM pickle: a namespace with `net`,
    `kind` ('distilled': the generator's weights, or 'teacher'), `ema` (the EMA decay used,
    None for raw weights; 'first' asks for the first EMA the file tracks), `coupling` (the
    image-to-image coupling of its config, None for noise-to-image models), `t_g` (a
    generator's start time, flow.generate) and `ckpt` (the loaded file; {} for a pickle).
    Teachers are read by teachers.load_teacher."""
    if path.endswith(teachers.EDM_SUFFIXES) or diffusers_teacher.is_diffusers_folder(path):
        net = teachers.load_teacher(path)
        return argparse.Namespace(net=net, kind="teacher", ema=None, ckpt={}, coupling=None,
                                  t_g=0.0)
    ckpt = checkpoints.load_checkpoint(path, "checkpoint")  # a run folder: its latest.pt
    kind = checkpoints.checkpoint_kind(ckpt)
    if kind is None:
        common.fail(f"{path} holds neither a teacher (net_model/ema_models) nor a generator "
                    f"(gen/ema_gens); keys: {sorted(ckpt)}")
    ema = checkpoints.first_ema(ckpt) if ema == "first" else ema
    if kind == "teacher":
        net = teachers.teacher_from_checkpoint(ckpt, path, "raw" if ema is None else ema,
                                               fallback_cfg)
    else:
        sd = checkpoints.pick_weights(ckpt, ema, path)
        cfg = networks.net_config_from(ckpt, sd, fallback_cfg)
        net = networks.build_network(cfg, sd, dropout=0.0, what=f"weights in {path}")
    config = ckpt.get("config", {})
    return argparse.Namespace(net=net, kind=kind, ema=ema, ckpt=ckpt,
                              coupling=config.get("coupling"), t_g=config.get("t_g", 0.0))


def one_pass(model, z, y=None, s=None, nfe=100, sampler="euler"):
    """A generator in one step (flow.generate), or a teacher with nfe Euler steps in t (a
    diffusion teacher: on its range of t, flow.euler) or EDM's Heun sampler with about nfe
    denoiser evaluations (teachers.edm_heun), from z."""
    if model.kind == "distilled":
        return generate(model.net, z, y, s, model.t_g)
    if sampler == "heun":
        if not networks.is_diffusion(model.net):
            common.fail("--sampler heun is EDM's sampler for diffusion teachers; sample a "
                        "flow-matching teacher with --sampler euler")
        return teachers.edm_heun(model.net, z, y, steps=(nfe + 1) // 2)
    t0, t1 = networks.t_range(model.net)
    return euler(model.net, z, y, s, nfe=nfe, t0=t0, t1=t1)


def read_sources(path, shape):
    """uint8 sources [N, C, H, W] from an .npz (its `source` array, else `images`), a folder of
    images or a single image file, at the model's size (C, H, W); returns (sources, targets or
    None, labels or None): a pairs .npz also gives its targets and labels."""
    c, h, w = shape
    targets = labels = None
    if path.endswith(".npz"):
        if not os.path.isfile(path):
            common.fail(f"--source {path} does not exist")
        images, labels, src = image_data.read_npz_images(path)
        src, targets = (images, None) if src is None else (src, images)
        src = torch.from_numpy(src).permute(0, 3, 1, 2).contiguous()
        targets = None if targets is None else torch.from_numpy(targets).permute(0, 3, 1, 2)
        labels = None if labels is None else torch.from_numpy(np.asarray(labels)).long()
    elif os.path.isdir(path) or os.path.isfile(path):
        from PIL import Image
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                       if f.lower().endswith(image_data.IMAGE_SUFFIXES)) if os.path.isdir(path) \
            else [path]
        if not files:
            common.fail(f"no images ({', '.join(image_data.IMAGE_SUFFIXES)}) found under {path}")
        arrays = []
        for f in files:
            try:
                with Image.open(f) as im:
                    arrays.append(np.asarray(im.convert("RGB" if c == 3 else "L")))
            except OSError as e:
                common.fail(f"cannot read the image {f} ({e})")
        if len({a.shape for a in arrays}) > 1:
            common.fail(f"the images under {path} have different sizes "
                        f"({sorted({a.shape for a in arrays})[:3]}); resize them to the model's "
                        "size")
        stack = np.stack(arrays)
        src = torch.from_numpy(stack[..., None] if stack.ndim == 3 else stack).permute(0, 3, 1, 2)
    else:
        common.fail(f"--source {path} is neither an .npz, an image folder nor an image file")
    if tuple(src.shape[1:]) != shape:
        common.fail(f"--source {path}: the sources are {'x'.join(map(str, src.shape[1:]))} but "
                    f"the model translates {c}x{h}x{w} images; resize them first")
    return src.contiguous(), targets, labels


def held_out_pairs(data_path, coupling_cfg, shape, n, seed, data_root="./data"):
    """(sources, targets, labels or None) of the first n images of --data: a pairs file's own
    sources, or the model's task applied to the clean images (denoise noise from `seed`).
    Sources are float in the network's range, exactly as training feeds them (a denoise
    source x1 + 0.2 n is neither clipped nor quantised); targets are uint8."""
    data = image_data.open_data(data_path, data_root, shape[-1])
    if tuple(data.shape) != tuple(shape):
        common.fail(f"--data images are {'x'.join(map(str, data.shape))} but the model "
                    f"translates {'x'.join(map(str, shape))} images")
    coupling.for_student(coupling_cfg, None, data, "of this checkpoint")
    x_u8, labels, src_u8 = data.get(list(range(min(n or len(data), len(data)))))
    if src_u8 is not None:
        return common.from_uint8(src_u8), x_u8, labels
    x1 = common.from_uint8(x_u8)
    noise = torch.randn(x1.shape, generator=torch.Generator().manual_seed(seed))
    return coupling.corrupt(x1, coupling_cfg["task"], noise), x_u8, labels


@torch.no_grad()
def translate(model, sources, labels, per_source, seed, batch_size, device, amp, nfe):
    """Outputs uint8 [N * per_source, C, H, W] for float sources [N, C, H, W] (the network's
    range, as held_out_pairs gives them), source-major: output i * K + k is the k-th
    translation of source i, from the start kappa s + sigma eps with eps the noise of
    (seed, i * K + k), so it depends neither on the batch size nor on N."""
    c = model.coupling
    src_all = sources.repeat_interleave(per_source, 0)
    y_all = None if labels is None else labels.repeat_interleave(per_source, 0)
    out = []
    for lo in range(0, len(src_all), batch_size):
        hi = min(len(src_all), lo + batch_size)
        s = src_all[lo:hi].to(device)
        z = coupling.start(s, latents(seed, lo, hi - lo, s.shape[1:]).to(device), c["kappa"],
                           c["sigma"])
        y = None if y_all is None else y_all[lo:hi].to(device)
        with amp:
            x = one_pass(model, z, y, s, nfe)
        out.append(common.to_uint8(x.float()).cpu())
    return torch.cat(out)
