"""Check edm.py against EDM's own code (a local check: CI has no copy of EDM's code).

    git clone https://github.com/NVlabs/edm /tmp/edm_src      # not shipped here (CC BY-NC-SA 4.0)
    python benchmarks/check_edm.py --edm-src /tmp/edm_src

Builds networks with EDM's code from --edm-src (every preconditioner, SongUNet with the DDPM++,
NCSN++ and skip/skip settings, DhariwalUNet, with and without labels, plus the full CIFAR-10
DDPM++ teachers), sets every parameter to random values (zero-initialised layers included),
pickles each exactly as EDM's training loop writes a snapshot, and saves the outputs of EDM's
network. A subprocess in which EDM's code cannot be imported then reads each pickle with
`net_pickles.load_edm_network` and compares D(x; sigma, y) and the raw network F, and checks that a
pickle whose __reduce__ runs `os.system` is refused with one line and runs nothing.
Prints a table; exits 1 on any relative error above --tolerance or any parameter-count mismatch.
Expected: relative errors 0 (float32 operations in EDM's order), about 35 s on 2 CPU cores.
"""
import argparse
import copy
import importlib.util
import json
import os
import pickle
import sys
import tempfile
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import edm  # noqa: E402
import net_pickles  # noqa: E402
from benchmarks import original_code  # noqa: E402
from benchmarks.original_code import relative_error  # noqa: E402

SMALL = dict(img_resolution=16, model_channels=16, channel_mult=[1, 2, 2], num_blocks=1,
             attn_resolutions=[8])
ARCHS = {  # EDM's train.py settings, at a toy size
    "ddpmpp": dict(SMALL, model_type="SongUNet", embedding_type="positional",
                   encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
                   resample_filter=[1, 1], augment_dim=9),
    "ncsnpp": dict(SMALL, model_type="SongUNet", embedding_type="fourier", encoder_type="residual",
                   decoder_type="standard", channel_mult_noise=2, resample_filter=[1, 3, 3, 1]),
    "skip/skip": dict(SMALL, model_type="SongUNet", embedding_type="fourier", encoder_type="skip",
                      decoder_type="skip", channel_mult_noise=2, resample_filter=[1, 3, 3, 1]),
    # 64 channels: ADM has one attention head per 64 channels, so fewer would disable attention
    "adm": dict(img_resolution=8, model_type="DhariwalUNet", model_channels=64, channel_mult=[1, 2],
                num_blocks=1, attn_resolutions=[8], augment_dim=9),
}
PRECONDS = ("EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond")
LOSSES = {"EDMPrecond": "EDMLoss", "VPPrecond": "VPLoss", "VEPrecond": "VELoss",
          "iDDPMPrecond": "EDMLoss"}


def cases():
    """(name, preconditioner, kwargs, batch) of every configuration checked."""
    out = []
    for precond in PRECONDS:
        for arch, kwargs in ARCHS.items():
            for label_dim in (0, 5):
                name = f"{precond} {arch} {'cond' if label_dim else 'uncond'}"
                out.append((name, precond, dict(kwargs, img_channels=3, label_dim=label_dim), 4))
    for name, kwargs in edm.CONFIGS.items():
        out.append((name + " (full)", "EDMPrecond", dict(kwargs), 2))
    return out


def randomise(net, generator):
    """Every parameter random: weights ~ N(0, 1 / fan_in), norm gains 1 + N(0, 0.1^2), biases
    ~ N(0, 0.1^2). Buffers (FIR filters, Fourier frequencies, iDDPM's levels) keep their values."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.dim() > 1:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                # 1-d weights are GroupNorm gains
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)


def parse_args(argv=None):
    parser = common.Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edm-src", help="a checkout of NVlabs/edm (with training/networks.py)")
    parser.add_argument("--work", help="folder for the pickles (default: a temporary folder)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest relative error accepted")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", help=argparse.SUPPRESS)  # the subprocess's mode
    args = parser.parse_args(argv)
    networks = os.path.join(args.edm_src or "", "training", "networks.py")
    if not args.compare and not os.path.isfile(networks):
        parser.error("--edm-src must name a checkout of NVlabs/edm (with training/networks.py): "
                     "git clone https://github.com/NVlabs/edm DIR, then --edm-src DIR")
    return args


def write_cases(edm_src, work, seed):
    """Parent side: EDM's networks, their pickles, inputs and outputs; returns the manifest."""
    if importlib.util.find_spec("requests") is None:  # dnnlib imports it, for downloads only
        sys.modules["requests"] = types.ModuleType("requests")
    sys.path.insert(0, os.path.abspath(edm_src))
    from training import augment, loss, networks

    generator = torch.Generator().manual_seed(seed)
    manifest = []
    for i, (name, precond, kwargs, n) in enumerate(cases()):
        torch.manual_seed(seed + i)
        net = getattr(networks, precond)(**kwargs)
        randomise(net, generator)
        net.eval()
        res, labels = kwargs["img_resolution"], kwargs["label_dim"]
        x = torch.randn([n, 3, res, res], generator=generator)
        sigma = torch.tensor([0.002, 0.3, 3.0, 80.0][:n])
        y = torch.eye(labels)[torch.randint(labels, [n], generator=generator)] if labels else None
        extra = {}
        if kwargs.get("augment_dim"):
            extra["augment_labels"] = torch.randn([n, 9], generator=generator)
        with torch.no_grad():
            D = net(x, sigma, y, **extra)
            s = sigma.reshape(-1, 1, 1, 1)
            c_in, c_noise = precond_inputs(net, s)
            net_in = (c_in * x, c_noise.flatten(), None if y is None else y)
            F_x = net.model(*net_in[:2], class_labels=net_in[2], **extra)
        # what EDM's training loop writes (training/training_loop.py, "Save network snapshot")
        data = dict(ema=copy.deepcopy(net).eval().requires_grad_(False).cpu(),
                    loss_fn=getattr(loss, LOSSES[precond])(),
                    augment_pipe=augment.AugmentPipe(p=0.12, xflip=1e8, yflip=1, scale=1,
                                                     rotate_frac=1, aniso=1, translate_frac=1),
                    dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset",
                                        path="x.zip", use_labels=bool(labels), xflip=False,
                                        cache=True, resolution=res, max_size=50000))
        path = os.path.join(work, f"case{i:02d}.pkl")
        with open(path, "wb") as f:
            pickle.dump(data, f)
        torch.save(dict(x=x, sigma=sigma, y=y, extra=extra, D=D, net_in=net_in, F=F_x),
                   path + ".io")
        manifest.append(dict(name=name, path=path, params=sum(p.numel() for p in net.parameters())))
        print(f"wrote {name}", flush=True)
    return manifest


