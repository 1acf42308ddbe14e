"""Faults of the diffusion path found on 29328e5, each with the test that shows it fixed:
augmentation labels (EDM's CIFAR-10 / FFHQ / AFHQ networks, augment_dim 9) under DDP, EDM's
Heun sampler on iDDPM's noise levels, the attention's float32 logits under autocast, and an
fp16 pickle's network in float32 (DenoiserField.set_fp16)."""
import copy
import math
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import distill
import edm
import networks
import teachers
from conftest import FAST, ROOT, load, run
from test_edm import ARCHS, write_edm_pickle
from test_teachers import small_edm

SONG_ARGS = {k: v for k, v in ARCHS["ddpmpp"].items() if k not in ("model_type", "img_resolution")}


# ---------------------------------------------------------------------------------------------
# 1. Augmentation labels: zeros, as SiD passes them, so that DDP sees every parameter used.

def test_zero_augment_labels_change_no_output_and_give_the_weight_a_gradient():
    """An augment_dim network gets all-zero augment labels: D is bit for bit EDM's forward
    without them (map_augment has no bias), and map_augment.weight gets a gradient (zero),
    which DDP (find_unused_parameters off) needs from every parameter at every update."""
    for arch in ("ddpmpp", "adm"):
        kwargs = dict(ARCHS[arch], img_channels=3, label_dim=3)
        net = edm.EDMPrecond(**kwargs).eval()  # eval: no dropout between the passes
        with torch.no_grad():  # a trained network's map_augment: nonzero (ADM starts at 0)
            net.model.map_augment.weight.normal_()
        field = networks.DenoiserField(net)
        assert field.augment_dim == 9
        x, sigma = torch.randn(4, 3, 8, 8), torch.tensor([0.01, 0.5, 2.0, 40.0])
        y = torch.tensor([0, 1, 2, 0])
        with torch.no_grad():
            want = net(x, sigma, torch.eye(3)[y])  # augment_labels=None: map_augment skipped
            assert torch.equal(field.denoise(x, sigma, y), want)
        field(torch.tensor([0.2, 0.4, 0.6, 0.8]), x, y).square().sum().backward()
        grad = net.model.map_augment.weight.grad
        assert grad is not None and torch.equal(grad, torch.zeros_like(grad))
        assert all(p.grad is not None for p in field.parameters())
    # a network without augmentation labels is called as before (no augment_labels keyword)
    plain = networks.DenoiserField(edm.EDMPrecond(**dict(ARCHS["ncsnpp"], img_channels=3)))
    assert plain.augment_dim == 0


def torchrun(*argv):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *map(str, argv)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def adam_grads(ckpt, optimizer):
    state = ckpt[optimizer]["state"]
    return torch.cat([state[i]["exp_avg"].flatten() for i in sorted(state)]).double()


def test_two_processes_distill_an_augment_network_as_one(tmp_path):
    """An augment_dim 9 EDM pickle (as EDM's CIFAR-10 ones) distilled under torchrun with 2
    processes (gloo): it used to stop at the second update ("Expected to have finished
    reduction in the prior iteration ... Parameter indices which did not receive grad");
    now 2 updates of each player give one process's gradients and weights. As in
    tests/test_scale.py: a negligible learning rate, and Adam's exp_avg (beta1 = 0: the last
    update's gradient) as the witness; --fake-init random, so that the generator's gradient
    is not the rounding noise of f = v*."""
    net, kwargs = small_edm()
    assert kwargs["augment_dim"] == 9
    pkl = tmp_path / "edm-toy-augment.pkl"
    write_edm_pickle(pkl, net, kwargs)
    argv = ["--teacher", pkl, "--fake-init", "random", "--steps", 2, "--fake-steps", 1,
            "--lr", 1e-9, "--warmup", 0, *FAST]
    run(distill, [*argv, "--out", tmp_path / "one"])
    torchrun("distill.py", *argv, "--out", tmp_path / "two")
    a, b = load(tmp_path / "one" / "latest.pt"), load(tmp_path / "two" / "latest.pt")
    assert a["step"] == b["step"] == 2 and len(b["rng"]["per_rank"]) == 2
    for opt in ("optim_u", "optim_gen"):
        ga, gb = adam_grads(a, opt), adam_grads(b, opt)
        assert ga.norm() > 0 and ((ga - gb).norm() / ga.norm()).item() < 1e-4, opt
    for key in ("gen", "u"):
        for name, w in a[key].items():
            assert torch.allclose(w, b[key][name], rtol=0, atol=1e-7), (key, name)


