"""Sample from any checkpoint, ours or the authors': a distilled generator in one step, a teacher
with Euler steps. Writes an .npz of uint8 images [N, H, W, C] (key `images`, plus `labels` for
class-conditional models) that fid.py reads, and/or a PNG grid.

    # 50k one-step samples for FID (EMA 0.999 weights; the paper: FID 2.28 uncond at (0.94, 0.96))
    python sample.py --ckpt runs/distill/latest.pt --n 50000 --out samples.npz
    # the teacher with 100 Euler steps (the paper: FID 3.57 uncond, 5.56 cond)
    python sample.py --ckpt runs/teacher/latest.pt --nfe 100 --n 50000 --out teacher.npz
    # a grid from the authors' released fine-tuned generator (EMA 0.9999)
    python sample.py --ckpt cifar10_uncond_finetuned.pt --ema 0.9999 --n 100 --out grid.png
    # image-to-image (Appendix C): translate images, 4 restorations each, in one step
    python sample.py --ckpt runs/sr4/latest.pt --source low_res/ --per-source 4 --out sr.npz sr.png
    # ... or corrupt held-out images with the model's own task (the grid shows the targets)
    python sample.py --ckpt runs/sr4/latest.pt --data heldout.npz --n 16 --out sr.png

Conventions: the generator maps noise z to x = z + G(0, z, y) (flow.generate, Appendix D);
the teacher integrates dx/dt = v*(t, x, y) from t = 0 (x = z) to t = 1, so a teacher sampled with
--nfe 1 gives exactly the generator's starting point z + v*(0, z). The authors' own sampler runs
torchdyn Euler on 100 time points, i.e. 99 steps; `--nfe 99` reproduces it.
Images are quantised as in the paper's FID protocol (fid.py). Labels are balanced,
`arange(n) % classes`, or all equal to --label (a pairs file's own labels when translating).
Image i depends only on (--seed, i), not on the batch size. An image-to-image model starts from
kappa s + sigma_s eps (coupling.py) with eps the noise of (--seed, i).
"""
import startup  # noqa: F401  (first: Ctrl-C works while torch loads)
import argparse
import os

import numpy as np
import torch

import common
import coupling
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
    if path.endswith(teachers.EDM_SUFFIXES):
        net = teachers.load_teacher(path)
        return argparse.Namespace(net=net, kind="teacher", ema=None, ckpt={}, coupling=None,
                                  t_g=0.0)
    ckpt = common.load_checkpoint(path, "checkpoint")  # a run folder: its latest.pt
    kind = common.checkpoint_kind(ckpt)
    if kind is None:
        common.fail(f"{path} holds neither a teacher (net_model/ema_models) nor a generator "
                    f"(gen/ema_gens); keys: {sorted(ckpt)}")
    ema = common.first_ema(ckpt) if ema == "first" else ema
    if kind == "teacher":
        net = teachers.teacher_from_checkpoint(ckpt, path, "raw" if ema is None else ema,
                                               fallback_cfg)
    else:
        sd = common.pick_weights(ckpt, ema, path)
        cfg = common.net_config_from(ckpt, sd, fallback_cfg)
        net = teachers.build(cfg, sd, dropout=0.0, what=f"weights in {path}")
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
        if not teachers.is_diffusion(model.net):
            common.fail("--sampler heun is EDM's sampler for diffusion teachers; sample a "
                        "flow-matching teacher with --sampler euler")
        return teachers.edm_heun(model.net, z, y, steps=(nfe + 1) // 2)
    t0, t1 = teachers.t_range(model.net)
    return euler(model.net, z, y, s, nfe=nfe, t0=t0, t1=t1)


# ---------------------------------------------------------------------------------------------
# Image-to-image: the sources to translate

def read_sources(path, shape):
    """uint8 sources [N, C, H, W] from an .npz (its `source` array, else `images`), a folder of
    images or a single image file, at the model's size (C, H, W); returns (sources, targets or
    None, labels or None): a pairs .npz also gives its targets and labels."""
    c, h, w = shape
    targets = labels = None
    if path.endswith(".npz"):
        if not os.path.isfile(path):
            common.fail(f"--source {path} does not exist")
        images, labels, src = common.read_npz_images(path)
        src, targets = (images, None) if src is None else (src, images)
        src = torch.from_numpy(src).permute(0, 3, 1, 2).contiguous()
        targets = None if targets is None else torch.from_numpy(targets).permute(0, 3, 1, 2)
        labels = None if labels is None else torch.from_numpy(np.asarray(labels)).long()
    elif os.path.isdir(path) or os.path.isfile(path):
        from PIL import Image
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                       if f.lower().endswith(common.IMAGE_SUFFIXES)) if os.path.isdir(path) \
            else [path]
        if not files:
            common.fail(f"no images ({', '.join(common.IMAGE_SUFFIXES)}) found under {path}")
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
    data = common.open_data(data_path, data_root, shape[-1])
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


