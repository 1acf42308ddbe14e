"""The RealUID objectives of distill.py for couplings (paper Appendix C, coupling.py) against closed
forms: section 4's Gaussian checks of tests/test_losses.py, conditional on a source s.

The convention (coupling.py, distill.generate): pairs (s, x1) ~ pi; the path starts at
x0 = kappa s + sigma eps0, eps0 ~ N(0, I); x_t = t x1 + (1 - t) x0, u = x1 - x0; the teacher is
v*(t, x, s) = E[u | x_t = x, s]. The generator has its OWN start z = kappa s + sigma eps_g, eps_g
independent of eps0 (as section 4's z is independent of x0), x_g = z + G(0, z, s), and the
generated and the real interpolations share x0 and t. Then x0 is independent of x_g given s, as
it is of x1 under pi, so the generated coupling (x0, x_g) equals pi exactly when the law of x_g
given s is that of x1 given s. (A generator fed the interpolation's own x0 makes x_g a function
of x0: that coupling never equals pi, and the last test shows what this costs.)

Closed form, per coordinate: s ~ N(m_s, S), x1 | s ~ N(A s + b, Sigma). Given s, x1 and x0 are
independent Gaussians, so with mu1 = A s + b and mu0 = kappa s

    x_t | s ~ N(t mu1 + (1 - t) mu0, t^2 Sigma + (1 - t)^2 sigma^2),
    v*(t, x, s) = (mu1 - mu0) + k(t) (x - t mu1 - (1 - t) mu0),
    k(t) = (t Sigma - (1 - t) sigma^2) / (t^2 Sigma + (1 - t)^2 sigma^2),

affine in (x, s). An affine generator x_g = M z + N s + c gives x_g | s ~ N((M kappa + N) s + c,
M^2 sigma^2), of the same form, and so is its own field v_G. Two coordinates with different
constants; two paths: cond-fm (kappa = 0, sigma = 1) and bridge (kappa = 1, sigma = 0.5).
Networks are called f(t, x, y, s) (distill.field), y = None. Everything is float64 and seeded.
"""
import math

import numpy as np
import pytest
import torch

import distill
import losses


