"""Score an image-to-image model (Appendix C) on held-out pairs: PSNR to the true target, the
pixel-space Frechet distance to the held-out targets and, where the Inception weights are here,
the FID of its outputs against the targets; beside it the source itself, the one-step start
x0 + v*(0, x0, s) and the teacher with --nfe Euler steps, all from the same sources and noise.

    python eval_pairs.py --ckpt runs/sr4_distill/latest.pt --data heldout.npz --out table.json

--data holds clean images that the checkpoint's own task corrupts (sr2, sr4, inpaint, gray,
denoise), or a held-out pairs .npz (`source`, `images`). Noise-to-image models are scored with
`fid.py calc` on sample.py's output instead.
"""
import startup  # noqa: F401  (first: Ctrl-C works while torch loads)
import contextlib
import json
import os


import run_folder
import common
import coupling
import inception
import networks
import sampling
import unet


def build_parser():
    p = common.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True,
                   help="a distilled image-to-image generator (or a teacher) checkpoint")
    p.add_argument("--data", required=True,
                   help="held-out clean images (.npz, folder, cifar10) that the checkpoint's "
                        "task corrupts, or a held-out pairs .npz (`source`, `images`)")
    p.add_argument("--data-root", default="./data", help="where cifar10 is downloaded")
    p.add_argument("--teacher", default=None,
                   help="the teacher to compare with (default: the one recorded in --ckpt's run)")
    p.add_argument("--teacher-ema", type=common.decay_or_none, default=None,
                   help="its EMA (default: the run's --teacher-ema, or the file's first EMA)")
    p.add_argument("--ema", type=common.decay_or_none, default=None,
                   help="the generator's EMA to score beside its raw weights (default: its "
                        "first)")
    p.add_argument("--n", type=common.positive_int, default=2048,
                   help="held-out pairs to score (the first n of --data)")
    p.add_argument("--nfe", type=common.positive_int, default=100,
                   help="Euler steps of the teacher")
    p.add_argument("--seed", type=common.count, default=0, help="noise of output i: (seed, i)")
    p.add_argument("--out", default=None, help="also write the table as JSON to this file")
    inception.add_feature_args(p)
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(args):
    return score_pairs(args, common.pick_device(args.device).type)


def score_pairs(args, device):
    """An image-to-image checkpoint on held-out pairs, next to the source itself,
    the one-step start x0 + v*(0, x0, s) and the teacher with --nfe Euler steps (Appendix C):
    PSNR to the true target (rewards the posterior mean), pixel-space Frechet distance to the
    held-out targets (rewards realistic, diverse outputs) and, when the Inception weights are
    here (--weights or the torch hub cache; never downloaded), the FID of the outputs against
    the held-out targets. Every model translates the same sources with the same noise."""
    if args.out:  # before any work: never over a checkpoint or a file of another kind
        run_folder.check_output_file(args.out, "--out", is_results_file,
                                      "an eval_pairs.py results file (JSON with `scores`)")
    model = sampling.load_model(args.ckpt, "first" if args.ema is None else args.ema,
                              unet.PAPER_CONFIG)
    if not model.coupling:
        common.fail(f"{args.ckpt} is a noise-to-image model; eval_pairs.py scores image-to-image "
                    "checkpoints (use `fid.py calc` on its samples)")
    run_args = model.ckpt.get("config", {}).get("args", {})
    teacher_path = args.teacher or (args.ckpt if model.kind == "teacher"
                                    else run_args.get("teacher"))
    if not teacher_path:
        common.fail(f"{args.ckpt} does not record its teacher; pass --teacher")
    teacher_ema = (args.teacher_ema if args.teacher_ema is not None
                   else run_args.get("teacher_ema", "first"))
    teacher = sampling.load_model(teacher_path, teacher_ema, unet.PAPER_CONFIG)
    shape = networks.image_shape(model.net)
    src, targets, labels = sampling.held_out_pairs(args.data, model.coupling, shape, args.n,
                                                 args.seed, args.data_root)
    if networks.num_classes(model.net) is None:
        labels = None
    elif labels is None:
        common.fail(f"{args.ckpt} is class conditional: --data needs labels")
    amp = contextlib.nullcontext()
    rows = {"source itself": common.to_uint8(src)}
    for m in (teacher, model):
        m.net.to(device).eval()
    translate = lambda m, nfe: sampling.translate(m, src, labels, 1, args.seed,  # noqa: E731
                                                args.batch_size, device, amp, nfe)
    rows["one-step start x0 + v*(0, x0, s)"] = translate(teacher, 1)
    rows[f"teacher, {args.nfe} Euler steps"] = translate(teacher, args.nfe)
    if model.kind == "distilled":
        rows[f"one-step generator, EMA {model.ema}" if model.ema
             else "one-step generator"] = translate(model, 1)
        if model.ema is not None:
            raw = sampling.load_model(args.ckpt, None, unet.PAPER_CONFIG)
            raw.net.to(device).eval()
            rows["one-step generator, raw weights"] = translate(raw, 1)
    weights = inception.local_weights(args.weights)
    extractor = inception.InceptionFeatures(weights, args.mode, device) if weights else None
    if extractor is not None:
        ref_mu, ref_sigma, _ = inception.feature_stats(
            inception.iter_batches(targets.permute(0, 2, 3, 1).numpy(), args.batch_size), extractor)
    table = {}
    for name, out in rows.items():
        table[name] = {"psnr_db": coupling.psnr(out, targets),
                       "pixel_fd": float(inception.pixel_frechet_distance(out, targets))}
        if extractor is not None:
            mu, sigma, _ = inception.feature_stats(
                inception.iter_batches(out.permute(0, 2, 3, 1).numpy(), args.batch_size), extractor)
            table[name]["fid"] = float(inception.frechet_distance(mu, sigma, ref_mu, ref_sigma))
    task = model.coupling["task"] or "pairs file"
    print(f"{args.ckpt}: {task} on the {model.coupling['path']} path, {len(src)} held-out pairs "
          f"of {args.data}"
          + ("" if extractor else "; no Inception weights here, so no FID (pass --weights)"))
    print("| model | PSNR to target (dB) | pixel FD to targets |" + (" FID |" if extractor else ""))
    print("|---|---|---|" + ("---|" if extractor else ""))
    for name, r in table.items():
        print(f"| {name} | {r['psnr_db']:.2f} | {r['pixel_fd']:.3f} |"
              + (f" {r['fid']:.2f} |" if extractor else ""))
    if args.out:
        report = {"ckpt": args.ckpt, "teacher": teacher_path, "data": args.data, "n": len(src),
                  "nfe": args.nfe, "coupling": model.coupling, "seed": args.seed,
                  "fid_weights": weights, "scores": table}
        write_results(args.out, report)
        print(f"wrote {args.out}")
    return table


def is_results_file(path):
    """Whether `path` is a table this command wrote (JSON with `ckpt` and `scores`), which
    --out may replace; read only if small (a table is a few KB)."""
    try:
        if os.path.getsize(path) > 10 * 2**20:
            return False
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and {"ckpt", "scores"} <= set(report)


def write_results(path, report):
    """The JSON table, written atomically (a temporary file in the same folder, then
    os.replace): an interrupted write never leaves half a table under `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


if __name__ == "__main__":
    common.cli(main, parse_args)
