"""edm.py: EDM's networks rebuilt, and the safe reader of EDM's pickles. No EDM code is needed.

Pickles are written here in EDM's format (torch_utils.persistence: each network a persistent
object with module_src, class_name and state, nested for its layers) by a pickler that stands in
for EDM's code. Layouts and outputs of EDM's own code are pinned as numbers measured with it
(`PYTHONPATH=. python tests/test_edm.py --edm-src DIR` prints them again);
benchmarks/check_edm.py compares against EDM's own code directly.
"""
import contextlib
import copy
import hashlib
import io
import math
import os
import pickle
import subprocess
import sys
import types

import pytest
import torch

import edm
import net_pickles
from common import RealUIDError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Toy versions of EDM's train.py settings (--arch ddpmpp / ncsnpp / adm) and a skip/skip variant.
SONG = dict(model_type="SongUNet", img_resolution=8, model_channels=8, channel_mult=[1, 2],
            num_blocks=1, attn_resolutions=[4])
ARCHS = {
    "ddpmpp": dict(SONG, embedding_type="positional", encoder_type="standard",
                   decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1],
                   augment_dim=9),
    "ncsnpp": dict(SONG, embedding_type="fourier", encoder_type="residual", decoder_type="standard",
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1]),
    "skip": dict(SONG, embedding_type="fourier", encoder_type="skip", decoder_type="skip",
                 channel_mult_noise=2, resample_filter=[1, 3, 3, 1]),
    # 128 channels at 4x4: two attention heads of 64 (ADM's head size)
    "adm": dict(model_type="DhariwalUNet", img_resolution=8, model_channels=64, channel_mult=[1, 2],
                num_blocks=1, attn_resolutions=[4], augment_dim=9),
}
PRECONDS = ("EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond")
CASES = [(p, a, label_dim) for p in PRECONDS for a in ARCHS for label_dim in (0, 3)]