@pytest.fixture(autouse=True)
def float64_one_thread():
    """Float64, and one intra-op thread: the tensors are small (at most 400k x 2), and on a busy
    2-core machine OpenMP's waiting threads made this file ten times slower (140 s against 14 s
    of wall time). Both settings are restored afterwards."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)


M_S = torch.tensor([0.3, -0.5], dtype=torch.float64)    # s ~ N(M_S, S_STD^2)
S_STD = torch.tensor([0.8, 1.1], dtype=torch.float64)
A = torch.tensor([0.6, -0.4], dtype=torch.float64)      # x1 | s ~ N(A s + B, SIG1^2)
B = torch.tensor([0.2, 0.5], dtype=torch.float64)
SIG1 = torch.tensor([0.5, 0.9], dtype=torch.float64)
PATHS = {"cond-fm": (0.0, 1.0), "bridge": (1.0, 0.5)}  # (kappa, sigma): x0 = kappa s + sigma eps0


def _col(t):
    return t.view(-1, 1)


class Coupling:
    """A coupling of (x0, x1) given s, seen through its interpolation: per coordinate
    x_t | s ~ N(mean(t, s), var(t)), and its flow field field(t, x, y, s) = E[x1 - x0 | x_t, s],
    affine in x. t [B]; x, s [B, 2]."""

    def __init__(self, mean, var, field):
        self.mean, self.var, self.field = mean, var, field

    def log_density(self, t, x, s):
        """log p(x_t = x | s) of each coordinate, [B, 2] (the joint density is their sum)."""
        var = self.var(t)
        return -(x - self.mean(t, s)) ** 2 / (2 * var) - 0.5 * torch.log(2 * math.pi * var)


def independent(a, b, var1, kappa, sigma):
    """x1 | s ~ N(a s + b, var1) and x0 = kappa s + sigma eps0 independent given s: the data
    coupling pi, and the generated one of distill (the generator's own noise)."""
    def mean(t, s):
        t = _col(t)
        return t * (a * s + b) + (1 - t) * kappa * s

    def var(t):
        t = _col(t)
        return t**2 * var1 + (1 - t) ** 2 * sigma**2

    def field(t, x, y, s):
        t = _col(t)
        mu1, mu0 = a * s + b, kappa * s
        k = (t * var1 - (1 - t) * sigma**2) / (t**2 * var1 + (1 - t) ** 2 * sigma**2)
        return (mu1 - mu0) + k * (x - t * mu1 - (1 - t) * mu0)
    return Coupling(mean, var, field)


def data_coupling(kappa, sigma):
    return independent(A, B, SIG1**2, kappa, sigma)


def generated(M, N, c, kappa, sigma):
    """The coupling of x_g = M z + N s + c, z = kappa s + sigma eps_g, with the independent x0."""
    return independent(M * kappa + N, c, M**2 * sigma**2, kappa, sigma)


def shared_x0(M, N, c, kappa, sigma):
    """The literal alternative x_g = M x0 + N s + c (the generator fed the interpolation's x0):
    x_t = a_t x0 + t h with a_t = t M + 1 - t, h = N s + c, and u = (M - 1) x0 + h is a function
    of (x_t, s), so v_G(t, x, s) = (M - 1) (x - t h) / a_t + h exactly."""
    def a_t(t):
        t = _col(t)
        return t * M + 1 - t

    def mean(t, s):
        return a_t(t) * kappa * s + _col(t) * (N * s + c)

    def var(t):
        return a_t(t) ** 2 * sigma**2

    def field(t, x, y, s):
        h = N * s + c
        return (M - 1) * (x - _col(t) * h) / a_t(t) + h
    return Coupling(mean, var, field)


def truth(kappa, sigma):
    """(M, N, c) with x_g | s ~ x1 | s: M sigma = sqrt(Sigma), M kappa + N = A, c = B."""
    M = SIG1 / sigma
    return M, A - M * kappa, B.clone()


def affine_generator(M, N, c):
    """G(t, z, y, s) = (M - 1) z + N s + c, so that distill.generate gives M z + N s + c."""
    def G(t, z, y, s):
        return (M - 1) * z + N * s + c
    return G


def draw(kappa, sigma, n, g, dims=2):
    """A batch of the convention: the source s, the shared start x0 = kappa s + sigma eps0, the
    generator's own start z = kappa s + sigma eps_g (eps_g independent of eps0), the target x1.
    dims = 1 keeps the first coordinate only."""
    s = M_S[:dims] + S_STD[:dims] * torch.randn(n, dims, generator=g)
    x0 = kappa * s + sigma * torch.randn(n, dims, generator=g)
    z = kappa * s + sigma * torch.randn(n, dims, generator=g)
    x1 = A[:dims] * s + B[:dims] + SIG1[:dims] * torch.randn(n, dims, generator=g)
    return s, x0, z, x1


def flow_distance(gen, data, t_nodes=64, s_nodes=5, dims=2):
    """E_s E_t E_{x ~ p_t^G(.|s)} |v*(t, x, s) - v_G(t, x, s)|^2, section 4's flow distance
    conditional on s (Appendix C). Exact in x: the fields are affine in x, so for x ~ N(m, var)
    E d(x)^2 = d(m)^2 + (d(m + 1) - d(m))^2 var. Exact in s: the integrand is quadratic in s and
    5 Gauss-Hermite nodes integrate degree 9 exactly. Gauss-Legendre in t on [0, 1]."""
    tn, tw = np.polynomial.legendre.leggauss(t_nodes)
    sn, sw = np.polynomial.hermite_e.hermegauss(s_nodes)
    t = torch.tensor((tn + 1) / 2).repeat_interleave(s_nodes)
    w = torch.tensor(np.outer(tw / 2, sw / math.sqrt(2 * math.pi)).ravel())
    s = M_S[:dims] + S_STD[:dims] * torch.tensor(sn).repeat(t_nodes)[:, None]
    m, var = gen.mean(t, s), gen.var(t)

    def d(x):
        return data.field(t, x, None, s) - gen.field(t, x, None, s)
    d0 = d(m)
    return (w * (d0**2 + (d(m + 1) - d0) ** 2 * var).sum(1)).sum()


def mc_mean_and_se(fn, chunks):
    """Mean and standard error of estimates over independent chunks."""
    values = torch.stack([fn(i) for i in range(chunks)])
    return values.mean(0), values.std(0) / math.sqrt(chunks)


@pytest.mark.parametrize("path", PATHS)
def test_conditional_gaussian_field_matches_regression(path):
    """The closed form v*(t, x, s) itself: E[u | x_t, s] is linear in (1, x_t, s) (jointly
    Gaussian), so least squares of u on (1, x_t, s) over 400k pairs estimates its coefficients.

    Tolerance: 5 ordinary-least-squares standard errors per coefficient (residual variance times
    the diagonal of (X^T X)^-1; about 0.002 here). A wrong k(t) moves a coefficient by > 0.05.
    """
    kappa, sigma = PATHS[path]
    g = torch.Generator().manual_seed(0)
    n = 400_000
    s, x0, _, x1 = draw(kappa, sigma, n, g)
    v = data_coupling(kappa, sigma).field
    for t in (0.3, 0.7):
        xt, u = t * x1 + (1 - t) * x0, x1 - x0
        tt = torch.full((3,), t)
        # coefficients of the closed form: value at (x, s) = 0, slope in x, slope in s
        x, src = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]), torch.tensor(
            [[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
        vals = v(tt, x, None, src)
        exact = torch.stack([vals[0], vals[1] - vals[0], vals[2] - vals[0]])  # [3, 2]
        for i in range(2):
            X = torch.stack([torch.ones(n), xt[:, i], s[:, i]], 1)
            coef = torch.linalg.lstsq(X, u[:, i:i + 1]).solution[:, 0]
            resid = u[:, i] - X @ coef
            se = (resid.var() * torch.linalg.inv(X.T @ X).diagonal()).sqrt()
            assert torch.all((coef - exact[:, i]).abs() < 5 * se), (t, i, coef, exact[:, i], se)


@pytest.mark.parametrize("path", PATHS)
def test_data_free_generator_gradient_is_conditional_flow_distance_gradient(path):
    """(a) alpha = beta = 1 (IBMD's data-free setting, coupling.py), f = the generator's own
    conditional field: the gradient of generator_loss over (M, N, c) equals the gradient of
    E_s E_t E |v* - v_G|^2 (section 4's FGM identity, pointwise in s).

    Tolerance: 4 Monte-Carlo standard errors (from 16 independent chunks of 25k samples) plus
    1e-3 absolute; the gradient components are of order 0.1-1 and exceed 0.05, so a wrong sign,
    weight or source fails.
    """
    kappa, sigma = PATHS[path]
    M = torch.tensor([0.7, 1.4], requires_grad=True)
    N = torch.tensor([0.1, -0.2], requires_grad=True)
    c = torch.tensor([0.4, 0.1], requires_grad=True)
    data = data_coupling(kappa, sigma)

    def mc_grad(seed):
        g = torch.Generator().manual_seed(seed)
        n = 25_000
        s, x0, z, _ = draw(kappa, sigma, n, g)
        t = torch.rand(n, generator=g)
        fake = generated(M.detach(), N.detach(), c.detach(), kappa, sigma).field  # frozen v_G
        x_g = distill.generate(affine_generator(M, N, c), z, None, s)
        loss = losses.generator_loss(data.field, fake, x_g, x0, t, None, s, alpha=1.0,
                                      beta=1.0)
        return torch.cat(torch.autograd.grad(loss, (M, N, c)))

    mc, se = mc_mean_and_se(mc_grad, 16)
    exact = torch.cat(torch.autograd.grad(flow_distance(generated(M, N, c, kappa, sigma), data),
                                          (M, N, c)))
    assert exact.abs().min() > 0.05, exact  # a non-trivial gradient in every parameter
    assert torch.all((mc - exact).abs() < 4 * se + 1e-3), (mc, exact, se)


T_GRID = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)


class AffinePerTime:
    """f(t, x, s) = c0[t] + c1[t] x + c2[t] s per coordinate, own coefficients for each t of
    T_GRID: contains v*, which is Lemma 2's optimum when the generated coupling is pi."""

    def __init__(self, c0=None, c1=None, c2=None):
        self.c = [torch.zeros(len(T_GRID), 2, requires_grad=True) if p is None else p
                  for p in (c0, c1, c2)]

    def __call__(self, t, x, y, s):
        w = (t[:, None] == T_GRID[None]).to(x.dtype)  # one-hot rows: t lies on T_GRID
        c0, c1, c2 = self.c
        return w @ c0 + (w @ c1) * x + (w @ c2) * s

    def frozen(self):
        return AffinePerTime(*[p.detach() for p in self.c])


def fit_fake_model(params, path, alpha, beta, seed, n=50_000):
    """Minimise losses.fake_model_loss over the per-t affine family (exactly: it is quadratic),
    on generated samples of the generator `params` = (M, N, c) and real pairs (s, x1)."""
    kappa, sigma = PATHS[path]
    g = torch.Generator().manual_seed(seed)
    s, x0, z, x1 = draw(kappa, sigma, n, g)
    t = T_GRID[torch.randint(len(T_GRID), (n,), generator=g)]
    x_g = distill.generate(affine_generator(*params), z, None, s)
    f = AffinePerTime()
    opt = torch.optim.LBFGS(f.c, lr=1, max_iter=200, tolerance_grad=1e-12,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = losses.fake_model_loss(f, x_g, x1, x0, t, None, s, alpha=alpha, beta=beta)
        loss.backward()
        return loss
    opt.step(closure)
    return f.frozen()


def generator_grad(params, f, path, alpha, beta, seed, n=50_000):
    """The Monte-Carlo gradient of losses.generator_loss over (M, N, c), f frozen."""
    kappa, sigma = PATHS[path]
    M, N, c = [p.clone().requires_grad_(True) for p in params]
    g = torch.Generator().manual_seed(seed)
    s, x0, z, _ = draw(kappa, sigma, n, g)
    t = T_GRID[torch.randint(len(T_GRID), (n,), generator=g)]
    x_g = distill.generate(affine_generator(M, N, c), z, None, s)
    loss = losses.generator_loss(data_coupling(kappa, sigma).field, f, x_g, x0, t, None, s,
                                  alpha=alpha, beta=beta)
    return torch.cat(torch.autograd.grad(loss, (M, N, c)))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.94, 0.96), (0.8, 0.9)])
