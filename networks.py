"""Networks from configs: the U-Net (unet.py) and EDM's denoisers (edm.py) as flow fields.

Every network of this repository, teacher or student, is a field v(t, x, y[, s]) (flow.py's
convention). A diffusion denoiser D(x; sigma, y) becomes one through DenoiserField. A network's
`config` (a JSON-able dict) rebuilds it: `build_network(config, state_dict)`; the generator and
the fake model take their teacher's config with their own dropout (`student_config`).
"""
import math

import torch
import torch.nn.functional as F

import diffusers_teacher
import edm2
import unet
from checkpoints import clean_state_dict
from common import fail
from gan_head import bottleneck_logits, discriminator_head
from net_pickles import NETWORKS as DENOISERS


GAN_HEAD = "cls_pred_branch."  # the optional GAN head: the only keys allowed to be absent or extra


def build_net(cfg, sd=None, gan_head=False, dropout=None, what="weights"):
    """UNet from a config, loaded strictly from `sd`; only the GAN head may be absent (it then
    keeps its fresh initialisation) or extra (the authors' files always carry it)."""
    cfg = dict(cfg, gan_head=gan_head)
    if dropout is not None:
        cfg["dropout"] = dropout
    try:
        net = unet.UNet(**cfg)
    except (TypeError, ValueError) as e:
        fail(f"cannot build the network from its config ({e})")
    if sd is None:
        return net
    expected = net.state_dict()
    sd = {k: v for k, v in clean_state_dict(sd).items() if gan_head or not k.startswith(GAN_HEAD)}
    missing = [k for k in expected if k not in sd and not k.startswith(GAN_HEAD)]
    unexpected = [k for k in sd if k not in expected]
    wrong = [k for k in sd if k in expected and sd[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}"
                  if unexpected else f"{wrong[0]} has shape {tuple(sd[wrong[0]].shape)}, "
                  f"expected {tuple(expected[wrong[0]].shape)}")
        fail(f"{what} do not fit the network {cfg} ({detail}); pass the network flags the "
             "checkpoint was trained with")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        fail(f"{what} contain NaN/inf values (e.g. {bad[0]}); use an earlier checkpoint")
    net.load_state_dict({**{k: v for k, v in expected.items() if k.startswith(GAN_HEAD)}, **sd},
                        strict=True)
    return net


def load_state(module, sd, what="checkpoint weights"):
    """Load a state dict into a built network (resume): strict, after prefix cleaning."""
    try:
        module.load_state_dict(clean_state_dict(sd), strict=True)
    except RuntimeError as e:
        fail(f"{what} do not fit the network ({str(e).splitlines()[1].strip()[:160]}); "
             "pass the network and GAN flags the checkpoint was made with")


SIGMA_RANGE = (0.002, 80.0)  # EDM's sampling range: where its denoisers are used


