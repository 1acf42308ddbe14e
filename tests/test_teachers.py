"""Diffusion teachers (teachers.py, networks.py; EDM, Karras et al. 2022, and the RealUID paper section 2.1): the denoiser-to-velocity change of variables
against closed forms, the generator's start time, SiD as a configuration of distill.py (its
generator gradient against SiD's formula written out), the noise-level laws, EDM's sampler, and
the commands on an EDM pickle and on a diffusion teacher trained here."""
import math
import os

import numpy as np
import pytest
import torch

import distill
import edm
import losses
import networks
import players
import sample
import teachers
import train_teacher
from conftest import FAST, TINY_NET, load, run

from flow import euler, generate, interpolate
from test_edm import ARCHS, set_weights, write_edm_pickle

torch.set_default_dtype(torch.float32)


class GaussianDenoiser(torch.nn.Module):
    """The exact denoiser of Gaussian data x1 ~ N(mu, s^2) per pixel, in EDM's interface:
    E[x1 | x1 + sigma n = x] = mu + s^2 / (s^2 + sigma^2) (x - mu)."""

    def __init__(self, mu, s, shape=(3, 4, 4)):
        super().__init__()
        self.mu, self.s = mu, s
        self.img_channels, self.img_resolution = shape[0], shape[1]
        self.label_dim, self.sigma_min, self.sigma_max = 0, 0.0, math.inf

    def forward(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
        return self.mu + self.s ** 2 / (self.s ** 2 + sigma ** 2) * (x - self.mu)


def gaussian_flow(mu, s, t, x):
    """The exact flow field of x_t = t x1 + (1 - t) x0, x1 ~ N(mu, s^2), x0 ~ N(0, 1):
    E[x1 - x0 | x_t = x] = mu + (t s^2 - (1 - t)) / (t^2 s^2 + (1 - t)^2) (x - t mu)."""
    t = t.reshape(-1, 1, 1, 1).to(x.dtype)
    return mu + (t * s ** 2 - (1 - t)) / (t ** 2 * s ** 2 + (1 - t) ** 2) * (x - t * mu)


def test_denoiser_converted_is_the_exact_flow_field():
    """For Gaussian data the exact denoiser, through DenoiserField, is the exact flow field."""
    torch.manual_seed(0)
    mu = torch.randn(3, 4, 4, dtype=torch.float64) * 0.5
    field = networks.DenoiserField(GaussianDenoiser(mu, 0.7))
    t = torch.tensor([0.0123, 0.1, 0.5, 0.9, 0.998], dtype=torch.float64)
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    assert torch.allclose(field(t, x), gaussian_flow(mu, 0.7, t, x), rtol=1e-10, atol=1e-10)
    # and back: D = x_t + (1 - t) v
    t_ = t.view(-1, 1, 1, 1)
    assert torch.allclose(x + (1 - t_) * field(t, x), field.denoise(x / t_, (1 - t) / t),
                          atol=1e-10)
    assert field.t_min == pytest.approx(1 / 81) and field.t_max == pytest.approx(1 / 1.002)


def small_edm(label_dim=0, seed=0):
    kwargs = dict(ARCHS["ddpmpp"], img_channels=3, label_dim=label_dim)
    torch.manual_seed(seed)
    net = set_weights(edm.EDMPrecond(**kwargs)).eval()
    net.init_args, net.init_kwargs = [], kwargs
    return net, kwargs


@pytest.mark.parametrize("label_dim", [0, 3])
def test_load_teacher_reads_an_edm_pickle_as_its_flow_field(tmp_path, label_dim):
    net, kwargs = small_edm(label_dim)
    path = tmp_path / "network-snapshot-000100.pkl"
    write_edm_pickle(path, net, kwargs)
    v = teachers.load_teacher(path)
    assert not v.training and not any(p.requires_grad for p in v.parameters())
    assert sum(p.numel() for p in v.parameters()) == sum(p.numel() for p in net.parameters())
    t = torch.tensor([0.05, 0.3, 0.6, 0.95])
    x = torch.randn(4, 3, 8, 8)
    y = torch.arange(4) % label_dim if label_dim else None
    t_ = t.view(-1, 1, 1, 1)
    labels = torch.eye(label_dim)[y] if label_dim else None
    expected = (net(x / t_, (1 - t) / t, labels) - x) / (1 - t_)
    assert torch.allclose(v(t, x, y), expected, rtol=1e-4, atol=1e-5)
    assert v.config["kwargs"] == kwargs  # rebuilt from its config, the same network
    rebuilt = networks.build_network(v.config, v.state_dict()).eval()
    assert torch.equal(rebuilt(t, x, y), v(t, x, y))


def test_load_teacher_reads_our_flow_matching_teacher(teachers_fm):
    v = teachers.load_teacher(teachers_fm)
    ckpt = load(teachers_fm)
    assert not networks.is_diffusion(v) and v.coupling is None
    sd = ckpt["ema_models"]["0.999"]
    assert all(torch.equal(v.state_dict()[k], sd[k]) for k in sd)
    raw = teachers.load_teacher(teachers_fm, ema="raw")
    assert all(torch.equal(raw.state_dict()[k], ckpt["net_model"][k]) for k in sd)


@pytest.fixture(scope="module")
def teachers_fm(request):
    """conftest's tiny unconditional flow-matching teacher (its fixture is named like this
    module's `teachers`)."""
    return request.getfixturevalue("teachers")["uncond"]


def test_generator_start_time_is_sids_generator():
    """x = x_t + (1 - t_g) G(t_g, x_t), x_t = (1 - t_g) z, is D_G(sigma_init z; sigma_init);
    t_g = 0 is z + G(0, z)."""
    net, _ = small_edm()
    G = networks.DenoiserField(net)
    z = torch.randn(3, 3, 8, 8)
    sigma_init = 2.5
    x = generate(G, z, t_g=1 / (1 + sigma_init))
    assert torch.allclose(x, G.denoise(sigma_init * z, torch.full((3,), sigma_init)), atol=1e-5)
    lin = lambda t, x, y=None: 0.5 * x + t.view(-1, 1, 1, 1)  # noqa: E731
    assert torch.equal(generate(lin, z), z + lin(torch.zeros(3), z))


def sid_generator_loss(teacher, fake, x_g, x0, t, alpha_sid):
    """SiD's generator loss (Zhou et al. 2024, their sid_loss.py), written out in their terms:
    y = x_g + sigma n with n = x0, D* and D_f the denoisers at (y, sigma), each sample divided
    by mean |x_g - D*| (no gradient), summed over pixels, mean over the batch."""
    sigma = (1 - t) / t
    noisy = x_g + sigma.view(-1, 1, 1, 1) * x0
    d_real, d_fake = teacher.denoise(noisy, sigma), fake.denoise(noisy, sigma)
    w = (x_g - d_real).abs().mean(dim=[1, 2, 3], keepdim=True).clamp_min(1e-5).detach()
    loss = (d_real - d_fake) * ((d_real - x_g) - alpha_sid * (d_real - d_fake)) / w
    return loss.flatten(1).sum(1).mean()


def test_sid_configuration_has_sids_generator_gradient():
    """distill.py's generator loss in the SiD configuration (alpha = beta = 1, --gen-gamma 2.4,
    --gen-weight sid, --sigma-init 2.5) has the gradient of SiD's formula."""
    teacher = networks.DenoiserField(small_edm(seed=0)[0]).requires_grad_(False)
    fake = networks.DenoiserField(small_edm(seed=1)[0]).requires_grad_(False)
    gen = networks.DenoiserField(small_edm(seed=2)[0]).requires_grad_(True)
    torch.manual_seed(7)
    for p in list(fake.parameters()) + list(gen.parameters()):  # three different networks
        p.data.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(3)
    z, x0 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = losses.noise_levels("sid", torch.rand(4))
    t_g = 1 / (1 + 2.5)

    def grad(loss_fn):
        gen.zero_grad()
        loss_fn(generate(gen, z, t_g=t_g)).backward()
        return torch.cat([p.grad.flatten() for p in gen.parameters() if p.grad is not None])

    ours = grad(lambda x_g: losses.general_generator_loss(
        teacher, fake, x_g, x0, t, alpha=1.0, beta=1.0, gamma=2.4,
        weight=(1 - t) ** 2 / 2, normalize=True))
    theirs = grad(lambda x_g: sid_generator_loss(teacher, fake, x_g, x0, t, 1.2))
    err = ((ours - theirs).norm() / theirs.norm()).item()
    print(f"SiD gradient identity: relative error {err:.2e}")
    assert theirs.norm() > 0 and err < 1e-4


def test_distill_sid_command_line_has_sids_generator_gradient(tmp_path):
    """The same through distill.py's own generator update, as the SiD command line sets it up
    (an EDM pickle, --gen-gamma 2.4, the diffusion defaults: SiD's laws, weights, sigma_init
    2.5, the fake model from the teacher): the gradient the update leaves on G is SiD's."""
    net, kwargs = small_edm()
    pkl = tmp_path / "edm-toy.pkl"
    write_edm_pickle(pkl, net, kwargs)
    args = distill.parse_args(["--teacher", pkl, "--gen-gamma", 2.4, "--batch-size", 4,
                               "--grad-clip", 1e9, "--device", "cpu", "--workers", 0,
                               "--out", tmp_path / "run"])
    state = distill.setup(args, players.Process("cpu"))
    torch.manual_seed(8)
    for p in state.fake.parameters():  # a fake model that is not the teacher any more
        p.data.add_(0.05 * torch.randn_like(p))
    state.gen_player.step = lambda: None  # keep the gradient the update computed
    batch = distill.draw(state, args, args.gen_t)
    distill.generator_update(state, args, batch)
    ours = torch.cat([p.grad.flatten() for p in state.gen.parameters() if p.grad is not None])
    state.gen.zero_grad()
    x_g = generate(state.gen, batch["z"], t_g=1 / 3.5)
    sid_generator_loss(state.teacher, state.fake_frozen, x_g, batch["x0"], batch["t"],
                       1.2).backward()
    theirs = torch.cat([p.grad.flatten() for p in state.gen.parameters() if p.grad is not None])
    err = ((ours - theirs).norm() / theirs.norm()).item()
    assert theirs.norm() > 0 and err < 1e-4, err


def test_data_free_realuid_is_twice_sid_at_one_half():
    """Data-free RealUID's generator loss = 2 L_SiD(alpha = 1/2) / (1 - t)^2 per sample, and
    General RealUID's gamma = 2 alpha_SiD (Appendix A.3; Zhou et al. 2024)."""
    teacher = networks.DenoiserField(small_edm(seed=0)[0])
    fake = networks.DenoiserField(small_edm(seed=1)[0])
    torch.manual_seed(4)
    x_g, x0 = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    t = torch.tensor([0.2, 0.5, 0.8])
    for gamma in (1.0, 2.4):
        for i in range(3):  # one sample at a time: per-sample values
            sl = slice(i, i + 1)
            ours = losses.general_generator_loss(teacher, fake, x_g[sl], x0[sl], t[sl],
                                                  alpha=1.0, beta=1.0, gamma=gamma)
            sigma = (1 - t[sl]) / t[sl]
            noisy = x_g[sl] + sigma.view(-1, 1, 1, 1) * x0[sl]
            d_r, d_f = teacher.denoise(noisy, sigma), fake.denoise(noisy, sigma)
            l_sid = ((d_r - d_f) * ((d_r - x_g[sl]) - gamma / 2 * (d_r - d_f))).sum()
            assert ours.item() == pytest.approx(2 * l_sid.item() / (1 - t[i].item()) ** 2,
                                                rel=1e-4, abs=1e-4)
    # gamma = alpha: General RealUID's generator loss is plain RealUID's
    a = losses.general_generator_loss(teacher, fake, x_g, x0, t, alpha=1.0, beta=1.0, gamma=1.0)
    b = losses.generator_loss(teacher, fake, x_g, x0, t, alpha=1.0, beta=1.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_edm_weighted_flow_matching_is_edms_denoising_loss():
    """train_teacher.py --param edm: weight edm_weight(t) on the FM loss of D = x_t + (1-t) v is
    EDM's lambda(sigma) |D(x1 + sigma x0; sigma) - x1|^2."""
    v = networks.DenoiserField(small_edm()[0])
    torch.manual_seed(5)
    x1, x0 = torch.randn(4, 3, 8, 8).clamp(-1, 1), torch.randn(4, 3, 8, 8)
    t = losses.noise_levels("edm", torch.randn(4))
    ours = losses.flow_matching_loss(v, x1, x0, t, weight=losses.edm_weight(t))
    sigma = (1 - t) / t
    lam = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    D = v.denoise(x1 + sigma.view(-1, 1, 1, 1) * x0, sigma)
    edm_loss = (lam.view(-1, 1, 1, 1) * (D - x1) ** 2).mean()
    assert ours.item() == pytest.approx(edm_loss.item(), rel=1e-4)


def test_noise_level_laws():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    t = losses.noise_levels("edm", torch.randn(n, generator=g))
    log_sigma = ((1 - t) / t).log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.02)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.02)
    r = torch.rand(n, generator=g)
    sigma = (1 - losses.noise_levels("sid", r)) / losses.noise_levels("sid", r)
    assert sigma.min().item() == pytest.approx(0.002, rel=1e-2)  # SiD's rnd_t = 0: sigma_min
    hi = (80 ** (1 / 7) + 0.2 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7  # rnd_t = 0.8
    assert sigma.max().item() == pytest.approx(hi, rel=1e-3) and 24 < hi < 25
    u = losses.noise_levels("uniform", r, (1 / 81, 1 / 1.002))
    assert u.min() >= 1 / 81 and u.max() <= 1 / 1.002
    assert torch.equal(losses.noise_levels("uniform", r), r)  # flow matching: t itself


def test_samplers_move_gaussian_noise_to_the_gaussian_data():
    """For N(mu, s^2) data the probability-flow ODE maps z to mu + s z: EDM's Heun sampler
    (35 evaluations) and Euler in t on the denoiser's range both land there."""
    torch.manual_seed(6)
    mu = torch.randn(3, 4, 4) * 0.5
    field = networks.DenoiserField(GaussianDenoiser(mu, 0.5))
    z = torch.randn(64, 3, 4, 4, dtype=torch.float32)
    exact = mu + 0.5 * z
    def heun_error(steps):
        return (teachers.edm_heun(field, z, steps=steps) - exact).abs().mean().item()

    def euler_error(nfe):
        return (euler(field, z, nfe=nfe, t0=field.t_min, t1=field.t_max) - exact).abs().mean()

    # second order: 18 -> 40 steps cuts the error about five-fold (measured 0.022 -> 0.0047)
    assert heun_error(18) < 0.03 and heun_error(40) < heun_error(18) / 3
    assert euler_error(400) < 0.01 and euler_error(400) < euler_error(50) / 3  # 0.012 -> 0.003


def test_distill_and_sample_on_an_edm_pickle(tmp_path, tiny_data):
    """The commands on EDM's format: RealUID and the SiD configuration distill an EDM pickle,
    resume, and sample.py samples the pickle (Euler, Heun) and the distilled generator."""
    net, kwargs = small_edm()
    pkl = tmp_path / "edm-toy-8x8-uncond-vp.pkl"
    write_edm_pickle(pkl, net, kwargs)
    common = ["--batch-size", 8, "--log-every", 1, "--sample-every", 0, "--device", "cpu",
              "--workers", 0, "--teacher", pkl]
    run(distill, [*common, "--data", tiny_data["uncond"], "--alpha", 0.94, "--beta", 0.96,
                  "--steps", 2, "--out", tmp_path / "realuid"])
    ckpt = load(tmp_path / "realuid" / "latest.pt")
    assert ckpt["config"]["net"]["edm"] == "EDMPrecond"
    assert ckpt["config"]["t_g"] == pytest.approx(1 / 3.5)
    saved = ckpt["config"]["args"]  # the diffusion defaults (SiD's), saved resolved
    assert (saved["fake_init"], saved["fake_t"], saved["gen_t"], saved["fake_weight"],
            saved["gen_weight"]) == ("teacher", "edm", "sid", "edm", "sid")
    run(distill, ["--resume", tmp_path / "realuid", "--steps", 3])
    assert load(tmp_path / "realuid" / "latest.pt")["step"] == 3
    run(distill, [*common, "--data", tiny_data["uncond"], "--alpha", 0.94, "--beta", 0.96,
                  "--gan-gen-coef", 0.3, "--gan-disc-coef", 1.0, "--steps", 1,
                  "--out", tmp_path / "gan"])  # the GAN baseline on a diffusion teacher
    assert any(k.startswith("cls_pred_branch.") for k in load(tmp_path / "gan" / "latest.pt")["u"])
    run(distill, [*common, "--gen-gamma", 2.4, "--fake-t", "edm", "--gen-t", "sid",
                  "--fake-weight", "edm", "--gen-weight", "sid", "--steps", 1,
                  "--out", tmp_path / "sid"])
    for ckpt_path, extra in ((pkl, ["--nfe", 3]), (pkl, ["--nfe", 5, "--sampler", "heun"]),
                             (tmp_path / "realuid", [])):
        out = tmp_path / f"s{len(os.listdir(tmp_path))}.npz"
        run(sample, ["--ckpt", ckpt_path, "--n", 4, "--out", out, *extra])
        images = np.load(out)["images"]
        assert images.shape == (4, 8, 8, 3) and images.std() > 0


def test_gan_head_on_a_diffusion_network():
    """The GAN baseline's discriminator sits on the bottleneck of EDM's network (after the
    middle blocks), as on the U-Net: forward_head = head(features there), gradients reach the
    encoder and the head, and a head absent from the weights keeps its fresh initialisation."""
    net, _ = small_edm()
    fake = networks.build_network(networks.edm_config(net), networks.DenoiserField(net).state_dict(),
                          gan_head=True).eval()  # eval: no dropout between the two passes
    t, x = torch.tensor([0.3, 0.7]), torch.randn(2, 3, 8, 8)
    seen = []
    hook = fake._middle().register_forward_hook(lambda m, i, o: seen.append(o))
    fake(t, x)
    hook.remove()
    logits = fake.forward_head(t, x)
    assert torch.equal(logits, fake.cls_pred_branch(seen[0]))
    assert logits.std() > 0  # the head tells samples apart
    logits.sum().backward()
    assert fake.cls_pred_branch[0].weight.grad.abs().sum() > 0
    assert fake.denoiser.model.enc[next(iter(fake.denoiser.model.enc))].weight.grad is not None
    assert all(p.grad is None for n, p in fake.named_parameters() if ".dec." in n and
               "_in" not in n)  # the decoder never ran


def test_a_diffusion_teacher_trained_here(tmp_path, tiny_data):
    """train_teacher.py --param edm makes a denoiser that load_teacher reads as a field."""
    out = tmp_path / "edm_teacher"
    run(train_teacher, ["--param", "edm", "--data", tiny_data["cond"], "--cond", "--steps", 2,
                        "--lr", 1e-3, "--warmup", 0, "--out", out, *TINY_NET, *FAST])
    v = teachers.load_teacher(out)
    assert networks.is_diffusion(v) and networks.num_classes(v) == 3
    assert isinstance(v.denoiser, edm.EDMPrecond)
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([0.3, 0.7])
    assert v(t, x, torch.tensor([0, 2])).shape == x.shape
    x1 = interpolate(x, torch.zeros_like(x), t)  # the field is finite inside its range
    assert torch.isfinite(v(t, x1, torch.tensor([1, 1]))).all()