def test_generator_gradient_vanishes_at_the_true_conditional_law(path, alpha, beta):
    """(b) x_g | s ~ x1 | s (so the generated coupling is pi) and f fitted with fake_model_loss
    (Lemma 2's optimum, here v*, lies in the family): f equals v* and the generator gradient
    vanishes. A generator off the truth (M 1.3 times too large) gets a clear gradient.

    Tolerances: the fit uses 50k samples, about 17k per t; the residual sd of u is about 1 and
    the test points have leverage up to 3, so the standard error of f at them is about 0.025
    (over 6 other seeds the largest |f - v*| was 0.072): |f - v*| < 0.15. Every term of the
    gradient at the truth is proportional to f - v* (plus 50k-sample noise); over 6 other seeds
    the largest component was 0.015: |grad| < 0.04. Off the truth the dM components were 0.42 to
    0.84 over those seeds: > 0.25 asserted.
    """
    kappa, sigma = PATHS[path]
    params = truth(kappa, sigma)
    f = fit_fake_model(params, path, alpha, beta, seed=1)
    v = data_coupling(kappa, sigma).field
    x = torch.tensor([[-1.0, 0.5], [0.0, 0.0], [1.5, -2.0]])
    src = torch.tensor([[0.5, -1.0], [0.0, 0.3], [-1.0, 1.0]])
    for t in T_GRID:
        tt = torch.full((3,), float(t))
        assert torch.allclose(f(tt, x, None, src), v(tt, x, None, src), atol=0.15)
    grad = generator_grad(params, f, path, alpha, beta, seed=2)
    assert grad.abs().max() < 0.04, grad

    off = (1.3 * params[0], params[1], params[2])
    f_off = fit_fake_model(off, path, alpha, beta, seed=3)
    grad_off = generator_grad(off, f_off, path, alpha, beta, seed=4)
    assert grad_off[:2].abs().min() > 0.25, grad_off


