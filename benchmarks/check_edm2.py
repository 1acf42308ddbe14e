"""Check edm2.py against EDM2's own code (a local check: CI has no copy of EDM2's code).

    git clone https://github.com/NVlabs/edm2 /tmp/edm2_src    # not shipped here (CC BY-NC-SA 4.0)
    python benchmarks/check_edm2.py --edm2-src /tmp/edm2_src

Builds small EDM2 networks with EDM2's code from --edm2-src (img64-like pixel networks with and
without labels, an img512-like 4-channel latent network; four levels, attention at the two
lowest, EDM2's 64 channels per head), sets every parameter to random values (the zero-initialised
gains included), and pickles each as EDM2's training loop writes a snapshot: an EasyDict of the
encoder (StandardRGBEncoder, or StabilityVAEEncoder for the latent network), dataset_kwargs,
loss_fn (EDM2Loss) and `ema`, stored in float16 as EDM2 stores it and, as a second case, in
float32. A subprocess in which EDM2's code cannot be imported then reads each pickle with
`net_pickles.load_edm_network` and compares with EDM2's network:
- D: D(x; sigma, y) against EDM2 running the pickled network as generate_images.py does (its
  parameters as stored; on the CPU in float32 activations), and against EDM2's network cast to
  float32 (`D f32`), which is what edm2.py evaluates;
- F and ln u: the raw U-Net F(c_in x; c_noise, y) and the uncertainty (return_logvar);
- train D, train W (float32 cases): D in training mode from the same seed (forced weight
  normalisation, dropout 0.1), and the weights that pass rewrote.
With diffusers installed, EDM2's StabilityVAEEncoder (with a tiny random AutoencoderKL in place
of Stability's, saved as a diffusers folder) encodes images and decodes latents, and
latents.LatentCodec, with the scale and bias read from the latent pickle, must agree. It also
checks the parameter counts of edm2.CONFIGS (EDM2's presets) against EDM2's code, that a
pickle whose __reduce__ runs `os.system` is refused with one line and runs nothing, and that an
EDM2 pickle whose module_src writes a file loads without running it.
Prints a table; exits 1 on any relative error above --tolerance (--tolerance-fp16 for D, F and
ln u against a float16-stored network run as stored) or any count mismatch. Expected: 0 against
float32 (float32 operations in EDM2's order); about 2e-4 against a float16-stored network run
as stored, where EDM2 divides its float16 gains in float16 (gain / sqrt(fan_in)) and edm2.py,
holding the same values in float32, divides in float32. About 30 s on 2 CPU cores.
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
import edm2  # noqa: E402
import net_pickles  # noqa: E402
from benchmarks import original_code  # noqa: E402
from benchmarks.original_code import relative_error  # noqa: E402

# EDM2's img64 / img512 networks at a toy size: EDM2's channel_mult [1, 2, 3, 4] and attention
# at the two lowest resolutions (64x64: [16, 8]; here 16x16: [4, 2]), two blocks per level.
SMALL = dict(img_resolution=16, model_channels=32, channel_mult=[1, 2, 3, 4], num_blocks=2,
             attn_resolutions=[4, 2], dropout=0.1)
CONFIGS = {
    "img64-like cond": dict(SMALL, img_channels=3, label_dim=10),
    "img64-like uncond": dict(SMALL, img_channels=3, label_dim=0),
    "img512-like latent cond": dict(SMALL, img_channels=4, label_dim=10),
}
DTYPES = {"float16": torch.float16, "float32": torch.float32}


def cases():
    """(name, config name, stored dtype name) of every case checked."""
    return [(f"{config} {dtype}", config, dtype) for config in CONFIGS for dtype in DTYPES]


def randomise(net, generator):
    """Every parameter random: weights ~ N(0, 1) (MPConv normalises them anyway), the scalar
    gains (emb_gain, out_gain; zero at EDM2's init) ~ 1 + N(0, 0.3^2). The Fourier buffers keep
    EDM2's random initialisation."""
    with torch.no_grad():
        for p in net.parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(noise if p.dim() else 1 + 0.3 * noise)


def parse_args(argv=None):
    parser = common.Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edm2-src", help="a checkout of NVlabs/edm2 "
                                           "(with training/networks_edm2.py)")
    parser.add_argument("--work", help="folder for the pickles (default: a temporary folder)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest relative error accepted")
    parser.add_argument("--tolerance-fp16", type=float, default=1e-3,
                        help="largest relative error accepted against a float16-stored network "
                             "run as stored")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", help=argparse.SUPPRESS)  # the subprocess's mode
    args = parser.parse_args(argv)
    networks = os.path.join(args.edm2_src or "", "training", "networks_edm2.py")
    if not args.compare and not os.path.isfile(networks):
        parser.error("--edm2-src must name a checkout of NVlabs/edm2 "
                     "(with training/networks_edm2.py)")
    return args


