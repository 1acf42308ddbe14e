"""Sample from any checkpoint, ours or the authors': a distilled generator in one step, a teacher
with Euler steps. Writes an .npz of uint8 images [N, H, W, C] (key `images`, plus `labels` for
class-conditional models) that fid.py reads, and/or a PNG grid.

    # 50k one-step samples for FID (EMA 0.999 weights; the paper: FID 2.28 uncond at (0.94, 0.96))
    python sample.py --ckpt runs/distill/latest.pt --n 50000 --out samples.npz
    # the teacher with 100 Euler steps (the paper: FID 3.57 uncond, 5.56 cond)
    python sample.py --ckpt runs/teacher/latest.pt --nfe 100 --n 50000 --out teacher.npz
    # a grid from the authors' released fine-tuned generator (EMA 0.9999)
    python sample.py --ckpt cifar10_uncond_finetuned.pt --ema 0.9999 --n 100 --out grid.png

Conventions: the generator maps noise z to x = z + G(0, z, y) (distill.generate, Appendix D);
the teacher integrates dx/dt = v*(t, x, y) from t = 0 (x = z) to t = 1, so a teacher sampled with
--nfe 1 gives exactly the generator's starting point z + v*(0, z). The authors' own sampler runs
torchdyn Euler on 100 time points, i.e. 99 steps; `--nfe 99` reproduces it.
Images are quantised as in the paper's FID protocol (SPEC 7). Labels are balanced,
`arange(n) % classes`, or all equal to --label. Image i depends only on (--seed, i), not on the
batch size.
"""
import os

import numpy as np
import torch

import common
import distill


@torch.no_grad()
def euler(v, x0, y=None, s=None, *, nfe=100):
    """Integrate dx/dt = v(t, x, y[, s]) from t = 0 (x = x0: noise, or a coupling's start) to
    t = 1 (data) with nfe Euler steps."""
    x, h = x0, 1.0 / nfe
    for i in range(nfe):
        t = torch.full((len(x0),), i * h, device=x0.device, dtype=x0.dtype)
        x = x + h * distill.field(v, t, x, y, s).to(x.dtype)
    return x


def latents(seed, start, n, shape):
    """Noise for images start..start+n-1; image i's noise depends only on (seed, i)."""
    out = torch.empty(n, *shape)
    for j in range(n):
        s = np.random.SeedSequence([seed, start + j]).generate_state(1, np.uint64)[0]
        out[j] = torch.randn(shape, generator=torch.Generator().manual_seed(int(s)))
    return out


def load_model(path, ema, fallback_cfg):
    """(network, kind, EMA decay used) from any checkpoint: generator weights of a distilled
    file, else teacher; ema 'first' is the first EMA the file tracks (None: raw weights)."""
    ckpt = common.load_checkpoint(path, "checkpoint")
    kind = common.checkpoint_kind(ckpt)
    if kind is None:
        common.fail(f"{path} holds neither a teacher (net_model/ema_models) nor a generator "
                    f"(gen/ema_gens); keys: {sorted(ckpt)}")
    ema = common.first_ema(ckpt) if ema == "first" else ema
    sd = common.pick_weights(ckpt, ema, path)
    cfg = common.net_config_from(ckpt, sd, fallback_cfg)
    return common.build_net(cfg, sd, dropout=0.0, what=f"weights in {path}"), kind, ema


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
    p.add_argument("--n", type=common.positive_int, default=64, help="number of images")
    p.add_argument("--out", nargs="+", default=["samples.png"],
                   help="output file(s): .npz (uint8 NHWC + labels) and/or .png grid")
    p.add_argument("--seed", type=common.count, default=0,
                   help="image i uses the noise of (seed, i)")
    p.add_argument("--nfe", type=common.positive_int, default=100,
                   help="Euler steps for a teacher (ignored for a one-step generator)")
    p.add_argument("--label", type=common.count, default=None,
                   help="class of every image (conditional models; default: balanced)")
    p.add_argument("--batch-size", type=common.positive_int, default=500,
                   help="images per forward pass")
    p.add_argument("--device", default=None, help="cuda, npu, mps or cpu (default: best)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast precision of the network")
    p.add_argument("--nrow", type=common.positive_int, default=None, help="images per grid row")
    net = common.add_net_args(p)
    net.title = ("network of a checkpoint without config (the authors' files: the paper "
                 "network); ours describe themselves")
    net.add_argument("--image-size", type=common.positive_int, default=32,
                     help="image size of a checkpoint without config (CIFAR-10: 32, CelebA: 64)")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(args):
    for out in args.out:
        if not out.endswith((".npz", ".png")):
            common.fail(f"--out {out}: use a .npz (images for FID) or .png (grid) file name")
    device = common.pick_device(args.device)
    fallback = common.net_config_from_args(args)
    net, kind, ema = load_model(args.ckpt, args.ema, fallback)
    net.to(device).eval()
    cfg = net.config
    shape = (cfg["in_channels"], cfg["image_size"], cfg["image_size"])
    labels = common.class_labels(args.n, cfg["num_classes"], args.label)
    if args.label is not None and labels is None:
        common.fail("--label given but the model is unconditional; drop --label")
    amp = common.precision_context(device, args.precision)

    images = []
    for lo in range(0, args.n, args.batch_size):
        hi = min(args.n, lo + args.batch_size)
        z = latents(args.seed, lo, hi - lo, shape).to(device)
        y = None if labels is None else labels[lo:hi].to(device)
        with amp:
            x = distill.generate(net, z, y) if kind == "distilled" else \
                euler(net, z, y, nfe=args.nfe)
        images.append(common.to_uint8(x.float()).cpu())
        if args.n > args.batch_size:
            print(f"\r{hi}/{args.n} images", end="", flush=True)
    if args.n > args.batch_size:
        print()
    images = torch.cat(images)
    for out in args.out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        if out.endswith(".npz"):
            arrays = {"images": images.permute(0, 2, 3, 1).numpy()}
            if labels is not None:
                arrays["labels"] = labels.numpy()
            tmp = out + ".tmp"
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, out)
        else:
            common.save_grid(common.from_uint8(images), out, args.nrow)
        print(f"wrote {out}: {args.n} {'one-step' if kind == 'distilled' else f'{args.nfe}-step'}"
              f" samples from {args.ckpt} ({'raw' if ema is None else f'EMA {ema}'} weights)")


if __name__ == "__main__":
    common.cli(main, parse_args)