def lemma2_optimum(gen, data, alpha, beta, joint=True):
    """Lemma 2 conditionally on s (Appendix C): f*(t, x, s) = (beta p_g v_G + (1 - beta) p_d v*) /
    (alpha p_g + (1 - alpha) p_d) with p_g = p(x_t^g = x | s), p_d = p(x_t^d = x | s), the joint
    densities of the coordinates. joint=False uses each coordinate's own density (wrong)."""
    def f(t, x, y, s):
        lg, ld = gen.log_density(t, x, s), data.log_density(t, x, s)
        if joint:
            lg, ld = lg.sum(1, keepdim=True), ld.sum(1, keepdim=True)
        top = torch.maximum(lg, ld)
        p_g, p_d = torch.exp(lg - top), torch.exp(ld - top)
        return (beta * p_g * gen.field(t, x, y, s) + (1 - beta) * p_d * data.field(t, x, y, s)
                ) / (alpha * p_g + (1 - alpha) * p_d)
    return f


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("alpha,beta", [(0.94, 0.96), (0.9, 0.7)])
def test_conditional_lemma2_optimum_minimises_the_fake_model_loss(path, alpha, beta):
    """(c) Fixed t = 0.6, a generator off the truth: Lemma 2's conditional optimum minimises
    fake_model_loss. On 200k common samples (20 chunks of 10k): along each bump h the loss at
    f* +- 0.2 h exceeds the loss at f*, and the directional derivative (L(f* + eps h) -
    L(f* - eps h)) / (2 eps), whose expectation is zero exactly at the optimum, is within 4
    Monte-Carlo standard errors of 0; the wrong candidates (alpha and beta swapped, v*, v_G,
    per-coordinate densities, another pair's source) have an excess loss above 5 standard errors.
    """
    kappa, sigma = PATHS[path]
    params = (torch.tensor([1.2, 0.6]), torch.tensor([0.3, 0.1]), torch.tensor([-0.3, 0.4]))
    gen, data = generated(*params, kappa, sigma), data_coupling(kappa, sigma)
    g = torch.Generator().manual_seed(0)
    n, chunks = 200_000, 20
    s, x0, z, x1 = draw(kappa, sigma, n, g)
    x_g = distill.generate(affine_generator(*params), z, None, s)
    tt = torch.full((n,), 0.6)
    batches = list(zip(*[v.chunk(chunks) for v in (x_g, x1, x0, tt, s)]))

    def loss(f):  # the loss of each chunk, [chunks]
        return torch.stack([losses.fake_model_loss(f, xg, xd, x0_, t_, None, s_, alpha=alpha,
                                                    beta=beta) for xg, xd, x0_, t_, s_ in batches])
    best = lemma2_optimum(gen, data, alpha, beta)
    base = loss(best)

    def excess(f):
        d = loss(f) - base
        return d.mean(), d.std() / math.sqrt(chunks)
    bumps = [lambda x, s: torch.ones_like(x), lambda x, s: x, lambda x, s: s,
             lambda x, s: torch.tanh(3 * x) * s]
    eps = 0.2
    for h in bumps:
        up, down = [loss(lambda t, x, y, s, h=h, e=e: best(t, x, y, s) + e * h(x, s))
                    for e in (eps, -eps)]
        assert (up.mean() > base.mean()) and (down.mean() > base.mean())
        slope = (up - down) / (2 * eps)
        assert slope.mean().abs() < 4 * slope.std() / math.sqrt(chunks), slope.mean()
    wrong = [lemma2_optimum(gen, data, beta, alpha),  # alpha and beta swapped
             data.field, gen.field, lemma2_optimum(gen, data, alpha, beta, joint=False),
             lambda t, x, y, s: best(t, x, y, s.roll(1, 0))]  # the source of another pair
    for f in wrong:
        mean, se = excess(f)
        assert mean > 5 * se, (mean, se)


