"""The RealUID objectives of losses.py against closed forms.

For Gaussian data N(mu, sigma^2) (per coordinate), noise x0 ~ N(0, 1) and the interpolation
x_t = t x1 + (1 - t) x0 (t = 0 noise, t = 1 data), the marginal flow field is affine in x:

    v(t, x) = mu + k(t) (x - t mu),   k(t) = (t sigma^2 - (1 - t)) / (t^2 sigma^2 + (1 - t)^2),

and x_t ~ N(t mu, t^2 sigma^2 + (1 - t)^2). A generator x = a z + b gives the Gaussian N(b, a^2),
so its own field v_G has the same form. Everything below is float64.
"""
import math

import numpy as np
import pytest
import torch

import flow
import losses


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def gaussian_field(mean, std):
    """Flow field v(t, x) of data N(mean, std^2) under the linear interpolation (closed form)."""
    def v(t, x, y=None):
        t = t.view(-1, *[1] * (x.dim() - 1))
        k = (t * std**2 - (1 - t)) / (t**2 * std**2 + (1 - t)**2)
        return mean + k * (x - t * mean)
    return v


def gaussian_pdf(x, mean, var):
    return torch.exp(-(x - mean) ** 2 / (2 * var)) / math.sqrt(2 * math.pi * var)


MU = torch.tensor([0.7, -0.4], dtype=torch.float64)
SIGMA = torch.tensor([0.8, 1.3], dtype=torch.float64)


def flow_distance(a, b, nodes=64):
    """E_t E_{x ~ p_t^G} |v*(t, x) - v_G(t, x)|^2, exact in x, Gauss-Legendre in t (on [0, 1])."""
    s, w = np.polynomial.legendre.leggauss(nodes)
    t = torch.tensor((s + 1) / 2)
    w = torch.tensor(w / 2)
    t_ = t[:, None]

    def coeffs(mean, std):  # v = c0 + c1 x
        k = (t_ * std**2 - (1 - t_)) / (t_**2 * std**2 + (1 - t_)**2)
        return mean - k * t_ * mean, k
    c0s, c1s = coeffs(MU, SIGMA)
    c0g, c1g = coeffs(b, a)
    c0, c1 = c0s - c0g, c1s - c1g
    m, var = t_ * b, t_**2 * a**2 + (1 - t_)**2
    per_t = ((c0 + c1 * m) ** 2 + c1**2 * var).sum(1)
    return (w * per_t).sum()


def mc_mean_and_se(fn, chunks):
    """Mean and standard error of gradient estimates over independent chunks."""
    grads = torch.stack([fn(i) for i in range(chunks)])
    return grads.mean(0), grads.std(0) / math.sqrt(chunks)


def test_gaussian_field_matches_conditional_expectation():
    # The closed form itself, against a Monte-Carlo regression of u = x1 - x0 on x_t at one t.
    g = torch.Generator().manual_seed(0)
    n, t = 400_000, 0.3
    x1 = MU[0] + SIGMA[0] * torch.randn(n, generator=g)
    x0 = torch.randn(n, generator=g)
    xt, u = t * x1 + (1 - t) * x0, x1 - x0
    slope = ((xt - xt.mean()) * (u - u.mean())).mean() / xt.var()
    intercept = u.mean() - slope * xt.mean()
    v = gaussian_field(MU[0], SIGMA[0])
    x = torch.tensor([-1.0, 0.0, 2.0])
    fitted = intercept + slope * x
    assert torch.allclose(v(torch.full((3,), t), x), fitted, atol=0.01)


