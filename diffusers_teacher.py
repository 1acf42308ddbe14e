"""Diffusers teachers: a pixel-space DDPM / DDIM model of Hugging Face diffusers (a
`UNet2DModel` with the `DDPMScheduler` / `DDIMScheduler` configuration it was trained with) as
a flow field v*(t, x, y) in this repository's convention (t = 0 noise, t = 1 data,
x_t = t x1 + (1 - t) x0, x0 ~ N(0, I)), to distill with RealUID (Kornilov et al., "Universal
Inverse Distillation for Matching Models with Real-Data Supervision (No GANs)", ICLR 2026,
arXiv:2509.22459).

diffusers and safetensors are optional: they are imported only by the functions that read,
build or write a diffusers network. The schedule and the change of variables below are pure
torch and need neither.

The change of variables, by matching signal-to-noise ratios
-----------------------------------------------------------
DDPM (Ho et al. 2020, "Denoising Diffusion Probabilistic Models") noises data x1 (diffusers
calls it x_0; its timestep k = 0 is the *cleanest* level) as

    x_k = sqrt(abar_k) x1 + sqrt(1 - abar_k) eps,    eps ~ N(0, I),   k = 0 .. T - 1,

with abar_k = prod_{i <= k} (1 - beta_i) decreasing in k. Our path x_t = t x1 + (1 - t) x0 has
signal t and noise 1 - t; divided by s = sqrt(t^2 + (1 - t)^2) the two coefficients have unit
sum of squares:

    x_t / s = (t / s) x1 + ((1 - t) / s) x0,

which is a DDPM sample with eps = x0 and abar(t) = t^2 / s^2 = t^2 / (t^2 + (1 - t)^2), i.e.
log-SNR lambda(t) = log(abar / (1 - abar)) = 2 log(t / (1 - t)). Conversely
t(abar) = sqrt(abar) / (sqrt(abar) + sqrt(1 - abar)). The UNet is therefore evaluated at
x_t / s and at the DDPM timestep k with abar_k = abar(t). Between the integer timesteps the
network was trained on, k is *fractional*: we invert k -> abar_k by linear interpolation of k
against the log-SNR lambda_k (strictly decreasing in k, so the inverse is monotone and hits
the integers exactly at the schedule's own levels); the sinusoidal timestep embedding of
UNet2DModel takes fractional k as is.

With a = t / s, b = (1 - t) / s (a^2 + b^2 = 1) and the network's estimates x1^ = E[x1 | x_t],
eps^ = E[x0 | x_t] (consistent: x_t / s = a x1^ + b eps^), the flow field is
v = E[x1 - x0 | x_t] = x1^ - eps^ (x_t = t x1^ + (1 - t) eps^), which gives for each
prediction type of diffusers:

- epsilon (Ho et al. 2020): eps^ is the output; x1^ = (x_t - (1 - t) eps^) / t, so
  v = (x_t - eps^) / t;
- v_prediction (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion
  Models"; target v = a eps - b x1): x1^ = a x_t / s - b v^ and eps^ = b x_t / s + a v^, so
  v = (a - b) x_t / s - (a + b) v^ = ((2t - 1) / s^2) x_t - v^ / s;
- sample: x1^ is the output; eps^ = (x_t - t x1^) / (1 - t), so v = (x1^ - x_t) / (1 - t).

Gaussian data x1 ~ N(mu, I) makes these checkable in closed form (tests/test_diffusers_teacher.py):
the exact DDPM predictors give exactly v(t, x) = mu + ((2t - 1) / s^2) (x - t mu).

Sampling. DDIM with eta = 0 (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models")
is Euler's method on y = x_k / sqrt(abar_k) in sigma = sqrt((1 - abar) / abar); in our units
y = x_t / t and sigma = (1 - t) / t, and one Euler step in t of dx/dt = v(t, x) from t to t',
x' = x + (t' - t)(x1^ - eps^) = t' x1^ + (1 - t') eps^, is exactly DDIM's step
x'_k' = sqrt(abar') x1^ + sqrt(1 - abar') eps^ (times s'). So integrating our field on the
t-grid of DDIM's timesteps reproduces DDIM bit for bit up to rounding, and flow.euler with
uniform steps converges to the same ODE solution.

Where the field is used: the schedule's range of t, [t_min, t_max] = [t(abar_{T-1}),
t(abar_0)]: [0.00631, 0.99010] for the linear schedule 1e-4 .. 0.02 over 1000 steps,
[0.000049, 0.99362] for squaredcos_cap_v2 (Nichol & Dhariwal 2021, "Improved Denoising
Diffusion Probabilistic Models"), [0.06404, 0.97166] for scaled_linear 0.00085 .. 0.012.
Outside it the network is evaluated at the nearest end timestep (it was never trained beyond).
DDIM's clip_sample / thresholding are sampler heuristics, not part of the field.
"""
import json
import math
import os
import shutil
import tempfile

