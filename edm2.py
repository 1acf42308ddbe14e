"""EDM2's magnitude-preserving denoisers, written for this repository from the EDM2 paper.

    import net_pickles
    net = net_pickles.load_edm_network("edm2-img64-s-1073741-0.075.pkl")  # an edm2.Precond
    D = net(x, sigma, class_labels=one_hot)        # estimate of E[x1 | x1 + sigma n = x]

Karras, Aittala, Lehtinen, Hellsten, Aila, Laine, "Analyzing and Improving the Training Dynamics
of Diffusion Models" (CVPR 2024; arXiv:2312.02696). The network is the paper's CONFIG G (its
Sec. 2 and Table 1 build it up from ADM as CONFIGs A-G), the magnitude-preserving U-Net of its
Figure 21, made of
- magnitude-preserving learned layers (CONFIG D; Eq. 47): convolutions and fully-connected
  layers without biases whose weights are normalised, so that unit-variance inputs give
  unit-variance outputs (`MPConv`);
- forced weight normalisation (CONFIG E, Algorithm 1; Eq. 66): in training every forward pass
  first rewrites the stored weight to its normalised version;
- magnitude-preserving fixed-function layers (CONFIG G): Fourier features (Eq. 75), SiLU
  (Eq. 81), sum (Eq. 88) and concatenation (Eq. 103), and a learned gain on the output layer;
- EDM's preconditioning (Karras et al. 2022, Table 1) with sigma_data = 0.5 and
  c_noise = ln(sigma) / 4, and the uncertainty u(sigma) of the loss (EDM2 Eq. 21), `logvar`.
Equation numbers are the arXiv version's (most of these are in its appendix), the numbering
EDM2's own code cites.

Licence: EDM2's code and weights (NVlabs/edm2) are CC BY-NC-SA 4.0, and models distilled from
its weights inherit that licence. This is this repository's own code, written from the paper;
none of EDM2's code is copied. What a pickle depends on is matched: class names, constructor
arguments, parameter and buffer names and shapes (state dicts load with strict=True), and the
order of float operations (benchmarks/check_edm2.py compares with EDM2's own code, from a
directory the user names). net_pickles.py reads EDM2's pickles without running code from them.

One departure from EDM2: the network is evaluated in float32 unless the caller explicitly asks
for float16 (`force_fp32=False`, and then only on CUDA for a network built with use_fp16, as in
EDM2). EDM2 runs its use_fp16=True networks in float16 on CUDA by default; a teacher here is
evaluated in float32 (parameters stay float32 in every case).

Legend (EDM's eq. 7 and the RealUID paper's section 2.1): D(x; sigma, y) is the teacher's
denoiser; this repository's field is v*(t, x_t) = (D(x_t / t; (1 - t) / t) - x_t) / (1 - t).
"""
import math

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# The magnitude-preserving operations (pure functions). Scalars are computed in float64 and
# applied as Python numbers, as in EDM2, so that the float32 rounding is the same.

def normalize(x, dim=None, eps=1e-4):
    """x / (eps + rms(x)) over `dim` (default: all but the first), rms = ||x|| / sqrt(N): rows of
    unit magnitude, i.e. norm sqrt(N) (the "normalize" of EDM2's Algorithm 1 and Eq. 66; eps
    keeps a zero row finite). The norm is taken in float32 at least (float16 input: float32,
    as in EDM2; float64 input, which EDM2 refuses: float64)."""
    dims = list(range(1, x.ndim)) if dim is None else dim
    dtype = torch.promote_types(x.dtype, torch.float32)
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=dtype)
    # eps + norm / sqrt(N) as one torch.add, the operation whose rounding EDM2 has;
    # norm.numel() / x.numel() is 1 / N
    rms = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / rms.to(x.dtype)


