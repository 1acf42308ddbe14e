"""EDM's denoisers, written for this repository from the EDM paper.

    import edm, net_pickles
    net = net_pickles.load_edm_network("edm-cifar10-32x32-cond-vp.pkl")  # an edm.EDMPrecond
    D = net(x, sigma, class_labels=one_hot)        # estimate of E[x1 | x1 + sigma n = x]

Karras, Aittala, Aila, Laine, "Elucidating the Design Space of Diffusion-Based Generative Models"
(NeurIPS 2022). This repository's own code, written from the paper: preconditioners from Table 1
and Appendix B (VP, VE, iDDPM, EDM), architectures from Appendix F (DDPM++ / NCSN++ as `SongUNet`,
ADM as `DhariwalUNet`). EDM's code and weights are CC BY-NC-SA 4.0; none of its code is copied.
What a pickle depends on is matched: class names, constructor arguments, parameter names and
shapes (strict loading), and the order of float operations (benchmarks/check_edm.py compares
with EDM's own code, from a directory the user names: relative error 0 on CPU). net_pickles.py
reads the pickles without running code from them.

Legend (EDM's eq. 7 and the RealUID paper's section 2.1): D(x; sigma, y) is the teacher's
denoiser; this repository's field is v*(t, x_t) = (D(x_t / t; (1 - t) / t) - x_t) / (1 - t).
"""
import math

import torch
import torch.nn.functional as F

from common import RealUIDError


# ---------------------------------------------------------------------------------------------
# Layers. Each keeps EDM's class name (a pickle names it) and its parameter names. Weights are
# cast to the activation dtype inside forward, so parameters stay float32 when fp16 runs.

def _initial(shape, mode, fan_in, fan_out):
    """A random tensor for EDM's init modes (Appendix F): Xavier / Kaiming, uniform or normal."""
    variance = 2 / (fan_in + fan_out) if mode.startswith("xavier") else 1 / fan_in
    if mode.endswith("uniform"):  # U(-a, a) has variance a^2 / 3
        return math.sqrt(3 * variance) * (torch.rand(*shape) * 2 - 1)
    return math.sqrt(variance) * torch.randn(*shape)


class Linear(torch.nn.Module):
    """y = x W^T + b, with the weight of shape [out, in]."""

    def __init__(self, in_features, out_features, bias=True, init_mode="kaiming_normal",
                 init_weight=1, init_bias=0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        shape = [out_features, in_features]
        self.weight = torch.nn.Parameter(_initial(shape, **fans) * init_weight)
        self.bias = (torch.nn.Parameter(_initial([out_features], **fans) * init_bias)
                     if bias else None)

    def forward(self, x):
        # matmul then in-place add (not F.linear's fused addmm): EDM's rounding, bit for bit
        x = x @ self.weight.to(x.dtype).t()
        return x if self.bias is None else x.add_(self.bias.to(x.dtype))


class Conv2d(torch.nn.Module):
    """A 'same' convolution, optionally preceded by a 2x up- or downsampling with a fixed FIR
    filter (outer product of `resample_filter`, normalised). kernel=0 means resampling only;
    fused_resample convolves first, then downsamples (NCSN++'s residual encoder; EDM never fuses
    upsampling, so neither does this class)."""

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False,
                 resample_filter=[1, 1], fused_resample=False, init_mode="kaiming_normal",
                 init_weight=1, init_bias=0):
        super().__init__()
        if up and (down or fused_resample):
            raise ValueError("Conv2d: up excludes down and fused_resample")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel,
                    fan_out=out_channels * kernel * kernel)
        shape = [out_channels, in_channels, kernel, kernel]
        self.weight = torch.nn.Parameter(_initial(shape, **fans) * init_weight) if kernel else None
        self.bias = (torch.nn.Parameter(_initial([out_channels], **fans) * init_bias)
                     if kernel and bias else None)
        taps = torch.as_tensor(resample_filter, dtype=torch.float32)
        fir = torch.outer(taps, taps)[None, None] / taps.sum().square()
        # a None buffer is absent from the state dict, as in EDM's pickles
        self.register_buffer("resample_filter", fir if up or down else None)

    def forward(self, x):
        w = None if self.weight is None else self.weight.to(x.dtype)
        fir = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        pad_w = 0 if w is None else w.shape[-1] // 2
        pad_f = 0 if fir is None else (fir.shape[-1] - 1) // 2
        if self.fused_resample and w is not None and self.down:  # one padding for both steps
            x = F.conv2d(x, w, padding=pad_w + pad_f)
            x = F.conv2d(x, fir.tile([self.out_channels, 1, 1, 1]), stride=2,
                         groups=self.out_channels)
        else:
            if self.up:  # zero-insertion upsampling; x4 keeps the mean (4 zeros per 2x2 cell)
                x = F.conv_transpose2d(x, (fir * 4).tile([self.in_channels, 1, 1, 1]), stride=2,
                                       groups=self.in_channels, padding=pad_f)
            if self.down:
                x = F.conv2d(x, fir.tile([self.in_channels, 1, 1, 1]), stride=2,
                             groups=self.in_channels, padding=pad_f)
            if w is not None:
                x = F.conv2d(x, w, padding=pad_w)
        return x if self.bias is None else x.add_(self.bias.to(x.dtype).reshape(1, -1, 1, 1))