def test_data_free_generator_gradient_is_flow_distance_gradient():
    """(a) alpha = beta = 1, f = the student's own field: grad L_G = grad E_t E |v* - v_G|^2.

    Tolerance: 4 Monte-Carlo standard errors (estimated from 16 independent chunks of 100k
    samples) plus 1e-3 absolute; the gradient itself is of order 1, so a wrong sign or weight fails.
    """
    a = torch.tensor([0.5, 1.6], requires_grad=True)   # generator x = a z + b
    b = torch.tensor([0.2, 0.3], requires_grad=True)
    teacher = gaussian_field(MU, SIGMA)

    def generator(t0, z, y=None):  # G(0, z) so that x = z + G(0, z) = a z + b
        return (a - 1) * z + b

    def mc_grad(seed):
        g = torch.Generator().manual_seed(seed)
        n = 100_000
        z, x0, t = torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g), \
            torch.rand(n, generator=g)
        fake = gaussian_field(b.detach(), a.detach())  # frozen copy of the student's field
        x_g = flow.generate(generator, z)
        loss = losses.generator_loss(teacher, fake, x_g, x0, t, alpha=1.0, beta=1.0)
        return torch.cat(torch.autograd.grad(loss, (a, b)))

    mc, se = mc_mean_and_se(mc_grad, 16)
    exact = torch.cat(torch.autograd.grad(flow_distance(a, b), (a, b)))
    assert exact.abs().min() > 0.05  # a non-trivial gradient
    assert torch.all((mc - exact).abs() < 4 * se + 1e-3), (mc, exact, se)


T_GRID = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)


class AffinePerTime:
    """f(t, x) = c0[t] + c1[t] x with its own coefficients for each t of T_GRID."""

    def __init__(self):
        self.c0 = torch.zeros(len(T_GRID), 2, requires_grad=True)
        self.c1 = torch.zeros(len(T_GRID), 2, requires_grad=True)

    def __call__(self, t, x, y=None):
        i = (t[:, None] - T_GRID[None]).abs().argmin(1)
        return self.c0[i] + self.c1[i] * x


def fit_fake_model(a, b, alpha, beta, seed, n=200_000):
    """Minimise losses.fake_model_loss over the per-t affine family (exactly: it is quadratic)."""
    g = torch.Generator().manual_seed(seed)
    z, x0 = torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g)
    x_d = MU + SIGMA * torch.randn(n, 2, generator=g)
    t = T_GRID[torch.randint(len(T_GRID), (n,), generator=g)]
    x_g = a * z + b
    f = AffinePerTime()
    opt = torch.optim.LBFGS([f.c0, f.c1], lr=1, max_iter=200, tolerance_grad=1e-12,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = losses.fake_model_loss(f, x_g, x_d, x0, t, alpha=alpha, beta=beta)
        loss.backward()
        return loss
    opt.step(closure)
    return f


def generator_grad(a, b, f, alpha, beta, seed, n=200_000):
    a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    g = torch.Generator().manual_seed(seed)
    z, x0 = torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g)
    t = T_GRID[torch.randint(len(T_GRID), (n,), generator=g)]
    frozen = AffinePerTime()
    frozen.c0, frozen.c1 = f.c0.detach(), f.c1.detach()
    loss = losses.generator_loss(gaussian_field(MU, SIGMA), frozen, a * z + b, x0, t,
                                  alpha=alpha, beta=beta)
    return torch.cat(torch.autograd.grad(loss, (a, b)))


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.94, 0.96), (0.8, 0.9)])
def test_generator_gradient_vanishes_at_the_data(alpha, beta):
    """(b) p_G = p_data and f at the Lemma 2 optimum (fitted with fake_model_loss): the expected
    generator gradient vanishes, and f equals v*. A generator off the data gets a clear gradient.

    Tolerance: |grad| < 0.03 at the data (Monte-Carlo noise of 200k samples is about 0.005);
    off the data (a = 1.3 sigma) the gradient exceeds 0.1.
    """
    f = fit_fake_model(SIGMA, MU, alpha, beta, seed=1)
    v = gaussian_field(MU, SIGMA)
    x = torch.tensor([[-1.0, 0.5], [0.0, 0.0], [1.5, -2.0]])
    for t in T_GRID:
        tt = torch.full((3,), float(t))
        assert torch.allclose(f(tt, x), v(tt, x), atol=0.05)
    grad = generator_grad(SIGMA, MU, f, alpha, beta, seed=2)
    assert grad.abs().max() < 0.03, grad

    a_off = 1.3 * SIGMA
    f_off = fit_fake_model(a_off, MU, alpha, beta, seed=3)
    assert generator_grad(a_off, MU, f_off, alpha, beta, seed=4).abs().max() > 0.1