def realuid_value(gen, data, alpha, beta, t_nodes=32, s_nodes=20, x_nodes=801, width=12.0):
    """The RealUID value of eq. (18) in ONE coordinate (data and generator 1-D), conditional on
    s: E_t E_s [RealUM(v*) - min_f RealUM(f)] = E_t E_s int q |v* - f*|^2 dx with q = alpha p_g +
    (1 - alpha) p_d and f* Lemma 2's optimum, i.e. the integrand |alpha p_g v* - beta p_g v_G +
    (beta - alpha) p_d v*|^2 / q. Gauss-Legendre in t, Gauss-Hermite in s, a uniform grid in x
    over +-width of the larger standard deviation around the data mean (exponentially accurate
    for a smooth integrand that vanishes at the ends; doubling every grid changes the gradient by
    < 3e-6)."""
    tn, tw = np.polynomial.legendre.leggauss(t_nodes)
    sn, sw = np.polynomial.hermite_e.hermegauss(s_nodes)
    u = torch.linspace(-width, width, x_nodes)
    t = torch.tensor((tn + 1) / 2).repeat_interleave(s_nodes * x_nodes)
    s = (M_S[0] + S_STD[0] * torch.tensor(sn)).repeat_interleave(x_nodes).repeat(t_nodes)
    w = torch.tensor(np.outer(tw / 2, sw / math.sqrt(2 * math.pi)).ravel()).repeat_interleave(
        x_nodes)[:, None]
    s = s[:, None]
    scale = torch.maximum(gen.var(t), data.var(t)).sqrt().detach()
    x = data.mean(t, s).detach() + scale * u.repeat(t_nodes * s_nodes)[:, None]
    p_g, p_d = gen.log_density(t, x, s).exp(), data.log_density(t, x, s).exp()
    v, v_g = data.field(t, x, None, s), gen.field(t, x, None, s)
    r = alpha * p_g * v - beta * p_g * v_g + (beta - alpha) * p_d * v
    return (w * (u[1] - u[0]) * scale * r**2 / (alpha * p_g + (1 - alpha) * p_d)).sum()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("alpha,beta", [(0.94, 0.96), (0.8, 0.9)])
