"""Every objective of this repository, as small pure functions (imports only torch and flow.py).

Copy this file and flow.py into another project and you have the whole mathematics of
Kornilov et al., "Universal Inverse Distillation for Matching Models with Real-Data Supervision
(No GANs)", ICLR 2026. Equation numbers are those of arXiv v1; the ICLR 2026
camera-ready renumbers them (its eqs. 16-17 are v1's 17-18, its A.4 eqs. 35-36 are v1's 24-25).

    teacher       flow_matching_loss                         section 2 (with EDM's weight: EDM)
    fake model    fake_model_loss                            RealUM, eq. (17)
    generator     generator_loss                             eq. (18), generator side
    General       general_fake_model_loss, general_generator_loss    Appendix A.2
    SiD           noise_levels, edm_weight, sid_generator_weight,
                  general_generator_loss(normalize=True)     Appendix A.3; Zhou et al. 2024
    GAN baseline  gan_discriminator_loss, gan_generator_loss eqs. (7)-(9), Appendix D
    Normalized    normalized_fake_loss, normalized_generator_loss    Appendix A.4, eqs. (24)-(25)
    delta = beta (v* - f)   beta_delta_fake_loss, beta_delta_generator_loss  ICLR A.2
    DMD           dmd_generator_loss (fake model: fake_model_loss, alpha = beta)  Appendix A.5

Image-to-image (Appendix C) needs no separate functions: each loss takes the source s and passes
it to every network, and x0 is the coupling's start kappa s + sigma_s eps (coupling.py).

Conventions. t = 0 is noise and t = 1 data, x_t = t x1 + (1 - t) x0, u = x1 - x0 (flow.py).
Tensors are [B, ...] of any shape (images or vectors); each loss sums over all non-batch
dimensions and takes the mean over the batch (flow_matching_loss: the mean over all elements,
the authors' F.mse_loss); the value is minimised. One calling convention for all: the networks
first, in the order teacher v*, fake model f (or the discriminator D); then the tensors x_g,
x_d, x0, t, y, s; then the coefficients, keyword-only (alpha=..., beta=..., gamma=...), so that
no positional copy can swap two networks or two coefficients. y are class labels or None; s is
the source image of an image-to-image coupling or None. Networks are called v(t, x, y) without
a source and v(t, x, y, s) with one. Network outputs are cast to the data's dtype: under
autocast the losses stay in float32.
"""
import torch
import torch.nn.functional as F

from flow import field, interpolate


# ---------------------------------------------------------------------------------------------
# Flow matching (section 2): the teacher's objective.

def flow_matching_loss(v, x1, x0, t, y=None, s=None, weight=None):
    """Conditional flow matching (Lipman et al.; paper section 2), minimised by the teacher v.

    x1: data [B, ...], x0: the start like x1 (noise, or kappa s + sigma_s eps for a coupling),
    t: [B] in [0, 1], y: labels [B] or None, s: source images [B, ...] or None (Appendix C).
    Returns mean over all elements of (v(t, x_t, y[, s]) - (x1 - x0))^2, i.e. F.mse_loss, exactly
    the authors' reduction, with x_t = t x1 + (1 - t) x0.

    With a per-sample weight [B] and t from EDM's law this is EDM's denoising loss
    lambda(sigma) |D(x1 + sigma x0; sigma) - x1|^2 of a denoiser D = x_t + (1 - t) v
    (networks.DenoiserField), since D - x1 = (1 - t)(v - (x1 - x0)): weight =
    lambda(sigma) (1 - t)^2 = edm_weight(t) (--param edm).
    """
    xt = interpolate(x1, x0, t)
    err = (field(v, t, xt, y, s).to(x1.dtype) - (x1 - x0)).pow(2)
    if weight is None:
        return err.mean()
    return (weight.view(-1, *[1] * (err.dim() - 1)) * err).mean()


# ---------------------------------------------------------------------------------------------
# RealUID (section 3) and General RealUID (Appendix A.2).