class DenoiserField(torch.nn.Module):
    """A denoiser D(x; sigma, y) as a flow field v(t, x, y) (EDM, Karras et al. 2022, eq. 7; RealUID paper section 2.1).

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

    A network trained with augmentation labels (EDM's CIFAR-10, FFHQ and AFHQ pickles:
    augment_dim 9) is given all-zero ones, "no augmentation", as SiD does: its map_augment
    layer (bias-free) then adds exactly zero to the embedding, so D is what EDM's forward
    without augment_labels gives, and its weight takes part in every forward pass and receives
    a (zero) gradient, as DistributedDataParallel needs of every parameter.
    """

    def __init__(self, denoiser, gan_head=False, latents=None):
        super().__init__()
        self.denoiser = denoiser
        self.latents = latents  # latents.latent_settings of a latent network (EDM2 img512)
        self.label_dim = int(getattr(denoiser, "label_dim", 0) or 0)
        augment = getattr(getattr(denoiser, "model", None), "map_augment", None)
        self.augment_dim = int(augment.in_features) if augment is not None else 0
        sigma_min = max(float(getattr(denoiser, "sigma_min", 0.0) or 0.0), SIGMA_RANGE[0])
        sigma_max = min(float(getattr(denoiser, "sigma_max", math.inf)), SIGMA_RANGE[1])
        self.t_min, self.t_max = 1 / (1 + sigma_max), 1 / (1 + sigma_min)
        self.config = edm_config(denoiser)
        if latents is not None:  # students and sample.py decode with it
            self.config["latents"] = latents
        if gan_head:  # the GAN baseline's discriminator on the bottleneck (eqs. 7-9, Appendix D)
            self.cls_pred_branch = discriminator_head(self._middle().out_channels)

    def set_fp16(self, on):
        """Whether the denoiser runs its network in float16 on CUDA: the `use_fp16` of its
        preconditioners, which a pickle sets (EDM's ImageNet network: True; edm.py's
        preconditioners then cast F's input to float16 on CUDA whatever the autocast policy).
        A training or sampling script passes on = (its --precision is fp16), so that such a
        network runs in float32 under fp32 / tf32, under bf16 autocast and as the mixed
        policy's float32 teacher and fake model (common.full_precision). Only the flag
        changes: weights stay float32, and `config` (what rebuilds the network) keeps the
        pickle's value, so a field built from a config needs this call again; deep copies
        made afterwards (EMAs, players.frozen_alias) inherit it. (EDM2's networks, edm2.py,
        hold the flag too, but run in float16 only when called with force_fp32=False, which
        this field never passes.) Returns the field."""
        for m in self.denoiser.modules():
            if hasattr(m, "use_fp16"):
                m.use_fp16 = bool(on)
        return self

    def _middle(self):
        """The last block of the architecture's middle (the bottleneck), EDM's `<res>_in1`."""
        return next(m for n, m in self.denoiser.model.dec.items() if n.endswith("_in1"))

    def forward_head(self, t, x, y=None, s=None):
        """GAN discriminator logits from the bottleneck after the middle blocks, as the U-Net's
        (unet.UNet.forward_head): the network runs up to there (a hook stops it)."""
        return bottleneck_logits(self, self._middle(), self.cls_pred_branch, t, x, y)

    def denoise(self, x, sigma, y=None):
        """D(x; sigma, y) with integer labels y (or None)."""
        labels = None if not self.label_dim or y is None else \
            F.one_hot(y.long(), self.label_dim).float()
        if not self.augment_dim:
            return self.denoiser(x, sigma, labels)
        no_augment = torch.zeros(x.shape[0], self.augment_dim, device=x.device)
        return self.denoiser(x, sigma, labels, augment_labels=no_augment)

    def forward(self, t, x, y=None):
        xf = x if x.dtype == torch.float64 else x.float()  # never below float32
        t_ = t.to(xf.dtype).view(-1, *[1] * (x.dim() - 1))
        D = self.denoise(xf / t_, ((1 - t_) / t_).flatten(), y)
        return ((D - xf) / (1 - t_)).to(x.dtype)


def edm_config(denoiser):
    """What rebuilds a denoiser of edm.py: its class name and constructor arguments (a
    student's config adds its dropout)."""
    return {"edm": type(denoiser).__name__,
            "args": list(getattr(denoiser, "init_args", ())),
            "kwargs": dict(getattr(denoiser, "init_kwargs", {}))}


def is_diffusion(net):
    """A denoiser as a field (EDM, EDM2, a diffusers UNet), not a flow-matching network."""
    return isinstance(net, DenoiserField) or diffusers_teacher.is_diffusers_field(net)


def build_edm(config, sd=None, what="weights", gan_head=False):
    """A DenoiserField from edm_config's dict (and strictly loaded weights; only a GAN head may
    be absent from them: it keeps its fresh initialisation)."""
    cls = DENOISERS.get(config.get("edm"))
    if cls is None:
        fail(f"unknown EDM / EDM2 network {config.get('edm')!r}; expected one of "
             f"{', '.join(DENOISERS)}")
    try:
        denoiser = cls(*config.get("args", ()), **config.get("kwargs", {}))
    except (TypeError, ValueError) as e:
        fail(f"cannot build the EDM network {config['edm']} from its config ({e})")
    denoiser.init_args, denoiser.init_kwargs = config.get("args", []), config.get("kwargs", {})
    field = DenoiserField(denoiser, gan_head, config.get("latents"))
    if sd is not None:
        head = {k: v for k, v in field.state_dict().items() if k.startswith(GAN_HEAD)}
        load_state(field, {**head, **clean_state_dict(sd)}, what)
    return field


