"""One way to load a teacher: `load_teacher(path)` is the flow field v*(t, x, y) of any matching
model this repository reads, in its own convention (t = 0 noise, t = 1 data,
x_t = t x1 + (1 - t) x0, x0 ~ N(0, I)):

- our train_teacher.py checkpoints and the authors' teacher files (flow matching: the U-Net
  is the field itself);
- EDM's network pickles (`edm-cifar10-32x32-{uncond,cond}-vp.pkl`, `edm-{ffhq,afhqv2}-64x64-
  uncond-vp.pkl`, `edm-imagenet-64x64-cond-adm.pkl`, the `baseline-*` VP / VE pickles and
  `network-snapshot-*.pkl` of EDM's training loop), read by edm.py without EDM's code and
  without executing anything from the file, and diffusion teachers trained here
  (train_teacher.py --param edm): denoisers D(x; sigma, y), turned into flow fields by
  DenoiserField below.

EDM's weights are CC BY-NC-SA 4.0 (NVlabs/edm): models distilled from them inherit that license.
"""
import math

import torch
import torch.nn.functional as F

import common
import edm
import net_pickles
import unet

EDM_SUFFIXES = (".pkl",)
SIGMA_RANGE = (0.002, 80.0)  # EDM's sampling range: where its denoisers are used


