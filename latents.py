"""Latent teachers: EDM2's ImageNet 512x512 networks (Karras et al., "Analyzing and Improving the
Training Dynamics of Diffusion Models", CVPR 2024) denoise 4x64x64 latents of Stability AI's
VAE (`stabilityai/sd-vae-ft-mse`, a diffusers AutoencoderKL), not pixels. To distill one with
real data, real images become latents; to see a generator's samples, latents become images.
Both go through a VAE folder the user supplies (nothing is downloaded):

    huggingface-cli download stabilityai/sd-vae-ft-mse --local-dir sd-vae-ft-mse
    python distill.py --teacher edm2-img512-xs-2147483-0.135.pkl --vae sd-vae-ft-mse \\
        --data imagenet512/ --alpha 0.94 --beta 0.96
    python sample.py --ckpt runs/img512 --vae sd-vae-ft-mse --out samples.npz

The latents are EDM2's "final latents": its pickle's encoder (EDM2's StabilityVAEEncoder,
training/encoders.py) standardises the VAE's raw latents channel by channel,

    scale = final_std / raw_std,   bias = final_mean - raw_mean * scale,
    raw_mean = [5.81, 3.25, 0.12, -2.15], raw_std = [4.17, 4.62, 3.71, 3.28], final 0, 0.5

(EDM2's defaults, computed in float32 as EDM2 does; a pickle carries its own scale and bias,
which are used). Following EDM2 exactly, and not Stable Diffusion's own convention:

    encode: pixels u8 -> x = u8 / 255 in [0, 1] -> VAE posterior N(mean, std^2)
            -> latent = (mean + std * eps) * scale + bias,   eps ~ N(0, I) fresh each time
    decode: latent -> (latent - bias) / scale -> VAE decoder -> clamp(0, 1) * 255 -> uint8
            (truncated, as EDM2's .to(torch.uint8))

EDM2 feeds the VAE [0, 1] pixels, not the [-1, 1] Stable Diffusion was trained with; its
raw_mean / raw_std were measured that way, so a teacher trained on them must be served the
same. EDM2 encodes its dataset once (dataset_tool.py encode, keeping mean and std) and draws
eps per training step; here each real batch is encoded when drawn (same law: a fresh eps per
use), which costs one VAE encoder pass per real batch.

diffusers and safetensors are optional: imported only when a VAE is read.
"""
import os

import numpy as np
import torch

import common
import diffusers_teacher

VAE_CLASS = "AutoencoderKL"
# EDM2's StabilityVAEEncoder defaults (its constructor's arguments)
STABILITY_DEFAULTS = {"vae_name": "stabilityai/sd-vae-ft-mse",
                      "raw_mean": [5.81, 3.25, 0.12, -2.15], "raw_std": [4.17, 4.62, 3.71, 3.28],
                      "final_mean": 0.0, "final_std": 0.5}
PIXEL_ENCODERS = ("StandardRGBEncoder",)  # EDM2's img64: x / 127.5 - 1, this repository's own


def _floats(value, what, where):
    """A pickle's scale / bias (numpy float32 arrays, lists or a number) as a list of finite
    Python floats, or a one-line error."""
    try:
        out = [float(v) for v in np.asarray(value, dtype=np.float32).reshape(-1)]
    except (TypeError, ValueError):
        common.fail(f"{where}: the encoder's {what} is {str(value)[:60]!r}, not numbers")
    if not out or not all(np.isfinite(out)) or (what == "scale" and 0.0 in out):
        common.fail(f"{where}: the encoder's {what} {out[:8]} is empty, not finite or zero; "
                    "use an intact copy of the pickle")
    return out


def latent_settings(encoder, where="pickle"):
    """What decodes a pickle's latents: None for a pixel-space encoder (EDM2's img64, EDM's
    pickles, which hold none), else {"vae": the VAE's name, "scale": [...], "bias": [...]}
    (per latent channel) for EDM2's StabilityVAEEncoder, from its stored state (the exact
    float32 values) or, failing that, its constructor arguments with EDM2's defaults.
    `encoder` is net_pickles' plain dict {"class_name", "init_args", "init_kwargs", "state"}."""
    if encoder is None:
        return None
    if not isinstance(encoder, dict):
        common.fail(f"{where}: its encoder is a {type(encoder).__name__}, not one of EDM2's "
                    "encoders; use an intact copy of the pickle")
    name = encoder.get("class_name")
    if name in PIXEL_ENCODERS:
        return None
    if name != "StabilityVAEEncoder":
        common.fail(f"{where}: its encoder is a {str(name)[:60]}; only EDM2's StandardRGBEncoder "
                    "(pixels) and StabilityVAEEncoder (Stability's VAE latents) are known")
    kwargs = dict(STABILITY_DEFAULTS, **(encoder.get("init_kwargs") or {}))
    state = encoder.get("state") or {}
    if "scale" in state and "bias" in state:
        scale, bias = state["scale"], state["bias"]
    else:  # EDM2's constructor, in float32
        scale = np.float32(kwargs["final_std"]) / np.float32(kwargs["raw_std"])
        bias = np.float32(kwargs["final_mean"]) - np.float32(kwargs["raw_mean"]) * scale
    scale, bias = _floats(scale, "scale", where), _floats(bias, "bias", where)
    if len(bias) != len(scale):
        common.fail(f"{where}: the encoder's scale has {len(scale)} channels, its bias "
                    f"{len(bias)}; use an intact copy of the pickle")
    return {"vae": str(state.get("vae_name", kwargs["vae_name"])), "scale": scale, "bias": bias}


