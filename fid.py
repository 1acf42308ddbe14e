"""Frechet Inception Distance with the TensorFlow protocol, in plain PyTorch.

The paper's FIDs (its section 4) compare 50,000 generated images with the 50,000 CIFAR-10
training images using clean-fid's "legacy_tensorflow" mode, i.e. the TensorFlow FID of TTUR.
This file computes the same quantity offline, without clean-fid or pytorch-fid:

    # 1. reference statistics of the CIFAR-10 training set (once; writes mu, sigma, mode, n)
    python fid.py ref --data cifar10 --out cifar10_train_tf.npz

    # 2. FID of three independent 50k sample sets (uint8 NHWC .npz files written by sample.py,
    #    generated with three different seeds); prints each FID, then mean and std
    python fid.py calc samples_0.npz samples_1.npz samples_2.npz --ref cifar10_train_tf.npz

Expected results, as published in the paper (its numbers, not measured with this file):
teacher (Euler, NFE = 100) 3.57 unconditional / 5.56 conditional; RealUID alpha = beta = 1
2.58 / 2.21; RealUID best (alpha, beta) = (0.94, 0.96) uncond, (0.98, 0.96) cond 2.28 / 2.02;
fine-tuned (0.94, 1.0) 2.03 / 1.91; the authors' released fine-tuned checkpoints 1.91 / 1.77.

Cost: the network does about 6 GFLOP per 299x299 image. On a 2-core AMD EPYC VM it runs at
13.6 img/s (benchmarks/bench_fid.py; pytorch-fid 9.7), so a 50k pass takes about an hour
there; by the FLOP count it should take minutes on one GPU (not measured here).

The network, its preprocessing and the statistics files are inception.py's (the training
scripts import it for their in-training FID); this file reads images and is the command.
eval_pairs.py scores image-to-image models.
"""
import startup  # noqa: F401  (first: Ctrl-C works while torch loads)
import os
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np


import run_folder
import common
import image_data
import inception


# ----------------------------------------------------------------------------------------------
# Image sources: everything becomes a uint8 array [N, H, W, 3].

def _read_image(path):
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def load_images(source, data_root="./data", workers=8):
    """uint8 [N, H, W, 3] from "cifar10" (training set, torchvision), an image folder
    (png/jpg/jpeg/webp/bmp, not recursive) or an .npz (key `images`, `arr_0` or a single array)."""
    if source == "cifar10":
        from torchvision.datasets import CIFAR10
        try:
            images = CIFAR10(data_root, train=True, download=True).data
        except Exception as e:
            raise inception.FIDError(f"could not load CIFAR-10 from {data_root} ({e}); put "
                           "cifar-10-python.tar.gz there or pass --data-root")
    elif os.path.isdir(source):
        files = sorted(os.path.join(source, f) for f in os.listdir(source)
                       if f.lower().endswith(image_data.IMAGE_SUFFIXES))
        if not files:
            raise inception.FIDError(f"no {'/'.join(e[1:] for e in image_data.IMAGE_SUFFIXES)} images in folder "
                           f"{source}")
        with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL decodes outside the GIL
            arrays = list(pool.map(_read_image, files))
        sizes = sorted({a.shape for a in arrays})
        if len(sizes) > 1:
            raise inception.FIDError(f"images in {source} have different sizes {sizes[:3]}; resize them to "
                           "one size first")
        images = np.stack(arrays)
    elif source.endswith(".npz") and os.path.isfile(source):
        with inception._open_npz(source) as f:
            keys = ([k for k in ("images", "arr_0") if k in f.files]
                    or (f.files if len(f.files) == 1 else []))
            if not keys:
                raise inception.FIDError(f"{source} has keys {f.files}; store the images under 'images' "
                               "(uint8 [N, H, W, 3])")
            images = f[keys[0]]
    else:
        raise inception.FIDError(f"{source} is not 'cifar10', an image folder or an existing .npz file")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise inception.FIDError(f"{source}: expected uint8 images [N, H, W, 3], got {images.dtype} "
                       f"{images.shape}; quantise with "
                       "(x.clamp(-1, 1) * 127.5 + 128).clamp(0, 255).to(torch.uint8) and use NHWC")
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def check_source(source):
    """Fail early (before any weights download) on an image source that cannot be read."""
    if (source == "cifar10" or os.path.isdir(source)
            or (source.endswith(".npz") and os.path.isfile(source))):
        return
    raise inception.FIDError(f"{source} is not 'cifar10', an image folder or an existing .npz file")