def _batch_mean(loss, weight=None):
    """Sum over all but the batch dimension, then the mean over the batch, each sample's sum
    multiplied by its weight [B] if given (SiD's weightings, see generator_update)."""
    per_sample = loss.flatten(1).sum(1)
    return (per_sample if weight is None else per_sample * weight).mean()


def _twice(v):
    """The conditioning of a batch for the fused pass over [generated; real] (None stays None)."""
    return None if v is None else torch.cat([v, v])


def _points(x_g, x_d, x0, t, y=None, s=None):
    """The inputs (x_t, t, y, s) of one pass of a network over the generated batch, or, given a
    real batch x_d, over [generated; real] fused: both interpolated with the same x0 and t."""
    if x_d is None:
        return interpolate(x_g, x0, t), t, y, s
    return (torch.cat([interpolate(x_g, x0, t), interpolate(x_d, x0, t)]), t.repeat(2),
            _twice(y), _twice(s))


def fake_model_loss(fake, x_g, x_d, x0, t, y=None, s=None, *, alpha, beta, weight=None):
    """RealUM(f) of eq. (17), minimised by the fake model f (the inner max of eq. (18) is
    max_f -RealUM(f)):

        E_gen[ alpha |f(t, x_t^g)|^2 - 2 beta <f, u_g> ] + E_real[ (1 - alpha) |f(t, x_t^d)|^2
        - 2 (1 - beta) <f, u_d> ],    u_g = x_g - x0,  u_d = x_d - x0,

    i.e. alpha |f - (beta/alpha) u_g|^2 + (1 - alpha) |f - ((1-beta)/(1-alpha)) u_d|^2 up to
    terms without f; its pointwise optimum is Lemma 2's f = (beta p_g v_G + (1 - beta) p_d v*) /
    (alpha p_g + (1 - alpha) p_d). x_g is generated without a graph; x_d (real data) may be None
    when alpha = beta = 1. The two batches share x0 and t (and y, s) and go through f in one
    forward pass. `weight` [B] weighs each sample (its generated and real terms), e.g. EDM's
    denoising weight for a diffusion fake model; it leaves the pointwise optimum unchanged.
    """
    u_g = x_g - x0
    if alpha == 1 and beta == 1:  # data-free UID: the real-data terms vanish
        f_g = field(fake, t, interpolate(x_g, x0, t), y, s).to(x0.dtype)
        return _batch_mean(alpha * (f_g * f_g) - 2 * beta * (f_g * u_g), weight)
    u_d = x_d - x0
    xt = torch.cat([interpolate(x_g, x0, t), interpolate(x_d, x0, t)])
    f_g, f_d = field(fake, t.repeat(2), xt, _twice(y), _twice(s)).to(x0.dtype).chunk(2)
    loss = (alpha * (f_g * f_g) - 2 * beta * (f_g * u_g)
            + (1 - alpha) * (f_d * f_d) - 2 * (1 - beta) * (f_d * u_d))
    return _batch_mean(loss, weight)


def generator_loss(teacher, fake, x_g, x0, t, y=None, s=None, *, alpha, beta):
    """The generator's side of eq. (18), RealUM(v*) - RealUM(f) on the generated batch (the
    real-data terms do not depend on G), minimised by G:

        E_gen[ alpha |v*|^2 - 2 beta <v*, u_g> - alpha |f|^2 + 2 beta <f, u_g> ]
        = E_gen[ alpha |v* - (beta/alpha) u_g|^2 - alpha |f - (beta/alpha) u_g|^2 ].

    Gradients reach G through x_t and u_g; teacher v* and fake model f are frozen (their
    parameters should not require grad, so that no parameter gradients are computed).
    """
    xt, u_g = interpolate(x_g, x0, t), x_g - x0
    v, fv = field(teacher, t, xt, y, s).to(x0.dtype), field(fake, t, xt, y, s).to(x0.dtype)
    loss = alpha * (v * v - fv * fv) - 2 * beta * ((v - fv) * u_g)
    return loss.flatten(1).sum(1).mean()