import torch

import common
from gan_head import bottleneck_logits, discriminator_head

SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# diffusers' defaults for the keys that define the training schedule (DDPM and DDIM agree)
SCHEDULER_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                      "beta_schedule": "linear", "prediction_type": "epsilon"}
COSINE_MAX_BETA = 0.999  # diffusers' cap on the betas of squaredcos_cap_v2 (Nichol & Dhariwal)
UNET_CLASS = "UNet2DModel"
WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_FP16 = "diffusion_pytorch_model.fp16.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
WEIGHTS_BIN = "diffusion_pytorch_model.bin"
GAN_HEAD = "cls_pred_branch."  # the GAN head's parameter prefix, as for the repository's U-Net


def require_diffusers(what="reading a diffusers teacher"):
    """diffusers and safetensors, or the project's one-line error naming the install."""
    try:
        import diffusers  # noqa: F401
        import safetensors.torch  # noqa: F401
    except ImportError:
        common.fail(f"{what} needs: pip install diffusers safetensors")
    return diffusers


# ---------------------------------------------------------------------------------------------
# The training schedule (pure torch, float64)

def scheduler_settings(config):
    """A DDPMScheduler / DDIMScheduler config checked and completed with diffusers' defaults for
    the keys that define the training schedule; refuses what this module cannot reproduce."""
    if not isinstance(config, dict):
        common.fail(f"a scheduler config must be a JSON object, got {type(config).__name__}")
    name = config.get("_class_name")
    if name is not None and name not in SCHEDULERS:
        common.fail(f"scheduler {name} is not supported; give the {' or '.join(SCHEDULERS)} "
                    "config the UNet was trained with (scheduler_config.json)")
    # a key left out, or null, takes diffusers' default
    c = dict(SCHEDULER_DEFAULTS)
    c.update({k: v for k, v in config.items() if k != "_use_default_values" and
              not (v is None and k in SCHEDULER_DEFAULTS)})
    if c.get("trained_betas") is not None:
        common.fail("a scheduler with trained_betas is not supported; only the beta_schedule "
                    f"formulas {', '.join(BETA_SCHEDULES)}")
    if c.get("rescale_betas_zero_snr"):
        common.fail("rescale_betas_zero_snr is not supported: its last level is pure noise "
                    "(t = 0), where the field of an epsilon model is undefined")
    if c["beta_schedule"] not in BETA_SCHEDULES:
        common.fail(f"beta_schedule {c['beta_schedule']!r} is not supported; expected one of "
                    f"{', '.join(BETA_SCHEDULES)}")
    if c["prediction_type"] not in PREDICTION_TYPES:
        common.fail(f"prediction_type {c['prediction_type']!r} is not supported; expected one "
                    f"of {', '.join(PREDICTION_TYPES)}")
    T = c["num_train_timesteps"]
    if not isinstance(T, int) or isinstance(T, bool) or T < 2:
        common.fail(f"num_train_timesteps must be an integer >= 2, got {T!r}")
    if c["beta_schedule"] != "squaredcos_cap_v2":
        b0, b1 = c["beta_start"], c["beta_end"]
        if not all(isinstance(b, (int, float)) and 0 < b < 1 for b in (b0, b1)):
            common.fail(f"beta_start and beta_end must lie in (0, 1), got {b0!r}, {b1!r}")
    return json.loads(json.dumps(c))  # JSON-able: a network's config keeps it