# Measured with EDM's own code (NVlabs/edm at 008a4e5; layouts with torch 2.13, outputs with
# torch 2.14.1 CPU) by `PYTHONPATH=. python tests/test_edm.py --edm-src DIR`: sha256 of the state
# dict's "key shape" lines in order (first 16 hex digits), and summaries of D(x; sigma, y) in
# float64 (denoise64) for the deterministic weights (set_pin_weights) and inputs below.
EDM_LAYOUTS = {
    'EDMPrecond ddpmpp 0': '646e7e3cce903772',
    'EDMPrecond ddpmpp 3': '55cbdbc5421ec0fb',
    'EDMPrecond ncsnpp 0': '457366f2f5a5f279',
    'EDMPrecond ncsnpp 3': '8da72086b2bab704',
    'EDMPrecond skip 0': 'f9e7cbd6e9158618',
    'EDMPrecond skip 3': '1f69bb21fa6d2f3c',
    'EDMPrecond adm 0': '927230eadd343352',
    'EDMPrecond adm 3': '27b359cc80c40079',
    'VPPrecond ddpmpp 0': '646e7e3cce903772',
    'VPPrecond ddpmpp 3': '55cbdbc5421ec0fb',
    'VPPrecond ncsnpp 0': '457366f2f5a5f279',
    'VPPrecond ncsnpp 3': '8da72086b2bab704',
    'VPPrecond skip 0': 'f9e7cbd6e9158618',
    'VPPrecond skip 3': '1f69bb21fa6d2f3c',
    'VPPrecond adm 0': '927230eadd343352',
    'VPPrecond adm 3': '27b359cc80c40079',
    'VEPrecond ddpmpp 0': '646e7e3cce903772',
    'VEPrecond ddpmpp 3': '55cbdbc5421ec0fb',
    'VEPrecond ncsnpp 0': '457366f2f5a5f279',
    'VEPrecond ncsnpp 3': '8da72086b2bab704',
    'VEPrecond skip 0': 'f9e7cbd6e9158618',
    'VEPrecond skip 3': '1f69bb21fa6d2f3c',
    'VEPrecond adm 0': '927230eadd343352',
    'VEPrecond adm 3': '27b359cc80c40079',
    'iDDPMPrecond ddpmpp 0': 'd89a0c22f37734aa',
    'iDDPMPrecond ddpmpp 3': '9da4706cbea0fc40',
    'iDDPMPrecond ncsnpp 0': 'ac118b0fb5f4ecc5',
    'iDDPMPrecond ncsnpp 3': '7340b1ac2f9febc9',
    'iDDPMPrecond skip 0': '46fe73f574bb8466',
    'iDDPMPrecond skip 3': 'a291aab12f719e52',
    'iDDPMPrecond adm 0': 'f28744f114c7c2d3',
    'iDDPMPrecond adm 3': '21f8681c4bf7b631',
}
EDM_OUTPUTS = {
    'EDMPrecond ddpmpp 0': [-0.02627464193, 166.3020183, -4.91242055, -1.379180912],
    'EDMPrecond ddpmpp 3': [33.38762227, 171.5282359, -0.4346911371, 6.157225479],
    'EDMPrecond ncsnpp 0': [-26.71789028, 181.4571343, 1.841416707, -4.065576609],
    'EDMPrecond ncsnpp 3': [25.04750311, 187.7528467, 3.599002177, 3.776125449],
    'EDMPrecond skip 0': [98.90460476, 212.4123956, 0.02499487102, 18.30274168],
    'EDMPrecond skip 3': [-113.527822, 226.1761761, -2.437804386, -14.84810793],
    'EDMPrecond adm 0': [-9.154076613, 190.3265923, 1.866450626, -1.445717503],
    'EDMPrecond adm 3': [54.14854066, 186.077742, -1.798828393, 7.662067177],
    'VPPrecond ddpmpp 0': [14.19861471, 198602.846, -29.46456496, 66.19608204],
    'VPPrecond ddpmpp 3': [-2493.585572, 389575.7581, 335.1829531, -497.1520062],
    'VPPrecond ncsnpp 0': [2180.136504, 378169.4426, -110.2442031, 356.6911067],
    'VPPrecond ncsnpp 3': [-3236.69983, 577207.004, 218.4579405, -463.1530206],
    'VPPrecond skip 0': [-8168.080218, 757880.2741, -150.4094277, -1421.89104],
    'VPPrecond skip 3': [4121.225157, 801662.3858, 744.4829663, 486.5641114],
    'VPPrecond adm 0': [-1829.027503, 233516.3264, 224.3117732, -447.5239574],
    'VPPrecond adm 3': [-5588.799472, 714008.8943, 15.37256012, -873.944711],
    'VEPrecond ddpmpp 0': [-736.881434, 253236.3538, -256.1033238, -236.0029718],
    'VEPrecond ddpmpp 3': [862.6477828, 337087.8935, 107.2671022, 8.488443489],
    'VEPrecond ncsnpp 0': [-1054.828301, 313394.7762, 100.5728455, -82.37443868],
    'VEPrecond ncsnpp 3': [-14.73568378, 344060.4507, -306.6679086, -44.31538312],
    'VEPrecond skip 0': [3575.494653, 786592.2608, -83.04934916, 671.2746981],
    'VEPrecond skip 3': [-8511.15904, 940396.1011, -269.7572323, -1123.183114],
    'VEPrecond adm 0': [-488.3771687, 223010.105, -151.7745963, -250.4290044],
    'VEPrecond adm 3': [1739.922499, 479682.3254, -620.2261054, 12.73126191],
    'iDDPMPrecond ddpmpp 0': [-790.6334246, 134522.0862, -17.57268246, 45.069769],
    'iDDPMPrecond ddpmpp 3': [-5490.363914, 554908.893, -181.9210712, -875.5508736],
    'iDDPMPrecond ncsnpp 0': [512.0464787, 203098.2199, -126.3944663, 86.05599029],
    'iDDPMPrecond ncsnpp 3': [-3204.024632, 615153.5577, 168.6915535, -562.6823263],
    'iDDPMPrecond skip 0': [-7639.096388, 696206.7237, -184.5355054, -1172.069022],
    'iDDPMPrecond skip 3': [5044.881197, 1052595.29, 703.9949434, 658.914667],
    'iDDPMPrecond adm 0': [-349.8336069, 228115.1292, 276.4597176, -174.6040977],
    'iDDPMPrecond adm 3': [-5341.288098, 759674.7015, 219.8867687, -789.3282627],
}
# EDMPrecond(**edm.CONFIGS[...]).parameters(), counted with EDM's training/networks.py the same way.
EDM_CIFAR10_PARAMS = {"edm-cifar10-32x32-uncond-vp": 55_733_891,
                      "edm-cifar10-32x32-cond-vp": 55_735_299}