def lemma2_optimum(t, gen, data, alpha, beta):
    """Lemma 2: f = (beta p_g v_G + (1 - beta) p_d v*) / (alpha p_g + (1 - alpha) p_d), 1-D."""
    (b, a), (mu, sigma) = gen, data
    v_g, v_d = gaussian_field(b, a), gaussian_field(mu, sigma)

    def f(tt, x, y=None):
        p_g = gaussian_pdf(x, t * b, t**2 * a**2 + (1 - t) ** 2)
        p_d = gaussian_pdf(x, t * mu, t**2 * sigma**2 + (1 - t) ** 2)
        return (beta * p_g * v_g(tt, x) + (1 - beta) * p_d * v_d(tt, x)) / (
            alpha * p_g + (1 - alpha) * p_d)
    return f


@pytest.mark.parametrize("alpha,beta", [(0.94, 0.96), (0.9, 0.7)])
def test_lemma2_optimum_minimises_the_fake_model_loss(alpha, beta):
    """(c) 1-D, fixed t, p_G != p_data: Lemma 2's pointwise optimum has a lower fake-model loss
    (1M common samples) than perturbations of it and than the wrong candidates."""
    t, gen, data = 0.6, (1.0, 0.5), (-0.5, 1.2)
    g = torch.Generator().manual_seed(0)
    n = 1_000_000
    z, x0 = torch.randn(n, 1, generator=g), torch.randn(n, 1, generator=g)
    x_d = data[0] + data[1] * torch.randn(n, 1, generator=g)
    x_g = gen[0] + gen[1] * z
    tt = torch.full((n,), t)

    def loss(f):
        return losses.fake_model_loss(f, x_g, x_d, x0, tt, alpha=alpha, beta=beta).item()
    best = lemma2_optimum(t, gen, data, alpha, beta)
    base = loss(best)
    bumps = [lambda x: torch.ones_like(x), lambda x: x, lambda x: torch.exp(-(x - 0.5) ** 2),
             lambda x: torch.tanh(3 * x)]
    for h in bumps:
        for eps in (0.2, -0.2):
            assert loss(lambda s, x, y=None, h=h, eps=eps: best(s, x) + eps * h(x)) > base
    wrong = [lemma2_optimum(t, gen, data, beta, alpha),  # alpha and beta swapped
             gaussian_field(data[0], data[1]), gaussian_field(gen[0], gen[1])]
    for f in wrong:
        assert loss(f) > base + 1e-3


def small_net(seed, d=3):
    """A nonlinear time-dependent field with parameters, standing in for a network."""
    g = torch.Generator().manual_seed(seed)
    w1 = (0.5 * torch.randn(d + 1, 8, generator=g)).requires_grad_(True)
    w2 = (0.5 * torch.randn(8, d, generator=g)).requires_grad_(True)

    def f(t, x, y=None):
        h = torch.tanh(torch.cat([x, t[:, None]], 1) @ w1)
        return h @ w2
    return f, [w1, w2]


def random_batch(seed, n=64, d=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g), torch.randn(n, d, generator=g) + 1,
            torch.randn(n, d, generator=g), torch.rand(n, generator=g))


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.94, 0.96), (0.98, 0.96), (1.0, 0.9)])
def test_general_realuid_with_gamma_equal_alpha_is_realuid(alpha, beta):
    """(d) General RealUID with gamma = alpha: generator loss equal in value and gradient; the
    fake-model loss equals RealUM(f) - RealUM(v*), so its gradient over f is RealUID's."""
    f, f_params = small_net(0)
    teacher, _ = small_net(1)
    x_g, x_d, x0, t = random_batch(2)
    x_g.requires_grad_(True)

    plain = losses.generator_loss(teacher, f, x_g, x0, t, alpha=alpha, beta=beta)
    general = losses.general_generator_loss(teacher, f, x_g, x0, t, alpha=alpha, beta=beta,
                                             gamma=alpha)
    assert torch.allclose(plain, general, rtol=1e-10, atol=1e-12)
    g1, = torch.autograd.grad(plain, x_g)
    g2, = torch.autograd.grad(general, x_g)
    assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-12)

    xg = x_g.detach()
    plain_f = losses.fake_model_loss(f, xg, x_d, x0, t, alpha=alpha, beta=beta)
    general_f = losses.general_fake_model_loss(teacher, f, xg, x_d, x0, t, alpha=alpha,
                                                beta=beta, gamma=alpha)
    realum_teacher = losses.fake_model_loss(teacher, xg, x_d, x0, t, alpha=alpha, beta=beta)
    assert torch.allclose(general_f, plain_f - realum_teacher, rtol=1e-10, atol=1e-12)
    for p, q in zip(torch.autograd.grad(plain_f, f_params),
                    torch.autograd.grad(general_f, f_params)):
        assert torch.allclose(p, q, rtol=1e-10, atol=1e-12)

    # gamma is really used (the authors' general_dist_loss ignores it): another gamma differs.
    other = losses.general_generator_loss(teacher, f, x_g, x0, t, alpha=alpha, beta=beta,
                                           gamma=alpha * 0.9)
    assert not torch.allclose(other, general)