def schedule_alphas_cumprod(config):
    """abar_k = prod_{i <= k} (1 - beta_i), k = 0 .. T - 1, float64, by diffusers' formulas:
    linear: beta uniform from beta_start to beta_end (Ho et al. 2020); scaled_linear: sqrt(beta)
    uniform (latent diffusion's); squaredcos_cap_v2: beta_k = min(1 - f((k + 1) / T) / f(k / T),
    0.999) with f(u) = cos((u + 0.008) / 1.008 * pi / 2)^2 (Nichol & Dhariwal 2021)."""
    c = scheduler_settings(config)
    T, kind = c["num_train_timesteps"], c["beta_schedule"]
    if kind == "linear":
        betas = torch.linspace(c["beta_start"], c["beta_end"], T, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, T,
                               dtype=torch.float64) ** 2
    else:
        u = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=COSINE_MAX_BETA)
    return torch.cumprod(1 - betas, 0)


def alpha_bar_of_t(t):
    """abar(t) = t^2 / (t^2 + (1 - t)^2): the DDPM level of x_t / s."""
    return t ** 2 / (t ** 2 + (1 - t) ** 2)


def t_of_alpha_bar(alpha_bar):
    """The inverse of alpha_bar_of_t: t = sqrt(abar) / (sqrt(abar) + sqrt(1 - abar))."""
    a, b = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    return a / (a + b)


def schedule_t_range(config):
    """[t_min, t_max] = [t(abar_{T-1}), t(abar_0)]: where the field of a network trained on this
    schedule is used."""
    abar = schedule_alphas_cumprod(config)
    return float(t_of_alpha_bar(abar[-1])), float(t_of_alpha_bar(abar[0]))


def log_snr(alpha_bar):
    """lambda = log(abar / (1 - abar)); strictly decreasing along a schedule (all betas > 0)."""
    return torch.log(alpha_bar) - torch.log1p(-alpha_bar)


def log_snr_of_t(t):
    """lambda(t) = log(abar(t) / (1 - abar(t))) = 2 log(t / (1 - t))."""
    return 2 * (torch.log(t) - torch.log1p(-t))


def timestep_of_t(t, table):
    """The fractional DDPM timestep k(t) in [0, T - 1] with log-SNR lambda(t), k linear in the
    log-SNR between the integer timesteps; `table` is the schedule's lambda_k [T] (log_snr of
    schedule_alphas_cumprod). Clamped at the ends (t outside [t_min, t_max])."""
    lam = log_snr_of_t(t)
    asc = table.to(lam).flip(0)  # increasing in the flipped index j = T - 1 - k
    j = torch.searchsorted(asc, lam).clamp(1, len(asc) - 1)
    lo, hi = asc[j - 1], asc[j]
    frac = ((lam - lo) / (hi - lo)).clamp(0, 1)
    return (len(asc) - 1) - (j - 1 + frac)


def alpha_bar_of_timestep(k, table):
    """abar at a fractional timestep k: the inverse of timestep_of_t (log-SNR linear in k)."""
    table = table.to(k.dtype if k.is_floating_point() else torch.float64)
    k = k.to(table.dtype).clamp(0, len(table) - 1)
    lo = k.floor().long().clamp(max=len(table) - 2)
    lam = table[lo] + (k - lo) * (table[lo + 1] - table[lo])
    return torch.sigmoid(lam)


def network_input(t, x, table):
    """What the DDPM network sees for x_t: (x_t / s, k(t)) with s = sqrt(t^2 + (1 - t)^2)."""
    t_ = t.view(-1, *[1] * (x.dim() - 1))
    return x / (t_ ** 2 + (1 - t_) ** 2).sqrt(), timestep_of_t(t, table)


def field_from_prediction(pred, t, x, prediction_type):
    """The flow field v(t, x_t) from the network's output at (x_t / s, k(t)) (module docstring):
    epsilon (x_t - eps^) / t; v_prediction ((2t - 1) / s^2) x_t - v^ / s; sample
    (x1^ - x_t) / (1 - t)."""
    t = t.view(-1, *[1] * (x.dim() - 1))
    if prediction_type == "epsilon":
        return (x - pred) / t
    if prediction_type == "v_prediction":
        s2 = t ** 2 + (1 - t) ** 2
        return (2 * t - 1) / s2 * x - pred / s2.sqrt()
    if prediction_type == "sample":
        return (pred - x) / (1 - t)
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def flow_field(predict, t, x, table, prediction_type):
    """v(t, x) of a DDPM predictor predict(x_k, k) (any callable: a UNet, a closed form)."""
    x_k, k = network_input(t, x, table)
    return field_from_prediction(predict(x_k, k), t, x, prediction_type)