def kwargs_of(precond, arch, label_dim):
    return dict(ARCHS[arch], img_channels=3, label_dim=label_dim)


def layout_digest(net):
    lines = "".join(f"{k} {tuple(v.shape)}\n" for k, v in net.state_dict().items())
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def set_weights(net):
    """Deterministic, nonzero weights in every parameter and Fourier frequencies (no RNG, so
    EDM's code and edm.py get the same numbers on any torch): sines scaled by 1/sqrt(fan_in),
    gains near 1."""
    with torch.no_grad():
        for i, (name, p) in enumerate(net.named_parameters()):
            wave = torch.sin(0.731 * torch.arange(p.numel(), dtype=torch.float64) + 0.37 * i)
            wave = wave.reshape(p.shape).to(torch.float32)
            if p.dim() > 1:
                p.copy_(wave * (1.7 / p[0].numel() ** 0.5))
            else:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * wave)  # GroupNorm / bias
        for name, b in net.named_buffers():
            if name.endswith("freqs"):  # NCSN++'s random Fourier frequencies (scale 16)
                b.copy_(16 * torch.sin(1.3 * torch.arange(b.numel(), dtype=torch.float32)))
    return net


def _hash_uniform(n, i):
    """n numbers uniform on [-1, 1) from an integer hash of (position, i): integer arithmetic is
    exact, so every host and torch build gets the very same float64 numbers (multiples of
    2^-31), and from them the same float32 ones."""
    h = (torch.arange(n, dtype=torch.int64) * 2654435761 + (i + 1) * 40503) % 2 ** 32
    for _ in range(2):  # a 32-bit mixer: neighbouring weights uncorrelated
        h = ((h ^ (h >> 16)) * 0x45D9F3B) % 2 ** 32
    return (h ^ (h >> 16)).to(torch.float64) / 2 ** 31 - 1


def set_pin_weights(net):
    """Deterministic weights for the pinned outputs (no RNG: EDM's code and edm.py get the same
    numbers on any torch), behaving like random ones: weights uniform with variance 1 / fan_in
    (check_edm.py's scale), norm gains 1 + 0.1 u, biases 0.1 u, u from _hash_uniform; NCSN++'s
    Fourier frequencies as in set_weights. (set_weights' sine waves correlate with the smooth
    test inputs, so the sums of each layer cancel and every layer multiplies the rounding
    error: its ADM networks turned float32 rounding into a few 1e-4 of D, above the pins'
    tolerance on some hosts.)"""
    with torch.no_grad():
        for i, (name, p) in enumerate(net.named_parameters()):
            u = _hash_uniform(p.numel(), i).reshape(p.shape)
            if p.dim() > 1:
                p.copy_(u * math.sqrt(3 / p[0].numel()))
            else:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * u)  # GroupNorm / bias
        for name, b in net.named_buffers():
            if name.endswith("freqs"):
                b.copy_(16 * torch.sin(1.3 * torch.arange(b.numel(), dtype=torch.float32)))
    return net


def denoise64(net, x, sigma, y, extra):
    """D(x; sigma, y) in float64, for EDM's networks and edm.py's alike: Table 1's
    preconditioning written out here, from the network's own constants and methods
    (sigma_data, sigma_inv, round_sigma, M), around a float64 copy of its network F (`.model`),
    whose layers compute in their input's dtype. Only the attention logits and softmax, and the
    positional embedding's frequencies, stay float32 (in both codes); everything else is a
    float64 sum or product, so the summaries move by far less than the pins' tolerance from
    one host or BLAS to another (measured: at most 2% of it, emulating other hosts with
    ATEN_CPU_CAPABILITY, MKL_CBWR and DNNL_MAX_CPU_ISA)."""
    kind = type(net).__name__
    s = sigma.to(torch.float64).reshape(-1, 1, 1, 1)
    if kind == "EDMPrecond":
        d = net.sigma_data
        c_skip, c_out = d ** 2 / (s ** 2 + d ** 2), s * d / (s ** 2 + d ** 2).sqrt()
        c_in, c_noise = 1 / (d ** 2 + s ** 2).sqrt(), s.log() / 4
    elif kind == "VEPrecond":
        c_skip, c_out, c_in, c_noise = 1, s, 1, (0.5 * s).log()
    elif kind == "VPPrecond":
        c_skip, c_out, c_in = 1, -s, 1 / (s ** 2 + 1).sqrt()
        c_noise = (net.M - 1) * net.sigma_inv(s)
    else:  # iDDPMPrecond: the index j of the nearest level u_j, found by the network itself
        c_skip, c_out, c_in = 1, -s, 1 / (s ** 2 + 1).sqrt()
        c_noise = net.M - 1 - net.round_sigma(sigma.reshape(-1, 1, 1, 1),
                                              return_index=True).to(torch.float64)
    model = copy.deepcopy(net.model).to(torch.float64)
    labels = None if y is None else y.to(torch.float64)
    F_x = model(c_in * x.to(torch.float64), c_noise.flatten(), labels,
                **{k: v.to(torch.float64) for k, v in extra.items()})
    return c_skip * x.to(torch.float64) + c_out * F_x[:, :net.img_channels]