def general_fake_model_loss(teacher, fake, x_g, x_d, x0, t, y=None, s=None, *, alpha, beta,
                            gamma, weight=None):
    """General RealUID (Appendix A.2, delta form, delta = f - v*), minimised by f: minus

        E_gen[ -gamma |delta|^2 + 2 beta <delta, u_g> - 2 alpha <delta, v*> ]
      + E_real[ -(1 - gamma) |delta|^2 + 2 (1 - beta) <delta, u_d> - 2 (1 - alpha) <delta, v*> ].

    gamma = alpha gives RealUID: this is then RealUM(f) - RealUM(v*), fake_model_loss up to a
    constant. Needs the teacher on both batches (no gradient). x_d may be None if
    alpha = beta = gamma = 1. `weight` [B] weighs each sample (its generated and real terms),
    as in fake_model_loss; None leaves every sample's weight 1.
    """
    u_g = x_g - x0
    real = not (alpha == 1 and beta == 1 and gamma == 1)
    xt, tt, yy, ss = _points(x_g, x_d if real else None, x0, t, y, s)
    with torch.no_grad():
        v = field(teacher, tt, xt, yy, ss).to(x0.dtype)
    delta = field(fake, tt, xt, yy, ss).to(x0.dtype) - v
    if not real:
        gain = -gamma * delta * delta + 2 * beta * delta * u_g - 2 * alpha * delta * v
        return -_batch_mean(gain, weight)
    (d_g, d_d), (v_g, v_d) = delta.chunk(2), v.chunk(2)
    gain = (-gamma * d_g * d_g + 2 * beta * d_g * u_g - 2 * alpha * d_g * v_g
            - (1 - gamma) * d_d * d_d + 2 * (1 - beta) * d_d * (x_d - x0)
            - 2 * (1 - alpha) * d_d * v_d)
    return -_batch_mean(gain, weight)


def general_generator_loss(teacher, fake, x_g, x0, t, y=None, s=None, *, alpha, beta, gamma,
                           weight=None, normalize=False):
    """General RealUID (Appendix A.2), generator side, minimised by G (delta = f - v*):

        E_gen[ -gamma |delta|^2 + 2 beta <delta, u_g> - 2 alpha <delta, v*> ].

    With gamma = alpha this equals generator_loss exactly. The generator-side gamma may exceed 1
    (the fake model's loss keeps its own): with D = x_t + (1 - t) v, alpha = beta = 1, this is
    2 L_SiD / (1 - t)^2 with alpha_SiD = gamma / 2, SiD's generator loss (Zhou et al. 2024)

        L_SiD = (D* - D_f) . ((D* - x_g) - alpha_SiD (D* - D_f)),

    since D* - D_f = -(1 - t) delta and D* - x_g = (1 - t)(v* - u_g) (Appendix A.3; SiD's
    alpha_SiD = 1.2 is gamma = 2.4). `weight` [B] weighs each sample; `normalize` divides each
    sample's loss by mean |x_g - D*| = (1 - t) mean |u_g - v*|, without gradient, as SiD does
    (weight (1 - t)^2 / 2 with normalize=True is SiD's generator loss itself).
    """
    xt, u_g = interpolate(x_g, x0, t), x_g - x0
    v = field(teacher, t, xt, y, s).to(x0.dtype)
    delta = field(fake, t, xt, y, s).to(x0.dtype) - v
    loss = -gamma * delta * delta + 2 * beta * delta * u_g - 2 * alpha * delta * v
    if normalize:
        t_ = t.view(-1, *[1] * (x0.dim() - 1))
        scale = ((1 - t_) * (u_g - v)).abs().flatten(1).mean(1).detach().clamp_min(1e-5)
        weight = 1 / scale if weight is None else weight / scale
    return _batch_mean(loss, weight)


