"""The flow-matching conventions every stage shares (paper section 2; imports only torch).

Noise x0 ~ N(0, I) sits at t = 0, data x1 at t = 1; x_t = t x1 + (1 - t) x0 and the
conditional velocity is u = x1 - x0. A network is a field v(t, x, y) with t of shape [B] in
[0, 1] and y class labels or None; an image-to-image network (Appendix C) also sees its source
s, as v(t, x, y, s). The teacher is sampled by integrating dx/dt = v*(t, x, y) from t = 0 to
t = 1; the distilled generator is one evaluation of the network at t = 0 (Appendix D).
"""
import torch


def field(net, t, x, y=None, s=None):
    """The flow field of a network at (t, x): net(t, x, y), or net(t, x, y, s) when there is a
    source, so that callables without an image condition (closed-form fields, the ablation's
    MLPs) keep their three-argument form."""
    return net(t, x, y) if s is None else net(t, x, y, s)


def interpolate(x1, x0, t):
    """x_t = t x1 + (1 - t) x0 with t [B] broadcast over the other dimensions."""
    t_ = t.view(-1, *[1] * (x0.dim() - 1))
    return t_ * x1 + (1 - t_) * x0


def generate(G, z, y=None, s=None, t_g=0.0):
    """One-step generator x = z + G(0, z, y[, s]): the network at t = 0 plus a residual
    (Appendix D). For couplings z is the generator's own start kappa s + sigma_s eps
    (coupling.start), drawn independently of the interpolations' x0.

    A start time t_g > 0 generalises it to x_t = (1 - t_g) z, x = x_t + (1 - t_g) G(t_g, x_t):
    one Euler step from t_g to 1. For a diffusion teacher's network (teachers.py) this is
    SiD's x = D_G(sigma_init z; sigma_init) with sigma_init = (1 - t_g) / t_g, since a
    denoiser is not defined at sigma = infinity (t = 0)."""
    if t_g == 0:
        t0 = torch.zeros(len(z), device=z.device, dtype=z.dtype)
        return z + field(G, t0, z, y, s).to(z.dtype)
    xt = (1 - t_g) * z
    t = torch.full((len(z),), t_g, device=z.device, dtype=z.dtype)
    return xt + (1 - t_g) * field(G, t, xt, y, s).to(z.dtype)


@torch.no_grad()
def euler(v, x0, y=None, s=None, *, nfe=100, t0=0.0, t1=1.0):
    """Integrate dx/dt = v(t, x, y[, s]) from t = 0 (x = x0: noise, or a coupling's start) to
    t = 1 (data) with nfe Euler steps. nfe = 1 gives x0 + v(0, x0), the generator's start.

    A field defined only on [t0, t1] (a denoiser's, networks.DenoiserField) starts from the
    path's point x_t0 = (1 - t0) x0 and, after the nfe steps to t1, jumps to t = 1 with the
    field at t1 (x + (1 - t1) v = the denoiser's output there): nfe + 1 evaluations."""
    x, h = (x0 if t0 == 0 else (1 - t0) * x0), (t1 - t0) / nfe
    for i in range(nfe):
        t = torch.full((len(x0),), t0 + i * h, device=x0.device, dtype=x0.dtype)
        x = x + h * field(v, t, x, y, s).to(x.dtype)
    if t1 < 1:
        t = torch.full((len(x0),), t1, device=x0.device, dtype=x0.dtype)
        x = x + (1 - t1) * field(v, t, x, y, s).to(x.dtype)
    return x
