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
    (teachers.DenoiserField), since D - x1 = (1 - t)(v - (x1 - x0)): weight =
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
                            gamma):
    """General RealUID (Appendix A.2, delta form, delta = f - v*), minimised by f: minus

        E_gen[ -gamma |delta|^2 + 2 beta <delta, u_g> - 2 alpha <delta, v*> ]
      + E_real[ -(1 - gamma) |delta|^2 + 2 (1 - beta) <delta, u_d> - 2 (1 - alpha) <delta, v*> ].

    gamma = alpha gives RealUID: this is then RealUM(f) - RealUM(v*), fake_model_loss up to a
    constant. Needs the teacher on both batches (no gradient). x_d may be None if
    alpha = beta = gamma = 1.
    """
    u_g = x_g - x0
    real = not (alpha == 1 and beta == 1 and gamma == 1)
    xt, tt, yy, ss = interpolate(x_g, x0, t), t, y, s
    if real:
        xt = torch.cat([xt, interpolate(x_d, x0, t)])
        tt, yy, ss = t.repeat(2), _twice(y), _twice(s)
    with torch.no_grad():
        v = field(teacher, tt, xt, yy, ss).to(x0.dtype)
    delta = field(fake, tt, xt, yy, ss).to(x0.dtype) - v
    if not real:
        gain = -gamma * delta * delta + 2 * beta * delta * u_g - 2 * alpha * delta * v
        return -gain.flatten(1).sum(1).mean()
    (d_g, d_d), (v_g, v_d) = delta.chunk(2), v.chunk(2)
    gain = (-gamma * d_g * d_g + 2 * beta * d_g * u_g - 2 * alpha * d_g * v_g
            - (1 - gamma) * d_d * d_d + 2 * (1 - beta) * d_d * (x_d - x0)
            - 2 * (1 - alpha) * d_d * v_d)
    return -gain.flatten(1).sum(1).mean()


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
# (teachers.DenoiserField).

SIGMA_DATA = 0.5  # EDM's sigma_data, in its denoising weight


def noise_levels(law, r, t_range=(0.0, 1.0)):
    """t [B] from random numbers r [B] (normal for "edm", uniform on [0, 1) otherwise), with
    sigma = (1 - t) / t the noise level of a denoiser (teachers.DenoiserField):
    - uniform: t uniform on the teacher's range (flow matching: [0, 1]);
    - edm: EDM's training law, ln sigma ~ N(-1.2, 1.2^2) (SiD's fake model);
    - sid: SiD's generator law, sigma on EDM's rho = 7 grid between 0.002 and 80 at a position
      uniform on [0, 0.8] from the low end (sigma from 0.002 up to about 24.4)."""
    if law == "uniform":
        lo, hi = t_range
        return r if (lo, hi) == (0.0, 1.0) else lo + (hi - lo) * r
    if law == "edm":
        sigma = (-1.2 + 1.2 * r).exp()
    elif law == "sid":
        lo, hi = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
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