class GroupNorm(torch.nn.Module):
    """Group normalisation with at most 32 groups of at least 4 channels each."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype),
                            self.eps)


class UNetBlock(torch.nn.Module):
    """Residual block of the three U-Nets: norm-silu-conv, noise embedding (added, or as scale and
    shift when adaptive_scale), norm-silu-dropout-conv, skip connection, then optional multi-head
    self-attention. `skip_scale` (1/sqrt 2 in DDPM++ / NCSN++) keeps the variance of sums at 1."""

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False,
                 attention=False, num_heads=None, channels_per_head=64, dropout=0, skip_scale=1,
                 eps=1e-5, resample_filter=[1, 1], resample_proj=False, adaptive_scale=True,
                 init=dict(), init_zero=dict(init_weight=0), init_attn=None):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.emb_channels = emb_channels
        # ADM derives the head count from 64 channels per head: fewer than 64 channels, no heads
        heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.num_heads = heads if attention else 0
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        resample = dict(up=up, down=down, resample_filter=resample_filter)
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, **resample, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, **resample, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1,
                              **(init if init_attn is None else init_attn))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        h = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h.add_(params)))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        h = h.add_(x if self.skip is None else self.skip(x)) * self.skip_scale
        if self.num_heads:
            h = self._attend(h) * self.skip_scale
        return h

    def _attend(self, x):
        n, c, height, width = x.shape
        # channels laid out as [head, channel, (q, k, v)]: the order the pickled qkv weights assume
        q, k, v = self.qkv(self.norm2(x)).reshape(n * self.num_heads, c // self.num_heads, 3,
                                                  height * width).unbind(2)
        # logits and softmax in float32 even under fp16 (they overflow in half precision) and
        # under autocast, which would otherwise run the einsum in bf16 / fp16 whatever its
        # inputs: autocast is off for these two steps (their backward runs in float32 too)
        with torch.autocast(x.device.type, enabled=False):
            logits = torch.einsum("ncq,nck->nqk", q.to(torch.float32),
                                  (k / math.sqrt(k.shape[1])).to(torch.float32))
            weights = logits.softmax(dim=2).to(q.dtype)
        mixed = torch.einsum("nqk,nck->ncq", weights, v)
        return self.proj(mixed.reshape(n, c, height, width)).add_(x)


class PositionalEmbedding(torch.nn.Module):
    """Transformer-style sinusoids of the noise label: [cos(c f_i), sin(c f_i)], with f_i going
    geometrically from 1 to 1/max_positions (inclusive when `endpoint`)."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, c):
        half = self.num_channels // 2
        exponents = torch.arange(half, dtype=torch.float32, device=c.device)
        freqs = (1 / self.max_positions) ** (exponents / (half - int(self.endpoint)))
        angles = torch.outer(c, freqs.to(c.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(torch.nn.Module):
    """Random Fourier features of the noise label (NCSN++): [cos(2 pi c f), sin(2 pi c f)]."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, c):
        angles = torch.outer(c, (2 * math.pi * self.freqs).to(c.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


def _drop_labels(labels, p, training, n):
    """Classifier-free guidance training: zero each sample's label with probability p."""
    keep = torch.rand([n, 1], device=labels.device) >= p if training and p else None
    return labels if keep is None else labels * keep.to(labels.dtype)


# ---------------------------------------------------------------------------------------------
# Architectures. Encoder and decoder are ModuleDicts named "{res}x{res}_{role}" (EDM's keys);
# forward dispatches on the role, so the order of the dict is the order of computation.

def _role(name):
    return name.split("_", 1)[1]  # "32x32_aux_down" -> "aux_down", "16x16_block2" -> "block2"


class SongUNet(torch.nn.Module):
    """DDPM++ (positional embedding, standard encoder, [1,1] filter) and NCSN++ (Fourier
    embedding, residual encoder, [1,3,3,1] filter) of Song et al. 2021, as EDM configures them.
    The output is the sum of the decoder's `aux_conv` heads (only the last one unless
    decoder_type='skip')."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4, num_blocks=4,
                 attn_resolutions=[16], dropout=0.10, label_dropout=0, embedding_type="positional",
                 channel_mult_noise=1, encoder_type="standard", decoder_type="standard",
                 resample_filter=[1, 1]):
        super().__init__()
        if (embedding_type not in ("positional", "fourier") or encoder_type not in
                ("standard", "skip", "residual") or decoder_type not in ("standard", "skip")):
            raise ValueError(f"SongUNet: unknown embedding/encoder/decoder type "
                             f"{embedding_type}/{encoder_type}/{decoder_type}")
        self.label_dropout = label_dropout
        emb_ch, noise_ch = model_channels * channel_mult_emb, model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        block = dict(emb_channels=emb_ch, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                     eps=1e-6, resample_filter=resample_filter, resample_proj=True,
                     adaptive_scale=False, init=init, init_zero=init_zero,
                     init_attn=dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2)))

        # Noise, class and augmentation labels -> one embedding vector per sample.
        self.map_noise = (PositionalEmbedding(noise_ch, endpoint=True)
                          if embedding_type == "positional" else FourierEmbedding(noise_ch))
        self.map_label = Linear(label_dim, noise_ch, **init) if label_dim else None
        self.map_augment = (Linear(augment_dim, noise_ch, bias=False, **init)
                            if augment_dim else None)
        self.map_layer0 = Linear(noise_ch, emb_ch, **init)
        self.map_layer1 = Linear(emb_ch, emb_ch, **init)

        # Encoder; `aux` layers carry a downsampled copy of the input image (skip / residual).
        self.enc = torch.nn.ModuleDict()
        ch = aux_ch = in_channels
        for level, mult in enumerate(channel_mult):
            r = f"{img_resolution >> level}x{img_resolution >> level}"
            if level == 0:
                self.enc[f"{r}_conv"] = Conv2d(ch, model_channels, kernel=3, **init)
                ch = model_channels
            else:
                self.enc[f"{r}_down"] = UNetBlock(ch, ch, down=True, **block)
                if encoder_type == "skip":
                    self.enc[f"{r}_aux_down"] = Conv2d(aux_ch, aux_ch, kernel=0, down=True,
                                                       resample_filter=resample_filter)
                    self.enc[f"{r}_aux_skip"] = Conv2d(aux_ch, ch, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{r}_aux_residual"] = Conv2d(aux_ch, ch, kernel=3, down=True,
                                                           resample_filter=resample_filter,
                                                           fused_resample=True, **init)
                    aux_ch = ch
            for i in range(num_blocks):
                attn = (img_resolution >> level) in attn_resolutions
                self.enc[f"{r}_block{i}"] = UNetBlock(ch, model_channels * mult, attention=attn,
                                                      **block)
                ch = model_channels * mult
        skips = [layer.out_channels for name, layer in self.enc.items() if "aux" not in name]

        # Decoder; each `block` concatenates the matching encoder output (a U-Net skip).
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            r = f"{res}x{res}"
            if level == len(channel_mult) - 1:
                self.dec[f"{r}_in0"] = UNetBlock(ch, ch, attention=True, **block)
                self.dec[f"{r}_in1"] = UNetBlock(ch, ch, **block)
            else:
                self.dec[f"{r}_up"] = UNetBlock(ch, ch, up=True, **block)
            for i in range(num_blocks + 1):
                attn = i == num_blocks and res in attn_resolutions
                self.dec[f"{r}_block{i}"] = UNetBlock(ch + skips.pop(), model_channels * mult,
                                                      attention=attn, **block)
                ch = model_channels * mult
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{r}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                     resample_filter=resample_filter)
                self.dec[f"{r}_aux_norm"] = GroupNorm(ch, eps=1e-6)
                self.dec[f"{r}_aux_conv"] = Conv2d(ch, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # [sin, cos] (Song)
        if self.map_label is not None:
            labels = _drop_labels(class_labels, self.label_dropout, self.training, x.shape[0])
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        skips, aux = [], x
        for name, layer in self.enc.items():
            role = _role(name)
            if role == "aux_down":
                aux = layer(aux)
            elif role == "aux_skip":
                x = skips[-1] = x + layer(aux)
            elif role == "aux_residual":
                x = skips[-1] = aux = (x + layer(aux)) / math.sqrt(2)
            else:
                x = layer(x) if role == "conv" else layer(x, emb)
                skips.append(x)

        out = head = None
        for name, layer in self.dec.items():
            role = _role(name)
            if role == "aux_up":
                out = layer(out)
            elif role == "aux_norm":
                head = layer(x)
            elif role == "aux_conv":
                head = layer(F.silu(head))
                out = head if out is None else head + out
            else:
                if role.startswith("block"):
                    x = torch.cat([x, skips.pop()], dim=1)
                x = layer(x, emb)
        return out


class DhariwalUNet(torch.nn.Module):
    """ADM (Dhariwal & Nichol 2021), as in EDM's ImageNet-64 model: adaptive scale/shift from the
    embedding, 64 channels per attention head, Kaiming-uniform init with zeroed output layers."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3,
                 attn_resolutions=[32, 16, 8], dropout=0.10, label_dropout=0):
        super().__init__()
        self.label_dropout = label_dropout
        emb_ch = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3),
                    init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block = dict(emb_channels=emb_ch, channels_per_head=64, dropout=dropout, init=init,
                     init_zero=init_zero)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = (Linear(augment_dim, model_channels, bias=False, **init_zero)
                            if augment_dim else None)
        self.map_layer0 = Linear(model_channels, emb_ch, **init)
        self.map_layer1 = Linear(emb_ch, emb_ch, **init)
        self.map_label = (Linear(label_dim, emb_ch, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        self.enc = torch.nn.ModuleDict()
        ch = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            r = f"{res}x{res}"
            if level == 0:
                self.enc[f"{r}_conv"] = Conv2d(ch, model_channels * mult, kernel=3, **init)
                ch = model_channels * mult
            else:
                self.enc[f"{r}_down"] = UNetBlock(ch, ch, down=True, **block)
            for i in range(num_blocks):
                self.enc[f"{r}_block{i}"] = UNetBlock(ch, model_channels * mult,
                                                      attention=res in attn_resolutions, **block)
                ch = model_channels * mult
        skips = [layer.out_channels for layer in self.enc.values()]

        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            r = f"{res}x{res}"
            if level == len(channel_mult) - 1:
                self.dec[f"{r}_in0"] = UNetBlock(ch, ch, attention=True, **block)
                self.dec[f"{r}_in1"] = UNetBlock(ch, ch, **block)
            else:
                self.dec[f"{r}_up"] = UNetBlock(ch, ch, up=True, **block)
            for i in range(num_blocks + 1):
                self.dec[f"{r}_block{i}"] = UNetBlock(ch + skips.pop(), model_channels * mult,
                                                      attention=res in attn_resolutions, **block)
                ch = model_channels * mult
        self.out_norm = GroupNorm(ch)
        self.out_conv = Conv2d(ch, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            labels = _drop_labels(class_labels, self.label_dropout, self.training, x.shape[0])
            emb = emb + self.map_label(labels)
        emb = F.silu(emb)

        skips = []
        for name, layer in self.enc.items():
            x = layer(x) if _role(name) == "conv" else layer(x, emb)
            skips.append(x)
        for name, layer in self.dec.items():
            if _role(name).startswith("block"):
                x = torch.cat([x, skips.pop()], dim=1)
            x = layer(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


_ARCHITECTURES = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


# ---------------------------------------------------------------------------------------------
# Preconditioners (Table 1): D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), the network F
# held as `.model`. The input is float32; F runs in fp16 only when the pickle asks for it
# (use_fp16) AND x is on CUDA, as in EDM: CPU half-precision convolutions are slow or missing,
# and parameters stay float32 in every case.

class _Precond(torch.nn.Module):
    """Subclasses define coefficients(sigma [N,1,1,1]) -> (c_skip, c_out, c_in, c_noise)."""

    def __init__(self, img_resolution, img_channels, label_dim, use_fp16, model_type,
                 model_out_channels, model_kwargs):
        super().__init__()
        if model_type not in _ARCHITECTURES:
            raise RealUIDError(f"model_type must be one of {sorted(_ARCHITECTURES)}, "
                               f"not {model_type!r}")
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.label_dim, self.use_fp16 = label_dim, use_fp16
        self.model = _ARCHITECTURES[model_type](
            img_resolution=img_resolution, in_channels=img_channels,
            out_channels=model_out_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        """D(x; sigma, y): x [N, C, H, W], sigma [N] or scalar, class_labels one-hot [N, label_dim]
        (zeros when omitted); extra keywords (augment_labels) go to the network."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim and class_labels is None:  # EDM's default: the all-zero label
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        class_labels = (class_labels.to(torch.float32).reshape(-1, self.label_dim)
                        if self.label_dim else None)
        half = self.use_fp16 and not force_fp32 and x.device.type == "cuda"
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.model((c_in * x).to(torch.float16 if half else torch.float32), c_noise.flatten(),
                         class_labels=class_labels, **model_kwargs)
        return c_skip * x + c_out * F_x[:, :self.img_channels].to(torch.float32)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


class VPPrecond(_Precond):
    """Variance preserving (DDPM++ baselines), sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1).
    F predicts the noise: c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1),
    c_noise = (M - 1) sigma^-1(sigma)."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, beta_d=19.9,
                 beta_min=0.1, M=1000, epsilon_t=1e-5, model_type="SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type,
                         img_channels, model_kwargs)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))

    def sigma(self, t):
        t = torch.as_tensor(t)  # float32 for a Python number, as EDM computes sigma_min/max
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt()
                - self.beta_min) / self.beta_d

    def coefficients(self, sigma):
        return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)