# ---------------------------------------------------------------------------------------------
# 7. EDM's Heun sampler on iDDPM's levels (EDM's generate.py rounds its t_steps).

class Probe(torch.nn.Module):
    """Stands in for the network F: a fixed smooth function of its inputs."""

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        return torch.tanh(x) + 1e-3 * noise_labels.reshape(-1, 1, 1, 1)


def iddpm_field():
    net = edm.iDDPMPrecond(8, 3, model_type="SongUNet", **SONG_ARGS)
    net.model = Probe()
    return networks.DenoiserField(net)


def schedule(sigma_min, sigma_max, steps, rho=7.0):
    i = torch.arange(steps, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + i / (steps - 1) *
            (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def heun(field, z, sigmas):
    """Algorithm 1 on the levels `sigmas` (then 0), as edm_heun computes it."""
    sigmas = list(sigmas) + [0.0]
    x = z.double() * sigmas[0]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = ((x.float() - field.denoise(x.float(), torch.full((len(z),), s))) / s).double()
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d2 = ((x_next.float() - field.denoise(x_next.float(), torch.full((len(z),), s_next)))
                  / s_next).double()
            x_next = x + (s_next - s) * (d + d2) / 2
        x = x_next
    return x.float()


def test_heun_sampler_uses_iddpms_levels():
    """For an iDDPM denoiser every noise level edm_heun evaluates is one of its levels u_j: the
    nearest one (by hand, in float64) to each sigma_i of the rho = 7 schedule; the result is
    Heun's method on those levels, not on the unrounded schedule."""
    field = iddpm_field()
    u = field.denoiser.u.double()
    steps = 6
    sigma_min, sigma_max = max(0.002, float(u[-2])), min(80.0, float(u[0]))
    raw = schedule(sigma_min, sigma_max, steps)
    gaps = (raw[:, None] - u[None]).abs()
    nearest = gaps.argmin(1)
    second = gaps.sort(1).values[:, 1]
    assert bool(((second - gaps.min(1).values) > 1e-6 * raw).all())  # no near-ties
    levels = u[nearest]
    assert bool(((levels - raw).abs() / raw > 1e-6).any())  # rounding moves the schedule

    seen = []
    denoise = field.denoise
    field.denoise = lambda x, sigma, y=None: seen.append(sigma.clone()) or denoise(x, sigma, y)
    z = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = teachers.edm_heun(field, z, steps=steps)
    field.denoise = denoise
    assert len(seen) == 2 * steps - 1
    used = torch.stack([s[0] for s in seen]).double()
    want = torch.stack([levels[0]] + [levels[i] for i in range(1, steps) for _ in range(2)])
    assert torch.equal(used, want.float().double())
    assert torch.allclose(out, heun(field, z, levels.tolist()), rtol=1e-6, atol=1e-6)
    unrounded = heun(field, z, raw.tolist())  # the sampler before the fix
    assert (out - unrounded).abs().max() > 1e-3
    # any other denoiser: the schedule itself (round_sigma is the identity)
    edm_field = networks.DenoiserField(edm.EDMPrecond(8, 3, model_type="SongUNet", **SONG_ARGS))
    edm_field.denoiser.model = Probe()
    assert torch.allclose(teachers.edm_heun(edm_field, z, steps=steps),
                          heun(edm_field, z, schedule(0.002, 80.0, steps).tolist()),
                          rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 9. Precision: the attention's logits in float32 under autocast; set_fp16.

class DtypeLog(TorchDispatchMode):
    """Records (op name, input dtypes) of every op that reaches the kernels (below autocast)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        dtypes = [a.dtype for a in args if isinstance(a, torch.Tensor)]
        self.ops.append((func.__name__, dtypes))
        return func(*args, **(kwargs or {}))


def test_attention_logits_and_softmax_are_float32_under_autocast():
    """Under bf16 autocast (--precision bf16 / mixed) the attention's logits product and its
    softmax, forward and backward, run in float32, as the code says; the rest of the block
    (the qkv projection, the weighted sum of the values) in bf16."""
    block = edm.UNetBlock(128, 128, 64, attention=True, channels_per_head=64)
    x = torch.randn(2, 128, 4, 4, requires_grad=True)
    h = block.conv0(torch.nn.functional.silu(block.norm0(x)))  # any input of the attention
    log = DtypeLog()
    with torch.autocast("cpu", dtype=torch.bfloat16), log:
        out = block._attend(h)
    with log:
        out.float().square().sum().backward()
    bmm = [d for name, d in log.ops if name.startswith("bmm")]
    softmax = [d for name, d in log.ops if "softmax" in name]
    assert bmm[0] == [torch.float32, torch.float32]  # q^T k: the logits
    assert bmm[1] == [torch.bfloat16, torch.bfloat16]  # the weights times v
    assert softmax and all(d == [torch.float32] * len(d) for d in softmax)
    assert any("backward" in name for name, _ in log.ops if "softmax" in name)
    assert out.dtype == torch.bfloat16 and x.grad is not None


def fp16_field():
    net, kwargs = small_edm()
    half = edm.EDMPrecond(**dict(kwargs, use_fp16=True))
    half.load_state_dict(net.state_dict())
    half.init_args, half.init_kwargs = [], dict(kwargs, use_fp16=True)
    return networks.DenoiserField(net.eval()), networks.DenoiserField(half.eval())


def test_set_fp16_sets_every_preconditioner_and_copies_inherit_it():
    field32, field16 = fp16_field()
    assert field16.denoiser.use_fp16 is True
    assert field16.set_fp16(False) is field16 and field16.denoiser.use_fp16 is False
    # EMAs and the frozen aliases are deep copies made after the call: they inherit it
    assert copy.deepcopy(field16).denoiser.use_fp16 is False
    assert field16.config["kwargs"]["use_fp16"] is True  # the pickle's value stays in the config
    field32.set_fp16(True)
    assert field32.denoiser.use_fp16 is True
    field32.set_fp16(False)
    t, x = torch.tensor([0.3, 0.7]), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(field16(t, x), field32(t, x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fp16 path runs on CUDA only")
def test_set_fp16_false_gives_the_float32_outputs_on_cuda():
    """A use_fp16=True network (EDM's ImageNet pickle) runs F in float16 on CUDA; after
    set_fp16(False) it gives the float32 network's outputs, bit for bit, also inside the
    mixed policy's float32 wrapper (common.full_precision)."""
    import common
    field32, field16 = (f.cuda() for f in fp16_field())
    seen = []
    field16.denoiser.model.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    t = torch.tensor([0.3, 0.7], device="cuda")
    x = torch.randn(2, 3, 8, 8, device="cuda")
    with torch.no_grad():
        before = field16(t, x)
        assert seen[-1] == torch.float16 and not torch.equal(before, field32(t, x))
        field16.set_fp16(False)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            mixed = common.full_precision(field16)(t, x)
        assert seen[-1] == torch.float32 and torch.equal(mixed, field32(t, x))
        assert torch.equal(field16(t, x), field32(t, x))
    assert math.isfinite(before.float().abs().sum().item())