def inputs(kwargs, n=4):
    """Fixed x, sigma (0.002 to 80, EDM's range), one-hot labels, augment labels."""
    res, label_dim = kwargs["img_resolution"], kwargs["label_dim"]
    x = torch.cos(0.113 * torch.arange(n * 3 * res * res, dtype=torch.float64))
    x = x.reshape(n, 3, res, res)
    sigma = torch.tensor([0.002, 0.3, 3.0, 80.0][:n])
    y = torch.eye(label_dim)[torch.arange(n) % label_dim] if label_dim else None
    extra = {}
    if kwargs.get("augment_dim"):
        extra["augment_labels"] = torch.sin(torch.arange(n * 9, dtype=torch.float32)).reshape(n, 9)
    return x.to(torch.float32), sigma, y, extra


def summary(D):
    """Four numbers that move with any change of D: sum, sum of squares, two weighted sums."""
    D = D.double()
    w = torch.cos(0.5 * torch.arange(D.numel(), dtype=torch.float64)).reshape(D.shape)
    return [float(D.sum()), float((D * D).sum()), float((w * D).sum()),
            float(D.flatten()[::7].sum())]


# ---------------------------------------------------------------------------------------------
# Writing pickles in EDM's format without EDM's code.

EXPLODING_SRC = "raise RuntimeError('module_src must never be executed')\n"
LAYER_CLASSES = (edm.Linear, edm.Conv2d, edm.GroupNorm, edm.UNetBlock, edm.PositionalEmbedding,
                 edm.FourierEmbedding)  # persistent in EDM too; its ModuleDicts are not


class Opaque:
    """A persistent object of a class edm.py does not implement (EDM's loss, AugmentPipe)."""

    def __init__(self, class_name, **kwargs):
        self.class_name, self.kwargs = class_name, kwargs


@contextlib.contextmanager
def edm_globals():
    """Modules named like EDM's, in sys.modules only while a pickle is written, so that pickle
    can name torch_utils.persistence._reconstruct_persistent_obj and dnnlib.util.EasyDict."""
    def _reconstruct_persistent_obj(meta):
        raise AssertionError("the stub is only written, never called")

    class EasyDict(dict):
        pass

    modules = {name: types.ModuleType(name) for name in
               ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util")}
    for function, module in ((_reconstruct_persistent_obj, "torch_utils.persistence"),
                             (EasyDict, "dnnlib.util")):
        function.__module__, function.__qualname__ = module, function.__name__
        setattr(modules[module], function.__name__, function)
    assert not set(modules) & set(sys.modules)
    sys.modules.update(modules)
    try:
        yield modules["torch_utils.persistence"]._reconstruct_persistent_obj, EasyDict
    finally:
        for name in modules:
            del sys.modules[name]


class EDMPickler(pickle.Pickler):
    """pickle.Pickler that writes this file's modules as EDM's persistence does: a call to
    _reconstruct_persistent_obj(meta) with the module's __dict__ and init kwargs as state."""

    def __init__(self, f, reconstruct, init_kwargs, module_src=EXPLODING_SRC):
        super().__init__(f, protocol=4)
        self.reconstruct, self.init_kwargs, self.module_src = reconstruct, init_kwargs, module_src

    def reducer_override(self, obj):
        if isinstance(obj, Opaque):
            state = dict(_init_args=(), _init_kwargs=obj.kwargs, **obj.kwargs)
            class_name = obj.class_name
        elif isinstance(obj, tuple(edm.NETWORKS.values()) + LAYER_CLASSES):
            # EDM records every layer's kwargs; the reader needs only the top network's
            state = dict(vars(obj), _init_args=(), _init_kwargs=self.init_kwargs.get(id(obj), {}))
            class_name = type(obj).__name__
        else:
            return NotImplemented
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=class_name,
                    state=state)
        return self.reconstruct, (meta,)


