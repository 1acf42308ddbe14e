"""edm2.py: EDM2's magnitude-preserving denoisers, and their pickles read by net_pickles.py.
No EDM2 code is needed.

Pickles are written here in EDM2's format (a dnnlib.EasyDict; each network, encoder and loss a
torch_utils.persistence persistent object carrying module_src, class_name and state) by a
pickler that stands in for EDM2's code. Layouts and outputs of EDM2's own code are pinned as
numbers measured with it (`PYTHONPATH=. python tests/test_edm2.py --edm2-src DIR` prints them
again); benchmarks/check_edm2.py compares against EDM2's own code directly.
"""
import copy
import hashlib
import math
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

import edm2
import net_pickles
from common import RealUIDError
from test_edm import EXPLODING_SRC, edm_globals

# Toy versions of EDM2's networks: one block per level, 8 channels per attention head (EDM2's
# 64 would leave these widths without heads), 8x8 images.
TINY = dict(img_resolution=8, model_channels=16, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[4], channels_per_head=8)
CASES = {
    "pixel cond": dict(TINY, img_channels=3, label_dim=5),
    "pixel uncond": dict(TINY, img_channels=3, label_dim=0),
    # a latent (4-channel) network with every other constructor argument off its default
    "latent custom": dict(TINY, img_channels=4, label_dim=3, channel_mult=[1, 2, 2],
                          channel_mult_noise=2, channel_mult_emb=3, logvar_channels=8,
                          label_balance=0.3, concat_balance=0.4, res_balance=0.4,
                          attn_balance=0.2, clip_act=0.5, resample_filter=[1, 3, 3, 1],
                          sigma_data=0.6, use_fp16=False),
}

# Measured with EDM2's own code (NVlabs/edm2 at 4bf8162, torch 2.14 CPU) by
# `PYTHONPATH=. python tests/test_edm2.py --edm2-src DIR`: sha256 of the state dict's
# "key shape" lines in order (first 16 hex digits); summaries of D(x; sigma, y) in eval mode,
# of ln u(sigma), and of D in training mode (forced weight normalisation), for the
# deterministic weights and inputs below; parameter counts of edm2.CONFIGS.
EDM2_LAYOUTS = {
    'pixel cond': '2a9243c5a342fdf5',
    'pixel uncond': 'cc4554dfc7bf5800',
    'latent custom': 'a7f1929d54983523',
}
EDM2_OUTPUTS = {
    'pixel cond': [
        [-2.254601641, 146.4902811, -0.3202065204, -0.09686930766],
        [-0.1754662991, 0.1560884712, -0.2045101497, -0.2172363102],
        [-2.085018202, 147.0740866, -0.1963536476, -0.09147177618],
    ],
    'pixel uncond': [
        [-2.259042412, 146.4179886, -0.3237839671, -0.09365362155],
        [-0.1794913858, 0.1566091459, -0.1960342613, -0.2134619355],
        [-2.124941209, 146.5244755, -0.2417962485, -0.05125372698],
    ],
    'latent custom': [
        [5.584419601, 212.071635, -0.1859832527, 1.287425822],
        [-1.201865554, 1.497819693, -1.234651795, -0.8425807953],
        [5.587448909, 213.0013823, -0.1194908449, 1.253077893],
    ],
}
EDM2_PARAMS = {
    'edm2-img512-xxs': 31_309_029,
    'edm2-img512-xs': 124_713_253,
    'edm2-img512-s': 280_212_837,
    'edm2-img512-m': 497_807_781,
    'edm2-img512-l': 777_498_085,
    'edm2-img512-xl': 1_119_283_749,
    'edm2-img512-xxl': 1_523_164_773,
    'edm2-img64-xs': 124_710_949,
    'edm2-img64-s': 280_209_381,
    'edm2-img64-m': 497_803_173,
    'edm2-img64-l': 777_492_325,
    'edm2-img64-xl': 1_119_276_837,
}