def one_step_recipe(config, t_g):
    """How a distilled generator at start time t_g (flow.generate: x = x_tg + (1 - t_g) G(t_g,
    x_tg) with x_tg = (1 - t_g) z) reads in diffusers' terms: x is the data estimate x1^ of
    the UNet evaluated once at (input_scale * z, timestep) (DDIM's pred_original_sample), since
    x_t + (1 - t) v = x1^."""
    t = torch.tensor([float(t_g)], dtype=torch.float64)
    table = log_snr(schedule_alphas_cumprod(config))
    return {"timestep": float(timestep_of_t(t, table)), "t_g": float(t_g),
            "input_scale": float((1 - t) / (t ** 2 + (1 - t) ** 2).sqrt()),
            "output": "pred_original_sample (the data estimate of the prediction)"}


# ---------------------------------------------------------------------------------------------
# The network as a flow field

class DiffusersField(torch.nn.Module):
    """A diffusers UNet2DModel with its training schedule as the flow field v*(t, x, y) (module
    docstring for the change of variables). Attributes as networks.DenoiserField: label_dim
    (num_class_embeds or 0; labels go to the UNet's class_labels), t_min / t_max (the
    schedule's range), config ({"diffusers": the UNet's config, "scheduler": the schedule's},
    JSON-able; build_diffusers rebuilds it), image_shape (in_channels, H, W), in_channels,
    sample_size, prediction_type; sigma_min / sigma_max and denoise(x, sigma, y) give EDM's
    denoiser interface. The field runs in float32 at least (it divides by t and
    1 - t) and returns the input's dtype."""

    def __init__(self, unet, scheduler_config, gan_head=False):
        super().__init__()
        self.unet = unet
        ucfg = unet_config(unet)
        _check_unet(ucfg)
        settings = scheduler_settings(scheduler_config)
        self.prediction_type = settings["prediction_type"]
        abar = schedule_alphas_cumprod(settings)
        self._log_snr = log_snr(abar)  # float64 on the CPU: not a buffer, so .float() keeps it
        self._tables = {}
        self.t_min, self.t_max = float(t_of_alpha_bar(abar[-1])), float(t_of_alpha_bar(abar[0]))
        # the same range as EDM's noise levels sigma = (1 - t) / t (denoise, edm_heun)
        self.sigma_min = (1 - self.t_max) / self.t_max
        self.sigma_max = (1 - self.t_min) / self.t_min
        self.label_dim = int(ucfg.get("num_class_embeds") or 0)
        self.in_channels, self.sample_size = ucfg["in_channels"], ucfg["sample_size"]
        h, w = (self.sample_size,) * 2 if isinstance(self.sample_size, int) else self.sample_size
        self.image_shape = (self.in_channels, h, w)
        self.config = {"diffusers": ucfg, "scheduler": settings}
        if gan_head:  # the GAN baseline's discriminator on the bottleneck, as DenoiserField's
            if unet.mid_block is None:
                common.fail("this UNet2DModel has no middle block (mid_block_type null), where "
                            "the GAN head reads the bottleneck; distill it without the GAN terms")
            self.cls_pred_branch = discriminator_head(ucfg["block_out_channels"][-1])

    def _table(self, like):
        """The log-SNR table on `like`'s device and dtype (cached: no copy per call)."""
        key = (like.device, like.dtype)
        if key not in self._tables:
            self._tables[key] = self._log_snr.to(like.device, like.dtype)
        return self._tables[key]

    def predict(self, x_k, k, y=None):
        """The UNet's output in diffusers' units at DDPM timesteps k [B] (fractional allowed)."""
        labels = None
        if self.label_dim:
            if y is None:
                common.fail("this diffusers UNet is class-conditional: pass class labels y")
            labels = y.long()
        # k stays float32 / float64: the sinusoidal embedding computes in float32 anyway
        dtype = next(self.unet.parameters()).dtype
        return self.unet(x_k.to(dtype), k, class_labels=labels).sample

    def forward(self, t, x, y=None):
        xf = x if x.dtype == torch.float64 else x.float()  # never below float32
        v = flow_field(lambda x_k, k: self.predict(x_k, k, y).to(xf.dtype), t.to(xf.dtype), xf,
                       self._table(xf), self.prediction_type)
        return v.to(x.dtype)

    def denoise(self, x, sigma, y=None):
        """EDM's denoiser D(x; sigma) = E[x1 | x1 + sigma n = x] (networks.DenoiserField's
        interface, for EDM's sampler): with t = 1 / (1 + sigma), x_t = t x is our path's point
        and D = x_t + (1 - t) v(t, x_t)."""
        xf = x if x.dtype == torch.float64 else x.float()
        sigma = torch.as_tensor(sigma, dtype=xf.dtype, device=x.device).reshape(-1)
        t = (1 / (1 + sigma)).expand(len(x))
        t_ = t.view(-1, *[1] * (x.dim() - 1))
        x_t = t_ * xf
        return (x_t + (1 - t_) * self(t, x_t, y).to(xf.dtype)).to(x.dtype)

    def forward_head(self, t, x, y=None, s=None):
        """GAN discriminator logits from the bottleneck (the UNet's mid_block output), as the
        repository's U-Net: the network runs up to there (a hook stops it)."""
        return bottleneck_logits(self, self.unet.mid_block, self.cls_pred_branch, t, x, y)