def write_edm_pickle(path, net, kwargs, extra=None, module_src=EXPLODING_SRC, snapshot=True):
    """EDM's snapshot layout: dict(ema=net, loss_fn, augment_pipe, dataset_kwargs)."""
    with edm_globals() as (reconstruct, EasyDict):
        data = dict(ema=net)
        if snapshot:
            data.update(loss_fn=Opaque("EDMLoss", P_mean=-1.2, P_std=1.2, sigma_data=0.5),
                        augment_pipe=Opaque("AugmentPipe", p=0.12, xflip=1e8, yflip=1),
                        dataset_kwargs=EasyDict(class_name="training.dataset.ImageFolderDataset",
                                                path="cifar10.zip", use_labels=True, resolution=32))
        data.update(extra or {})
        with open(path, "wb") as f:
            EDMPickler(f, reconstruct, {id(net): kwargs}, module_src).dump(data)
    assert "torch_utils" not in sys.modules and "dnnlib" not in sys.modules


def build(precond, arch, label_dim):
    kwargs = kwargs_of(precond, arch, label_dim)
    return set_weights(getattr(edm, precond)(**kwargs)).eval(), kwargs


# ---------------------------------------------------------------------------------------------
# Round trips: every preconditioner, both architectures, with and without labels.

@pytest.mark.parametrize("precond,arch,label_dim", CASES)
def test_round_trip_in_edm_format(tmp_path, precond, arch, label_dim):
    net, kwargs = build(precond, arch, label_dim)
    path = tmp_path / "network-snapshot-000000.pkl"
    write_edm_pickle(path, net, kwargs)
    data = net_pickles.load_edm_pickle(path)
    loaded = data["ema"]
    assert type(loaded) is type(net) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    ours, theirs = net.state_dict(), loaded.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    x, sigma, y, extra = inputs(kwargs)
    with torch.no_grad():
        assert torch.equal(net(x, sigma, y, **extra), loaded(x, sigma, y, **extra))
    # the other entries come back as plain data, the module source nowhere
    assert data["loss_fn"] == {"class_name": "EDMLoss", "init_args": (),
                               "init_kwargs": {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5}}
    assert data["augment_pipe"]["class_name"] == "AugmentPipe"
    assert type(data["dataset_kwargs"]) is dict and data["dataset_kwargs"]["resolution"] == 32
    assert "never be executed" not in repr({k: v for k, v in data.items() if k != "ema"})
    for attr in ("img_resolution", "img_channels", "label_dim", "sigma_min", "sigma_max"):
        assert getattr(loaded, attr) == getattr(net, attr)


@pytest.mark.parametrize("precond,arch,label_dim", CASES)
def test_layout_and_outputs_equal_edms(precond, arch, label_dim):
    """State-dict keys and shapes, and D(x; sigma, y), as EDM's own code gives them (in float64,
    denoise64), and the float32 forward pass close to that."""
    key = f"{precond} {arch} {label_dim}"
    kwargs = kwargs_of(precond, arch, label_dim)
    net = set_pin_weights(getattr(edm, precond)(**kwargs)).eval()
    assert layout_digest(net) == EDM_LAYOUTS[key]
    x, sigma, y, extra = inputs(kwargs)
    with torch.no_grad():
        D = denoise64(net, x, sigma, y, extra)
        D32 = net(x, sigma, y, **extra)
    # another host, BLAS or thread count moves the float64 sums by under 2% of this tolerance
    # (denoise64); any error in the network moves them by a good fraction of |D|
    want = EDM_OUTPUTS[key]
    assert summary(D) == pytest.approx(want, rel=1e-5, abs=1e-4 * math.sqrt(want[1]))
    # the forward pass, in float32: within 1.3e-5 of |D| (measured), except NCSN++'s Fourier
    # features of VP's and iDDPM's noise labels (up to 999, so angles up to 1e5 radians, which
    # float32 holds to 0.008): there 4e-3
    fourier = kwargs.get("embedding_type") == "fourier" and precond in ("VPPrecond",
                                                                        "iDDPMPrecond")
    assert (D32.double() - D).norm() <= (1e-2 if fourier else 1e-4) * D.norm()