def layout_digest(net):
    lines = "".join(f"{k} {tuple(v.shape)}\n" for k, v in net.state_dict().items())
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def set_weights(net):
    """Deterministic weights without RNG (EDM2's code and edm2.py get the same numbers on any
    torch): sines in every weight, gains 0.3 to 0.5 (EDM2 starts them at 0, which would zero
    the output), Fourier frequencies and phases. The weights' rms is 1e-4, EDM2's eps: then
    normalize() halves them and forced weight normalisation (training mode) doubles that, so
    the pinned outputs move with eps and with the training-mode rewrite."""
    with torch.no_grad():
        for i, (name, p) in enumerate(net.named_parameters()):
            wave = torch.sin(0.731 * torch.arange(p.numel(), dtype=torch.float64) + 0.37 * i)
            p.copy_(1e-4 * math.sqrt(2) * wave.reshape(p.shape) if p.dim()
                    else 0.4 + 0.1 * wave[0])
        for i, (name, b) in enumerate(net.named_buffers()):
            k = torch.arange(b.numel(), dtype=torch.float64)
            b.copy_(2 * math.pi * (torch.sin(1.3 * k + i) if name.endswith("freqs")
                                   else (0.618 * k + 0.1 * i) % 1))
    return net


def build(case):
    return set_weights(edm2.Precond(**CASES[case])).eval()


def inputs(kwargs, n=4):
    """Fixed x, sigma (0.002 to 80, EDM's range) and one-hot labels."""
    res, channels, label_dim = kwargs["img_resolution"], kwargs["img_channels"], kwargs["label_dim"]
    x = torch.cos(0.113 * torch.arange(n * channels * res * res, dtype=torch.float64))
    sigma = torch.tensor([0.002, 0.3, 3.0, 80.0][:n])
    y = torch.eye(label_dim)[torch.arange(n) % label_dim] if label_dim else None
    return x.reshape(n, channels, res, res).to(torch.float32), sigma, y


def summary(D):
    """Four numbers that move with any change of D: sum, sum of squares, two weighted sums."""
    D = D.double()
    w = torch.cos(0.5 * torch.arange(D.numel(), dtype=torch.float64)).reshape(D.shape)
    return [float(D.sum()), float((D * D).sum()), float((w * D).sum()),
            float(D.flatten()[::7].sum())]


def outputs(net, kwargs):
    """[D eval, ln u eval, D train] summaries; leaves net in eval mode (its weights normalised
    by the training-mode pass)."""
    x, sigma, y = inputs(kwargs)
    with torch.no_grad():
        D, logvar = net.eval()(x, sigma, y, return_logvar=True)
        D_train = net.train()(x, sigma, y)
    net.eval()
    return [summary(D), summary(logvar), summary(D_train)]


def close(got, want):
    # float32 rounding of another BLAS / torch build: far below 1e-4 of |D|; any error in the
    # network moves these sums by a good fraction of |D|
    return got == pytest.approx(want, rel=1e-5, abs=1e-4 * math.sqrt(abs(want[1])) + 1e-6)


# ---------------------------------------------------------------------------------------------
# The magnitude-preserving operations in closed form (EDM2 Eqs. 47, 66, 75, 81, 88, 103).

def test_normalize_gives_unit_magnitude_rows_with_edm2s_eps():
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    x[1] *= 1e-6  # rms 1e-6 << eps: eps dominates
    x[2] = 0
    n = x[0].numel()
    got = edm2.normalize(x)
    rms = x.flatten(1).norm(dim=1) / math.sqrt(n)
    want = x / (1e-4 + rms).reshape(-1, 1, 1, 1)  # x / (eps + ||x|| / sqrt(N)), eps = 1e-4
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    norms = got.flatten(1).norm(dim=1)
    assert torch.allclose(norms[[0, 3, 4]], torch.full([3], math.sqrt(n), dtype=torch.float64),
                          rtol=1e-3)  # unit magnitude: norm sqrt(N), up to eps / rms
    assert norms[1] < 0.02 * math.sqrt(n) and torch.equal(got[2], x[2])  # tiny and zero rows
    # over one dimension (pixel norm): each pixel's channel vector
    pix = edm2.normalize(x[[0, 3]], dim=1)
    assert torch.allclose(pix.norm(dim=1), torch.full([2, 4, 4], math.sqrt(3), dtype=torch.float64),
                          rtol=1e-3)
    # float16 input: the norm in float32, the result in float16
    assert edm2.normalize(x.half()).dtype == torch.float16