def unet_config(unet):
    """A UNet2DModel's full config (diffusers' defaults filled in) as a JSON-able dict."""
    return json.loads(json.dumps({k: v for k, v in dict(unet.config).items()
                                  if not k.startswith("_")}))


def _check_unet(c):
    """Refuse the UNet2DModel settings the change of variables cannot serve, with one line."""
    if c.get("time_embedding_type", "positional") != "positional":
        common.fail(f"time_embedding_type {c['time_embedding_type']!r} is not supported: only "
                    "'positional' (sinusoidal) embeddings take the fractional DDPM timesteps "
                    "the field needs")
    if c.get("class_embed_type") is not None:
        common.fail(f"class_embed_type {c['class_embed_type']!r} is not supported; only class "
                    "ids through num_class_embeds")
    if c.get("out_channels") != c.get("in_channels"):
        common.fail(f"the UNet has {c.get('out_channels')} output channels for "
                    f"{c.get('in_channels')} input channels (a learned variance?); only "
                    "networks whose output is one prediction are supported")
    if c.get("sample_size") is None:
        common.fail("the UNet config has no sample_size; add the image size to its config.json")


def is_diffusers_field(net):
    return isinstance(net, DiffusersField)


def build_diffusers(config, state_dict=None, gan_head=False, dropout=None, what="weights"):
    """A DiffusersField from its `config` ({"diffusers": UNet config, "scheduler": schedule
    config, optionally "dropout"}): the same architecture with fresh weights, or `state_dict`
    loaded strictly (a DiffusersField's state dict, keys `unet.*`, or the UNet's own); only a
    GAN head may be absent from it (it keeps its fresh initialisation). dropout overrides the
    UNet's (a student's)."""
    require_diffusers("building a diffusers network")
    from diffusers import UNet2DModel
    if not isinstance(config, dict) or not isinstance(config.get("diffusers"), dict) or \
            not isinstance(config.get("scheduler"), dict):
        common.fail("a diffusers network config needs the dicts `diffusers` (the UNet's "
                    "config) and `scheduler` (its schedule's)")
    name = config["diffusers"].get("_class_name", UNET_CLASS)
    if name != UNET_CLASS:
        common.fail(f"only {UNET_CLASS} is supported, not {name}")
    ucfg = {k: v for k, v in config["diffusers"].items() if not k.startswith("_")}
    dropout = config.get("dropout") if dropout is None else dropout
    if dropout is not None:
        ucfg["dropout"] = float(dropout)
    try:
        unet = UNet2DModel.from_config(ucfg)
    except (TypeError, ValueError, KeyError, AttributeError, AssertionError) as e:
        common.fail(f"cannot build the UNet2DModel from its config ({str(e).splitlines()[0]})")
    field = DiffusersField(unet, config["scheduler"], gan_head)
    if state_dict is not None:
        sd = dict(state_dict)
        for prefix in ("module.", "_orig_mod."):  # DataParallel / torch.compile
            sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
        if not any(k.startswith("unet.") for k in sd):  # the UNet's own keys (a .safetensors)
            sd = {f"unet.{k}": v for k, v in rename_deprecated_attention(unet, sd).items()}
        head = {k: v for k, v in field.state_dict().items() if k.startswith(GAN_HEAD)}
        sd = {**head, **{k: v for k, v in sd.items() if gan_head or not k.startswith(GAN_HEAD)}}
        bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            common.fail(f"{what} contain NaN/inf values (e.g. {bad[0]}); use another copy")
        try:  # fp16 / bf16 weights are copied into the float32 parameters
            field.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            lines = str(e).splitlines()
            common.fail(f"{what} do not fit the UNet of its config "
                        f"({(lines[1] if len(lines) > 1 else lines[0]).strip()[:160]})")
    return field