def test_losses_on_hand_computed_values():
    # B = 2, one coordinate; f and v* return constants so every term can be done by hand.
    x_g = torch.tensor([[1.0], [2.0]])
    x_d = torch.tensor([[0.0], [-1.0]])
    x0 = torch.tensor([[0.5], [0.0]])
    t = torch.tensor([0.5, 0.25])
    f = lambda t, x, y=None: torch.full_like(x, 2.0)       # noqa: E731
    v = lambda t, x, y=None: torch.full_like(x, -1.0)      # noqa: E731
    alpha, beta = 0.8, 0.6
    u_g, u_d = [0.5, 2.0], [-0.5, -1.0]
    # RealUM(f) per sample: alpha f^2 - 2 beta f u_g + (1 - alpha) f^2 - 2 (1 - beta) f u_d
    per = [alpha * 4 - 2 * beta * 2 * ug + 0.2 * 4 - 2 * 0.4 * 2 * ud for ug, ud in zip(u_g, u_d)]
    got = losses.fake_model_loss(f, x_g, x_d, x0, t, alpha=alpha, beta=beta)
    assert got.item() == pytest.approx(sum(per) / 2)
    # generator: alpha (v^2 - f^2) - 2 beta (v - f) u_g
    per = [alpha * (1 - 4) - 2 * beta * (-3) * ug for ug in u_g]
    got = losses.generator_loss(v, f, x_g, x0, t, alpha=alpha, beta=beta)
    assert got.item() == pytest.approx(sum(per) / 2)
    # data-free: the real batch is not needed at all
    got = losses.fake_model_loss(f, x_g, None, x0, t, alpha=1.0, beta=1.0)
    assert got.item() == pytest.approx(sum(4 - 2 * 2 * ug for ug in u_g) / 2)
    # GAN: D = constant logits
    D = lambda t, x, y=None: torch.full((len(x), 1, 1, 1), 0.3)  # noqa: E731
    softplus = lambda s: math.log1p(math.exp(s))                  # noqa: E731
    got = losses.gan_discriminator_loss(D, x_g, x_d, x0, t, None)
    assert got.item() == pytest.approx(softplus(0.3) + softplus(-0.3))
    assert losses.gan_generator_loss(D, x_g, x0, t, None).item() == pytest.approx(
        softplus(-0.3))


def test_losses_are_shape_generic_and_use_shared_noise():
    # Images [B, C, H, W] and vectors [B, C*H*W] give the same value: sums over non-batch dims.
    f, _ = small_net(0, d=12)
    img = lambda t, x, y=None: f(t, x.flatten(1), y).view_as(x)  # noqa: E731
    x_g, x_d, x0, t = random_batch(5, d=12)
    as_img = [x.view(-1, 3, 2, 2) for x in (x_g, x_d, x0)]
    a = losses.fake_model_loss(f, x_g, x_d, x0, t, alpha=0.9, beta=0.95)
    b = losses.fake_model_loss(img, *as_img, t, alpha=0.9, beta=0.95)
    assert torch.allclose(a, b, rtol=1e-12)
    # the fused forward pass equals two separate passes
    t_ = t[:, None]
    f_g, f_d = f(t, t_ * x_g + (1 - t_) * x0), f(t, t_ * x_d + (1 - t_) * x0)
    sep = (0.9 * f_g**2 - 2 * 0.95 * f_g * (x_g - x0) + 0.1 * f_d**2
           - 2 * 0.05 * f_d * (x_d - x0)).sum(1).mean()
    assert torch.allclose(a, sep, rtol=1e-12)
