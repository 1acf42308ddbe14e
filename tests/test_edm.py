"""edm.py: EDM's networks rebuilt, and the safe reader of EDM's pickles. No EDM code is needed.

Pickles are written here in EDM's format (torch_utils.persistence: each network a persistent
object with module_src, class_name and state, nested for its layers) by a pickler that stands in
for EDM's code. Layouts and outputs of EDM's own code are pinned as numbers measured with it
(`PYTHONPATH=. python tests/test_edm.py --edm-src DIR` prints them again);
benchmarks/check_edm.py compares against EDM's own code directly.
"""
import contextlib
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

# Measured with EDM's own code (NVlabs/edm at 008a4e5, torch 2.13 CPU) by
# `PYTHONPATH=. python tests/test_edm.py --edm-src DIR`: sha256 of the state dict's "key shape"
# lines in order (first 16 hex digits), and D(x; sigma, y) summaries for the deterministic
# weights and inputs below.
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
    'EDMPrecond ddpmpp 0': [0.8320727813, 171.9788342, -1.491756808, 0.7157769119],
    'EDMPrecond ddpmpp 3': [-13.7019629, 201.8663043, 2.75694634, -0.6783493152],
    'EDMPrecond ncsnpp 0': [-6.005490967, 168.2425041, 0.6389386788, 0.3144925324],
    'EDMPrecond ncsnpp 3': [-20.34204006, 192.0471811, -0.3358197503, -2.051972114],
    'EDMPrecond skip 0': [-17.18092095, 196.5001023, 1.069441313, -1.030293439],
    'EDMPrecond skip 3': [-20.92199004, 206.8398574, -2.642976564, -4.506352657],
    'EDMPrecond adm 0': [-7.436104962, 177.4914919, 4.178082491, -1.741573006],
    'EDMPrecond adm 3': [-19.10404882, 188.5043739, -29.05109368, -2.58647075],
    'VPPrecond ddpmpp 0': [-198.8537656, 451078.6794, -184.5534041, -21.92590234],
    'VPPrecond ddpmpp 3': [800.3248538, 535367.0799, -384.0367175, 37.02376698],
    'VPPrecond ncsnpp 0': [237.5929667, 331641.8148, -279.0173685, -67.61845224],
    'VPPrecond ncsnpp 3': [1430.069812, 348727.0648, -104.0030812, 169.4130486],
    'VPPrecond skip 0': [1547.221543, 1126913.209, 234.8465214, -2.581180863],
    'VPPrecond skip 3': [1563.213863, 440873.0538, 492.7732094, 462.0284804],
    'VPPrecond adm 0': [210.6976899, 391036.9319, -235.5330374, 111.8523988],
    'VPPrecond adm 3': [1288.139121, 605641.2463, 1655.471132, 241.110677],
    'VEPrecond ddpmpp 0': [323.8788432, 291167.4088, 22.16988746, 135.1059768],
    'VEPrecond ddpmpp 3': [-563.6186473, 511005.3182, -286.5011093, 7.088150316],
    'VEPrecond ncsnpp 0': [-196.1644284, 443004.8547, 18.21241644, 22.4498627],
    'VEPrecond ncsnpp 3': [-912.6526979, 585329.6819, -344.1673781, -66.03859197],
    'VEPrecond skip 0': [-1322.271215, 752632.4023, 88.38440681, -136.0342483],
    'VEPrecond skip 3': [-1006.893695, 1099681.284, -471.5445306, -185.9278338],
    'VEPrecond adm 0': [-961.1002736, 218962.1655, -523.664934, -211.4249174],
    'VEPrecond adm 3': [-973.6028384, 163529.7884, -1812.745542, -68.08152825],
    'iDDPMPrecond ddpmpp 0': [-52.96449043, 365027.0775, -354.2961158, 1.433592672],
    'iDDPMPrecond ddpmpp 3': [797.3583017, 350356.4543, -261.2757798, 71.88560195],
    'iDDPMPrecond ncsnpp 0': [258.9546278, 332929.8218, -243.6883843, -82.42079781],
    'iDDPMPrecond ncsnpp 3': [1328.076846, 415721.3566, -410.2899157, 184.4694854],
    'iDDPMPrecond skip 0': [1652.724958, 1202953.39, 590.3123322, 165.4194322],
    'iDDPMPrecond skip 3': [1107.935986, 379277.5276, 118.0696432, 137.5531863],
    'iDDPMPrecond adm 0': [744.6321389, 308900.5788, 65.69669931, 216.6303703],
    'iDDPMPrecond adm 3': [1271.293191, 662605.2438, 1935.282786, 240.732148],
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
    """State-dict keys and shapes, and D(x; sigma, y), as EDM's own code gives them."""
    key = f"{precond} {arch} {label_dim}"
    net, kwargs = build(precond, arch, label_dim)
    assert layout_digest(net) == EDM_LAYOUTS[key]
    x, sigma, y, extra = inputs(kwargs)
    with torch.no_grad():
        got = summary(net(x, sigma, y, **extra))
    # float32 rounding of another BLAS / torch build: far below 1e-4 of |D|; any error in the
    # network moves these sums by a good fraction of |D|
    want = EDM_OUTPUTS[key]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-4 * math.sqrt(want[1]))


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
        net = set_weights(getattr(networks, precond)(**kwargs)).eval()
        x, sigma, y, extra = inputs(kwargs)
        with torch.no_grad():
            layouts[key], outputs[key] = layout_digest(net), summary(net(x, sigma, y, **extra))
    print("EDM_LAYOUTS = {")
    for k, v in layouts.items():
        print(f"    {k!r}: {v!r},")
    print("}")
    print("EDM_OUTPUTS = {")
    for k, v in outputs.items():
        print(f"    {k!r}: [{', '.join(f'{x:.10g}' for x in v)}],")
    print("}")
