"""Throughput of fid.py's Inception feature extraction next to pytorch-fid's (and torch-fidelity's).

All extractors get the same weights (random ones written here, or --weights PATH), the same
uint8 32x32 images, batch size and thread count; they take turns batch by batch (order
rotated) and the median batch time is reported, so that a busy machine penalises them alike.
pytorch-fid and torch-fidelity are only used here, never by fid.py. On a shared CPU, use
--threads 1: OpenMP threads that wait for each other on oversubscribed cores distort timings.

    PYTHONPATH=/opt/ref python benchmarks/bench_fid.py                    # CPU, 64 images
    PYTHONPATH=/opt/ref python benchmarks/bench_fid.py --device cuda --images 2000 --batch-size 200

Prints a table and writes benchmarks/results/bench_fid_<device>.json with the machine description.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import inception  # noqa: E402
from benchmarks import measure  # noqa: E402


def build_extractors(weights, device, hub_dir):
    """name -> function(uint8 batch on device) -> features; references only if importable."""
    ours_tf = inception.InceptionFeatures(weights, mode="tf", device=device)
    ours_pt = inception.InceptionFeatures(weights, mode="pytorch-fid", device=device)
    extractors = {
        "fid.py --mode tf": ours_tf,
        "fid.py --mode pytorch-fid": ours_pt,
    }
    try:
        from pytorch_fid.inception import InceptionV3
    except ImportError:
        print("pytorch-fid not importable (PYTHONPATH=/opt/ref?): its row is skipped",
              file=sys.stderr)
    else:
        # pytorch-fid reads <hub dir>/checkpoints/<name> without checking the hash: point it at
        # our file
        os.makedirs(os.path.join(hub_dir, "checkpoints"), exist_ok=True)
        os.symlink(os.path.abspath(weights), os.path.join(hub_dir, "checkpoints", inception.WEIGHTS_NAME))
        torch.hub.set_dir(hub_dir)
        net = InceptionV3([3]).eval().to(device)

        @torch.no_grad()
        def pytorch_fid(x):  # ToTensor's x / 255, then its forward (resize, 2x - 1, network)
            return net(x.float() / 255)[0]

        extractors["pytorch-fid 0.3.0 InceptionV3([3])"] = pytorch_fid
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        print("torch-fidelity not importable: its row is skipped", file=sys.stderr)
    else:
        tfe = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                          feature_extractor_weights_path=weights).to(device)
        extractors["torch-fidelity 0.4.0 (TF1 resize)"] = lambda x: tfe(x)[0]
    return extractors


def main(args):
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), generator=g,
                           dtype=torch.uint8).to(device)
    batches = [images[i:i + args.batch_size] for i in range(0, args.images, args.batch_size)]
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not comparable with published FIDs")
        weights = args.weights
        if weights is None:
            weights = os.path.join(tmp, "random_inception.pth")
            torch.save(inception.random_inception_state_dict(), weights)
        extractors = build_extractors(weights, device, os.path.join(tmp, "hub"))
        names = list(extractors)
        times = {name: [] for name in names}  # seconds per batch
        for name in names:  # warm-up: one batch each
            extractors[name](batches[0])
        for r in range(args.repeats):
            for b, batch in enumerate(batches):  # interleaved per batch, order rotated
                for k in range(len(names)):
                    name = names[(k + b + r) % len(names)]
                    measure.sync(device)
                    start = time.perf_counter()
                    extractors[name](batch)
                    measure.sync(device)
                    times[name].append(time.perf_counter() - start)
    rows = [dict(name=name, images_per_s=args.batch_size / statistics.median(t),
                 mean_images_per_s=args.batch_size * len(t) / sum(t),
                 batch_seconds=[round(s, 4) for s in t])
            for name, t in times.items()]
    result = dict(
        machine=dict(measure.machine(device), device=str(device),
                     load_average_after=os.getloadavg()),
        setup=dict(images=args.images, batch_size=args.batch_size, image_size=32,
                   repeats=args.repeats,
                   weights="random (same file for all)" if args.weights is None else args.weights),
        results=rows)
    width = max(len(r["name"]) for r in rows)
    print(f"{args.images} uint8 32x32 images, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, "
          f"{device} ({measure.host(result['machine'])}), torch {torch.__version__}")
    print(f"{'extractor':<{width}}  img/s (median batch)  img/s (mean)")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['images_per_s']:18.2f}  {r['mean_images_per_s']:12.2f}")
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"bench_fid_{device.type}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64, help="images per timed pass (default: 64)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="images per forward, all extractors (default: 16)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch CPU threads (default: all cores)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed passes over the images (default: 2)")
    p.add_argument("--weights", default=None,
                   help="Inception weights file (default: random weights written to a temporary "
                        "directory)")
    p.add_argument("--out", default=None,
                   help="JSON output (default: benchmarks/results/bench_fid_<device>.json)")
    return p.parse_args()


if __name__ == "__main__":
    main(parse_args())