def test_load_in_a_fresh_process(tmp_path):
    net, kwargs = build("EDMPrecond", "ncsnpp", 3)
    path = tmp_path / "edm.pkl"
    write_edm_pickle(path, net, kwargs)
    x, sigma, y, _ = inputs(kwargs)
    torch.save(dict(x=x, sigma=sigma, y=y), tmp_path / "in.pt")
    code = ("import sys, torch, net_pickles; d = torch.load(sys.argv[2]); "
            "net = net_pickles.load_edm_network(sys.argv[1]); "
            "torch.save(net(d['x'], d['sigma'], d['y']), sys.argv[3])")
    subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "in.pt"),
                    str(tmp_path / "out.pt")], check=True, cwd=ROOT,
                   env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "out.pt"), net(x, sigma, y))


def test_full_cifar10_teachers_have_edms_parameter_count():
    for name, count in EDM_CIFAR10_PARAMS.items():
        net = edm.EDMPrecond(**edm.CONFIGS[name])
        assert sum(p.numel() for p in net.parameters()) == count
    keys = net.state_dict()
    assert tuple(keys["model.enc.16x16_block0.qkv.weight"].shape) == (768, 256, 1, 1)
    assert tuple(keys["model.dec.32x32_aux_conv.weight"].shape) == (3, 256, 3, 3)
    assert tuple(keys["model.map_label.weight"].shape) == (128, 10)


# ---------------------------------------------------------------------------------------------
# Preconditioning in closed form (EDM paper, Table 1).

class Probe(torch.nn.Module):
    """Stands in for the network F: records its inputs and returns a known function of them."""

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        self.seen = (x.clone(), noise_labels.clone(), class_labels)
        return torch.tanh(x) + noise_labels.reshape(-1, 1, 1, 1)


SONG_ARGS = {k: v for k, v in ARCHS["ddpmpp"].items() if k not in ("model_type", "img_resolution")}


def probed(net):
    net.model = Probe()
    return net


def test_edm_preconditioning_closed_form():
    net = probed(edm.EDMPrecond(8, 3, label_dim=3, model_type="SongUNet", **SONG_ARGS))
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.5, 2.0, 80.0], dtype=torch.float64)
    D = net(x, sigma).double()
    s, d = sigma.reshape(-1, 1, 1, 1), 0.5
    c_skip, c_out = d ** 2 / (s ** 2 + d ** 2), s * d / (s ** 2 + d ** 2).sqrt()
    c_in, c_noise = 1 / (s ** 2 + d ** 2).sqrt(), torch.log(sigma) / 4
    F_x = torch.tanh(c_in * x) + c_noise.reshape(-1, 1, 1, 1)
    assert torch.allclose(D, c_skip * x + c_out * F_x, rtol=1e-5, atol=1e-5)
    seen_x, seen_noise, seen_labels = net.model.seen
    assert torch.allclose(seen_x.double(), c_in * x, rtol=1e-6)
    assert torch.allclose(seen_noise.double(), c_noise, rtol=1e-6)
    assert torch.equal(seen_labels, torch.zeros(1, 3))  # no labels -> the zero vector, as EDM
    # sigma -> 0: c_skip -> 1, c_out -> 0, D -> x
    assert torch.allclose(net(x, torch.full([4], 1e-8)).double(), x, atol=1e-6)