def fir_filter(f, dtype, device):
    """The 2-D FIR filter of 1-D taps f: outer(f, f) / sum(f)^2, computed in float32."""
    taps = torch.as_tensor(f, dtype=torch.float32)
    taps = taps / taps.sum()
    return torch.outer(taps, taps)[None, None].to(dtype=dtype, device=device)


def resample(x, f=(1, 1), mode="keep"):
    """2x down- or upsampling with the FIR filter f ('keep': x itself). Upsampling inserts
    zeros, so its filter is scaled by 4 to keep the mean (4 positions per 2x2 cell)."""
    if mode == "keep":
        return x
    if len(f) % 2:
        raise ValueError("resample: the filter needs an even number of taps")
    fir, c, pad = fir_filter(f, x.dtype, x.device), x.shape[1], (len(f) - 1) // 2
    if mode == "down":
        return F.conv2d(x, fir.tile([c, 1, 1, 1]), groups=c, stride=2, padding=pad)
    if mode == "up":
        return F.conv_transpose2d(x, (fir * 4).tile([c, 1, 1, 1]), groups=c, stride=2,
                                  padding=pad)
    raise ValueError(f"resample: unknown mode {mode!r}")


def mp_silu(x):
    """SiLU divided by 0.596, its output magnitude for unit-Gaussian input (Eq. 81)."""
    return F.silu(x) / 0.596


def mp_sum(a, b, t=0.5):
    """((1 - t) a + t b) / sqrt((1 - t)^2 + t^2) (Eq. 88): unit magnitude for independent
    unit-magnitude a and b; t balances a (t = 0) against b (t = 1)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a, b, dim=1, t=0.5):
    """Concatenation along `dim` with weights that keep unit magnitude overall and give b the
    share t^2 / ((1 - t)^2 + t^2) of it whatever the channel counts Na, Nb (Eq. 103):
    C = sqrt((Na + Nb) / ((1 - t)^2 + t^2)), a * C (1 - t) / sqrt(Na), b * C t / sqrt(Nb)."""
    n_a, n_b = a.shape[dim], b.shape[dim]
    scale = math.sqrt((n_a + n_b) / ((1 - t) ** 2 + t ** 2))
    w_a = scale / math.sqrt(n_a) * (1 - t)
    w_b = scale / math.sqrt(n_b) * t
    return torch.cat([w_a * a, w_b * b], dim=dim)


def preconditioning(sigma, sigma_data=0.5):
    """EDM's preconditioning (Karras et al. 2022, Table 1), as EDM2 uses it:
    c_skip = s^2 / (sigma^2 + s^2), c_out = sigma s / sqrt(sigma^2 + s^2),
    c_in = 1 / sqrt(s^2 + sigma^2), c_noise = ln(sigma) / 4, with s = sigma_data;
    sigma [N, 1, 1, 1] gives three [N, 1, 1, 1] tensors and c_noise [N]."""
    s = sigma_data
    c_skip = s ** 2 / (sigma ** 2 + s ** 2)
    c_out = sigma * s / (sigma ** 2 + s ** 2).sqrt()
    c_in = 1 / (s ** 2 + sigma ** 2).sqrt()
    c_noise = sigma.flatten().log() / 4
    return c_skip, c_out, c_in, c_noise


# ---------------------------------------------------------------------------------------------
# Layers. Class names, constructor arguments and parameter / buffer names are EDM2's: a pickle
# names them, and its state dict loads strictly.

class MPFourier(torch.nn.Module):
    """Fourier features sqrt(2) cos(f c + phi) of the noise label c (Eq. 75): frequencies
    f ~ 2 pi N(0, bandwidth^2) and phases phi ~ 2 pi U[0, 1) (buffers); with uniform phases the
    output has unit magnitude. Computed in float32, returned in c's dtype."""

    def __init__(self, num_channels, bandwidth=1):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x):
        y = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32))
        y = y + self.phases.to(torch.float32)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(torch.nn.Module):
    """A magnitude-preserving convolution (kernel [k, k]) or fully-connected layer (kernel []),
    without bias (Eq. 47): the weight w [out, in, *kernel] is used as
    normalize(w) * gain / sqrt(fan_in), so each output unit has a weight vector of norm `gain`.
    In training mode the stored weight is first replaced by normalize(w) (forced weight
    normalisation, Eq. 66): its norm can then never grow, which keeps the effective learning
    rate from decaying (Sec. 2, CONFIG E).

    That rewrite changes the parameter in place, so a second training-mode pass before the
    backward pass of the first makes autograd refuse the first (EDM2's code behaves alike). A
    caller that runs a network several times per optimiser step sets force_normalization False
    on its MPConvs and calls normalize_weights_ once per step, before the passes: the same
    numbers as EDM2's once-per-step pass, without the in-place change inside the graph."""

    force_normalization = True  # a class default; set per instance (not part of the state dict)

    def __init__(self, in_channels, out_channels, kernel):
        super().__init__()
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x, gain=1):
        # a float32 weight: w IS the parameter, so after the forced normalisation below the pass
        # uses the normalised stored weight (normalised once more), exactly as EDM2 does
        w = self.weight.to(torch.float32)
        if self.training and self.force_normalization:
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        w = normalize(w)
        w = w * (gain / math.sqrt(w[0].numel()))  # fan_in = in_channels * prod(kernel)
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        if w.ndim != 4:
            raise ValueError("MPConv: kernel must be [] or [k, k]")
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