def test_generator_gradient_with_real_data_is_the_realuid_value_gradient(path, alpha, beta):
    """(a') With real data: f = Lemma 2's exact conditional optimum (frozen), a generator off the
    truth. By the envelope theorem the gradient of generator_loss is that of the RealUID value
    RealUM(v*) - min_f RealUM(f) (eq. (18); its real-data terms do not depend on G). One
    coordinate, so that the value is a 1-D integral in x (realuid_value); at alpha = beta = 1 it
    is the flow distance of (a).

    Tolerance: 4 Monte-Carlo standard errors (16 chunks of 25k samples) plus 1e-3; the components
    are 0.15 to 2.1 in size; swapping alpha and beta in generator_loss moves the most affected
    one by 7 to 90 standard errors.
    """
    kappa, sigma = PATHS[path]
    data = independent(A[:1], B[:1], SIG1[:1] ** 2, kappa, sigma)
    m0 = {"cond-fm": 1.2, "bridge": 1.6}[path]  # x_g std 1.2 and 0.8, the data's 0.5
    M, N, c = [torch.tensor([v], requires_grad=True) for v in (m0, 0.3, -0.3)]
    gen = generated(M, N, c, kappa, sigma)
    assert torch.allclose(realuid_value(gen, data, 1.0, 1.0), flow_distance(gen, data, dims=1),
                          rtol=1e-8)
    exact = torch.cat(torch.autograd.grad(realuid_value(gen, data, alpha, beta), (M, N, c)))
    f = lemma2_optimum(generated(M.detach(), N.detach(), c.detach(), kappa, sigma), data,
                       alpha, beta)

    def mc_grad(seed):
        g = torch.Generator().manual_seed(seed)
        n = 25_000
        s, x0, z, _ = draw(kappa, sigma, n, g, dims=1)
        t = torch.rand(n, generator=g)
        x_g = distill.generate(affine_generator(M, N, c), z, None, s)
        loss = losses.generator_loss(data.field, f, x_g, x0, t, None, s, alpha=alpha,
                                      beta=beta)
        return torch.cat(torch.autograd.grad(loss, (M, N, c)))
    mc, se = mc_mean_and_se(mc_grad, 16)
    assert exact.abs().min() > 0.1, exact
    assert torch.all((mc - exact).abs() < 4 * se + 1e-3), (mc, exact, se)