def test_vp_ve_iddpm_closed_forms():
    x = torch.randn(3, 3, 8, 8)
    sigma = torch.tensor([0.01, 1.0, 50.0])
    s = sigma.reshape(-1, 1, 1, 1)
    ve = probed(edm.VEPrecond(8, 3, model_type="SongUNet", **SONG_ARGS))
    want = x + s * (torch.tanh(x) + torch.log(sigma / 2).reshape(-1, 1, 1, 1))
    assert torch.allclose(ve(x, sigma), want, rtol=1e-5, atol=1e-5)
    vp = probed(edm.VPPrecond(8, 3, model_type="SongUNet", **SONG_ARGS))
    t = vp.sigma_inv(sigma)  # sigma(t)^2 = exp(beta_d t^2 / 2 + beta_min t) - 1
    assert torch.allclose(torch.exp(19.9 * t ** 2 / 2 + 0.1 * t) - 1, sigma ** 2, rtol=1e-4)
    c_in = 1 / (s ** 2 + 1).sqrt()
    want = x - s * (torch.tanh(c_in * x) + (999 * t).reshape(-1, 1, 1, 1))
    assert torch.allclose(vp(x, sigma), want, rtol=1e-5, atol=1e-4)
    # EDM computes sigma_min in float32: exp(1e-6) - 1 keeps few digits
    assert vp.sigma_min == pytest.approx(math.sqrt(math.expm1(19.9e-10 / 2 + 1e-6)), rel=0.05)
    assert vp.sigma_max == pytest.approx(math.sqrt(math.expm1(19.9 / 2 + 0.1)), rel=1e-5)
    iddpm = probed(edm.iDDPMPrecond(8, 3, model_type="SongUNet", **SONG_ARGS))
    u = iddpm.u
    assert u[-1] == 0 and bool((u[:-1] > u[1:]).all()) and len(u) == 1001
    j = torch.tensor([10, 500, 990])
    assert torch.equal(iddpm.round_sigma(u[j] * 1.0001, return_index=True), j)
    assert torch.equal(iddpm.round_sigma(u[j] * 1.0001), u[j])
    iddpm(x, u[j])
    assert torch.equal(iddpm.model.seen[1], (999 - j).float())


def test_fp16_flag_is_ignored_on_cpu():
    net, kwargs = build("EDMPrecond", "ddpmpp", 0)
    half = edm.EDMPrecond(**dict(kwargs, use_fp16=True))
    half.load_state_dict(net.state_dict())
    x, sigma, y, extra = inputs(kwargs)
    with torch.no_grad():
        assert torch.equal(half.eval()(x, sigma, y, **extra), net(x, sigma, y, **extra))


# ---------------------------------------------------------------------------------------------
# Refusals: nothing in a file runs; every error is one line.