NET_FLAGS = ("num_channels", "channel_mult", "num_res_blocks", "attention_resolutions",
             "num_heads", "num_head_channels")


def ema_choice(text):
    """--ema: 'first' (the first EMA the checkpoint tracks), 'none' (raw weights) or a decay."""
    return "first" if str(text).lower() == "first" else common.decay_or_none(text)


def build_parser():
    p = common.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="teacher or distilled checkpoint (ours or the "
                   "authors')")
    p.add_argument("--ema", type=ema_choice, default="first",
                   help="EMA decay whose weights to use, 'first' for the first EMA the "
                        "checkpoint tracks (the authors' files: 0.999), 'none' for raw weights")
    p.add_argument("--n", type=common.positive_int, default=None,
                   help="number of images (default 64); for image-to-image models the number "
                        "of sources (default: all)")
    p.add_argument("--out", nargs="+", default=["samples.png"],
                   help="output file(s): .npz (uint8 NHWC `images`, `labels`; for "
                        "image-to-image also `source` and `targets`, aligned) and/or .png grid")
    p.add_argument("--seed", type=common.count, default=0,
                   help="image i uses the noise of (seed, i)")
    p.add_argument("--nfe", type=common.positive_int, default=100,
                   help="Euler steps for a teacher (ignored for a one-step generator)")
    p.add_argument("--sampler", choices=["euler", "heun"], default="euler",
                   help="a teacher's sampler: Euler in t, or EDM's Heun sampler for a diffusion "
                        "teacher (--nfe 35: EDM's 18 steps)")
    p.add_argument("--label", type=common.count, default=None,
                   help="class of every image (conditional models; default: balanced)")
    p.add_argument("--batch-size", type=common.positive_int, default=500,
                   help="images per forward pass")
    p.add_argument("--device", default=None, help="cuda, npu, mps or cpu (default: best)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast precision of the network")
    p.add_argument("--nrow", type=common.positive_int, default=None, help="images per grid row")
    common.add_threads_arg(p)
    g = p.add_argument_group("image-to-image models (Appendix C): what to translate")
    g.add_argument("--source", default=None,
                   help="sources to translate: an .npz (its `source` array, else `images`; a "
                        "pairs file also gives targets), an image folder or one image file, "
                        "at the model's image size")
    g.add_argument("--data", default=None,
                   help="or held-out clean images (an .npz, a folder, cifar10) that the model's "
                        "task corrupts here, or a pairs .npz; the grid then shows the targets")
    g.add_argument("--data-root", default="./data", help="where cifar10 is downloaded")
    g.add_argument("--per-source", type=common.positive_int, default=1,
                   help="translations per source (stochastic restorations: different noise)")
    net = common.add_net_args(p)
    net.title = ("network of a checkpoint without config (the authors' files: the paper "
                 "network); ours describe themselves")
    net.add_argument("--image-size", type=common.positive_int, default=32,
                     help="image size of a checkpoint without config (CIFAR-10: 32, CelebA: 64)")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.given = common.given_flags(parser, argv)
    return args