def vae_folder(path):
    """The folder holding the VAE's config.json and weights: `path` itself (a VAE folder such
    as stabilityai/sd-vae-ft-mse) or its `vae/` (a Stable Diffusion pipeline folder)."""
    p = str(path)
    if not os.path.isdir(p):
        common.fail(f"--vae {p}: not a folder; pass a local diffusers AutoencoderKL folder, e.g. "
                    "`huggingface-cli download stabilityai/sd-vae-ft-mse --local-dir "
                    "sd-vae-ft-mse` (nothing is downloaded here)")
    if not os.path.isfile(os.path.join(p, "config.json")) and \
            os.path.isfile(os.path.join(p, "vae", "config.json")):
        return os.path.join(p, "vae")
    return p


def load_vae(path):
    """A diffusers AutoencoderKL from a local folder (config.json and
    diffusion_pytorch_model.safetensors; a .bin, a pickle, is refused, never unpickled), built
    from its config and loaded strictly, in eval mode, float32, without gradients."""
    diffusers = diffusers_teacher.require_diffusers("reading a VAE (--vae)")
    folder = vae_folder(path)
    cfg = diffusers_teacher.read_json(os.path.join(folder, "config.json"), "the VAE's config.json")
    if cfg.get("_class_name", VAE_CLASS) != VAE_CLASS:
        common.fail(f"--vae {path}: {folder} holds a {str(cfg['_class_name'])[:60]}, not a "
                    f"{VAE_CLASS} (e.g. stabilityai/sd-vae-ft-mse)")
    sd = diffusers_teacher.read_unet_weights(folder, "a diffusers VAE folder")
    try:
        vae = diffusers.AutoencoderKL.from_config(cfg)
        sd = diffusers_teacher.rename_deprecated_attention(vae, sd)  # the 2022 VAEs' names
        vae.load_state_dict(sd, strict=True)
    except (TypeError, ValueError, RuntimeError) as e:
        detail = " ".join(str(e).split())[:200]
        common.fail(f"--vae {path}: the weights in {folder} do not fit its config ({detail})")
    return vae.float().eval().requires_grad_(False)


class LatentCodec:
    """Pixels <-> a latent teacher's latents, as EDM2's StabilityVAEEncoder (module docstring).
    `settings` is latent_settings' dict; `shape` the teacher's latent (C, H, W), which the VAE
    must produce from images of `pixel_shape` = (3, H * factor, W * factor)."""

    def __init__(self, vae, settings, shape, batch=8):
        self.vae, self.batch = vae, batch
        channels = int(vae.config.latent_channels)
        if channels != shape[0] or len(settings["scale"]) != channels:
            common.fail(f"the VAE makes {channels}-channel latents, the teacher takes {shape[0]} "
                        f"with {len(settings['scale'])} scales; pass the VAE the teacher was "
                        f"trained with ({settings['vae']})")
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)  # one halving per level
        self.pixel_shape = (int(vae.config.in_channels), shape[1] * self.factor,
                            shape[2] * self.factor)
        self.scale = torch.tensor(settings["scale"], dtype=torch.float32).view(1, -1, 1, 1)
        self.bias = torch.tensor(settings["bias"], dtype=torch.float32).view(1, -1, 1, 1)

    def to(self, device):
        self.vae.to(device)
        self.scale, self.bias = self.scale.to(device), self.bias.to(device)
        return self

    def _chunks(self, fn, x):  # the VAE in chunks of `batch` images (its memory, not its math)
        return torch.cat([fn(part) for part in x.split(self.batch)])

    @torch.no_grad()
    def posterior(self, x_u8):
        """The VAE's posterior mean and std of uint8 images (EDM2: pixels / 255 in [0, 1])."""
        def run(part):
            d = self.vae.encode(part.float() / 255).latent_dist
            return torch.cat([d.mean, d.std], 1)
        return self._chunks(run, x_u8).chunk(2, 1)

    @torch.no_grad()
    def encode(self, x_u8, eps):
        """Final latents of uint8 images: (mean + std * eps) * scale + bias; eps ~ N(0, I) has
        the latents' shape (the run's own noise, so that a resumed run draws it again)."""
        mean, std = self.posterior(x_u8)
        return (mean + std * eps) * self.scale + self.bias

    @torch.no_grad()
    def decode(self, latents):
        """uint8 images of final latents: (latents - bias) / scale through the VAE decoder,
        clamp(0, 1) * 255, truncated (EDM2's decode)."""
        raw = (latents.float() - self.bias) / self.scale
        x = self._chunks(lambda part: self.vae.decode(part).sample, raw)
        return x.clamp(0, 1).mul(255).to(torch.uint8)

    def decode_signed(self, latents):
        """decode's images as floats in [-1, 1] (common.to_uint8 gives decode's bytes back)."""
        return common.from_uint8(self.decode(latents))


def open_codec(settings, vae_path, shape, device, what):
    """The codec of a latent teacher (settings from networks.latent_settings), or None when the
    network works on pixels. `vae_path` None leaves a latent network without one (data-free
    distillation needs none); what needs it fails on its own. A VAE given to a pixel network is
    refused: it would do nothing."""
    if settings is None:
        if vae_path:
            common.fail(f"--vae {vae_path}: {what} works on pixels, not VAE latents; drop --vae")
        return None
    if not vae_path:
        return None
    return LatentCodec(load_vae(vae_path), settings, shape).to(device)


def needs_vae(settings, why):
    """The one-line refusal of a latent network's step that needs images without --vae."""
    common.fail(f"{why} of a latent model (VAE latents of {settings['vae']}) needs its VAE: "
                f"pass --vae FOLDER, a local diffusers AutoencoderKL folder (e.g. "
                f"`huggingface-cli download {settings['vae']} --local-dir vae`)")