# ---------------------------------------------------------------------------------------------
# Diffusion teachers and SiD (Appendix A.3; Zhou et al., "Score identity Distillation", ICML 2024).
# A denoiser D(x; sigma) is a field through sigma = (1 - t) / t and D = x_t + (1 - t) v
# (networks.DenoiserField).

SIGMA_DATA = 0.5  # EDM's sigma_data, in its denoising weight


def noise_levels(law, r, t_range=(0.0, 1.0)):
    """t [B] from random numbers r [B] (normal for "edm", uniform on [0, 1) otherwise), with
    sigma = (1 - t) / t the noise level of a denoiser (networks.DenoiserField):
    - uniform: t uniform on the teacher's range (flow matching: [0, 1]);
    - edm: EDM's training law, ln sigma ~ N(-1.2, 1.2^2) (SiD's fake model);
    - sid: SiD's generator law, sigma on EDM's rho = 7 grid between 0.002 and 80 at a position
      uniform on [0, 0.8] from the low end (sigma from 0.002 up to about 24.4); a teacher
      defined on a narrower range of sigma (VE: from 0.02; a DDPM schedule) gets the grid
      between its own ends, so the generator's t never leaves the teacher's range."""
    if law == "uniform":
        lo, hi = t_range
        return r if (lo, hi) == (0.0, 1.0) else lo + (hi - lo) * r
    if law == "edm":
        sigma = (-1.2 + 1.2 * r).exp()
    elif law == "sid":
        sigma_min, sigma_max = 0.002, 80.0
        t_lo, t_hi = t_range
        # the teacher's ends in sigma, where they are narrower than EDM's (beyond rounding:
        # EDM's own range [1/81, 1/1.002] keeps EDM's numbers exactly)
        if t_hi < 1 and (1 - t_hi) / t_hi > sigma_min * (1 + 1e-9):
            sigma_min = (1 - t_hi) / t_hi
        if t_lo > 0 and (1 - t_lo) / t_lo < sigma_max * (1 - 1e-9):
            sigma_max = (1 - t_lo) / t_lo
        lo, hi = sigma_min ** (1 / 7), sigma_max ** (1 / 7)
        sigma = (hi + (1 - 0.8 * r) * (lo - hi)) ** 7
    else:
        raise ValueError(f"unknown law of t {law!r}")
    return 1 / (1 + sigma)


def edm_weight(t):
    """EDM's denoising weight (sigma^2 + s_d^2) / (sigma s_d)^2 in our units: a denoiser's error
    D - x1 is (1 - t) times the field's, so the weight of |f - u|^2 is that times (1 - t)^2,
    i.e. ((1 - t)^2 + s_d^2 t^2) / s_d^2 with sigma = (1 - t) / t."""
    return ((1 - t) ** 2 + SIGMA_DATA ** 2 * t ** 2) / SIGMA_DATA ** 2


def sid_generator_weight(t):
    """SiD's per-sample weight of the generator loss in our units, (1 - t)^2 / 2: with
    general_generator_loss(..., normalize=True) it gives SiD's generator loss itself."""
    return (1 - t) ** 2 / 2


def gan_levels(r):
    """t for the GAN terms from uniform r [B]: t_gan = 1 - 0.2 r, near the data (the authors'
    setting)."""
    return 1 - 0.2 * r


# ---------------------------------------------------------------------------------------------
# The GAN baseline (eqs. (7)-(9), Appendix D) that RealUID replaces.

def gan_discriminator_loss(D, x_g, x_d, x0, t_gan, y=None, s=None):
    """Optional GAN baseline (eqs. (7)-(9), Appendix D), discriminator side, minimised:
    mean softplus(D(x_t^g)) + mean softplus(-D(x_t^d)) on interpolations at t_gan (the authors
    use t_gan = 1 - 0.2 U[0, 1]). D(t, x, y[, s]) returns logits, e.g. fake.forward_head."""
    xt = torch.cat([interpolate(x_g, x0, t_gan), interpolate(x_d, x0, t_gan)])
    logits = field(D, t_gan.repeat(2), xt, _twice(y), _twice(s)).to(x0.dtype)
    logit_g, logit_d = logits.chunk(2)
    return F.softplus(logit_g).mean() + F.softplus(-logit_d).mean()