def test_mp_sum_and_mp_cat_preserve_magnitude():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 200_000, generator=g, dtype=torch.float64)
    for t in (0.3, 0.5, 0.9):
        s = edm2.mp_sum(a, b, t)
        assert torch.allclose(s, ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t ** 2),
                              rtol=1e-12, atol=1e-12)
        assert float(s.var()) == pytest.approx(1, abs=0.02)  # independent unit inputs
    # concatenation: with exactly unit-magnitude parts (+-1 entries), the result's mean square is
    # exactly 1 and b's share of it is t^2 / ((1 - t)^2 + t^2), whatever the channel counts
    A = torch.ones(2, 3, 4, 4, dtype=torch.float64)
    B = -torch.ones(2, 13, 4, 4, dtype=torch.float64)
    for t in (0.3, 0.5, 0.8):
        c = edm2.mp_cat(A, B, t=t)
        assert c.shape == (2, 16, 4, 4)
        assert float(c.square().mean()) == pytest.approx(1, rel=1e-12)
        share = float(c[:, 3:].square().sum() / c.square().sum())
        assert share == pytest.approx(t ** 2 / ((1 - t) ** 2 + t ** 2), rel=1e-12)
    z = torch.randn(1_000_000, generator=g)
    assert float(edm2.mp_silu(z).square().mean()) == pytest.approx(1, abs=0.01)  # Eq. 81


def test_mp_fourier_features():
    emb = edm2.MPFourier(64)
    c = torch.linspace(-2, 2, 7)
    want = math.sqrt(2) * torch.cos(torch.outer(c, emb.freqs) + emb.phases)
    assert torch.allclose(emb(c), want, atol=1e-6)
    assert set(dict(emb.named_buffers())) == {"freqs", "phases"} and not list(emb.parameters())
    # uniform phases: unit magnitude on average over features
    big = edm2.MPFourier(100_000)
    assert float(big(torch.tensor([0.7])).square().mean()) == pytest.approx(1, abs=0.02)


def test_mpconv_normalises_weights_and_forces_them_in_training():
    layer = edm2.MPConv(6, 4, kernel=[3, 3])
    with torch.no_grad():
        layer.weight.mul_(torch.arange(1, 5, dtype=torch.float32).reshape(4, 1, 1, 1))
    stored = layer.weight.detach().clone()
    x = torch.randn(2, 6, 5, 5)
    fan_in = 6 * 9
    # eval: the weight normalised on the fly, the stored one untouched
    w_hat = edm2.normalize(stored) / math.sqrt(fan_in)
    y = layer.eval()(x)
    assert torch.allclose(y, torch.nn.functional.conv2d(x, w_hat, padding=1), atol=1e-5)
    assert torch.equal(layer.weight, stored)
    assert torch.allclose(w_hat.flatten(1).norm(dim=1), torch.ones(4), rtol=1e-3)  # unit rows
    assert torch.allclose(layer(x, gain=2.5), 2.5 * y, rtol=1e-5, atol=1e-6)
    # training: the stored weight becomes normalize(w) (Eq. 66), rows of norm sqrt(fan_in)
    layer.train()(x)
    assert torch.allclose(layer.weight, edm2.normalize(stored), rtol=1e-6)
    assert torch.allclose(layer.weight.flatten(1).norm(dim=1), torch.full([4], math.sqrt(fan_in)),
                          rtol=1e-3)
    # the rewrite done once per step instead (normalize_weights_): the same numbers, and a
    # network may then run twice before one backward pass (in-forward, autograd refuses that)
    net, again = build("pixel cond").train(), build("pixel cond").train()
    x, sigma, y = inputs(CASES["pixel cond"])
    with torch.no_grad():
        want = net(x, sigma, y)
    edm2.normalize_weights_(again)
    for m in again.modules():
        if isinstance(m, edm2.MPConv):
            m.force_normalization = False
    first = again(x, sigma, y)
    assert torch.equal(first.detach(), want)
    ours, theirs = again.state_dict(), net.state_dict()
    # (a pass without return_logvar leaves logvar_linear as it was; normalize_weights_ does not)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if not k.startswith("logvar_"))
    (first.square().mean() + again(x, sigma, y).square().mean()).backward()
    assert again.unet.enc["8x8_conv"].weight.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="inplace"):
        (net(x, sigma, y).sum() + net(x, sigma, y).sum()).backward()
    # fully connected (kernel []), unit-variance inputs -> unit-variance outputs
    fc = edm2.MPConv(512, 256, kernel=[]).eval()
    out = fc(torch.randn(4096, 512))
    assert out.shape == (4096, 256) and float(out.detach().var()) == pytest.approx(1, abs=0.05)