def small_net(seed, d=3):
    """A nonlinear time- and source-dependent field with parameters, standing in for a network
    called f(t, x, y, s) (the U-Net concatenates s to x_t, coupling.py)."""
    g = torch.Generator().manual_seed(seed)
    w1 = (0.5 * torch.randn(2 * d + 1, 8, generator=g)).requires_grad_(True)
    w2 = (0.5 * torch.randn(8, d, generator=g)).requires_grad_(True)

    def f(t, x, y, s):
        h = torch.tanh(torch.cat([x, s, t[:, None]], 1) @ w1)
        return h @ w2
    return f, [w1, w2]


def random_batch(seed, n=64, d=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g), torch.randn(n, d, generator=g) + 1,
            torch.randn(n, d, generator=g), torch.rand(n, generator=g),
            torch.randn(n, d, generator=g) - 1)


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.94, 0.96), (0.98, 0.96), (1.0, 0.9)])
def test_general_realuid_with_gamma_equal_alpha_is_realuid_with_a_source(alpha, beta):
    """(d) With a source: General RealUID (Appendix A.2) with gamma = alpha equals RealUID, the
    generator loss in value and gradient, the fake-model loss as RealUM(f) - RealUM(v*) (so its
    gradient over f is RealUID's); another gamma differs; the source reaches every network (another
    s changes every loss). Data-free (1, 1) runs without real targets (x_d = None). Exact
    identities: float64 rounding tolerances."""
    f, f_params = small_net(0)
    teacher, _ = small_net(1)
    x_g, x_d, x0, t, s = random_batch(2)
    x_d = None if alpha == beta == 1 else x_d
    x_g.requires_grad_(True)
    close = dict(rtol=1e-10, atol=1e-12)

    plain = losses.generator_loss(teacher, f, x_g, x0, t, None, s, alpha=alpha, beta=beta)
    general = losses.general_generator_loss(teacher, f, x_g, x0, t, None, s, alpha=alpha,
                                             beta=beta, gamma=alpha)
    assert torch.allclose(plain, general, **close)
    g1, = torch.autograd.grad(plain, x_g)
    g2, = torch.autograd.grad(general, x_g)
    assert torch.allclose(g1, g2, **close)

    xg = x_g.detach()
    plain_f = losses.fake_model_loss(f, xg, x_d, x0, t, None, s, alpha=alpha, beta=beta)
    general_f = losses.general_fake_model_loss(teacher, f, xg, x_d, x0, t, None, s, alpha=alpha,
                                                beta=beta, gamma=alpha)
    realum_teacher = losses.fake_model_loss(teacher, xg, x_d, x0, t, None, s, alpha=alpha,
                                             beta=beta)
    assert torch.allclose(general_f, plain_f - realum_teacher, **close)
    for p, q in zip(torch.autograd.grad(plain_f, f_params),
                    torch.autograd.grad(general_f, f_params)):
        assert torch.allclose(p, q, **close)

    other = losses.general_generator_loss(teacher, f, x_g, x0, t, None, s, alpha=alpha,
                                           beta=beta, gamma=alpha * 0.9)
    assert not torch.allclose(other, general)

    s2 = s + 0.5
    assert not torch.allclose(plain, losses.generator_loss(teacher, f, x_g, x0, t, None, s2,
                                                            alpha=alpha, beta=beta))
    assert not torch.allclose(plain_f, losses.fake_model_loss(f, xg, x_d, x0, t, None, s2,
                                                               alpha=alpha, beta=beta))
    assert not torch.allclose(general_f, losses.general_fake_model_loss(
        teacher, f, xg, x_d, x0, t, None, s2, alpha=alpha, beta=beta, gamma=alpha))