def gan_generator_loss(D, x_g, x0, t_gan, y=None, s=None):
    """Optional GAN baseline, generator side (non-saturating), minimised: mean softplus(-D)."""
    return F.softplus(-field(D, t_gan, interpolate(x_g, x0, t_gan), y, s).to(x0.dtype)).mean()


# ---------------------------------------------------------------------------------------------
# Normalized UID / RealUID (Appendix A.4), the delta = beta (v* - f) parameterisation (ICLR 2026
# version, Appendix A.2) and DMD with real data (Appendix A.5; Yin et al., "One-step Diffusion
# with Distribution Matching Distillation", CVPR 2024).

def _direction(v, fv, eps):
    """n = (v* - f) / max(|v* - f|, eps), the norm over all of a sample's entries."""
    d = v - fv
    norm = d.flatten(1).norm(dim=1).clamp_min(eps)
    return d / norm.view(-1, *[1] * (d.dim() - 1))


def normalized_fake_loss(teacher, fake, x_g, x_d, x0, t, y=None, s=None, *, alpha, beta, eps):
    """Normalized UID / RealUID (Appendix A.4: arXiv v1 eqs. (24)-(25), ICLR 2026 camera-ready
    eqs. (35)-(36) and Definition 4), fake-model side, minimised by f: minus

        E_gen< n(x_t^g), alpha v*(x_t^g) - beta u_g > + E_real< n(x_t^d), (1 - alpha) v*(x_t^d)
        - (1 - beta) u_d >,    n = (v* - f) / max(|v* - f|, eps),

    u_g = x_g - x0, u_d = x_d - x0, |.| the norm over all of a sample's entries (C, H, W),
    <.,.> summed over them, the mean over the batch. It rests on |a| = max_{|n| = 1} <n, a>
    pointwise: the fake model learns only the direction of v* - f, and since
    E[u_g | x_t^g] = v_g (the generator's own field) and E[u_d | x_t^d] = v*, its maximum over f
    is E_t ∫ | p_t^g (alpha v* - beta v_g) + p_t^d (beta - alpha) v* | dx, reached where n is
    the direction of that integrand and zero exactly when p_g = p_d (alpha = beta = 1, data-free:
    E_t E_gen |v* - v_g|, a distance that is not squared). eps floors |v* - f| (the direction of
    a vanishing difference is undefined). The teacher runs without gradient; both batches go
    through v* and f in one pass each; x_d may be None when alpha = beta = 1. The paper gives no
    proof, algorithm or experiment for this variant.
    """
    u_g = x_g - x0
    real = not (alpha == 1 and beta == 1)
    xt, tt, yy, ss = _points(x_g, x_d if real else None, x0, t, y, s)
    with torch.no_grad():
        v = field(teacher, tt, xt, yy, ss).to(x0.dtype)
    n = _direction(v, field(fake, tt, xt, yy, ss).to(x0.dtype), eps)
    if not real:
        return -_batch_mean(n * (alpha * v - beta * u_g))
    (n_g, n_d), (vstar_g, vstar_d) = n.chunk(2), v.chunk(2)
    gain = (n_g * (alpha * vstar_g - beta * u_g)
            + n_d * ((1 - alpha) * vstar_d - (1 - beta) * (x_d - x0)))
    return -_batch_mean(gain)