def import_edm2(edm2_src):
    """EDM2's modules, from its checkout. dnnlib imports requests (for downloads) and the
    training loop psutil (for memory statistics): stubs stand in where they are missing."""
    for name in ("requests", "psutil"):
        if importlib.util.find_spec(name) is None:
            sys.modules[name] = types.ModuleType(name)
    sys.path.insert(0, os.path.abspath(edm2_src))
    import dnnlib
    from torch_utils import persistence
    from training import encoders, networks_edm2, training_loop
    return dnnlib, persistence, encoders, networks_edm2, training_loop


def snapshot(dnnlib, encoder, loss_fn, net, dtype, resolution, labels):
    """What EDM2's training loop pickles ("Save network snapshot"): the EasyDict of the encoder,
    dataset_kwargs and loss_fn, with ema a float16 copy of the network (here: `dtype`)."""
    dataset_kwargs = dnnlib.EasyDict(class_name="training.dataset.ImageFolderDataset",
                                     path=f"img{resolution}.zip", use_labels=labels)
    data = dnnlib.EasyDict(encoder=encoder, dataset_kwargs=dataset_kwargs, loss_fn=loss_fn)
    data.ema = copy.deepcopy(net).cpu().eval().requires_grad_(False).to(dtype)
    return data


def write_cases(edm2_src, work, seed):
    """Parent side: EDM2's networks, their pickles, inputs and outputs; returns the manifest."""
    dnnlib, persistence, encoders, networks_edm2, training_loop = import_edm2(edm2_src)
    generator = torch.Generator().manual_seed(seed)
    manifest = []
    for i, (name, config, dtype_name) in enumerate(cases()):
        kwargs, dtype = CONFIGS[config], DTYPES[dtype_name]
        torch.manual_seed(seed + i)
        net = networks_edm2.Precond(**kwargs)
        randomise(net, generator)
        net.eval()
        latent = kwargs["img_channels"] == 4
        encoder = encoders.StabilityVAEEncoder() if latent else encoders.StandardRGBEncoder()
        loss_fn = training_loop.EDM2Loss(P_mean=-0.4 if latent else -0.8,
                                         P_std=1.0 if latent else 1.6)
        data = snapshot(dnnlib, encoder, loss_fn, net, dtype, kwargs["img_resolution"],
                        bool(kwargs["label_dim"]))
        path = os.path.join(work, f"case{i:02d}.pkl")
        with open(path, "wb") as f:
            pickle.dump(data, f)

        n, res, labels = 4, kwargs["img_resolution"], kwargs["label_dim"]
        x = torch.randn([n, kwargs["img_channels"], res, res], generator=generator)
        sigma = torch.tensor([0.002, 0.3, 3.0, 80.0])
        y = torch.eye(labels)[torch.randint(labels, [n], generator=generator)] if labels else None
        stored = data.ema  # the network as the pickle holds it (float16: as generate_images.py)
        as_f32 = copy.deepcopy(stored).float()
        io = dict(x=x, sigma=sigma, y=y)
        with torch.no_grad():
            io["D"], io["logvar"] = stored(x, sigma, y, return_logvar=True)
            io["D_f32"] = as_f32(x, sigma, y)
            s = sigma.reshape(-1, 1, 1, 1)
            io["net_in"] = (x / (stored.sigma_data ** 2 + s ** 2).sqrt(), s.flatten().log() / 4)
            io["F"] = stored.unet(*io["net_in"], y)
            if dtype == torch.float32:  # training mode: forced weight normalisation, dropout
                torch.manual_seed(seed + 1000 + i)
                io["D_train"] = as_f32.train()(x, sigma, y)
                io["W_train"] = as_f32.state_dict()
        torch.save(io, path + ".io")
        manifest.append(dict(name=name, path=path, dtype=dtype_name, seed=seed + 1000 + i,
                             params=sum(p.numel() for p in net.parameters())))
        print(f"wrote {name}", flush=True)

    # module_src that writes a file when EDM2's loader executes it (edm2.py must never run it).
    # Swapped in only for pickle.dump: deepcopy goes through the same reduction and would run it.
    marker = os.path.join(work, "src_ran")
    net = networks_edm2.Precond(**CONFIGS["img64-like cond"])
    data = snapshot(dnnlib, encoders.StandardRGBEncoder(), training_loop.EDM2Loss(), net,
                    torch.float16, 16, True)
    cls = type(data.ema)
    original = cls._orig_module_src
    cls._orig_module_src = f"open({marker!r}, 'w').write('x')\n"
    try:
        with open(os.path.join(work, "src.pkl"), "wb") as f:
            pickle.dump(data, f)
    finally:
        cls._orig_module_src = original
    assert not os.path.exists(marker)

    counts = {}
    for name, cfg in edm2.CONFIGS.items():
        with torch.device("meta"):  # shapes only
            counts[name] = sum(p.numel() for p in networks_edm2.Precond(**cfg).parameters())
    return dict(cases=manifest, counts=counts, vae=vae_case(encoders, work, seed))