class Reduce:
    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def one_line_error(path, **kwargs):
    with pytest.raises(RealUIDError) as caught:
        net_pickles.load_edm_network(path, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize("attack", ["os.system", "builtins.eval", "builtins.exec", "nested"])
def test_code_in_a_pickle_is_refused(tmp_path, attack):
    marker = tmp_path / "pwned"
    shell, python = f"touch {marker}", f"open({str(marker)!r}, 'w').write('x')"
    payload = {"os.system": Reduce(os.system, shell), "builtins.eval": Reduce(eval, python),
               "builtins.exec": Reduce(exec, python)}.get(attack)
    path = tmp_path / "evil.pkl"
    if attack == "nested":  # inside a network's state, next to real tensors
        net, kwargs = build("VEPrecond", "ddpmpp", 0)
        net.hidden = Reduce(os.system, shell)
        write_edm_pickle(path, net, kwargs)
    else:
        with open(path, "wb") as f:
            pickle.dump({"ema": payload}, f)
    message = one_line_error(path)
    assert "refused global" in message and "not an EDM network pickle" in message
    assert ("system" if attack in ("os.system", "nested") else attack) in message
    assert not marker.exists()


def test_module_src_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    src = f"open({str(marker)!r}, 'w').write('x')\n"
    net, kwargs = build("EDMPrecond", "adm", 3)
    path = tmp_path / "src.pkl"
    write_edm_pickle(path, net, kwargs, module_src=src, extra={"evil": Opaque("Evil", a=1)})
    data = net_pickles.load_edm_pickle(path)
    assert not marker.exists()
    assert data["evil"] == {"class_name": "Evil", "init_args": (), "init_kwargs": {"a": 1}}
    assert isinstance(data["ema"], edm.EDMPrecond) and str(marker) not in repr(data)


def test_a_pickle_cannot_change_the_readers_classes(tmp_path):
    """BUILD with a slot state on a global is setattr on it: refused for the stand-in classes."""
    rebind = (b"\x80\x02ctorch_utils.persistence\n_reconstruct_persistent_obj\n"  # the class
              b"N}X\x08\x00\x00\x00__init__ccollections\nOrderedDict\ns\x86b"  # (None, {...})
              b"0}X\x03\x00\x00\x00emaK\x01s.")  # BUILD, then {'ema': 1}
    init = net_pickles._Persistent.__init__
    with pytest.raises(RealUIDError, match="may not change"):
        net_pickles.load_edm_pickle(io.BytesIO(rebind))
    assert net_pickles._Persistent.__init__ is init
    net, kwargs = build("VEPrecond", "ddpmpp", 0)  # a file object works as well as a path
    write_edm_pickle(tmp_path / "ok.pkl", net, kwargs)
    with open(tmp_path / "ok.pkl", "rb") as f:
        assert isinstance(net_pickles.load_edm_pickle(f)["ema"], edm.VEPrecond) and not f.closed


def test_tensor_bytes_are_read_as_weights_only(tmp_path):
    """A storage's bytes are torch.save's format, read by torch.load(weights_only=True)."""
    marker = tmp_path / "pwned"
    inner = pickle.dumps(Reduce(os.system, f"touch {marker}"), protocol=2)
    path = tmp_path / "storage.pkl"
    with open(path, "wb") as f:
        pickle.dump({"ema": Reduce(torch.storage._load_from_bytes, inner)}, f)
    message = one_line_error(path)
    assert "storage" in message and not marker.exists()


def test_user_errors_are_one_line(tmp_path):
    net, kwargs = build("EDMPrecond", "ddpmpp", 0)
    path = tmp_path / "edm.pkl"
    write_edm_pickle(path, net, kwargs, snapshot=False)
    message = one_line_error(path, key="G_ema")
    assert "'G_ema'" in message and "'ema'" in message
    text = tmp_path / "notes.txt"
    text.write_text("not a pickle at all\n")
    assert "not an EDM network pickle" in one_line_error(text)
    checkpoint = tmp_path / "torch.pt"
    torch.save({"ema": net.state_dict()}, checkpoint)
    assert "not an EDM network pickle" in one_line_error(checkpoint)
    listed = tmp_path / "list.pkl"
    listed.write_bytes(pickle.dumps([1, 2]))
    assert "top level is a list" in one_line_error(listed)
    assert "cannot read" in one_line_error(tmp_path / "missing.pkl")
    # arguments that do not fit the tensors (e.g. an edited pickle)
    write_edm_pickle(path, net, dict(kwargs, model_channels=16), snapshot=False)
    assert "do not fit" in one_line_error(path)
    write_edm_pickle(path, net, dict(kwargs, no_such_argument=1), snapshot=False)
    assert "cannot be built" in one_line_error(path)
    write_edm_pickle(path, net, kwargs)
    assert "not one of EDM's networks" in one_line_error(path, key="loss_fn")


if __name__ == "__main__":
    # Re-measure the pinned numbers with EDM's own code: python tests/test_edm.py --edm-src DIR
    import argparse
    import importlib.util
    parser = argparse.ArgumentParser(description="print EDM_LAYOUTS / EDM_OUTPUTS from EDM's code")
    parser.add_argument("--edm-src", required=True)
    src = os.path.abspath(parser.parse_args().edm_src)
    if importlib.util.find_spec("requests") is None:  # dnnlib imports it, for downloads only
        sys.modules["requests"] = types.ModuleType("requests")
    sys.path.insert(0, src)
    from training import networks
    layouts, outputs = {}, {}
    for precond, arch, label_dim in CASES:
        key, kwargs = f"{precond} {arch} {label_dim}", kwargs_of(precond, arch, label_dim)
        net = set_pin_weights(getattr(networks, precond)(**kwargs)).eval()
        x, sigma, y, extra = inputs(kwargs)
        with torch.no_grad():
            layouts[key] = layout_digest(net)
            outputs[key] = summary(denoise64(net, x, sigma, y, extra))
    print("EDM_LAYOUTS = {")
    for k, v in layouts.items():
        print(f"    {k!r}: {v!r},")
    print("}")
    print("EDM_OUTPUTS = {")
    for k, v in outputs.items():
        print(f"    {k!r}: [{', '.join(f'{x:.10g}' for x in v)}],")
    print("}")