class VEPrecond(_Precond):
    """Variance exploding (NCSN++ baselines): c_skip = 1, c_out = sigma, c_in = 1,
    c_noise = ln(sigma / 2)."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0.02,
                 sigma_max=100, model_type="SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type,
                         img_channels, model_kwargs)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def coefficients(self, sigma):
        return 1, sigma, 1, (0.5 * sigma).log()


class iDDPMPrecond(_Precond):
    """Improved DDPM (ADM baselines): sigma restricted to the M + 1 levels u_j of the cosine
    schedule (buffer `u`); F predicts noise (first img_channels outputs; the rest are the
    variances iDDPM learns, unused); c_noise = M - 1 - j."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, C_1=0.001,
                 C_2=0.008, M=1000, model_type="DhariwalUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type,
                         img_channels * 2, model_kwargs)
        self.C_1, self.C_2, self.M = C_1, C_2, M
        # u_{j-1} = sqrt((u_j^2 + 1) / max(alpha_bar_{j-1} / alpha_bar_j, C_1) - 1), u_M = 0
        u = torch.zeros(M + 1)
        for j in range(M, 0, -1):
            ratio = (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=C_1)
            u[j - 1] = ((u[j] ** 2 + 1) / ratio - 1).sqrt()
        self.register_buffer("u", u)
        self.sigma_min, self.sigma_max = float(u[M - 1]), float(u[0])

    def alpha_bar(self, j):
        return (0.5 * math.pi * torch.as_tensor(j) / self.M / (self.C_2 + 1)).sin() ** 2

    def coefficients(self, sigma):
        index = self.round_sigma(sigma, return_index=True).to(torch.float32)
        return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), self.M - 1 - index

    def round_sigma(self, sigma, return_index=False):
        sigma = torch.as_tensor(sigma)
        # torch.cdist, not |sigma - u|: for many levels it takes the matmul route, whose rounding
        # decides near-ties; using it keeps the chosen level identical to EDM's
        distance = torch.cdist(sigma.to(self.u.device).to(torch.float32).reshape(1, -1, 1),
                               self.u.reshape(1, -1, 1))
        index = distance.argmin(2)
        result = index if return_index else self.u[index.flatten()].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)