def tiny_vae(seed):
    """A random AutoencoderKL of Stable Diffusion's kind (4 latent channels), 2 levels."""
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
                         norm_num_groups=8, sample_size=32).eval().requires_grad_(False)


def vae_case(encoders, work, seed):
    """EDM2's StabilityVAEEncoder with a tiny random VAE in place of Stability's (saved as a
    diffusers folder for latents.py): encode_pixels + encode_latents of uint8 images, its eps
    (the global RNG's randn_like, replayed) and decode of random latents. None without
    diffusers."""
    if importlib.util.find_spec("diffusers") is None:
        return None
    vae = tiny_vae(seed)
    vae.save_pretrained(os.path.join(work, "vae"))
    encoder = encoders.StabilityVAEEncoder(batch_size=3)
    encoder._vae = vae  # instead of downloading Stability's
    g = torch.Generator().manual_seed(seed + 7)
    x_u8 = torch.randint(0, 256, (5, 3, 32, 32), generator=g, dtype=torch.uint8)
    raw = encoder.encode_pixels(x_u8)
    torch.manual_seed(seed + 8)
    final = encoder.encode_latents(raw)
    torch.manual_seed(seed + 8)
    eps = torch.randn_like(raw[:, :4])  # what encode_latents drew
    z = torch.randn(5, 4, 16, 16, generator=g)
    io = dict(x_u8=x_u8, eps=eps, final=final, z=z, decoded=encoder.decode(z))
    torch.save(io, os.path.join(work, "vae.io"))
    return os.path.join(work, "vae.io")


def compare(work):
    """Subprocess side: EDM2's code must not be importable here; edm2.py reads every pickle."""
    original_code.refuse_importable("EDM2's", ("torch_utils", "dnnlib", "training"))
    with open(os.path.join(work, "manifest.json")) as f:
        manifest = json.load(f)
    for case in manifest["cases"]:
        data = net_pickles.load_edm_pickle(case["path"])
        net = net_pickles.load_edm_network(case["path"])
        if data["encoder"]["class_name"] == "StabilityVAEEncoder":
            data_latent = data
        io = torch.load(case["path"] + ".io")
        x, sigma, y = io["x"], io["sigma"], io["y"]
        with torch.no_grad():
            D, logvar = net(x, sigma, y, return_logvar=True)
            F_x = net.unet(*io["net_in"], y)
            errors = dict(D=relative_error(D, io["D"]), D_f32=relative_error(D, io["D_f32"]),
                          F=relative_error(F_x, io["F"]),
                          logvar=relative_error(logvar, io["logvar"]))
            if "D_train" in io:
                torch.manual_seed(case["seed"])
                errors["D_train"] = relative_error(net.train()(x, sigma, y), io["D_train"])
                ours = net.state_dict()
                errors["W_train"] = max(relative_error(ours[k], w)
                                        for k, w in io["W_train"].items())
        case.update(errors=errors, ours=sum(p.numel() for p in net.parameters()),
                    float32=all(t.dtype == torch.float32 for t in net.state_dict().values()),
                    others=[data[k]["class_name"] for k in ("encoder", "loss_fn")])

    counts = {}
    for name, count in manifest["counts"].items():
        with torch.device("meta"):
            counts[name] = (count, sum(p.numel() for p in edm2.Precond(**edm2.CONFIGS[name])
                                       .parameters()))
    marker = os.path.join(work, "pwned")
    try:
        net_pickles.load_edm_pickle(os.path.join(work, "evil.pkl"))
        refusal = "loaded"
    except common.RealUIDError as e:
        refusal = str(e)
    src_loaded = isinstance(net_pickles.load_edm_network(os.path.join(work, "src.pkl")),
                            edm2.Precond)
    vae = None
    if manifest.get("vae"):  # latents.py's codec with the latent case's encoder settings
        import latents
        io = torch.load(manifest["vae"])
        settings = latents.latent_settings(data_latent["encoder"], "latent case")
        codec = latents.LatentCodec(latents.load_vae(os.path.join(work, "vae")), settings,
                                    (4, 16, 16), batch=4)
        decoded = codec.decode(io["z"])
        levels = (decoded.int() - io["decoded"].int()).abs()
        vae = dict(encode=relative_error(codec.encode(io["x_u8"], io["eps"]), io["final"]),
                   decode_max=int(levels.max()), decode_off=float((levels > 0).float().mean()),
                   settings=settings)
    result = dict(cases=manifest["cases"], counts=counts, refusal=refusal, vae=vae,
                  marker=os.path.exists(marker), src_loaded=src_loaded,
                  src_ran=os.path.exists(os.path.join(work, "src_ran")))
    with open(os.path.join(work, "result.json"), "w") as f:
        json.dump(result, f)