# ---------------------------------------------------------------------------------------------
# Preconditioning in closed form (EDM's Table 1, as EDM2 uses it).

class Probe(torch.nn.Module):
    """Stands in for the U-Net: records its inputs and returns a known function of them."""

    def forward(self, x, noise_labels, class_labels):
        self.seen = (x.clone(), noise_labels.clone(), class_labels)
        return torch.tanh(x) + noise_labels.reshape(-1, 1, 1, 1)


def test_preconditioning_closed_form():
    net = edm2.Precond(**CASES["pixel cond"])
    net.unet = Probe()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.5, 2.0, 80.0], dtype=torch.float64)
    s, d = sigma.reshape(-1, 1, 1, 1), 0.5
    c_skip, c_out = d ** 2 / (s ** 2 + d ** 2), s * d / (s ** 2 + d ** 2).sqrt()
    c_in, c_noise = 1 / (s ** 2 + d ** 2).sqrt(), torch.log(sigma) / 4
    coefficients = edm2.preconditioning(s, d)
    for got, want in zip(coefficients, (c_skip, c_out, c_in, c_noise)):
        assert torch.allclose(got, want, rtol=1e-12)
    D, logvar = net(x, sigma, return_logvar=True)
    F_x = torch.tanh(c_in * x) + c_noise.reshape(-1, 1, 1, 1)
    assert D.dtype == torch.float32 and logvar.shape == (4, 1, 1, 1)
    assert torch.allclose(D.double(), c_skip * x + c_out * F_x, rtol=1e-5, atol=1e-5)
    seen_x, seen_noise, seen_labels = net.unet.seen
    assert torch.allclose(seen_x.double(), c_in * x, rtol=1e-6)
    assert torch.allclose(seen_noise.double(), c_noise, rtol=1e-6)
    assert torch.equal(seen_labels, torch.zeros(1, 5))  # no labels -> the zero vector, as EDM2
    # sigma -> 0: D -> x; a scalar sigma is accepted; `model` is the U-Net (edm.py's name)
    assert torch.allclose(net(x, 1e-8).double(), x, atol=1e-6)
    assert net.model is net.unet and "model" not in dict(net.named_children())


# ---------------------------------------------------------------------------------------------
# Layout and outputs as EDM2's own code gives them; strict state-dict round trip.

@pytest.mark.parametrize("case", CASES)
def test_layout_and_outputs_equal_edm2s(case):
    net = build(case)
    assert layout_digest(net) == EDM2_LAYOUTS[case]
    for got, want in zip(outputs(net, CASES[case]), EDM2_OUTPUTS[case]):
        assert close(got, want)


def test_published_configs_have_edm2s_parameter_counts():
    for name, count in EDM2_PARAMS.items():
        with torch.device("meta"):  # shapes only: no memory, no time
            net = edm2.Precond(**edm2.CONFIGS[name])
        assert sum(p.numel() for p in net.parameters()) == count, name
    keys = net.state_dict()  # the last, edm2-img64-xl: 64x64 RGB, 1000 classes, 384 channels
    assert tuple(keys["unet.enc.64x64_conv.weight"].shape) == (384, 4, 3, 3)
    assert tuple(keys["unet.emb_label.weight"].shape) == (1536, 1000)
    assert tuple(keys["unet.out_conv.weight"].shape) == (3, 384, 3, 3)