def normalized_generator_loss(teacher, fake, x_g, x0, t, y=None, s=None, *, alpha, beta, eps):
    """Normalized UID / RealUID (Appendix A.4: arXiv v1 eqs. (24)-(25), ICLR 2026 eqs. (35)-(36),
    Definition 4), generator side, minimised by G: the generated part of the objective

        E_gen< n(x_t^g), alpha v*(x_t^g) - beta u_g >,    n = (v* - f) / max(|v* - f|, eps)

    (sum over C, H, W, mean over the batch; the real part does not depend on G). Gradients reach
    G through u_g and through x_t into v*, into the fake model's input and so into n: n must not
    be detached. By the envelope theorem the gradient of the maximum over f is that of this loss
    at the optimal f with f frozen; the path through n contributes
    t E_gen[(dn/dx)^T (alpha v* - beta u_g)], which vanishes in expectation at the optimum of
    the data-free loss (there alpha v* - beta v_g is parallel to n, and dn/dx is orthogonal to
    n) but not with real data, where the optimal n is the direction of
    p_g (alpha v* - beta v_g) + p_d (beta - alpha) v*. The teacher's and the fake model's
    parameters should not require grad.
    """
    xt, u_g = interpolate(x_g, x0, t), x_g - x0
    v = field(teacher, t, xt, y, s).to(x0.dtype)
    n = _direction(v, field(fake, t, xt, y, s).to(x0.dtype), eps)
    return _batch_mean(n * (alpha * v - beta * u_g))


def dmd_generator_loss(teacher, fake, x_g, x0, t, y=None, s=None, *, alpha=1.0, normalize=True):
    """DMD's generator step (Yin et al., CVPR 2024; DMD2, Yin et al., NeurIPS 2024) in this
    repository's convention, with real data as in Appendix A.5 (arXiv v1 Lemma 4, ICLR 2026
    Lemma 5), minimised by G.

    A field v gives the denoiser x_hat1 = x + (1 - t) v and the score (t v - x) / (1 - t), so the
    scores of the fake model f and of the teacher v* differ by t (f - v*) / (1 - t), and with
    x_t = t x_g + (1 - t) x0 the exact gradient of E_t KL(p_t^g || p_t^d) with respect to the
    generator's sample is, per sample,

        grad(x_g) = t^2 / (1 - t) (f - v*)(t, x_t),    f the generator's own field v_g.

    normalize=False: a surrogate whose gradient with respect to each x_g[i] is
    alpha grad(x_g[i]) / B, alpha mean_B sum_{C,H,W} x_g sg(grad) (only its gradient has a
    meaning; t must lie in [0, 1)).
    normalize=True: DMD2's step (tianweiy/DMD2, compute_distribution_matching_loss in
    main/edm/edm_guidance.py and main/sd_guidance.py): g = (x_hat_fake - x_hat_real) /
    mean_{C,H,W} |x_g - x_hat_real| per sample, with x_hat_fake - x_hat_real = (1 - t)(f - v*)
    and x_hat_real = D* = x_t + (1 - t) v*, and the loss alpha 0.5 |x_g - sg(x_g - g)|^2, whose
    gradient is alpha g / B. DMD2 takes the mean over all elements (F.mse_loss); here, as in
    every loss of this file, the sum over C, H, W and the mean over the batch, i.e. DMD2's loss
    times C H W. DMD2 applies nan_to_num to g; here the denominator is floored at 1e-5, as
    general_generator_loss(normalize=True) floors SiD's.

    With real data (Appendix A.5) the fake model is trained on eq. (17) (fake_model_loss) with
    alpha = beta: it then learns v_mix, the field of alpha p_g + (1 - alpha) p_d, and
    grad_G E_t KL(alpha p_t^g + (1 - alpha) p_t^d || p_t^d) =
    E[alpha t^2 / (1 - t) (v_mix - v*) dx_g/dG], the normalize=False gradient with that alpha.
    alpha != beta does not work: the KL objective is linear in p_g, so a separate beta only
    relabels alpha (ICLR 2026), and arXiv v1 reports that the generator collapses.
    The teacher and the fake model run without gradient.
    """
    xt = interpolate(x_g, x0, t)
    t_ = t.view(-1, *[1] * (x0.dim() - 1))
    with torch.no_grad():
        v = field(teacher, t, xt, y, s).to(x0.dtype)
        diff = field(fake, t, xt, y, s).to(x0.dtype) - v  # f - v*
        if normalize:
            x_hat_real = xt + (1 - t_) * v
            scale = (x_g - x_hat_real).abs().flatten(1).mean(1).clamp_min(1e-5)
            g = (1 - t_) * diff / scale.view_as(t_)
        else:
            g = t_ ** 2 / (1 - t_) * diff
    if normalize:
        return alpha * _batch_mean(0.5 * (x_g - (x_g - g).detach()) ** 2)
    return alpha * _batch_mean(x_g * g)


