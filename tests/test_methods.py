"""Normalized UID / RealUID (Appendix A.4), DMD with real data (Appendix A.5), the
delta = beta (v* - f) parameterisation (ICLR 2026 version, Appendix A.2) and the weight of
general_fake_model_loss, against closed forms and quadratures.

Gaussian data N(mu, I), noise x0 ~ N(0, I), x_t = t x1 + (1 - t) x0 (t = 0 noise, t = 1 data):
x_t ~ N(t mu, s^2 I) with s^2 = t^2 + (1 - t)^2, and since Cov(x1 - x0, x_t) = (2t - 1) I the
marginal field is v_mu(t, x) = mu + (2t - 1)/s^2 (x - t mu). A generator z + mu_g has the field
v_{mu_g}, and v* - v_g = (mu_d - mu_g)(1 - t)/s^2 does not depend on x. With t ~ U[0, 1],
t <-> 1 - t gives int t/s^2 = int (1 - t)/s^2 = (1/2) int 1/s^2 = (1/2)[arctan(2t - 1)]_0^1 = pi/4,
int (1 - t)^2/s^4 = int t^2/s^4 = (1/2) int 1/s^2 = pi/4 and int t^2/s^2 = (1/2) int 1 = 1/2.
Monte-Carlo tolerances are 4 standard errors estimated from independent chunks (plus a small
absolute term where stated). Everything is float64.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import losses


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _col(t, x):
    return t.view(-1, *[1] * (x.dim() - 1))


def gaussian_field(mean, std=1.0):
    """v(t, x) of data N(mean, std^2 I): mean + k(t)(x - t mean),
    k = (t std^2 - (1 - t)) / (t^2 std^2 + (1 - t)^2) (std = 1: (2t - 1)/s^2)."""
    def v(t, x, y=None):
        t = _col(t, x)
        k = (t * std**2 - (1 - t)) / (t**2 * std**2 + (1 - t) ** 2)
        return mean + k * (x - t * mean)
    return v


def normal_pdf(x, mean, var):
    return torch.exp(-(x - mean) ** 2 / (2 * var)) / torch.sqrt(2 * math.pi * var)


def gauss_legendre(nodes):
    s, w = np.polynomial.legendre.leggauss(nodes)
    return torch.tensor((s + 1) / 2), torch.tensor(w / 2)


def chunked(fn, chunks):
    """Mean and standard error over independent chunks (fn(i) uses seed i)."""
    values = torch.stack([torch.as_tensor(fn(i)) for i in range(chunks)])
    return values.mean(0), values.std(0) / math.sqrt(chunks)


def draw(seed, n, d):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g), torch.randn(n, d, generator=g),
            torch.rand(n, generator=g), torch.randn(n, d, generator=g))


# ---------------------------------------------------------------------------------------------
# Data-free closed forms in D = 3: Normalized UID, squared UID, DMD's exact KL gradient

MU_D3 = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64)
MU_G3 = torch.tensor([-0.2, 0.4, 1.1], dtype=torch.float64)


def test_data_free_closed_forms():
    """Generator z + mu_g, data N(mu_d, I), fake model = the generator's own field v_g (frozen).

    Normalized UID: with f = v_g, n = (v* - v_g)/|v* - v_g| = e = Delta/|Delta| (Delta =
    mu_d - mu_g) everywhere, and E[u_g | x_t] = v_g, so the objective E<n, v* - u_g> =
    E_t |v* - v_g| = |Delta| int (1 - t)/s^2 = (pi/4)|Delta|; it is its maximum over f (|a| =
    max_n <n, a>). normalized_fake_loss returns minus it, normalized_generator_loss plus it.
    Its gradient in mu_g: x_t = t(z + mu_g) + (1 - t) x0 and u_g move by t and 1, v* has slope
    (2t - 1)/s^2, n is constant, so d/dmu_g = ((2t - 1)t/s^2 - 1) e = -(1 - t)/s^2 e, mean
    -(pi/4) e = d/dmu_g (pi/4)|Delta|.
    Squared UID (generator_loss, alpha = beta = 1, f = v_g): E|v* - u|^2 - E|v_g - u|^2 =
    E|v* - v_g|^2 = |Delta|^2 int (1 - t)^2/s^4 = (pi/4)|Delta|^2, gradient -(pi/2) Delta.
    DMD: KL(N(t mu_g, s^2) || N(t mu_d, s^2)) = t^2 |Delta|^2/(2 s^2), so grad_mu_g E_t KL =
    -Delta int t^2/s^2 = -Delta/2; dmd_generator_loss's per-sample gradient t^2/(1 - t)(v_g - v*)
    = -Delta t^2/s^2 has the same mean.
    In the Normalized and DMD gradients only t is random (z, x0 drop out); 8 chunks of 50k.
    """
    delta = MU_D3 - MU_G3
    e, norm = delta / delta.norm(), delta.norm()
    teacher, fake = gaussian_field(MU_D3), gaussian_field(MU_G3.clone())

    def one(seed):
        z, x0, t, _ = draw(seed, 50_000, 3)
        mu = MU_G3.clone().requires_grad_(True)
        x_g = z + mu
        out = [-losses.normalized_fake_loss(teacher, fake, x_g.detach(), None, x0, t,
                                            alpha=1.0, beta=1.0, eps=1e-12)]
        gen = losses.normalized_generator_loss(teacher, fake, x_g, x0, t, alpha=1.0, beta=1.0,
                                               eps=1e-12)
        sq = losses.generator_loss(teacher, fake, x_g, x0, t, alpha=1.0, beta=1.0)
        dmd = losses.dmd_generator_loss(teacher, fake, x_g, x0, t, normalize=False)
        out += [gen, sq]
        out += [torch.autograd.grad(loss, mu, retain_graph=True)[0] for loss in (gen, sq, dmd)]
        return torch.cat([v.detach().reshape(-1) for v in out])

    mc, se = chunked(one, 8)
    exact = torch.cat([(math.pi / 4 * norm).view(1), (math.pi / 4 * norm).view(1),
                       (math.pi / 4 * norm**2).view(1), -math.pi / 4 * e, -math.pi / 2 * delta,
                       -delta / 2])
    assert torch.all((mc - exact).abs() < 4 * se + 1e-9), (mc, exact, se)
    assert se.max() < 0.02  # so that a wrong constant (pi/4 vs 1/2, a sign) fails


# ---------------------------------------------------------------------------------------------
# Normalized RealUID in 1-D: its maximum by quadrature, reached by normalized_fake_loss

ALPHA, BETA = 0.92, 0.94


def integrand(t, x, mu_g, mu_d, alpha, beta):
    """w = p_t^g (alpha v* - beta v_g) + p_t^d (beta - alpha) v*, unit-variance Gaussians.
    t, x broadcast (t a column, x a row); returns w and p_t^d."""
    s2 = t**2 + (1 - t) ** 2
    v_d, v_g = gaussian_field(mu_d)(t, x), gaussian_field(mu_g)(t, x)
    p_d, p_g = normal_pdf(x, t * mu_d, s2), normal_pdf(x, t * mu_g, s2)
    return p_g * (alpha * v_d - beta * v_g) + p_d * (beta - alpha) * v_d, p_d


def normalized_maximum(mu_g, mu_d, alpha, beta):
    """E_t int |w| dx: Gauss-Legendre in t (64 nodes), the trapezoid rule in x (step 0.01)."""
    t, wt = gauss_legendre(64)
    x = torch.linspace(-10, 10, 2001)
    w, _ = integrand(t[:, None], x[None], mu_g, mu_d, alpha, beta)
    return (wt * torch.trapezoid(w.abs(), x, dim=1)).sum()


def normalized_objective(fake, mu_g, mu_d, alpha, beta, seed, n=250_000):
    z, x0, t, e = draw(seed, n, 1)
    x_g, x_d = z + mu_g, e + mu_d
    return -losses.normalized_fake_loss(gaussian_field(mu_d), fake, x_g, x_d, x0, t,
                                        alpha=alpha, beta=beta, eps=1e-12)


def test_normalized_realuid_maximum_in_1d():
    """mu_d = 2, mu_g = -1, alpha = 0.92, beta = 0.94.

    Conditioning on x_t (E[u_g | x_t^g] = v_g, E[u_d | x_t^d] = v*) the objective of Definition
    4 is E_t int <n, p_g (alpha v* - beta v_g) + p_d ((1 - alpha) - (1 - beta)) v*> dx =
    E_t int <n, w> dx, maximal for n = w/|w| (here sign w), with value E_t int |w| dx. The
    optimal fake is any f with v* - f a positive multiple of w: f = v* - sign(w), and also
    Lemma 2's optimum of the squared loss, whose v* - f = w / (alpha p_g + (1 - alpha) p_d).
    Checks: the quadrature (2.2277; 3 pi/4 = (pi/4)|Delta| at alpha = beta = 1, as in the
    data-free test), normalized_fake_loss at both optimal fakes = minus the maximum within
    4 SE (8 chunks of 250k), a fake with the wrong direction (n = sign x) is worse by > 10 SE,
    and at mu_g = mu_d the objective is 0 for any fake (w = 0). (Here w < 0 only where the
    densities are negligible: the data-free direction n = +1, f = v_g, is optimal to 1e-4.)
    """
    mu_g, mu_d = -1.0, 2.0
    best = normalized_maximum(mu_g, mu_d, ALPHA, BETA)
    assert best.item() == pytest.approx(2.2277, abs=1e-4)
    assert normalized_maximum(mu_g, mu_d, 1.0, 1.0).item() == pytest.approx(3 * math.pi / 4,
                                                                           rel=1e-8)
    v_d = gaussian_field(mu_d)

    def sign_fake(t, x, y=None):
        w, _ = integrand(_col(t, x), x, mu_g, mu_d, ALPHA, BETA)
        return v_d(t, x) - torch.sign(w)

    def lemma2_fake(t, x, y=None):
        t_ = _col(t, x)
        s2 = t_**2 + (1 - t_) ** 2
        p_g, p_d = normal_pdf(x, t_ * mu_g, s2), normal_pdf(x, t_ * mu_d, s2)
        return (BETA * p_g * gaussian_field(mu_g)(t, x) + (1 - BETA) * p_d * v_d(t, x)) / (
            ALPHA * p_g + (1 - ALPHA) * p_d)

    wrong = lambda t, x, y=None: v_d(t, x) - torch.tanh(3 * x)  # noqa: E731  n = sign(x)
    for fake in (sign_fake, lemma2_fake):
        mc, se = chunked(lambda i: normalized_objective(fake, mu_g, mu_d, ALPHA, BETA, i), 8)
        assert abs(mc - best) < 4 * se, (mc, best, se)
    mc, se = chunked(lambda i: normalized_objective(wrong, mu_g, mu_d, ALPHA, BETA, i), 8)
    assert best - mc > 10 * se, (mc, best, se)

    # p_g = p_d: zero for any fake, here one whose direction changes sign with x
    any_fake = lambda t, x, y=None: v_d(t, x) - torch.tanh(3 * (x - 1))  # noqa: E731
    assert normalized_maximum(mu_d, mu_d, ALPHA, BETA).item() == pytest.approx(0, abs=1e-12)
    mc, se = chunked(lambda i: normalized_objective(any_fake, mu_d, mu_d, ALPHA, BETA, i), 8)
    assert abs(mc) < 4 * se and se < 0.01, (mc, se)


# ---------------------------------------------------------------------------------------------
# The generator's gradient of Normalized RealUID goes through n (2-D, real data)

MU_D2 = torch.tensor([2.0, 0.0], dtype=torch.float64)
MU_G2 = torch.tensor([-1.0, 0.5], dtype=torch.float64)


def integrand_2d(t, x, mu_g, alpha, beta):
    """w(t, x) of the 1-D test in 2-D: x [N, 2], t a scalar tensor or [N, 1]."""
    s2 = t**2 + (1 - t) ** 2
    k = (2 * t - 1) / s2
    v_d, v_g = MU_D2 + k * (x - t * MU_D2), mu_g + k * (x - t * mu_g)
    p = lambda mu: torch.exp(-((x - t * mu) ** 2).sum(-1, keepdim=True) / (2 * s2)) / (  # noqa
        2 * math.pi * s2)
    return p(mu_g) * (alpha * v_d - beta * v_g) + p(MU_D2) * (beta - alpha) * v_d, p(MU_D2)


def test_normalized_generator_gradient_goes_through_n():
    """alpha = 0.5, beta = 0.95, the fake model at its optimum for mu_g (frozen): v* - f = w/p_d,
    n = w/|w| (smooth where w != 0). By the envelope theorem the gradient in mu_g of the maximum
    M(mu_g) = E_t int |w| dx is that of the objective with f frozen; the reference is autograd
    through M's quadrature (Gauss-Legendre 32 nodes in t, trapezoid step 0.05 in x; halving the
    step changes it by < 1e-6). normalized_generator_loss (autograd w.r.t. mu_g, 16 chunks of
    50k) matches it within 4 SE + 5e-4; the same loss with n detached misses the path
    t E[(dn/dx)^T (alpha v* - beta u_g)] = -(beta - alpha) t int p_d (dn/dx)^T v* dx (using
    (dn/dx)^T w = 0), about -0.018 in the first coordinate (more than 20 SE): it is wrong. That
    path is proportional to beta - alpha (at the paper's 0.92, 0.94 it is about 4e-4).
    """
    alpha, beta = 0.5, 0.95
    mu0 = MU_G2.clone()
    teacher = gaussian_field(MU_D2)

    def fake(t, x, y=None):
        w, p_d = integrand_2d(_col(t, x), x, mu0, alpha, beta)
        return teacher(t, x) - w / p_d

    mu = MU_G2.clone().requires_grad_(True)
    t_nodes, wt = gauss_legendre(32)
    gx, gy = torch.arange(-6, 7.5 + 1e-9, 0.05), torch.arange(-6, 6.5 + 1e-9, 0.05)
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="ij"), -1).reshape(-1, 2)
    M = sum(w_ * integrand_2d(t_, grid, mu, alpha, beta)[0].norm(dim=1).sum() * 0.05**2
            for t_, w_ in zip(t_nodes, wt))
    exact, = torch.autograd.grad(M, mu)

    def one(seed):
        z, x0, t, _ = draw(seed, 50_000, 2)
        mu = MU_G2.clone().requires_grad_(True)
        x_g = z + mu
        loss = losses.normalized_generator_loss(teacher, fake, x_g, x0, t, alpha=alpha,
                                                beta=beta, eps=1e-12)
        xt = _col(t, x0) * x_g + (1 - _col(t, x0)) * x0
        d = teacher(t, xt) - fake(t, xt)
        n = (d / d.norm(dim=1, keepdim=True)).detach()
        detached = (n * (alpha * teacher(t, xt) - beta * (x_g - x0))).sum(1).mean()
        assert torch.allclose(loss, detached, rtol=1e-12)  # same value, different gradient
        return torch.cat([torch.autograd.grad(loss, mu)[0], torch.autograd.grad(detached, mu)[0]])

    mc, se = chunked(one, 16)
    assert torch.all((mc[:2] - exact).abs() < 4 * se[:2] + 5e-4), (mc, exact, se)
    assert (mc[2] - exact[0]).abs() > 20 * se[2] + 0.01, (mc, exact, se)


# ---------------------------------------------------------------------------------------------
# DMD with real data (Appendix A.5) and DMD2's normalisation

def mixture_kl(mu_g, mu_d, alpha):
    """E_t KL(alpha p_t^g + (1 - alpha) p_t^d || p_t^d), p_t^mu = N(t mu, s^2), by quadrature
    (Gauss-Legendre 48 nodes in t, trapezoid step 0.005 in x)."""
    t, wt = gauss_legendre(48)
    t = t[:, None]
    x = torch.linspace(-10, 12, 4401)[None]
    s2 = t**2 + (1 - t) ** 2
    p_d = normal_pdf(x, t * mu_d, s2)
    q = alpha * normal_pdf(x, t * mu_g, s2) + (1 - alpha) * p_d
    return (wt * torch.trapezoid(q * torch.log(q / p_d), x, dim=1)).sum()


@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_dmd_with_real_data_follows_the_mixture_kl(alpha):
    """1-D, mu_g = -1, mu_d = 2. The fake model is v_mix, the field of alpha N(mu_g, 1) +
    (1 - alpha) N(mu_d, 1) (Lemma 2's optimum of eq. (17) at alpha = beta):
    v_mix = (alpha p_g v_g + (1 - alpha) p_d v*)/(alpha p_g + (1 - alpha) p_d). Since
    q = alpha p_g + (1 - alpha) p_d depends on mu_g only through p_g (and int dq = 0),
    d/dmu_g KL(q || p_d) = alpha E_{x_t^g}[d/dx log(q/p_d)(x_t^g) dx_t^g/dmu_g], with
    dx_t^g/dmu_g = t and the score of a field v, (t v - x)/(1 - t): d/dx log(q/p_d) =
    t (v_mix - v*)/(1 - t). So the gradient of dmd_generator_loss(alpha, normalize=False) in
    mu_g (8 chunks of 200k) is that of E_t KL, here by central finite differences (h = 1e-4)
    of its quadrature; within 4 SE + 1e-4. alpha = 1 is plain DMD: -(mu_d - mu_g)/2.
    """
    mu_g, mu_d = -1.0, 2.0
    teacher, v_g = gaussian_field(mu_d), gaussian_field(mu_g)

    def v_mix(t, x, y=None):
        t_ = _col(t, x)
        s2 = t_**2 + (1 - t_) ** 2
        a, b = alpha * normal_pdf(x, t_ * mu_g, s2), (1 - alpha) * normal_pdf(x, t_ * mu_d, s2)
        return (a * v_g(t, x) + b * teacher(t, x)) / (a + b)

    def one(seed):
        z, x0, t, _ = draw(seed, 200_000, 1)
        mu = torch.tensor(mu_g, requires_grad=True)
        loss = losses.dmd_generator_loss(teacher, v_mix, z + mu, x0, t, alpha=alpha,
                                         normalize=False)
        return torch.autograd.grad(loss, mu)[0]

    mc, se = chunked(one, 8)
    h = 1e-4
    fd = (mixture_kl(mu_g + h, mu_d, alpha) - mixture_kl(mu_g - h, mu_d, alpha)) / (2 * h)
    if alpha == 1:
        assert fd.item() == pytest.approx(-(mu_d - mu_g) / 2, rel=1e-6)  # the closed form
    assert abs(mc - fd) < 4 * se + 1e-4, (mc, fd, se)
    assert fd.abs() > 100 * se


def small_net(seed, d=12):
    g = torch.Generator().manual_seed(seed)
    w1 = (0.5 * torch.randn(d + 1, 8, generator=g)).requires_grad_(True)
    w2 = (0.5 * torch.randn(8, d, generator=g)).requires_grad_(True)

    def f(t, x, y=None):
        flat = x.flatten(1)
        return (torch.tanh(torch.cat([flat, t[:, None]], 1) @ w1) @ w2).view_as(x)
    return f, [w1, w2]


def image_batch(seed, n=6):
    g = torch.Generator().manual_seed(seed)
    r = lambda: torch.randn(n, 3, 2, 2, generator=g)  # noqa: E731
    return r(), r() + 1, r(), torch.rand(n, generator=g)


@pytest.mark.parametrize("alpha", [1.0, 0.8])
def test_dmd2_normalisation_and_exact_gradient(alpha):
    """normalize=True against DMD2's compute_distribution_matching_loss written out by hand in
    its own variables (denoisers D = x_t + (1 - t) v, p_real = x - D*, p_fake = x - D_f,
    grad = (p_real - p_fake)/mean|p_real|, loss 0.5 F.mse_loss(x, sg(x - grad))): ours is
    alpha C H W times DMD2's, with gradient alpha grad / B. normalize=False: gradient
    alpha t^2/(1 - t)(f - v*)/B. No gradient reaches the teacher or the fake model."""
    teacher, t_params = small_net(1)
    fake, f_params = small_net(2)
    x_g, _, x0, t = image_batch(3)
    x_g.requires_grad_(True)
    t_ = t.view(-1, 1, 1, 1)
    xt = t_ * x_g.detach() + (1 - t_) * x0
    with torch.no_grad():
        d_real, d_fake = xt + (1 - t_) * teacher(t, xt), xt + (1 - t_) * fake(t, xt)
        p_real, p_fake = x_g - d_real, x_g - d_fake
        grad = (p_real - p_fake) / p_real.abs().mean(dim=[1, 2, 3], keepdim=True)
    dmd2 = 0.5 * F.mse_loss(x_g, (x_g - grad).detach(), reduction="mean")

    ours = losses.dmd_generator_loss(teacher, fake, x_g, x0, t, alpha=alpha)
    assert torch.allclose(ours, alpha * 12 * dmd2, rtol=1e-12)
    g_ours, = torch.autograd.grad(ours, x_g)
    assert torch.allclose(g_ours, alpha * grad / len(x_g), rtol=1e-10, atol=1e-14)
    assert torch.allclose(grad, (1 - t_) * (fake(t, xt) - teacher(t, xt)).detach()
                          / (x_g - d_real).abs().mean(dim=[1, 2, 3], keepdim=True), rtol=1e-12)

    plain = losses.dmd_generator_loss(teacher, fake, x_g, x0, t, alpha=alpha, normalize=False)
    g_plain, = torch.autograd.grad(plain, x_g, retain_graph=True)
    expect = alpha * t_**2 / (1 - t_) * (fake(t, xt) - teacher(t, xt)).detach() / len(x_g)
    assert torch.allclose(g_plain, expect, rtol=1e-12, atol=1e-15)
    assert all(g is None for g in torch.autograd.grad(plain, t_params + f_params,
                                                      allow_unused=True))


# ---------------------------------------------------------------------------------------------
# delta = beta (v* - f) (ICLR 2026 version, Appendix A.2)

@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.94, 1.0), (0.94, 0.96), (0.9, 0.7)])
def test_beta_delta_is_the_delta_form_at_a_moved_fake(alpha, beta):
    """With f' = (1 - beta) v* + beta f, v* - f' = beta (v* - f): beta_delta_generator_loss(f)
    = generator_loss(f') and beta_delta_fake_loss(f) = general_fake_model_loss(f', gamma =
    alpha), in value and in gradient (x_g; f's parameters). At beta = 1, f' = f: the generator
    loss is generator_loss itself; at beta != 1 it is not."""
    teacher, _ = small_net(1)
    fake, f_params = small_net(2)
    moved = lambda t, x, y=None: (1 - beta) * teacher(t, x) + beta * fake(t, x)  # noqa
    x_g, x_d, x0, t = image_batch(4)
    x_d = None if (alpha, beta) == (1, 1) else x_d
    x_g.requires_grad_(True)

    a = losses.beta_delta_generator_loss(teacher, fake, x_g, x0, t, alpha=alpha, beta=beta)
    b = losses.generator_loss(teacher, moved if beta != 1 else fake, x_g, x0, t, alpha=alpha,
                              beta=beta)
    assert torch.allclose(a, b, rtol=1e-12)
    ga, = torch.autograd.grad(a, x_g)
    gb, = torch.autograd.grad(b, x_g)
    assert torch.allclose(ga, gb, rtol=1e-10, atol=1e-14)
    if beta != 1:
        plain = losses.generator_loss(teacher, fake, x_g, x0, t, alpha=alpha, beta=beta)
        assert not torch.allclose(a, plain, rtol=1e-3)

    xg = x_g.detach()
    a = losses.beta_delta_fake_loss(teacher, fake, xg, x_d, x0, t, alpha=alpha, beta=beta)
    b = losses.general_fake_model_loss(teacher, moved, xg, x_d, x0, t, alpha=alpha, beta=beta,
                                       gamma=alpha)
    assert torch.allclose(a, b, rtol=1e-12)
    for p, q in zip(torch.autograd.grad(a, f_params), torch.autograd.grad(b, f_params)):
        assert torch.allclose(p, q, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("alpha,beta", [(0.9, 0.7), (0.94, 0.96)])
def test_beta_delta_fake_optimum(alpha, beta):
    """1-D, t = 0.6, generator N(1, 0.5^2), data N(-0.5, 1.2^2). Pointwise (E[u_g | x_t^g] =
    v_g, E[u_d | x_t^d] = v*, delta = beta (v* - f)) the objective is
    p_g[-alpha |delta|^2 + 2 alpha <delta, v*> - 2 beta <delta, v_g>] + p_d[-(1 - alpha)|delta|^2
    + 2 (beta - alpha) <delta, v*>], concave in delta, maximal at
    delta_opt = ((beta - alpha) p_d v* + alpha p_g v* - beta p_g v_g) / (alpha p_g + (1 - alpha)
    p_d): f_opt = v* - delta_opt / beta. beta_delta_fake_loss is quadratic in the coefficients
    theta of f = f_opt + sum_k theta_k h_k; its exact minimiser over theta (one Newton step, per
    chunk of 200k common samples, 10 chunks) is 0 within 4 SE for h = (f_L2 - f_opt, 1, x,
    tanh 3x, exp(-(x - 1/2)^2)), f_L2 = v* - delta_opt (Lemma 2's optimum, optimal for the
    plain parameterisation). At (0.9, 0.7), where f_L2 and f_opt differ clearly, theta_0 = 1
    (f_L2) is rejected by > 20 SE."""
    t0, (m_g, s_g), (m_d, s_d) = 0.6, (1.0, 0.5), (-0.5, 1.2)
    v_d, v_g = gaussian_field(m_d, s_d), gaussian_field(m_g, s_g)

    def delta_opt(t, x):
        p_g = normal_pdf(x, t0 * m_g, torch.tensor(t0**2 * s_g**2 + (1 - t0) ** 2))
        p_d = normal_pdf(x, t0 * m_d, torch.tensor(t0**2 * s_d**2 + (1 - t0) ** 2))
        r = p_g / p_d
        return ((beta - alpha + alpha * r) * v_d(t, x) - beta * r * v_g(t, x)) / (
            (1 - alpha) + alpha * r)

    f_opt = lambda t, x: v_d(t, x) - delta_opt(t, x) / beta  # noqa: E731
    basis = [lambda t, x: (1 / beta - 1) * delta_opt(t, x),  # f_L2 - f_opt
             lambda t, x: torch.ones_like(x), lambda t, x: x, lambda t, x: torch.tanh(3 * x),
             lambda t, x: torch.exp(-(x - 0.5) ** 2)]

    def one(seed):
        z, x0, _, e = draw(seed, 200_000, 1)
        x_g, x_d, t = m_g + s_g * z, m_d + s_d * e, torch.full((200_000,), t0)

        def loss(theta):
            fake = lambda t, x, y=None: f_opt(t, x) + sum(  # noqa: E731
                c * h(t, x) for c, h in zip(theta, basis))
            return losses.beta_delta_fake_loss(v_d, fake, x_g, x_d, x0, t, alpha=alpha,
                                               beta=beta)
        theta = torch.zeros(len(basis))
        grad = torch.autograd.functional.jacobian(loss, theta)
        hess = torch.autograd.functional.hessian(loss, theta)
        return -torch.linalg.solve(hess, grad)

    theta, se = chunked(one, 10)
    assert torch.all(theta.abs() < 4 * se), (theta, se)
    if beta == 0.7:
        assert (1 - theta[0]) > 20 * se[0], (theta, se)
    # r = 1 (p_g = p_d): f_opt is the generator's own field, here = v*
    x = torch.linspace(-2, 2, 5)[:, None]
    tt = torch.full((5,), t0)
    r1 = ((beta - alpha + alpha) * v_d(tt, x) - beta * v_g(tt, x)) / 1.0
    assert torch.allclose(v_d(tt, x) - r1 / beta, v_g(tt, x), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Small exact checks: eps, shapes, general_fake_model_loss's weight

def test_normalized_losses_by_hand():
    """B = 2, D = 2, constant fields: v* = (3, 4); f = 0 for the first sample (|v* - f| = 5,
    n = (0.6, 0.8)) and v* - 1e-3 (3, 4) for the second (|v* - f| = 0.005 < eps = 0.01, so
    n = (v* - f)/eps = (0.3, 0.4))."""
    v = lambda t, x, y=None: torch.tensor([3.0, 4.0]).expand_as(x)  # noqa: E731
    f = lambda t, x, y=None: torch.where(  # noqa: E731
        (t < 0.5)[:, None], torch.zeros_like(x), v(t, x) - 1e-3 * torch.tensor([3.0, 4.0]))
    x_g, x_d = torch.tensor([[1.0, 2.0], [0.0, -1.0]]), torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    x0, t = torch.tensor([[0.5, 0.0], [1.0, 1.0]]), torch.tensor([0.25, 0.75])
    alpha, beta = 0.8, 0.6
    n = torch.tensor([[0.6, 0.8], [0.3, 0.4]])
    vs = torch.tensor([3.0, 4.0])
    gen = (n * (alpha * vs - beta * (x_g - x0))).sum(1)
    real = (n * ((1 - alpha) * vs - (1 - beta) * (x_d - x0))).sum(1)
    got = losses.normalized_generator_loss(v, f, x_g, x0, t, alpha=alpha, beta=beta, eps=0.01)
    assert got.item() == pytest.approx(gen.mean().item(), rel=1e-12)
    got = losses.normalized_fake_loss(v, f, x_g, x_d, x0, t, alpha=alpha, beta=beta, eps=0.01)
    assert got.item() == pytest.approx(-(gen + real).mean().item(), rel=1e-12)
    got = losses.normalized_fake_loss(v, f, x_g, None, x0, t, alpha=1.0, beta=1.0, eps=0.01)
    assert got.item() == pytest.approx(-(n * (vs - (x_g - x0))).sum(1).mean().item(), rel=1e-12)


def test_new_losses_are_shape_generic():
    """Images [B, 3, 2, 2] and vectors [B, 12] give the same values: every sum, mean and norm
    runs over all of a sample's entries (a per-channel norm in n would fail this)."""
    teacher, _ = small_net(1)
    fake, _ = small_net(2)
    x_g, x_d, x0, t = image_batch(5)
    flat = [x.flatten(1) for x in (x_g, x_d, x0)]
    kw = dict(alpha=0.9, beta=0.95)
    pairs = [
        (losses.normalized_fake_loss, dict(kw, eps=1e-3), True),
        (losses.normalized_generator_loss, dict(kw, eps=1e-3), False),
        (losses.beta_delta_fake_loss, kw, True),
        (losses.beta_delta_generator_loss, kw, False),
        (losses.dmd_generator_loss, dict(alpha=0.9), False),
        (losses.dmd_generator_loss, dict(alpha=0.9, normalize=False), False),
    ]
    for fn, kwargs, with_real in pairs:
        img = fn(teacher, fake, *([x_g, x_d, x0] if with_real else [x_g, x0]), t, **kwargs)
        vec = fn(teacher, fake, *(flat if with_real else [flat[0], flat[2]]), t, **kwargs)
        assert torch.allclose(img, vec, rtol=1e-12), fn.__name__


@pytest.mark.parametrize("alpha,beta,gamma", [(1.0, 1.0, 1.0), (0.94, 0.96, 0.9)])
def test_general_fake_model_loss_weight(alpha, beta, gamma):
    """weight = ones is bit-identical to no weight; a weight w gives mean_i w_i L_i with L_i the
    loss of sample i alone, in value and in gradient."""
    teacher, _ = small_net(1)
    fake, f_params = small_net(2)
    x_g, x_d, x0, t = image_batch(6)
    x_d = None if gamma == 1 else x_d
    kw = dict(alpha=alpha, beta=beta, gamma=gamma)
    plain = losses.general_fake_model_loss(teacher, fake, x_g, x_d, x0, t, **kw)
    ones = losses.general_fake_model_loss(teacher, fake, x_g, x_d, x0, t, **kw,
                                          weight=torch.ones(len(t)))
    assert torch.equal(plain, ones)
    w = torch.linspace(0.1, 2.0, len(t))
    got = losses.general_fake_model_loss(teacher, fake, x_g, x_d, x0, t, **kw, weight=w)
    each = torch.stack([losses.general_fake_model_loss(
        teacher, fake, x_g[i:i + 1], None if x_d is None else x_d[i:i + 1], x0[i:i + 1],
        t[i:i + 1], **kw) for i in range(len(t))])
    expect = (w * each).mean()
    assert torch.allclose(got, expect, rtol=1e-12)
    assert not torch.allclose(got, plain, rtol=1e-3)
    for p, q in zip(torch.autograd.grad(got, f_params), torch.autograd.grad(expect, f_params)):
        assert torch.allclose(p, q, rtol=1e-10, atol=1e-14)