class EDMPrecond(_Precond):
    """EDM's own preconditioning: c_skip = s_d^2 / (sigma^2 + s_d^2),
    c_out = sigma s_d / sqrt(sigma^2 + s_d^2), c_in = 1 / sqrt(sigma^2 + s_d^2),
    c_noise = ln(sigma) / 4, with s_d = sigma_data = 0.5."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                 sigma_max=float("inf"), sigma_data=0.5, model_type="DhariwalUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type,
                         img_channels, model_kwargs)
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data

    def coefficients(self, sigma):
        s_d = self.sigma_data
        c_skip = s_d ** 2 / (sigma ** 2 + s_d ** 2)
        c_out = sigma * s_d / (sigma ** 2 + s_d ** 2).sqrt()
        c_in = 1 / (s_d ** 2 + sigma ** 2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4


NETWORKS = {cls.__name__: cls for cls in (EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond,
                                          SongUNet, DhariwalUNet)}

# EDM's CIFAR-10 teachers (their train.py --arch=ddpmpp --precond=edm, augment 0.12, dropout 0.13):
# EDMPrecond(**CONFIGS[name]) has the architecture of the public edm-cifar10-32x32-*-vp.pkl.
_DDPMPP_CIFAR10 = dict(img_resolution=32, img_channels=3, model_type="SongUNet",
                       embedding_type="positional", encoder_type="standard",
                       decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1],
                       model_channels=128, channel_mult=[2, 2, 2], augment_dim=9, dropout=0.13)
CONFIGS = {"edm-cifar10-32x32-uncond-vp": dict(_DDPMPP_CIFAR10, label_dim=0),
           "edm-cifar10-32x32-cond-vp": dict(_DDPMPP_CIFAR10, label_dim=10)}