# ----------------------------------------------------------------------------------------------
# Command line.


def build_parser():
    parser = common.Parser(description="FID with the TensorFlow protocol (see the module "
                                       "docstring).")
    sub = parser.add_subparsers(dest="command", required=True)
    ref = sub.add_parser("ref", help="compute reference statistics (mu, sigma) of a data set")
    inception.add_feature_args(ref)
    ref.add_argument("--data", required=True,
                     help="'cifar10' (the 50,000 training images, via torchvision), an image "
                          "folder, or an .npz of uint8 [N, H, W, 3] images")
    ref.add_argument("--data-root", default="./data", help="where torchvision keeps CIFAR-10")
    ref.add_argument("--out", required=True,
                     help="statistics file to write, e.g. cifar10_train_tf.npz")
    calc = sub.add_parser("calc", help="FID of sample sets against reference statistics")
    inception.add_feature_args(calc)
    calc.add_argument("samples", nargs="+",
                      help="sample sets: .npz of uint8 [N, H, W, 3] (as sample.py writes), image "
                           "folders, or statistics .npz files; the paper averages 3 sets of 50,000")
    calc.add_argument("--ref", required=True,
                      help="reference statistics from `fid.py ref` (pytorch-fid / clean-fid files "
                           "also work)")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def _stats_of_images(source, extractor, args):
    images = load_images(source, getattr(args, "data_root", "./data"), args.workers)
    print(f"fid.py: {source}: {len(images)} images {images.shape[1]}x{images.shape[2]}, "
          f"mode {args.mode}, device {extractor.device}", file=sys.stderr)
    if len(images) <= inception.FEATURE_DIM:
        print(f"fid.py: warning: {source} has {len(images)} images, not more than {inception.FEATURE_DIM}: "
              "the covariance is singular and the FID strongly biased; use 50,000 to compare with "
              "published numbers", file=sys.stderr)
    return inception.feature_stats(inception.iter_batches(images, args.batch_size), extractor, progress=True,
                         total=len(images))


def is_stats_npz(path):
    """Whether `path` is a statistics file (`fid.py ref`'s, pytorch-fid's, clean-fid's: an
    .npz with mu and sigma), which `ref --out` may replace; only the zip directory is read."""
    try:
        with zipfile.ZipFile(path) as z:
            return {"mu.npy", "sigma.npy"} <= set(z.namelist())
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return False


def main(args):
    if args.command == "ref":  # before any work: never over a checkpoint or another file
        run_folder.check_output_file(args.out, "--out", is_stats_npz,
                                      "a statistics file (.npz with mu and sigma)")
    device = common.pick_device(args.device).type
    for source in ([args.data] if args.command == "ref" else args.samples):
        check_source(source)
    extractor = None

    def get_extractor():
        nonlocal extractor
        if extractor is None:
            extractor = inception.InceptionFeatures(args.weights, args.mode, device)
        return extractor

    if args.command == "ref":
        ext = get_extractor()
        mu, sigma, n = _stats_of_images(args.data, ext, args)
        inception.save_stats(args.out, mu, sigma, args.mode, n, weights=ext.weights_sha256)
        print(f"wrote {args.out}: n={n}, mode={args.mode}")
        return

    ref = inception.load_stats(args.ref)
    all_stats = all(inception.is_stats_file(s) for s in args.samples)
    weights_sha = ref["weights"] if all_stats else get_extractor().weights_sha256
    inception.check_compatible(ref, args.ref, args.mode, weights_sha)
    scores = []
    for source in args.samples:
        if inception.is_stats_file(source):
            stats = inception.load_stats(source)
            inception.check_compatible(stats, source, args.mode, weights_sha)
            mu, sigma, n = stats["mu"], stats["sigma"], stats["n"]
        else:
            mu, sigma, n = _stats_of_images(source, get_extractor(), args)
        scores.append(inception.frechet_distance(mu, sigma, ref["mu"], ref["sigma"]))
        print(f"{source}: FID {scores[-1]:.4f} (n={n}, mode={args.mode}, "
              f"ref n={ref['n'] or 'unknown'})")
    if len(scores) > 1:
        print(f"mean FID {np.mean(scores):.4f} +- {np.std(scores, ddof=1):.4f} "
              f"(std over {len(scores)} sets, ddof=1)")


if __name__ == "__main__":
    common.cli(main, parse_args)