def build_network(config, sd=None, gan_head=False, dropout=None, what="weights"):
    """Any network of this repository from the `net` config of one of our checkpoints: the
    U-Net (build_net), a diffusion teacher's DenoiserField or a diffusers UNet's field."""
    if "diffusers" in config:
        return diffusers_teacher.build_diffusers(config, sd, gan_head, dropout, what)
    if "edm" in config:
        field = build_edm(config, sd, what, gan_head)
        dropout = config.get("dropout") if dropout is None else dropout
        return field if dropout is None else set_dropout(field, dropout)
    return build_net(config, sd, gan_head=gan_head, dropout=dropout, what=what)


def set_dropout(net, p):
    """The dropout rate of every layer of an edm.py / edm2.py network (they keep it as
    `dropout`; EDM2's blocks default to the int 0)."""
    for m in net.modules():
        rate = getattr(m, "dropout", None)
        if isinstance(rate, (int, float)) and not isinstance(rate, bool):
            m.dropout = p
    return net


def forced_weight_norm(net):
    """EDM2's networks normalise their weights in training mode (forced weight normalisation,
    EDM2 paper Eq. 66) by rewriting them in place inside forward, which autograd refuses when a
    network runs twice before its backward pass (the GAN head's second pass). For a network to
    be trained: turn that off, normalise once now, and return the function that normalises again
    after each optimizer step (players.Player's after_step); None for networks without such
    layers. The numbers are EDM2's: its first training pass normalises the stored weight, then
    uses its normalisation."""
    layers = [m for m in net.modules() if isinstance(m, edm2.MPConv)]
    if not layers:
        return None
    for m in layers:
        m.force_normalization = False
    edm2.normalize_weights_(net)
    return lambda: edm2.normalize_weights_(net)


def freeze_unused(net):
    """For a network to be trained: its parameters that the field never uses, frozen
    (requires_grad False). EDM2's uncertainty head (Precond.logvar_linear, the u(sigma) of
    EDM2's loss, Eq. 21) is used only with return_logvar, never for D. DistributedDataParallel
    expects a gradient for every parameter that requires one: with that head trainable its
    first update leaves a gradient bucket un-averaged and its second stops ("Expected to have
    finished reduction"). One process is unchanged (the head never had a gradient). Returns
    the network."""
    head = getattr(getattr(net, "denoiser", None), "logvar_linear", None)
    if isinstance(head, torch.nn.Module):
        head.requires_grad_(False)
    return net


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
    if diffusers_teacher.is_diffusers_field(net):
        return tuple(net.image_shape)
    if is_diffusion(net):
        d = net.denoiser
        return (d.img_channels, d.img_resolution, d.img_resolution)
    c = net.config
    return (c["in_channels"], c["image_size"], c["image_size"])


def latent_settings(net):
    """What turns a latent network's outputs into images (latents.latent_settings: the VAE's
    name, scale and bias), None for a network on pixels."""
    return getattr(net, "latents", None) if isinstance(net, DenoiserField) else None


def data_config(net):
    """What image_data.check_data compares with the data: channels, size, classes."""
    c, h, _ = image_shape(net)
    return {"in_channels": c, "image_size": h, "num_classes": num_classes(net)}


def same_net(a, b):
    """Two network configs describe the same network (configs written before a key existed,
    e.g. cond_channels, hold its default)."""
    return a is not None and dict(unet.PAPER_CONFIG, **a) == dict(unet.PAPER_CONFIG, **b)


def net_config_from(ckpt, sd, fallback):
    """The network config stored in our files; for the authors' files (no config) the paper
    network described by `fallback`, with class conditioning read from the label embedding."""
    if "config" in ckpt:
        return dict(ckpt["config"]["net"])
    cfg = dict(fallback)
    cfg["num_classes"] = sd["label_emb.weight"].shape[0] if "label_emb.weight" in sd else None
    return cfg