def test_strict_state_dict_round_trip():
    net = build("latent custom")
    sd = net.state_dict()
    assert all(not k.startswith("model.") for k in sd)  # the `model` alias adds no keys
    fresh = edm2.Precond(**CASES["latent custom"])
    fresh.load_state_dict(sd, strict=True)
    x, sigma, y = inputs(CASES["latent custom"])
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x, sigma, y), net(x, sigma, y))
    with pytest.raises(RuntimeError):
        edm2.Precond(**CASES["pixel cond"]).load_state_dict(sd, strict=True)


# ---------------------------------------------------------------------------------------------
# Writing pickles in EDM2's format without EDM2's code.

PERSISTENT = (edm2.Precond, edm2.UNet, edm2.Block, edm2.MPConv, edm2.MPFourier)


class Opaque:
    """A persistent object of a class edm2.py does not implement (an encoder, EDM2Loss): its
    state is its attributes plus the recorded constructor arguments, as EDM2's persistence
    pickles it."""

    def __init__(self, class_name, attrs=None, **kwargs):
        self.class_name, self.kwargs, self.attrs = class_name, kwargs, attrs or {}


class EDM2Pickler(pickle.Pickler):
    """Writes edm2.py's modules as EDM2's persistence does: _reconstruct_persistent_obj(meta)
    with the module's __dict__ and its constructor arguments as the state."""

    def __init__(self, f, reconstruct, init_kwargs, module_src=EXPLODING_SRC):
        super().__init__(f, protocol=4)  # pickle.dump's default, as EDM2 calls it
        self.reconstruct, self.init_kwargs, self.module_src = reconstruct, init_kwargs, module_src

    def reducer_override(self, obj):
        if isinstance(obj, Opaque):
            state = dict(_init_args=(), _init_kwargs=obj.kwargs, **obj.attrs)
            class_name = obj.class_name
        elif isinstance(obj, PERSISTENT):
            # EDM2 records every layer's arguments; the reader needs only the top network's
            state = dict(vars(obj), _init_args=(), _init_kwargs=self.init_kwargs.get(id(obj), {}))
            class_name = type(obj).__name__
        else:
            return NotImplemented
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=class_name,
                    state=state)
        return self.reconstruct, (meta,)


def write_edm2_pickle(path, net, kwargs, dtype=torch.float16, latent=False,
                      module_src=EXPLODING_SRC, tamper=None):
    """EDM2's snapshot: EasyDict(encoder, dataset_kwargs, loss_fn), then
    ema = deepcopy(net).cpu().eval().requires_grad_(False).to(float16) (EDM2's training loop);
    tamper(ema), if given, edits the copy before it is written."""
    if latent:  # StabilityVAEEncoder's state holds numpy arrays (and its VAE, not pickled)
        std = np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28])
        attrs = dict(vae_name="stabilityai/sd-vae-ft-mse", scale=std,
                     bias=np.float32(0) - np.float32([5.81, 3.25, 0.12, -2.15]) * std,
                     batch_size=8, _vae=None)
        encoder = Opaque("StabilityVAEEncoder", attrs)
    else:
        encoder = Opaque("StandardRGBEncoder")
    with edm_globals() as (reconstruct, EasyDict):  # EDM2 names the same two globals
        ema = copy.deepcopy(net).cpu().eval().requires_grad_(False).to(dtype)
        if tamper is not None:
            tamper(ema)
        data = EasyDict(encoder=encoder,
                        dataset_kwargs=EasyDict(class_name="training.dataset.ImageFolderDataset",
                                                path="img64.zip", use_labels=True),
                        loss_fn=Opaque("EDM2Loss", P_mean=-0.8, P_std=1.6), ema=ema)
        with open(path, "wb") as f:
            EDM2Pickler(f, reconstruct, {id(ema): kwargs}, module_src).dump(data)
    assert "torch_utils" not in sys.modules and "dnnlib" not in sys.modules


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_pickle_in_edm2_format_round_trip(tmp_path, dtype):
    case = "latent custom" if dtype == torch.float16 else "pixel cond"
    net, kwargs = build(case), CASES[case]
    path = tmp_path / "network-snapshot-0000000-0.100.pkl"
    write_edm2_pickle(path, net, kwargs, dtype, latent=kwargs["img_channels"] == 4)
    data = net_pickles.load_edm_pickle(path)
    loaded = net_pickles.load_edm_network(path)
    assert type(loaded) is edm2.Precond and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert all(t.dtype == torch.float32 for t in loaded.state_dict().values())
    # the stored values exactly: float16 ones when the pickle holds float16
    want = {k: v.to(dtype).float() for k, v in net.state_dict().items()}
    got = loaded.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    reference = edm2.Precond(**kwargs)
    reference.load_state_dict(want)
    x, sigma, y = inputs(kwargs)
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, y), reference.eval()(x, sigma, y))
    assert loaded.init_kwargs == kwargs
    for attr in ("img_resolution", "img_channels", "label_dim", "sigma_data", "use_fp16"):
        assert getattr(loaded, attr) == kwargs.get(attr, getattr(net, attr))
    # the other entries as plain data; the module source nowhere
    encoder = "StabilityVAEEncoder" if kwargs["img_channels"] == 4 else "StandardRGBEncoder"
    kept = data["encoder"].pop("state", None)  # a latent encoder's scale and bias: latents.py
    assert data["encoder"] == {"class_name": encoder, "init_args": (), "init_kwargs": {}}
    if encoder == "StabilityVAEEncoder":
        assert sorted(kept) == ["bias", "scale", "vae_name"]
        assert kept["scale"].dtype == np.float32 and kept["scale"].shape == (4,)
    else:
        assert kept is None
    assert data["loss_fn"] == {"class_name": "EDM2Loss", "init_args": (),
                               "init_kwargs": {"P_mean": -0.8, "P_std": 1.6}}
    assert type(data["dataset_kwargs"]) is dict and data["dataset_kwargs"]["path"] == "img64.zip"
    assert "never be executed" not in repr({k: v for k, v in data.items() if k != "ema"})