def precond_inputs(net, sigma):
    """c_in and c_noise of EDM's network, taken from its own forward's formulas per class."""
    kind = type(net).__name__
    if kind == "EDMPrecond":
        return 1 / (net.sigma_data ** 2 + sigma ** 2).sqrt(), sigma.log() / 4
    if kind == "VEPrecond":
        return torch.ones_like(sigma), (0.5 * sigma).log()
    c_in = 1 / (sigma ** 2 + 1).sqrt()
    if kind == "VPPrecond":
        return c_in, (net.M - 1) * net.sigma_inv(sigma)
    return c_in, net.M - 1 - net.round_sigma(sigma, return_index=True).to(torch.float32)


def compare(work):
    """Subprocess side: EDM's code must not be importable here; edm.py reads every pickle."""
    original_code.refuse_importable("EDM's", ("torch_utils", "dnnlib", "training.networks"))
    with open(os.path.join(work, "manifest.json")) as f:
        manifest = json.load(f)
    for case in manifest:
        data = net_pickles.load_edm_pickle(case["path"])
        net = net_pickles.load_edm_network(case["path"])
        io = torch.load(case["path"] + ".io")
        with torch.no_grad():
            D = net(io["x"], io["sigma"], io["y"], **io["extra"])
            F_x = net.model(*io["net_in"][:2], class_labels=io["net_in"][2], **io["extra"])
        case.update(D_error=relative_error(D, io["D"]), F_error=relative_error(F_x, io["F"]),
                    ours=sum(p.numel() for p in net.parameters()),
                    others=all(isinstance(data[k], dict) and "class_name" in data[k]
                               for k in ("loss_fn", "augment_pipe")))
    marker = os.path.join(work, "pwned")
    evil = os.path.join(work, "evil.pkl")
    try:
        net_pickles.load_edm_pickle(evil)
        refusal = "loaded"
    except common.RealUIDError as e:
        refusal = str(e)
    result = dict(cases=manifest, refusal=refusal, marker=os.path.exists(marker))
    with open(os.path.join(work, "result.json"), "w") as f:
        json.dump(result, f)


def main(args):
    if args.compare:
        return compare(args.compare)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or tmp
        os.makedirs(work, exist_ok=True)
        result = original_code.compare_in_fresh_process(
            __file__, work, write_cases(args.edm_src, work, args.seed))
        if result is None:
            return 1

    failures = 0
    print(f"\n{'configuration':38s} {'params EDM':>11s} {'params ours':>11s} {'rel err D':>10s} "
          f"{'rel err F':>10s}  verdict")
    for case in result["cases"]:
        ok = (case["ours"] == case["params"] and case["others"]
              and max(case["D_error"], case["F_error"]) <= args.tolerance)
        failures += not ok
        print(f"{case['name']:38s} {case['params']:11,d} {case['ours']:11,d} "
              f"{case['D_error']:10.2e} {case['F_error']:10.2e}  {'ok' if ok else 'MISMATCH'}")
    refusal = result["refusal"]
    refused = "\n" not in refusal and "system" in refusal and not result["marker"]
    failures += not refused
    print(f"\nmalicious pickle (os.system via __reduce__): "
          f"{'refused' if refused else 'NOT REFUSED'}, "
          f"marker file {'created' if result['marker'] else 'absent'}\n  {refusal}")
    worst = max(max(c["D_error"], c["F_error"]) for c in result["cases"])
    print(f"\n{len(result['cases'])} configurations, largest relative error {worst:.2e}, "
          f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