@torch.no_grad()
def normalize_weights_(module):
    """Forced weight normalisation (Eq. 66) of every MPConv in `module`, once, outside any
    forward pass (see MPConv); returns module."""
    for layer in module.modules():
        if isinstance(layer, MPConv):
            layer.weight.copy_(normalize(layer.weight.to(torch.float32)))
    return module


class Block(torch.nn.Module):
    """The U-Net block of Figure 21. Encoder blocks ('enc') resample, project the skip path with
    a 1x1 conv when the width changes and pixel-normalise it; decoder blocks ('dec') resample
    and project the skip path after the residual branch. The residual branch is
    conv(mp_silu(x)), scaled by 1 + emb_linear(emb) (gain emb_gain, zero at init), mp_silu,
    dropout, conv; it joins the main path by mp_sum with weight res_balance. Optional cosine
    self-attention (q, k, v pixel-normalised per head) joins with attn_balance; activations are
    clipped to +-clip_act (None: not clipped)."""

    def __init__(self, in_channels, out_channels, emb_channels, flavor="enc", resample_mode="keep",
                 resample_filter=[1, 1], attention=False, channels_per_head=64, dropout=0,
                 res_balance=0.3, attn_balance=0.3, clip_act=256):
        super().__init__()
        if flavor not in ("enc", "dec") or resample_mode not in ("keep", "up", "down"):
            raise ValueError(f"Block: unknown flavor {flavor!r} or resample_mode "
                             f"{resample_mode!r}")
        self.out_channels = out_channels
        self.flavor, self.resample_mode = flavor, resample_mode
        self.resample_filter = resample_filter
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout, self.res_balance, self.attn_balance = dropout, res_balance, attn_balance
        self.clip_act = clip_act
        # registration order = state-dict order, EDM2's
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels,
                                kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = (MPConv(in_channels, out_channels, kernel=[1, 1])
                          if in_channels != out_channels else None)
        self.attn_qkv = (MPConv(out_channels, out_channels * 3, kernel=[1, 1])
                         if self.num_heads else None)
        self.attn_proj = (MPConv(out_channels, out_channels, kernel=[1, 1])
                          if self.num_heads else None)

    def forward(self, x, emb):
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm: each pixel's channel vector of unit magnitude

        y = self.conv_res0(mp_silu(x))
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * scale[:, :, None, None].to(y.dtype))
        if self.training and self.dropout != 0:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads:
            x = mp_sum(x, self._attend(x), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clip_(-self.clip_act, self.clip_act)
        return x

    def _attend(self, x):
        n, c, h, w = x.shape
        qkv = self.attn_qkv(x)
        # channels laid out as [head, channel, (q, k, v)]: the order the pickled weights assume
        qkv = qkv.reshape(n, self.num_heads, -1, 3, h * w)
        q, k, v = normalize(qkv, dim=2).unbind(3)  # cosine attention: unit q, k, v per head
        weights = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
        mixed = torch.einsum("nhqk,nhck->nhcq", weights, v)
        return self.attn_proj(mixed.reshape(n, c, h, w))


class UNet(torch.nn.Module):
    """EDM2's U-Net (Figure 21): noise embedding MPFourier -> MPConv, mixed with the class
    embedding by mp_sum (label_balance) and mp_silu; an encoder and a decoder of Blocks whose
    ModuleDict keys are "{res}x{res}_{role}" (EDM2's; the middle is the decoder's `_in0` (with
    attention) and `_in1`); skips joined by mp_cat (concat_balance); a constant 1 channel on
    the input stands in for biases; the output conv has a learned gain (out_gain, zero at
    init). Widths: model_channels * channel_mult per level; the noise embedding has
    model_channels * channel_mult_noise channels (default: the first level's width), the final
    embedding model_channels * channel_mult_emb (default: the widest level's)."""

    def __init__(self, img_resolution, img_channels, label_dim, model_channels=192,
                 channel_mult=[1, 2, 3, 4], channel_mult_noise=None, channel_mult_emb=None,
                 num_blocks=3, attn_resolutions=[16, 8], label_balance=0.5, concat_balance=0.5,
                 **block_kwargs):
        super().__init__()
        widths = [model_channels * m for m in channel_mult]
        noise_ch = model_channels * channel_mult_noise if channel_mult_noise is not None \
            else widths[0]
        emb_ch = model_channels * channel_mult_emb if channel_mult_emb is not None \
            else max(widths)
        self.label_balance, self.concat_balance = label_balance, concat_balance
        self.out_gain = torch.nn.Parameter(torch.zeros([]))

        self.emb_fourier = MPFourier(noise_ch)
        self.emb_noise = MPConv(noise_ch, emb_ch, kernel=[])
        self.emb_label = MPConv(label_dim, emb_ch, kernel=[]) if label_dim != 0 else None

        self.enc = torch.nn.ModuleDict()
        ch = img_channels + 1  # the constant channel
        for level, width in enumerate(widths):
            r = f"{img_resolution >> level}x{img_resolution >> level}"
            if level == 0:
                self.enc[f"{r}_conv"] = MPConv(ch, width, kernel=[3, 3])
                ch = width
            else:
                self.enc[f"{r}_down"] = Block(ch, ch, emb_ch, flavor="enc", resample_mode="down",
                                              **block_kwargs)
            for i in range(num_blocks):
                attn = (img_resolution >> level) in attn_resolutions
                self.enc[f"{r}_block{i}"] = Block(ch, width, emb_ch, flavor="enc", attention=attn,
                                                  **block_kwargs)
                ch = width

        self.dec = torch.nn.ModuleDict()
        skips = [layer.out_channels for layer in self.enc.values()]
        for level, width in reversed(list(enumerate(widths))):
            res = img_resolution >> level
            r = f"{res}x{res}"
            if level == len(widths) - 1:
                self.dec[f"{r}_in0"] = Block(ch, ch, emb_ch, flavor="dec", attention=True,
                                             **block_kwargs)
                self.dec[f"{r}_in1"] = Block(ch, ch, emb_ch, flavor="dec", **block_kwargs)
            else:
                self.dec[f"{r}_up"] = Block(ch, ch, emb_ch, flavor="dec", resample_mode="up",
                                            **block_kwargs)
            for i in range(num_blocks + 1):
                self.dec[f"{r}_block{i}"] = Block(ch + skips.pop(), width, emb_ch, flavor="dec",
                                                  attention=res in attn_resolutions,
                                                  **block_kwargs)
                ch = width
        self.out_conv = MPConv(ch, img_channels, kernel=[3, 3])

    def forward(self, x, noise_labels, class_labels):
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            # one-hot labels times sqrt(label_dim): unit magnitude
            labels = class_labels * math.sqrt(class_labels.shape[1])
            emb = mp_sum(emb, self.emb_label(labels), t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, layer in self.enc.items():
            x = layer(x) if name.endswith("_conv") else layer(x, emb)
            skips.append(x)
        for name, layer in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = layer(x, emb)
        return self.out_conv(x, gain=self.out_gain)


class Precond(torch.nn.Module):
    """EDM2's denoiser D(x; sigma, y) = c_skip x + c_out F(c_in x; c_noise, y), F the UNet
    (`.unet`; also reachable as `.model`, the name edm.py's preconditioners use), with EDM's
    coefficients (`preconditioning`). `logvar_fourier` and `logvar_linear` give the log of the
    uncertainty u(sigma) of EDM2's loss (Eq. 21), returned when return_logvar=True."""

    def __init__(self, img_resolution, img_channels, label_dim, use_fp16=True, sigma_data=0.5,
                 logvar_channels=128, **unet_kwargs):
        super().__init__()
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.label_dim, self.use_fp16, self.sigma_data = label_dim, use_fp16, sigma_data
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels,
                         label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    @property
    def model(self):
        """The U-Net, under the name code written for edm.py looks for (not a second copy)."""
        return self.unet

    def forward(self, x, sigma, class_labels=None, force_fp32=True, return_logvar=False,
                **unet_kwargs):
        """D(x; sigma, y): x [N, C, H, W], sigma [N] or a scalar, class_labels one-hot
        [N, label_dim] (the all-zero label when omitted, as in EDM2). float32 unless
        force_fp32=False is passed explicitly (then float16 on CUDA if built with use_fp16).
        With return_logvar, also ln u(sigma) [N, 1, 1, 1]."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        half = self.use_fp16 and not force_fp32 and x.device.type == "cuda"

        c_skip, c_out, c_in, c_noise = preconditioning(sigma, self.sigma_data)
        F_x = self.unet((c_in * x).to(torch.float16 if half else torch.float32), c_noise,
                        class_labels, **unet_kwargs)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if return_logvar:
            logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
            return D_x, logvar
        return D_x


# Keyed as a pickle names the classes (a persistent object's class_name); net_pickles.py
# rebuilds these from a pickle's constructor arguments. No name is shared with edm.NETWORKS.
NETWORKS = {cls.__name__: cls for cls in (Precond, UNet)}

# The published EDM2 networks (train_edm2.py's presets; generate_images.py's pickles):
# Precond(**CONFIGS[name]) has the architecture of that preset. img512 works on 64x64x4 latents
# of Stability's VAE (stabilityai/sd-vae-ft-mse), img64 on 64x64 RGB; both ImageNet (1000
# classes).
_LATENT, _PIXEL = dict(img_resolution=64, img_channels=4, label_dim=1000), \
    dict(img_resolution=64, img_channels=3, label_dim=1000)
CONFIGS = {
    **{f"edm2-img512-{size}": dict(_LATENT, model_channels=channels, dropout=dropout)
       for size, channels, dropout in (("xxs", 64, 0.0), ("xs", 128, 0.0), ("s", 192, 0.0),
                                       ("m", 256, 0.1), ("l", 320, 0.1), ("xl", 384, 0.1),
                                       ("xxl", 448, 0.1))},
    **{f"edm2-img64-{size}": dict(_PIXEL, model_channels=channels, dropout=dropout)
       for size, channels, dropout in (("xs", 128, 0.0), ("s", 192, 0.0), ("m", 256, 0.1),
                                       ("l", 320, 0.1), ("xl", 384, 0.1))},
}