def test_a_loaded_edm2_network_is_a_denoiser_field(tmp_path):
    """What networks/teachers' DenoiserField reads: label_dim, image size, no sigma range (so
    EDM's sampling range), and the bottleneck `model.dec[..._in1]` for the GAN head."""
    import networks
    field_cls = getattr(networks, "DenoiserField", None)
    if field_cls is None:
        import teachers
        field_cls = teachers.DenoiserField
    net, kwargs = build("pixel cond"), CASES["pixel cond"]
    write_edm2_pickle(tmp_path / "edm2.pkl", net, kwargs)
    field = field_cls(net_pickles.load_edm_network(tmp_path / "edm2.pkl"), gan_head=True)
    assert field.label_dim == 5
    assert (field.t_min, field.t_max) == pytest.approx((1 / 81, 1 / 1.002), rel=1e-12)
    assert field._middle() is field.denoiser.unet.dec["4x4_in1"]
    t = torch.tensor([0.05, 0.3, 0.6, 0.95])
    x, _, _ = inputs(kwargs)
    y = torch.tensor([0, 1, 2, 4])
    with torch.no_grad():
        v = field(t, x, y)
        s = t.reshape(-1, 1, 1, 1)
        D = field.denoiser(x / s, ((1 - s) / s).flatten(), torch.eye(5)[y])
        assert torch.allclose(v, (D - x) / (1 - s), rtol=1e-5, atol=1e-5)
        assert field.forward_head(t, x, y).shape == (4, 1, 1, 1)  # 4x4 -> 2x2 -> 1x1


# ---------------------------------------------------------------------------------------------
# Refusals: nothing in a file runs; every error is one line.

class Reduce:
    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def one_line_error(path):
    with pytest.raises(RealUIDError) as caught:
        net_pickles.load_edm_network(path)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_code_in_an_edm2_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    net, kwargs = build("pixel uncond"), CASES["pixel uncond"]

    def plant(ema):  # after the deepcopy, which would itself run the payload
        ema.unet.dec["4x4_in1"].hidden = Reduce(os.system, f"touch {marker}")  # next to tensors
    path = tmp_path / "evil.pkl"
    write_edm2_pickle(path, net, kwargs, tamper=plant)
    assert not marker.exists()
    message = one_line_error(path)
    assert "refused global" in message and "system" in message
    assert "not an EDM network pickle" in message and not marker.exists()