def write_npz(path, **arrays):
    """uint8 NCHW tensors as NHWC arrays (labels as they are), written atomically."""
    arrays = {k: (v.permute(0, 2, 3, 1) if v.dim() == 4 else v).numpy()
              for k, v in arrays.items() if v is not None}
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def main(args):
    for out in args.out:
        if not out.endswith((".npz", ".png")):
            common.fail(f"--out {out}: use a .npz (images for FID) or .png (grid) file name")
    device = common.pick_device(args.device)
    model = load_model(args.ckpt, args.ema, common.net_config_from_args(args))
    model.net.to(device).eval()
    shape = teachers.image_shape(model.net)
    amp = common.precision_context(device, args.precision)
    given = getattr(args, "given", set())
    if "nfe" in given and model.kind == "distilled":
        print("note: --nfe ignored: a distilled generator samples in one step")
    net_flags = [f"--{k.replace('_', '-')}" for k in sorted(given & {"image_size", *NET_FLAGS})]
    if net_flags and "config" in model.ckpt:
        print(f"note: {', '.join(net_flags)} ignored: the checkpoint describes its own network")
    what = (f"{'one-step' if model.kind == 'distilled' else f'{args.nfe}-step'} samples from "
            f"{args.ckpt} ({'raw' if model.ema is None else f'EMA {model.ema}'} weights)")
    if model.coupling:
        return main_pairs(args, model, shape, device, amp, what)
    if args.source or args.data:
        common.fail(f"{args.ckpt} is a noise-to-image model: --source / --data are for "
                    "image-to-image checkpoints (train_teacher.py --task / pairs)")
    n = args.n or 64
    labels = common.class_labels(n, teachers.num_classes(model.net), args.label)
    if args.label is not None and labels is None:
        common.fail("--label given but the model is unconditional; drop --label")

    images = []
    for lo in range(0, n, args.batch_size):
        hi = min(n, lo + args.batch_size)
        z = latents(args.seed, lo, hi - lo, shape).to(device)
        y = None if labels is None else labels[lo:hi].to(device)
        with amp:
            x = one_pass(model, z, y, nfe=args.nfe, sampler=args.sampler)
        images.append(common.to_uint8(x.float()).cpu())
        if n > args.batch_size:
            print(f"\r{hi}/{n} images", end="", flush=True)
    if n > args.batch_size:
        print()
    images = torch.cat(images)
    for out in args.out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        if out.endswith(".npz"):
            write_npz(out, images=images, labels=labels)
        else:
            common.save_grid(common.from_uint8(images), out, args.nrow)
        print(f"wrote {out}: {n} {what}")


def main_pairs(args, model, shape, device, amp, what):
    """Image-to-image: translate --source (or --data's held-out pairs) and write the outputs
    beside their sources (and targets); the PNG has one row per source: source | outputs |
    target."""
    if bool(args.source) == bool(args.data):
        common.fail(f"{args.ckpt} is an image-to-image model ({model.coupling['task'] or 'pairs'}"
                    "): give exactly one of --source (images to translate) and --data "
                    "(held-out images to corrupt and translate)")
    if args.source:
        src, targets, labels = read_sources(args.source, shape)
        n = min(args.n or len(src), len(src))
        src, targets = common.from_uint8(src[:n]), None if targets is None else targets[:n]
        labels = None if labels is None else labels[:n]
    else:
        src, targets, labels = held_out_pairs(args.data, model.coupling, shape, args.n,
                                              args.seed, args.data_root)
    classes = teachers.num_classes(model.net)
    if classes is not None and (labels is None or args.label is not None):
        labels = common.class_labels(len(src), classes, args.label)
    elif classes is None:
        labels = None
    k = args.per_source
    images = translate(model, src, labels, k, args.seed, args.batch_size, device, amp, args.nfe)
    src = common.to_uint8(src)  # shown and saved as an image (a denoise source is clipped here)
    rep = lambda v: None if v is None else v.repeat_interleave(k, 0)  # noqa: E731
    for out in args.out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        if out.endswith(".npz"):
            write_npz(out, images=images, source=rep(src), targets=rep(targets),
                      labels=rep(labels))
        else:
            m = min(len(src), 32)  # rows shown
            cols = [src[:m, None], images[:m * k].view(m, k, *shape)]
            if targets is not None:
                cols.append(targets[:m, None])
            grid = torch.cat(cols, 1).flatten(0, 1)
            common.save_grid(common.from_uint8(grid), out, k + 1 + (targets is not None))
        print(f"wrote {out}: {len(images)} translations of {len(src)} sources, {what}")


if __name__ == "__main__":
    common.cli(main, parse_args)