class DenoiserField(torch.nn.Module):
    """A denoiser D(x; sigma, y) as a flow field v(t, x, y) (SPEC section 9).

    A denoiser estimates E[x1 | x1 + sigma n = x] with n ~ N(0, I). Our path is
    x_t = t x1 + (1 - t) x0 with x0 ~ N(0, I), so

        x_t / t = x1 + sigma x0,    sigma = (1 - t) / t    (t = 1 / (1 + sigma)),

    and D(x_t / t; sigma) = E[x1 | x_t]. The conditional velocity is u = x1 - x0, and
    x0 = (x_t - t x1) / (1 - t) gives u = (x1 - x_t) / (1 - t); its conditional mean is the
    flow field:

        v*(t, x_t) = E[u | x_t] = (D(x_t / t; (1 - t) / t) - x_t) / (1 - t),

    and conversely D = x_t + (1 - t) v. Class labels y (integers) become EDM's one-hot vectors.
    The field is used only where the denoiser is: sigma in [sigma_min, sigma_max], the
    network's own range clipped to EDM's sampling range [0.002, 80], i.e. t in
    [t_min, t_max] = [1 / (1 + sigma_max), 1 / (1 + sigma_min)] = [0.0123, 0.998] for EDM's
    networks; distill.py draws t inside that range for such a teacher (--fake-t / --gen-t
    uniform), and flow.euler samples it there.

    The conversion runs in float32 at least (it divides by t and by 1 - t; EDM's networks
    compute in float32 anyway); the field returns the input's dtype.
    """

    def __init__(self, denoiser, gan_head=False):
        super().__init__()
        self.denoiser = denoiser
        self.label_dim = int(getattr(denoiser, "label_dim", 0) or 0)
        sigma_min = max(float(getattr(denoiser, "sigma_min", 0.0) or 0.0), SIGMA_RANGE[0])
        sigma_max = min(float(getattr(denoiser, "sigma_max", math.inf)), SIGMA_RANGE[1])
        self.t_min, self.t_max = 1 / (1 + sigma_max), 1 / (1 + sigma_min)
        self.config = edm_config(denoiser)
        if gan_head:  # the GAN baseline's discriminator on the bottleneck (SPEC section 5)
            c = self._middle().out_channels
            g = math.gcd(32, max(c // 4, 1))  # GroupNorm(32), >= 4 channels a group
            self.cls_pred_branch = torch.nn.Sequential(
                torch.nn.Conv2d(c, c, 2, stride=2), torch.nn.GroupNorm(g, c), torch.nn.SiLU(),
                torch.nn.Conv2d(c, c, 2, stride=2), torch.nn.GroupNorm(g, c), torch.nn.SiLU(),
                torch.nn.Conv2d(c, 1, 1))

    def _middle(self):
        """The last block of the architecture's middle (the bottleneck), EDM's `<res>_in1`."""
        return next(m for n, m in self.denoiser.model.dec.items() if n.endswith("_in1"))

    def forward_head(self, t, x, y=None, s=None):
        """GAN discriminator logits from the bottleneck after the middle blocks, as the U-Net's
        (unet.UNet.forward_head): the network runs up to there (a hook stops it)."""
        def stop(module, inputs, output):
            raise _Bottleneck(output)
        handle = self._middle().register_forward_hook(stop)
        try:
            self(t, x, y)
        except _Bottleneck as b:
            return self.cls_pred_branch(b.args[0].float())
        finally:
            handle.remove()
        raise RuntimeError("the network never reached its middle block")

    def denoise(self, x, sigma, y=None):
        """D(x; sigma, y) with integer labels y (or None)."""
        labels = None if not self.label_dim or y is None else \
            F.one_hot(y.long(), self.label_dim).float()
        return self.denoiser(x, sigma, labels)

    def forward(self, t, x, y=None):
        xf = x if x.dtype == torch.float64 else x.float()  # never below float32
        t_ = t.to(xf.dtype).view(-1, *[1] * (x.dim() - 1))
        D = self.denoise(xf / t_, ((1 - t_) / t_).flatten(), y)
        return ((D - xf) / (1 - t_)).to(x.dtype)


class _Bottleneck(Exception):
    """Carries the bottleneck features out of a forward pass (DenoiserField.forward_head)."""


def edm_config(denoiser):
    """What rebuilds a denoiser of edm.py: its class name and constructor arguments (a
    student's config adds its dropout)."""
    return {"edm": type(denoiser).__name__,
            "args": list(getattr(denoiser, "init_args", ())),
            "kwargs": dict(getattr(denoiser, "init_kwargs", {}))}


def is_diffusion(net):
    return isinstance(net, DenoiserField)


def build_edm(config, sd=None, what="weights", gan_head=False):
    """A DenoiserField from edm_config's dict (and strictly loaded weights; only a GAN head may
    be absent from them: it keeps its fresh initialisation)."""
    cls = edm.NETWORKS.get(config.get("edm"))
    if cls is None:
        common.fail(f"unknown EDM network {config.get('edm')!r}; expected one of "
                    f"{', '.join(edm.NETWORKS)}")
    try:
        denoiser = cls(*config.get("args", ()), **config.get("kwargs", {}))
    except (TypeError, ValueError) as e:
        common.fail(f"cannot build the EDM network {config['edm']} from its config ({e})")
    denoiser.init_args, denoiser.init_kwargs = config.get("args", []), config.get("kwargs", {})
    field = DenoiserField(denoiser, gan_head)
    if sd is not None:
        head = {k: v for k, v in field.state_dict().items() if k.startswith(common.HEAD)}
        common.load_state(field, {**head, **common.clean_state_dict(sd)}, what)
    return field


def build(config, sd=None, gan_head=False, dropout=None, what="weights"):
    """Any network of this repository from the `net` config of one of our checkpoints: the
    U-Net (common.build_net) or a diffusion teacher's DenoiserField."""
    if "edm" in config:
        field = build_edm(config, sd, what, gan_head)
        dropout = config.get("dropout") if dropout is None else dropout
        return field if dropout is None else set_dropout(field, dropout)
    return common.build_net(config, sd, gan_head=gan_head, dropout=dropout, what=what)


def set_dropout(net, p):
    """The dropout rate of every layer of an edm.py network (they keep it as `dropout`)."""
    for m in net.modules():
        if isinstance(getattr(m, "dropout", None), float):
            m.dropout = p
    return net


def load_teacher(path, ema=None, device="cpu", fallback=None):
    """The teacher in `path` as a flow field module: forward(t, x, y=None) = v*(t, x, y) (an
    image-to-image teacher also takes its source s), in eval mode, without gradients, on
    `device`.

    ema: None for the file's default weights (the first EMA of our and the authors' files,
    0.999 for theirs), a decay for that EMA, or "raw" for the raw weights; an EDM pickle holds
    one network, its EMA under the key `ema`, whatever `ema` says. fallback: the U-Net config
    of an authors' file (no config inside; default: the paper network at 32x32). The module
    carries `config` (to rebuild it), `coupling` (image-to-image teachers) and, for denoisers,
    `t_min`, `t_max`.
    """
    path = str(path)
    if path.endswith(EDM_SUFFIXES):  # EDM keeps one network, its EMA, under `ema`: `ema` n/a
        net = DenoiserField(net_pickles.load_edm_network(path))
        net.coupling = None
        return net.to(device).eval().requires_grad_(False)
    ckpt = common.load_checkpoint(path, "teacher checkpoint")  # a run folder: its latest.pt
    return teacher_from_checkpoint(ckpt, path, ema, fallback).to(device)


def teacher_from_checkpoint(ckpt, path, ema=None, fallback=None):
    """load_teacher for a checkpoint already read (ours or the authors'), on the CPU."""
    common.require_kind(ckpt, "teacher", path)
    if ema is None:
        ema = common.first_ema(ckpt)
    sd = common.pick_weights(ckpt, None if ema == "raw" else ema, path)
    cfg = common.net_config_from(ckpt, sd, fallback or unet.PAPER_CONFIG)
    net = build(cfg, sd, dropout=0.0, what=f"teacher weights in {path}")
    net.coupling = ckpt.get("config", {}).get("coupling")
    return net.eval().requires_grad_(False)


def t_range(net):
    """Where a network's field is used: [t_min, t_max] of a denoiser, [0, 1] for flow matching."""
    return getattr(net, "t_min", 0.0), getattr(net, "t_max", 1.0)


def student_config(teacher, dropout):
    """The network config of a generator and fake model for `teacher`: its architecture with
    the students' dropout (the U-Net's config keeps no GAN head: the fake model adds it)."""
    if is_diffusion(teacher):
        return dict(teacher.config, dropout=dropout)
    return dict({k: v for k, v in teacher.config.items() if k != "gan_head"}, dropout=dropout)


def num_classes(net):
    """The number of classes of a class-conditional network, None if unconditional."""
    if is_diffusion(net):
        return net.label_dim or None
    return net.config["num_classes"]


def image_shape(net):
    """(C, H, W) of the images a network works on."""
    if is_diffusion(net):
        d = net.denoiser
        return (d.img_channels, d.img_resolution, d.img_resolution)
    c = net.config
    return (c["in_channels"], c["image_size"], c["image_size"])


def data_config(net):
    """What common.check_data compares with the data: channels, size, classes."""
    c, h, _ = image_shape(net)
    return {"in_channels": c, "image_size": h, "num_classes": num_classes(net)}


@torch.no_grad()
def edm_heun(net, z, y=None, steps=18, rho=7.0, sigma_min=0.002, sigma_max=80.0):
    """EDM's deterministic sampler (Karras et al. 2022, Algorithm 1) for a DenoiserField: Heun's
    method on dx/dsigma = (x - D(x; sigma)) / sigma over the noise levels
    sigma_i = (sigma_max^(1/rho) + i / (steps - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
    i < steps, then sigma_steps = 0, from x = sigma_0 z; 2 steps - 1 evaluations (EDM's
    CIFAR-10 setting: 18 steps, 35 evaluations). The range is clipped to the denoiser's own."""
    d = net.denoiser
    sigma_min = max(sigma_min, float(getattr(d, "sigma_min", 0.0)))
    sigma_max = min(sigma_max, float(getattr(d, "sigma_max", math.inf)))
    i = torch.arange(steps, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + i / max(steps - 1, 1) *
              (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)]).tolist()

    def slope(x, sigma):
        s = torch.full((len(x),), sigma, device=x.device)
        return (x - net.denoise(x, s, y)) / sigma

    x = z.double() * sigmas[0]
    for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
        d_cur = slope(x.float(), s_cur).double()
        x_next = x + (s_next - s_cur) * d_cur
        if s_next > 0:
            d_next = slope(x_next.float(), s_next).double()
            x_next = x + (s_next - s_cur) * (d_cur + d_next) / 2
        x = x_next
    return x.float()