def test_module_src_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    net, kwargs = build("pixel cond"), CASES["pixel cond"]
    path = tmp_path / "src.pkl"
    write_edm2_pickle(path, net, kwargs, latent=True,
                      module_src=f"open({str(marker)!r}, 'w').write('x')\n")
    assert isinstance(net_pickles.load_edm_network(path), edm2.Precond)
    assert not marker.exists()


def test_numpy_arrays_are_data_only(tmp_path):
    """The array globals EDM2's encoder needs cannot be turned into constructors."""
    view = tmp_path / "view.pkl"  # ndarray(shape, dtype, buffer): memory the file chose
    view.write_bytes(pickle.dumps({"ema": Reduce(np.ndarray, (2,), "f4", b"\0" * 8)}))
    assert "numpy.ndarray may be named" in one_line_error(view)
    other = tmp_path / "other.pkl"  # numpy's _reconstruct with a class other than ndarray
    reconstruct = np.zeros(0).__reduce__()[0]
    other.write_bytes(pickle.dumps({"ema": Reduce(reconstruct, dict, (0,), b"b")}))
    assert "refused global builtins.dict" in one_line_error(other)
    from collections import OrderedDict
    other.write_bytes(pickle.dumps({"ema": Reduce(reconstruct, OrderedDict, (0,), b"b")}))
    assert "other than numpy.ndarray" in one_line_error(other)
    arrays = tmp_path / "arrays.pkl"  # plain arrays load, as data
    arrays.write_bytes(pickle.dumps({"a": np.float32([1, 2]), "b": np.arange(3)}))
    data = net_pickles.load_edm_pickle(arrays)
    assert data["a"].tolist() == [1.0, 2.0] and data["b"].tolist() == [0, 1, 2]


def test_one_line_errors_for_edm2_pickles(tmp_path):
    net, kwargs = build("pixel cond"), CASES["pixel cond"]
    path = tmp_path / "edm2.pkl"
    write_edm2_pickle(path, net, dict(kwargs, model_channels=32))  # arguments unlike the tensors
    assert "do not fit a Precond" in one_line_error(path)
    write_edm2_pickle(path, net, dict(kwargs, no_such_argument=1))  # reaches Block: TypeError
    assert "Precond cannot be built" in one_line_error(path)
    write_edm2_pickle(path, net, kwargs)
    with pytest.raises(RealUIDError, match="'encoder' holds a StandardRGBEncoder"):
        net_pickles.load_edm_network(path, key="encoder")


if __name__ == "__main__":
    # Re-measure the pinned numbers with EDM2's own code: python tests/test_edm2.py --edm2-src DIR
    import argparse
    import importlib.util
    parser = argparse.ArgumentParser(description="print EDM2_LAYOUTS / EDM2_OUTPUTS / EDM2_PARAMS "
                                                 "from EDM2's code")
    parser.add_argument("--edm2-src", required=True)
    src = os.path.abspath(parser.parse_args().edm2_src)
    if importlib.util.find_spec("requests") is None:  # dnnlib imports it, for downloads only
        sys.modules["requests"] = types.ModuleType("requests")
    sys.path.insert(0, src)
    from training import networks_edm2
    layouts, outs, params = {}, {}, {}
    for case, kwargs in CASES.items():
        net = set_weights(networks_edm2.Precond(**kwargs)).eval()
        layouts[case], outs[case] = layout_digest(net), outputs(net, kwargs)
    for name, cfg in edm2.CONFIGS.items():
        with torch.device("meta"):
            params[name] = sum(p.numel() for p in networks_edm2.Precond(**cfg).parameters())
    print("EDM2_LAYOUTS = {")
    for k, v in layouts.items():
        print(f"    {k!r}: {v!r},")
    print("}\nEDM2_OUTPUTS = {")
    for k, v in outs.items():
        rows = ", ".join("[" + ", ".join(f"{x:.10g}" for x in s) + "]" for s in v)
        print(f"    {k!r}: [{rows}],")
    print("}\nEDM2_PARAMS = {")
    for k, v in params.items():
        print(f"    {k!r}: {v:_d},")
    print("}")
