"""Sample from any checkpoint, ours or the authors': a distilled generator in one step, a teacher
with Euler steps. Writes an .npz of uint8 images [N, H, W, C] (key `images`, plus `labels` for
class-conditional models) that fid.py reads, and/or a PNG grid.

    # 50k one-step samples for FID (EMA 0.999 weights; the paper: FID 2.28 uncond at (0.94, 0.96))
    python sample.py --ckpt runs/distill/latest.pt --n 50000 --out samples.npz
    # the teacher with 100 Euler steps (the paper: FID 3.57 uncond, 5.56 cond)
    python sample.py --ckpt runs/teacher/latest.pt --nfe 100 --n 50000 --out teacher.npz
    # a grid from the authors' released fine-tuned generator (EMA 0.9999)
    python sample.py --ckpt cifar10_uncond_finetuned.pt --ema 0.9999 --n 100 --out grid.png
    # a latent model (EDM2 img512 and its generators): decoded by the VAE folder you supply
    python sample.py --ckpt runs/img512/latest.pt --vae sd-vae-ft-mse --n 50000 --out img512.npz
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
import os
import zipfile

import numpy as np
import torch

import common
import diffusers_teacher
import latents
import networks
import run_folder
import sampling


# ---------------------------------------------------------------------------------------------
# Image-to-image: the sources to translate


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
    p.add_argument("--vae", default=None, metavar="FOLDER",
                   help="a latent model's VAE (EDM2 img512 teachers and their generators: a "
                        "local diffusers AutoencoderKL folder such as stabilityai/sd-vae-ft-mse),"
                        " which decodes its latents into images (latents.py)")
    p.add_argument("--export-diffusers", default=None, metavar="FOLDER",
                   help="instead of sampling, write the distilled generator of a diffusers "
                        "teacher as a diffusers UNet2DModel folder (config.json, safetensors, "
                        "scheduler_config.json; a new folder), loadable with "
                        "UNet2DModel.from_pretrained(FOLDER)")
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


def is_samples_file(path):
    """Whether `path` is what sample.py writes, which a new run may replace: a PNG, or an .npz
    whose arrays are `images` (and labels / sources); only the zip directory is read."""
    if path.endswith(".png"):
        with open(path, "rb") as f:
            return f.read(8) == b"\x89PNG\r\n\x1a\n"
    try:
        with zipfile.ZipFile(path) as z:
            return "images.npy" in z.namelist()
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return False


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
        # never over a checkpoint or another command's file: only samples this command wrote
        run_folder.check_output_file(out, "--out", is_samples_file,
                                     "a samples .npz or grid .png of sample.py")
    device = common.pick_device(args.device)
    model = sampling.load_model(args.ckpt, args.ema, common.net_config_from_args(args))
    if args.export_diffusers:
        if model.kind != "distilled" or not diffusers_teacher.is_diffusers_field(model.net):
            common.fail(f"--export-diffusers: {args.ckpt} is not a generator distilled from a "
                        "diffusers teacher")
        diffusers_teacher.export_diffusers_unet(model.net, args.export_diffusers, t_g=model.t_g)
        print(f"wrote {args.export_diffusers} ({'raw' if model.ema is None else f'EMA {model.ema}'}"
              f" weights; one step from t_g = {model.t_g:.6g}, recorded under _realuid in "
              "config.json)")
        return
    if isinstance(model.net, networks.DenoiserField):  # an fp16 pickle: float16 only if asked
        model.net.set_fp16(args.precision == "fp16")
    model.net.to(device).eval()
    shape = networks.image_shape(model.net)
    settings = networks.latent_settings(model.net)
    codec = latents.open_codec(settings, args.vae, shape, device, args.ckpt)
    if settings and codec is None:
        latents.needs_vae(settings, "sampling")
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
    labels = common.class_labels(n, networks.num_classes(model.net), args.label)
    if args.label is not None and labels is None:
        common.fail("--label given but the model is unconditional; drop --label")

    images = []
    for lo in range(0, n, args.batch_size):
        hi = min(n, lo + args.batch_size)
        z = sampling.latents(args.seed, lo, hi - lo, shape).to(device)
        y = None if labels is None else labels[lo:hi].to(device)
        with amp:
            x = sampling.one_pass(model, z, y, nfe=args.nfe, sampler=args.sampler)
        images.append((codec.decode(x) if codec else common.to_uint8(x.float())).cpu())
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
        src, targets, labels = sampling.read_sources(args.source, shape)
        n = min(args.n or len(src), len(src))
        src, targets = common.from_uint8(src[:n]), None if targets is None else targets[:n]
        labels = None if labels is None else labels[:n]
    else:
        src, targets, labels = sampling.held_out_pairs(args.data, model.coupling, shape, args.n,
                                              args.seed, args.data_root)
    classes = networks.num_classes(model.net)
    if classes is not None and (labels is None or args.label is not None):
        labels = common.class_labels(len(src), classes, args.label)
    elif classes is None:
        labels = None
    k = args.per_source
    images = sampling.translate(model, src, labels, k, args.seed, args.batch_size, device, amp, args.nfe)
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