def test_fused_pass_pairs_each_real_target_with_its_own_source():
    """fake_model_loss's single pass over [generated; real] gives each real x_t its own source:
    it equals two separate passes computed by hand (fake_model_loss's L_f with s, exact to
    rounding)."""
    f, _ = small_net(0)
    x_g, x_d, x0, t, s = random_batch(5)
    alpha, beta = 0.9, 0.95
    t_ = t[:, None]
    f_g, f_d = f(t, t_ * x_g + (1 - t_) * x0, None, s), f(t, t_ * x_d + (1 - t_) * x0, None, s)
    sep = (alpha * f_g**2 - 2 * beta * f_g * (x_g - x0) + (1 - alpha) * f_d**2
           - 2 * (1 - beta) * f_d * (x_d - x0)).sum(1).mean()
    got = losses.fake_model_loss(f, x_g, x_d, x0, t, None, s, alpha=alpha, beta=beta)
    assert torch.allclose(got, sep, rtol=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_generator_fed_the_shared_x0_cannot_stop_at_the_true_law(path):
    """Why distill's generator gets its own noise: with the literal x_g = x0 + G(0, x0, s), at
    the true conditional law (M sigma = sqrt(Sigma), M kappa + N = A, c = B) the generated
    coupling is deterministic, x_t^g | s has variance (t M + 1 - t)^2 sigma^2 = t^2 Sigma +
    (1 - t)^2 sigma^2 + 2 t (1 - t) sigma sqrt(Sigma), larger than the data's, so it is not pi and
    the generator gradient does not vanish: there the flow distance has dD/dM = (pi/2 - 1)
    sigma^2 in each coordinate (0.571 cond-fm, 0.143 bridge; the same for every Sigma > 0 tried),
    while with independent generator noise D and its gradient are 0. (Found numerically, LBFGS
    on the exact D: the data-free minimiser of the shared-x0 generator has the right conditional
    mean but std (2/pi) sqrt(Sigma), and D stays > 0 there.)

    Checks: exact D gradients (as in (a)); the Monte-Carlo gradient of generator_loss with
    f = the shared coupling's own field (alpha = beta = 1) matches the exact one within 4
    standard errors (16 chunks of 25k) + 1e-3; with real data (0.94, 0.96) and f = Lemma 2's
    exact optimum for that coupling (the envelope gradient of the RealUID value) the dM
    components still exceed 10 standard errors and 0.05.
    """
    kappa, sigma = PATHS[path]
    data = data_coupling(kappa, sigma)
    M, N, c = [p.requires_grad_(True) for p in truth(kappa, sigma)]
    exact_own = torch.cat(torch.autograd.grad(
        flow_distance(generated(M, N, c, kappa, sigma), data), (M, N, c)))
    assert exact_own.abs().max() < 1e-10, exact_own
    exact = torch.cat(torch.autograd.grad(flow_distance(shared_x0(M, N, c, kappa, sigma), data),
                                          (M, N, c)))
    assert torch.allclose(exact[:2], torch.full((2,), (math.pi / 2 - 1) * sigma**2), atol=1e-6)

    for alpha, beta in [(1.0, 1.0), (0.94, 0.96)]:
        frozen = shared_x0(M.detach(), N.detach(), c.detach(), kappa, sigma)
        f = lemma2_optimum(frozen, data, alpha, beta)  # alpha = beta = 1: the coupling's v_G

        def mc_grad(seed):
            g = torch.Generator().manual_seed(seed)
            n = 25_000
            s, x0, _, _ = draw(kappa, sigma, n, g)
            t = torch.rand(n, generator=g)
            x_g = distill.generate(affine_generator(M, N, c), x0, None, s)  # fed x0 itself
            loss = losses.generator_loss(data.field, f, x_g, x0, t, None, s, alpha=alpha,
                                          beta=beta)
            return torch.cat(torch.autograd.grad(loss, (M, N, c)))
        mc, se = mc_mean_and_se(mc_grad, 16)
        if alpha == beta == 1:
            assert torch.all((mc - exact).abs() < 4 * se + 1e-3), (mc, exact, se)
        assert torch.all(mc[:2].abs() > 10 * se[:2]) and mc[:2].abs().min() > 0.05, (mc, se)