def beta_delta_fake_loss(teacher, fake, x_g, x_d, x0, t, y=None, s=None, *, alpha, beta):
    """RealUID with delta = beta (v* - f) (ICLR 2026 version, Appendix A.2; the authors' code's
    parametrization='beta'), fake-model side, minimised by f: minus

        E_gen[ -alpha beta^2 |v* - f|^2 + 2 alpha beta <v* - f, v*> - 2 beta^2 <v* - f, u_g> ]
      + E_real[ -(1 - alpha) beta^2 |v* - f|^2 + 2 (1 - alpha) beta <v* - f, v*>
                - 2 (1 - beta) beta <v* - f, u_d> ],

    sum over C, H, W, mean over the batch. It is the delta form of Appendix A.2 (gamma = alpha)
    with delta = beta (v* - f): general_fake_model_loss of the fake field (1 - beta) v* + beta f.
    Its pointwise optimum is f = v* - delta_opt / beta with
    delta_opt = ((beta - alpha + alpha r) v* - beta r v_g) / ((1 - alpha) + alpha r),
    r = p_g / p_d: the generator's own field v_g where r = 1 (Lemma 2's optimum is
    v* - delta_opt). The teacher runs without gradient; x_d may be None when alpha = beta = 1.
    """
    u_g = x_g - x0
    real = not (alpha == 1 and beta == 1)
    xt, tt, yy, ss = _points(x_g, x_d if real else None, x0, t, y, s)
    with torch.no_grad():
        v = field(teacher, tt, xt, yy, ss).to(x0.dtype)
    d = v - field(fake, tt, xt, yy, ss).to(x0.dtype)  # v* - f
    if not real:
        gain = -alpha * beta**2 * d * d + 2 * alpha * beta * d * v - 2 * beta**2 * d * u_g
        return -_batch_mean(gain)
    (d_g, d_d), (vstar_g, vstar_d) = d.chunk(2), v.chunk(2)
    gain = (-alpha * beta**2 * d_g * d_g + 2 * alpha * beta * d_g * vstar_g
            - 2 * beta**2 * d_g * u_g
            - (1 - alpha) * beta**2 * d_d * d_d + 2 * (1 - alpha) * beta * d_d * vstar_d
            - 2 * (1 - beta) * beta * d_d * (x_d - x0))
    return -_batch_mean(gain)


def beta_delta_generator_loss(teacher, fake, x_g, x0, t, y=None, s=None, *, alpha, beta):
    """RealUID with delta = beta (v* - f) (ICLR 2026 version, Appendix A.2), generator side,
    minimised by G: the generated part of beta_delta_fake_loss's objective with f frozen,

        E_gen[ -alpha beta^2 |v* - f|^2 + 2 alpha beta <v* - f, v*> - 2 beta^2 <v* - f, u_g> ]

    (sum over C, H, W, mean over the batch): G minimises the maximum over f of the objective,
    whose real part does not depend on G. It equals generator_loss with the fake field
    (1 - beta) v* + beta f, hence generator_loss itself at beta = 1. Gradients reach G through
    x_t and u_g; the teacher's and the fake model's parameters should not require grad.
    """
    xt, u_g = interpolate(x_g, x0, t), x_g - x0
    v = field(teacher, t, xt, y, s).to(x0.dtype)
    d = v - field(fake, t, xt, y, s).to(x0.dtype)  # v* - f
    return _batch_mean(-alpha * beta**2 * d * d + 2 * alpha * beta * d * v
                       - 2 * beta**2 * d * u_g)
