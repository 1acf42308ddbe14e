"""The ADM-style U-Net used by RealUID for the teacher v*, the generator G and the fake model f.

A from-scratch re-implementation of torchcfm 1.0.7's `UNetModelWrapper` (itself openai
guided-diffusion's U-Net) with the same state-dict names, shapes and order, so that the authors'
checkpoints load with `strict=True` and give the same outputs (checked by
tests/test_unet_reference.py). `UNet()` is the paper's CIFAR-10 network (35,746,307 parameters;
35,751,427 with `num_classes=10`); `gan_head=True` adds the optional GAN discriminator head
`cls_pred_branch` of the authors' code (the GAN baseline of the paper's eqs. 7-9, 526,081
parameters more). `cond_channels=C` adds an image condition for image-to-image couplings
(Appendix C): the source s is concatenated to x along channels before the first convolution
(only that convolution grows; the output keeps x's channels). Without it (the default, 0) the
network and its state-dict keys are exactly torchcfm's.

Conventions (the paper's section 2, as in the authors' code):
- `net(t, x, y=None, s=None)` is the flow field v(t, x, y[, s]): t = 0 is noise (or a
  coupling's start), t = 1 is data, and t in [0, 1] enters the sinusoidal embedding as is (no
  x1000 rescaling).
- t: float tensor [B] (a 0-d tensor or a python float is broadcast to the batch);
  x: [B, C, H, W] images in [-1, 1]; y: int64 class labels [B], or None for unconditional nets;
  s: source images [B, cond_channels, H, W] for nets with cond_channels > 0, else None.
- The output has the shape of x. A fresh network outputs exactly 0 (the last layer of every
  residual branch and the output conv start at zero, as in torchcfm).
- `net.forward_head(t, x, y, s)` gives the GAN logits [B, 1, h, w] ([B, 1, 1, 1] on CIFAR-10).

Usage:
    net = UNet(num_classes=10)                    # paper CIFAR-10 net, class conditional
    v = net(torch.rand(8), torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    same = UNet(**net.config)                     # the config dict rebuilds the network
    same.load_state_dict(net.state_dict())        # also loads torchcfm / official state dicts
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

PAPER_CONFIG = dict(image_size=32, in_channels=3, num_channels=128, num_res_blocks=2,
                    channel_mult=[1, 2, 2, 2], attention_resolutions=[16], num_heads=4,
                    num_head_channels=64, dropout=0.0, num_classes=None, gan_head=False,
                    cond_channels=0)


def timestep_embedding(t, dim, max_period=10000.0):
    """Sinusoidal embedding [B, dim] of raw t [B]: cos(t * f_i) then sin(t * f_i),
    f_i = exp(-ln(max_period) * i / (dim / 2)), i = 0 .. dim/2 - 1 (guided-diffusion's order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def legacy_qkv_attention(qkv, num_heads):
    """Multi-head self-attention on qkv [B, 3*C, T] -> [B, C, T] in guided-diffusion's "legacy"
    channel order: the channels are split into heads first, then each head's 3*ch block into
    q, k, v (so the three are interleaved per head, not stacked as [q; k; v])."""
    b, width, length = qkv.shape
    ch = width // (3 * num_heads)
    q, k, v = qkv.reshape(b, num_heads, 3 * ch, length).transpose(2, 3).split(ch, dim=-1)
    # scaled_dot_product_attention rather than guided-diffusion's two einsums: on GPUs it runs
    # the fused flash / memory-efficient kernels (no [T, T] matrix in memory), which accumulate
    # the softmax in float32 just like the reference's explicit `softmax(weight.float())`, and
    # in float32 it matches the einsum version to rounding (on CPU, bit for bit: its math path
    # also scales q and k by ch**-0.25 each). scale = ch**-0.5 is that ch**-0.25 on both.
    a = F.scaled_dot_product_attention(q, k, v, scale=ch ** -0.5)  # [B, heads, T, ch]
    return a.transpose(2, 3).reshape(b, num_heads * ch, length)


def zero_init(module):
    """Zero all parameters of `module` and return it: the residual branches start as identities
    and the network as a whole starts at v = 0."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups computed in float32 and cast back, so that fp16/bf16 activations
    are normalised with float32 statistics (as in guided-diffusion)."""

    def __init__(self, channels):
        super().__init__(32, channels)

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


class EmbedSequential(nn.Sequential):
    """nn.Sequential that also hands the embedding to the residual blocks among its layers."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class ResBlock(nn.Module):
    """GN-SiLU-conv3x3, + Linear(SiLU(emb)), GN-SiLU-dropout-conv3x3 (zero init), + skip."""

    def __init__(self, in_ch, out_ch, emb_dim, dropout):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(in_ch), nn.SiLU(),
                                       nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch))
        self.out_layers = nn.Sequential(GroupNorm32(out_ch), nn.SiLU(), nn.Dropout(dropout),
                                        zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1)))
        self.skip_connection = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Pre-norm self-attention over all spatial positions, residual, 1x1 Conv1d projections."""

    def __init__(self, channels, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_init(nn.Conv1d(channels, channels, 1))

    def forward(self, x):
        b, c, height, width = x.shape
        x = x.reshape(b, c, height * width)
        h = legacy_qkv_attention(self.qkv(self.norm(x)), self.num_heads)
        return (x + self.proj_out(h)).reshape(b, c, height, width)


class Downsample(nn.Module):
    """Learned stride-2 3x3 conv (guided-diffusion's conv_resample=True, not average pooling)."""

    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _parse_resolutions(attention_resolutions):
    if isinstance(attention_resolutions, str):  # torchcfm's "16" or "16,8"
        return [int(r) for r in attention_resolutions.split(",") if r.strip()]
    if isinstance(attention_resolutions, int):
        return [attention_resolutions]
    return [int(r) for r in attention_resolutions]


class UNet(nn.Module):
    """ADM U-Net v(t, x, y); the defaults are the paper's CIFAR-10 network (see module docstring).

    attention_resolutions: feature-map sizes (e.g. "16", "16,8", [16]) that get self-attention
    after each residual block; the middle block always has one. num_head_channels=-1 means
    `num_heads` heads everywhere, otherwise heads of `num_head_channels` channels each.
    """

    def __init__(self, image_size=32, in_channels=3, num_channels=128, num_res_blocks=2,
                 channel_mult=(1, 2, 2, 2), attention_resolutions="16", num_heads=4,
                 num_head_channels=64, dropout=0.0, num_classes=None, gan_head=False,
                 cond_channels=0):
        super().__init__()
        attn_res = _parse_resolutions(attention_resolutions)
        self.config = dict(image_size=image_size, in_channels=in_channels,
                           num_channels=num_channels, num_res_blocks=num_res_blocks,
                           channel_mult=list(channel_mult), attention_resolutions=attn_res,
                           num_heads=num_heads, num_head_channels=num_head_channels,
                           dropout=float(dropout), num_classes=num_classes,
                           gan_head=bool(gan_head), cond_channels=int(cond_channels))
        chans = [int(m * num_channels) for m in channel_mult]
        levels = len(chans)
        sizes = [image_size // 2 ** i for i in range(levels)]
        if not chans or min(chans + [image_size, in_channels, num_res_blocks]) < 1:
            raise ValueError(f"UNet: image_size, in_channels, num_res_blocks and channel counts "
                             f"must be positive, got {self.config}")
        if any(c % 32 for c in chans):
            raise ValueError(f"UNet: GroupNorm uses 32 groups, so every level's channel count "
                             f"num_channels * channel_mult must be a multiple of 32, got {chans}")
        if image_size % 2 ** (levels - 1):
            raise ValueError(f"UNet: image_size {image_size} must be divisible by "
                             f"2**(len(channel_mult) - 1) = {2 ** (levels - 1)}")
        if any(r not in sizes for r in attn_res):
            raise ValueError(f"UNet: attention_resolutions {attn_res} must be feature-map sizes "
                             f"of this network, i.e. among {sizes}")
        if cond_channels < 0:
            raise ValueError(f"UNet: cond_channels must be >= 0, got {cond_channels}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"UNet: num_classes must be None or positive, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"UNet: dropout must be in [0, 1), got {dropout}")
        attn_chans = [c for c, s in zip(chans, sizes) if s in attn_res] + [chans[-1]]
        head_width = num_heads if num_head_channels == -1 else num_head_channels
        if head_width < 1 or any(c % head_width for c in attn_chans):
            raise ValueError(f"UNet: attention channels {sorted(set(attn_chans))} must be "
                             f"divisible by num_heads={num_heads} (num_head_channels=-1) or by "
                             f"num_head_channels={num_head_channels}")
        if gan_head and sizes[-1] < 4:
            raise ValueError(f"UNet: the GAN head halves the {sizes[-1]}x{sizes[-1]} bottleneck "
                             f"twice, which needs at least 4x4")
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        self.cond_channels = cond_channels
        self.num_channels = num_channels

        def attention(ch):
            return AttentionBlock(ch, num_heads if num_head_channels == -1
                                  else ch // num_head_channels)

        emb_dim = 4 * num_channels
        self.time_embed = nn.Sequential(nn.Linear(num_channels, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        # Encoder. `skip_chans` records what each input block hands to the decoder.
        ch = chans[0]
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels + cond_channels,
                                                                     ch, 3, padding=1))])
        skip_chans = [ch]
        for level, (out_ch, size) in enumerate(zip(chans, sizes)):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, out_ch, emb_dim, dropout)]
                ch = out_ch
                if size in attn_res:
                    layers.append(attention(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_chans.append(ch)
            if level < levels - 1:
                self.input_blocks.append(EmbedSequential(Downsample(ch)))
                skip_chans.append(ch)

        self.middle_block = EmbedSequential(ResBlock(ch, ch, emb_dim, dropout), attention(ch),
                                            ResBlock(ch, ch, emb_dim, dropout))

        # Decoder: one more block per level than the encoder, so each one takes a skip.
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chans.pop(), chans[level], emb_dim, dropout)]
                ch = chans[level]
                if sizes[level] in attn_res:
                    layers.append(attention(ch))
                if level > 0 and i == num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(),
                                 zero_init(nn.Conv2d(ch, in_channels, 3, padding=1)))

        # The authors' layout (indices 0, 1, 3, 4, 6 carry parameters). Their norms are plain
        # nn.GroupNorm(32); GroupNorm32 is the same in float32 and safer under autocast.
        if gan_head:
            c = chans[-1]
            self.cls_pred_branch = nn.Sequential(
                nn.Conv2d(c, c, 2, stride=2), GroupNorm32(c), nn.SiLU(),
                nn.Conv2d(c, c, 2, stride=2), GroupNorm32(c), nn.SiLU(),
                nn.Conv2d(c, 1, 1))

    def _encode(self, t, x, y, s):
        """Checks the inputs; returns the bottleneck features, the skips and the embedding."""
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"UNet: expected x of shape [B, {', '.join(map(str, expected))}], "
                             f"got {list(x.shape)}")
        batch = x.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        if t.dim() == 0:
            t = t.expand(batch)
        elif tuple(t.shape) != (batch,):
            raise ValueError(f"UNet: expected t of shape [{batch}] or a scalar, "
                             f"got {list(t.shape)}")
        emb = self.time_embed(timestep_embedding(t, self.num_channels))
        if self.num_classes is None:
            if y is not None:
                raise ValueError("UNet: got class labels y, but the network is unconditional "
                                 "(num_classes=None)")
        else:
            if y is None:
                raise ValueError(f"UNet: the network is class conditional "
                                 f"(num_classes={self.num_classes}): pass labels y of shape [B]")
            if tuple(y.shape) != (batch,):
                raise ValueError(f"UNet: expected y of shape [{batch}], got {list(y.shape)}")
            emb = emb + self.label_emb(y)
        h = x
        if self.cond_channels:
            expected = (batch, self.cond_channels, self.image_size, self.image_size)
            if s is None or tuple(s.shape) != expected:
                raise ValueError(f"UNet: the network is image conditional (cond_channels="
                                 f"{self.cond_channels}): pass a source s of shape "
                                 f"{list(expected)}, got {None if s is None else list(s.shape)}")
            h = torch.cat([x, s.to(x.dtype)], dim=1)
        elif s is not None:
            raise ValueError("UNet: got a source image s, but the network has no image condition "
                             "(cond_channels=0)")
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        return self.middle_block(h, emb), skips, emb

    def forward(self, t, x, y=None, s=None):
        """v(t, x, y, s) with t [B] (or scalar) in [0, 1], x [B, C, H, W], y int64 [B] or None,
        s [B, cond_channels, H, W] or None."""
        h, skips, emb = self._encode(t, x, y, s)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)

    def forward_head(self, t, x, y=None, s=None):
        """GAN discriminator logits [B, 1, h, w] from the bottleneck after the middle block."""
        if not hasattr(self, "cls_pred_branch"):
            raise RuntimeError("UNet: this network has no GAN head; build it with gan_head=True")
        return self.cls_pred_branch(self._encode(t, x, y, s)[0])
