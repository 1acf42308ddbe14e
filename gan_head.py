"""The GAN baseline's discriminator head on a denoiser's bottleneck (the paper's eqs. 7-9 and
Appendix D: the authors' `cls_pred_branch` on the U-Net's middle block), shared by the fields of
EDM / EDM2 networks (networks.DenoiserField) and of diffusers UNets (diffusers_teacher.py).
"""
import math

import torch


def discriminator_head(channels):
    """Logits [B, 1, h/4, w/4] from bottleneck features [B, channels, h, w]: two stride-2
    convolutions with GroupNorm (32 groups, at least four channels a group) and SiLU, then a
    1x1 convolution to one channel."""
    c, g = channels, math.gcd(32, max(channels // 4, 1))
    return torch.nn.Sequential(
        torch.nn.Conv2d(c, c, 2, stride=2), torch.nn.GroupNorm(g, c), torch.nn.SiLU(),
        torch.nn.Conv2d(c, c, 2, stride=2), torch.nn.GroupNorm(g, c), torch.nn.SiLU(),
        torch.nn.Conv2d(c, 1, 1))


class _Bottleneck(Exception):
    """Carries the bottleneck features out of a forward pass (bottleneck_logits)."""


def bottleneck_logits(field, block, head, t, x, y=None):
    """head(features) with the features `block` outputs when field(t, x, y) runs; the network
    runs up to there only (a hook stops it: the decoder is never evaluated)."""
    def stop(module, inputs, output):
        raise _Bottleneck(output)
    handle = block.register_forward_hook(stop)
    try:
        field(t, x, y)
    except _Bottleneck as b:
        return head(b.args[0].float())
    finally:
        handle.remove()
    raise RuntimeError("the network never reached its middle block")