def rename_deprecated_attention(unet, sd):
    """Attention weights of diffusers' early checkpoints (query / key / value / proj_attn, e.g.
    the 2022 DDPM pipelines) under today's names (to_q / to_k / to_v / to_out.0), as diffusers
    does on load; only in the attention blocks that descend from the old ones."""
    sd = dict(sd)
    renames = (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0"))
    for name, module in unet.named_modules():
        if getattr(module, "_from_deprecated_attn_block", False):
            for old, new in renames:
                for p in ("weight", "bias"):
                    if f"{name}.{old}.{p}" in sd and f"{name}.{new}.{p}" not in sd:
                        sd[f"{name}.{new}.{p}"] = sd.pop(f"{name}.{old}.{p}")
    return sd


# ---------------------------------------------------------------------------------------------
# Folders: reading (never unpickling, never downloading) and writing

def is_diffusers_folder(path):
    """A local folder in diffusers' pipeline layout (model_index.json, unet/) or a flat UNet
    folder (config.json beside diffusion_pytorch_model.* weights); needs no diffusers."""
    p = str(path)
    if not os.path.isdir(p):
        return False
    if os.path.isfile(os.path.join(p, "model_index.json")) or \
            os.path.isfile(os.path.join(p, "unet", "config.json")):
        return True
    return os.path.isfile(os.path.join(p, "config.json")) and \
        any(f.startswith("diffusion_pytorch_model.") for f in os.listdir(p))


def read_json(path, what):
    if not os.path.isfile(path):
        common.fail(f"{what} not found: {path}; a diffusers folder needs it (pipeline layout: "
                    "model_index.json, unet/config.json, unet/" + WEIGHTS +
                    ", scheduler/scheduler_config.json)")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        common.fail(f"{path} is not valid JSON ({e.msg}, line {e.lineno}); use an intact copy")
    except (OSError, UnicodeDecodeError) as e:
        common.fail(f"cannot read {path} ({type(e).__name__}); use an intact copy")
    if not isinstance(d, dict):
        common.fail(f"{path} holds a JSON {type(d).__name__}, not the object {what} should be")
    return d


def diffusers_paths(path):
    """(the UNet's folder, the scheduler config file) of a pipeline or flat folder."""
    p = str(path)
    if not os.path.isdir(p):
        common.fail(f"diffusers folder not found: {p}; pass a local folder (nothing is "
                    "downloaded)")
    index = os.path.join(p, "model_index.json")
    if os.path.isfile(index) or os.path.isdir(os.path.join(p, "unet")):
        if os.path.isfile(index):
            entry = read_json(index, "model_index.json").get("unet")
            if entry is None:
                common.fail(f"{index} names no `unet`; only pipelines with a {UNET_CLASS} "
                            "(e.g. DDPMPipeline, DDIMPipeline) are supported")
            if not (isinstance(entry, list) and len(entry) == 2 and entry[1] == UNET_CLASS):
                common.fail(f"the pipeline's unet is {entry!r}; only {UNET_CLASS} (pixel "
                            "space, unconditional or class-conditional) is supported")
        return os.path.join(p, "unet"), os.path.join(p, "scheduler", "scheduler_config.json")
    parent = os.path.dirname(os.path.abspath(p))
    if not os.path.isfile(os.path.join(p, "scheduler_config.json")) and \
            os.path.isfile(os.path.join(parent, "model_index.json")):
        common.fail(f"{p} is a pipeline's UNet folder without its schedule; pass the pipeline "
                    f"folder {parent} (its scheduler/ holds the schedule)")
    return p, os.path.join(p, "scheduler_config.json")


def read_unet_weights(folder, what="a diffusers UNet folder"):
    """The UNet's (or, latents.py, the VAE's) tensors from safetensors only (a sharded index,
    the file, or the fp16 variant); a folder with only a pickled .bin is refused, never
    unpickled."""
    import safetensors
    import safetensors.torch
    index = os.path.join(folder, WEIGHTS_INDEX)
    if os.path.isfile(index):
        weight_map = read_json(index, WEIGHTS_INDEX).get("weight_map")
        if not isinstance(weight_map, dict):
            common.fail(f"{index} has no weight_map; use an intact copy")
        files = sorted(set(weight_map.values()))
    else:
        files = next(([f] for f in (WEIGHTS, WEIGHTS_FP16)
                      if os.path.isfile(os.path.join(folder, f))), None)
    if files is None:
        if os.path.isfile(os.path.join(folder, WEIGHTS_BIN)):
            common.fail(f"{folder} has only {WEIGHTS_BIN}, a pickle, which is never loaded "
                        f"here; convert it to {WEIGHTS} (safetensors.torch.save_file) where "
                        "you trust the file")
        common.fail(f"no {WEIGHTS} in {folder}; {what} needs its weights")
    sd = {}
    for name in files:
        f = os.path.join(folder, os.path.basename(name))  # shards sit beside their index
        if not os.path.isfile(f):
            common.fail(f"weights file {f} not found; the folder is incomplete")
        try:
            sd.update(safetensors.torch.load_file(f))
        except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as e:
            common.fail(f"cannot read {f}: corrupt or not safetensors ({type(e).__name__}); "
                        "use an intact copy")
    return sd


def load_diffusers_teacher(path):
    """The teacher in a local diffusers folder as a DiffusersField, in eval mode, without
    gradients, on the CPU, in float32 (fp16 weights are widened). Pipeline layout:
    model_index.json, unet/config.json, unet/diffusion_pytorch_model.safetensors,
    scheduler/scheduler_config.json; flat layout: config.json,
    diffusion_pytorch_model.safetensors, scheduler_config.json. The UNet is built from its
    config (UNet2DModel.from_config) and loaded strictly; nothing is downloaded."""
    require_diffusers()
    unet_dir, scheduler_path = diffusers_paths(path)
    ucfg = read_json(os.path.join(unet_dir, "config.json"), "the UNet's config.json")
    if ucfg.get("_class_name", UNET_CLASS) != UNET_CLASS:
        common.fail(f"{unet_dir} holds a {ucfg['_class_name']}; only {UNET_CLASS} (pixel "
                    "space, unconditional or class-conditional) is supported")
    scfg = read_json(scheduler_path, "scheduler_config.json")
    sd = read_unet_weights(unet_dir)
    field = build_diffusers({"diffusers": ucfg, "scheduler": scfg}, sd,
                            what=f"the weights in {unet_dir}")
    field.coupling = None
    return field.float().eval().requires_grad_(False)


def export_diffusers_unet(field, folder, t_g=None):
    """Write a DiffusersField (a generator distilled from a diffusers teacher) as a folder that
    diffusers loads (UNet2DModel.from_pretrained(folder)): config.json,
    diffusion_pytorch_model.safetensors and the teacher's scheduler_config.json. With t_g the
    generator's one-step recipe (one_step_recipe) is recorded in config.json under `_realuid`
    (diffusers ignores keys that start with "_"). Atomic: written to a temporary folder beside
    `folder`, then renamed; an existing non-empty `folder` is refused. Returns the folder."""
    diffusers = require_diffusers("exporting a diffusers UNet")
    import safetensors.torch
    if not isinstance(field, DiffusersField):
        common.fail(f"only a network of a diffusers teacher can be exported as a diffusers UNet, "
                    f"not a {type(field).__name__}")
    folder = os.path.abspath(str(folder))
    if os.path.lexists(folder) and not (os.path.isdir(folder) and not os.listdir(folder)):
        common.fail(f"{folder} exists and is not an empty folder; choose a new folder")
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    config = dict(field.config["diffusers"], _class_name=UNET_CLASS,
                  _diffusers_version=diffusers.__version__)
    if t_g is not None:
        config["_realuid"] = one_step_recipe(field.config["scheduler"], t_g)
    scheduler = dict(field.config["scheduler"])
    scheduler.setdefault("_class_name", "DDIMScheduler")
    weights = {k: v.detach().cpu().contiguous() for k, v in field.unet.state_dict().items()}
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.tmp-", dir=parent)
    try:
        for name, obj in (("config.json", config), ("scheduler_config.json", scheduler)):
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=2, sort_keys=True)
        safetensors.torch.save_file(weights, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        try:
            os.rename(tmp, folder)  # atomic; replaces only an empty folder
        except OSError:
            common.fail(f"{folder} appeared meanwhile and is not empty; choose a new folder")
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return folder