def main(args):
    if args.compare:
        return compare(args.compare)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or tmp
        os.makedirs(work, exist_ok=True)
        result = original_code.compare_in_fresh_process(
            __file__, work, write_cases(args.edm2_src, work, args.seed))
        if result is None:
            return 1

    failures = 0
    columns = ("D", "D_f32", "F", "logvar", "D_train", "W_train")
    print(f"\n{'configuration':32s} {'params EDM2':>11s} {'params ours':>11s} "
          + " ".join(f"{c.replace('_', ' '):>9s}" for c in columns) + "  verdict")
    for case in result["cases"]:
        e = case["errors"]
        fp16 = case["dtype"] == "float16"
        # run as stored, a float16 network's gains round differently (see the docstring)
        limits = {c: args.tolerance_fp16 if fp16 and c in ("D", "F", "logvar") else args.tolerance
                  for c in columns}
        ok = (case["ours"] == case["params"] and case["float32"]
              and all(e[c] <= limits[c] for c in e))
        failures += not ok
        cells = " ".join(f"{e[c]:9.2e}" if c in e else f"{'-':>9s}" for c in columns)
        print(f"{case['name']:32s} {case['params']:11,d} {case['ours']:11,d} {cells}  "
              f"{'ok' if ok else 'MISMATCH'}")
    print(f"  (other entries read as plain dicts: "
          f"{sorted(set(n for c in result['cases'] for n in c['others']))})")
    wrong = [name for name, (theirs, ours) in result["counts"].items() if theirs != ours]
    failures += len(wrong)
    sizes = ", ".join(f"{name[5:]} {theirs / 1e6:.1f}M"
                      for name, (theirs, _) in result["counts"].items())
    print(f"\nedm2.CONFIGS parameter counts equal EDM2's: "
          f"{len(result['counts']) - len(wrong)}/{len(result['counts'])}"
          f"{' (MISMATCH: ' + ', '.join(wrong) + ')' if wrong else ''}\n  {sizes}")
    refusal = result["refusal"]
    refused = "\n" not in refusal and "system" in refusal and not result["marker"]
    failures += not refused
    print(f"\nmalicious pickle (os.system via __reduce__): "
          f"{'refused' if refused else 'NOT REFUSED'}, "
          f"marker file {'created' if result['marker'] else 'absent'}\n  {refusal}")
    src_ok = result["src_loaded"] and not result["src_ran"]
    failures += not src_ok
    print(f"EDM2 pickle whose module_src writes a file: loaded "
          f"{'without running it' if src_ok else 'BUT ITS SOURCE RAN'}")
    vae = result["vae"]
    if vae is None:
        print("VAE latents: not checked (pip install diffusers safetensors)")
    else:
        vae_ok = vae["encode"] <= args.tolerance and vae["decode_max"] <= 1 and \
            vae["decode_off"] <= 0.01
        failures += not vae_ok
        print(f"VAE latents (EDM2's StabilityVAEEncoder vs latents.LatentCodec, a tiny random "
              f"AutoencoderKL, the scale and bias read from the pickle): encode relative error "
              f"{vae['encode']:.2e}; decode: {100 * vae['decode_off']:.3f}% of the bytes differ, "
              f"by at most {vae['decode_max']} level(s)  {'ok' if vae_ok else 'MISMATCH'}")

    def largest(dtype, as_stored):
        """The largest error of the float16- or float32-stored cases, against EDM2 running the
        network as stored (D, F, ln u) or against EDM2 in float32 (the other columns)."""
        return max((v for c in result["cases"] if c["dtype"] == dtype
                    for k, v in c["errors"].items() if (k in ("D", "F", "logvar")) == as_stored),
                   default=0.0)
    print(f"\n{len(result['cases'])} cases; largest relative error: float32-stored "
          f"{max(largest('float32', True), largest('float32', False)):.2e}; float16-stored "
          f"{largest('float16', True):.2e} run as stored, {largest('float16', False):.2e} "
          f"against EDM2 in float32; {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
