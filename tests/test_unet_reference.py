"""unet.UNet against the reference it re-implements: torchcfm 1.0.7's UNetModelWrapper (used by the
authors' code) and the authors' GAN head `cls_pred_branch` (the GAN baseline of eqs. 7-9).

Skipped when torchcfm is not importable. Run with the reference on the path:
    PYTHONPATH=/opt/ref python -m pytest tests/test_unet_reference.py
Running this file as a script rewrites tests/data/unet_paper_keys.txt from torchcfm and prints the
golden values that tests/test_unet.py pins:
    PYTHONPATH=/opt/ref:. python tests/test_unet_reference.py
"""

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn

if importlib.util.find_spec("torchcfm") is not None and importlib.util.find_spec("ot") is None:
    # torchcfm/__init__.py imports POT (`ot`) for its OT samplers; the U-Net never touches it.
    sys.modules.setdefault("ot", types.ModuleType("ot"))
tcfm = pytest.importorskip("torchcfm.models.unet.unet", reason="torchcfm is not importable")

# The golden values pinned by test_unet.py (which must run without torchcfm) are checked here.
from test_unet import (GOLDEN_CONFIG, GOLDEN_PROJECTION, GOLDEN_SAMPLES,  # noqa: E402
                       golden_inputs, golden_summary)
from test_unet import randomise_ as pseudo_randomise_  # noqa: E402
from unet import PAPER_CONFIG, UNet  # noqa: E402

KEYS_FILE = Path(__file__).parent / "data" / "unet_paper_keys.txt"

PAPER = dict(PAPER_CONFIG)
TINY_8 = dict(image_size=8, in_channels=3, num_channels=32, num_res_blocks=1, channel_mult=[1, 2],
              attention_resolutions=[4], num_heads=2, num_head_channels=-1, dropout=0.0,
              num_classes=None)
TINY_16 = dict(image_size=16, in_channels=3, num_channels=32, num_res_blocks=1,
               channel_mult=[1, 2, 2], attention_resolutions=[16, 8], num_heads=1,
               num_head_channels=16, dropout=0.0, num_classes=10)
TINY_16_GRAY = dict(image_size=16, in_channels=1, num_channels=64, num_res_blocks=2,
                    channel_mult=[1, 1], attention_resolutions=[16], num_heads=4,
                    num_head_channels=-1, dropout=0.0, num_classes=None)
# name -> (our UNet kwargs, batch size)
CONFIGS = {
    "paper_uncond": (dict(PAPER, dropout=0.1), 1),
    "paper_cond": (dict(PAPER, num_classes=10), 2),
    "celeba_64": (dict(PAPER, image_size=64), 1),
    "tiny_8": (TINY_8, 3),
    "tiny_16_cond": (TINY_16, 3),
    "tiny_16_gray": (TINY_16_GRAY, 2),
}


def reference_unet(cfg):
    """torchcfm's network for one of our configs."""
    s = cfg["image_size"]
    return tcfm.UNetModelWrapper(
        dim=(cfg["in_channels"], s, s), num_channels=cfg["num_channels"],
        num_res_blocks=cfg["num_res_blocks"], channel_mult=list(cfg["channel_mult"]),
        num_heads=cfg["num_heads"], num_head_channels=cfg["num_head_channels"],
        attention_resolutions=",".join(str(r) for r in cfg["attention_resolutions"]),
        dropout=cfg["dropout"], class_cond=cfg["num_classes"] is not None,
        num_classes=cfg["num_classes"] or 10)


def authors_head(c):
    """The authors' discriminator head (RealUID src/models.py, eqs. 7-9), by layout."""
    return nn.Sequential(nn.Conv2d(c, c, kernel_size=2, stride=2), nn.GroupNorm(32, c), nn.SiLU(),
                         nn.Conv2d(c, c, kernel_size=2, stride=2), nn.GroupNorm(32, c), nn.SiLU(),
                         nn.Conv2d(c, 1, kernel_size=1))


def randomise_(module, seed):
    """Gaussian weights that make every layer act, the zero-initialised ones included: conv/linear
    weights of variance 1/fan_in, GroupNorm scales 1 + N(0, 0.2^2), biases N(0, 0.2^2), label
    embeddings N(0, 1). (A flat std of 0.05 leaves the attention almost uniform and the time path
    almost invisible: a wrong attention scale or embedding frequency then passed at 1e-4.)"""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                if isinstance(m, nn.Embedding):
                    p.normal_(0.0, 1.0, generator=g)
                elif p.dim() > 1:
                    p.normal_(0.0, p[0].numel() ** -0.5, generator=g)
                else:
                    p.normal_(1.0 if isinstance(m, nn.GroupNorm) and name == "weight" else 0.0,
                              0.2, generator=g)
    return module


def inputs(cfg, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    s = cfg["image_size"]
    x = torch.randn(batch, cfg["in_channels"], s, s, generator=g)
    t = torch.rand(batch, generator=g)
    y = None if cfg["num_classes"] is None else torch.randint(0, cfg["num_classes"], (batch,),
                                                             generator=g)
    return t, x, y


def paper_key_lines():
    """`name shape part` per state-dict entry of the authors' conditional paper network with the
    GAN head, in order; part says which networks hold it: base (all), cond, head."""
    base = reference_unet(PAPER).state_dict()
    cond = reference_unet(dict(PAPER, num_classes=10)).state_dict()
    head = {f"cls_pred_branch.{k}": v for k, v in authors_head(256).state_dict().items()}
    lines = []
    for name, v in list(cond.items()) + list(head.items()):
        part = "head" if name in head else "base" if name in base else "cond"
        lines.append(f"{name} {','.join(map(str, v.shape))} {part}")
    return lines


def write_keys_file():
    header = ["# State dict of the paper CIFAR-10 U-Net, in order: `name shape part`; part is base",
              "# (every network), cond (only num_classes=10) or head (only gan_head=True).",
              "# Regenerate from torchcfm 1.0.7 + the authors' cls_pred_branch layout with:",
              "# PYTHONPATH=/opt/ref:. python tests/test_unet_reference.py"]
    KEYS_FILE.parent.mkdir(parents=True, exist_ok=True)
    KEYS_FILE.write_text("\n".join(header + paper_key_lines()) + "\n")


def test_keys_file_matches_torchcfm():
    lines = [l for l in KEYS_FILE.read_text().splitlines() if l and not l.startswith("#")]
    assert lines == paper_key_lines()


def reference_golden_summary():
    ref = pseudo_randomise_(reference_unet(GOLDEN_CONFIG), seed=3)
    with torch.no_grad():
        return golden_summary(ref(*golden_inputs()))


def test_golden_values_in_test_unet_are_torchcfm_outputs():
    samples, projection = reference_golden_summary()
    assert max(abs(a - b) for a, b in zip(samples, GOLDEN_SAMPLES)) < 1e-5
    assert abs(projection - GOLDEN_PROJECTION) < 1e-4


@pytest.mark.parametrize("name", CONFIGS)
def test_same_state_dict_layout_and_outputs(name):
    cfg, batch = CONFIGS[name]
    torch.manual_seed(0)
    ref = randomise_(reference_unet(cfg), seed=0).eval()
    net = UNet(**cfg).eval()
    assert [(k, v.shape) for k, v in net.state_dict().items()] == \
           [(k, v.shape) for k, v in ref.state_dict().items()]
    assert [n for n, _ in net.named_parameters()] == [n for n, _ in ref.named_parameters()]
    net.load_state_dict(ref.state_dict(), strict=True)
    t, x, y = inputs(cfg, batch)
    with torch.no_grad():
        expected, got = ref(t, x, y), net(t, x, y)
    assert expected.abs().max() > 1e-2  # the comparison is not between two near-zero tensors
    assert (got - expected).abs().max() < 1e-4
    if y is not None:  # and the labels matter, in the same way
        with torch.no_grad():
            assert (ref(t, x, (y + 1) % 10) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["paper_cond", "tiny_16_gray"])
def test_same_initialisation_under_the_same_seed(name):
    """Layers are created in the reference's order with the same default inits (and the same
    zero-initialised layers), so a fixed seed gives identical fresh weights."""
    cfg = CONFIGS[name][0]
    torch.manual_seed(7)
    ref = reference_unet(cfg)
    torch.manual_seed(7)
    net = UNet(**cfg)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                 ref.state_dict().values()))


@pytest.mark.parametrize("name", ["tiny_8", "tiny_16_cond"])
def test_dropout_in_the_same_place(name):
    """In train mode both networks draw the same dropout masks only if the Dropout layers sit at
    the same places and run in the same order."""
    cfg = dict(CONFIGS[name][0], dropout=0.3)
    ref = randomise_(reference_unet(cfg), seed=2).train()
    net = UNet(**cfg).train()
    net.load_state_dict(ref.state_dict(), strict=True)
    t, x, y = inputs(cfg, 2)
    with torch.no_grad():
        torch.manual_seed(5)
        expected = ref(t, x, y)
        torch.manual_seed(5)
        got = net(t, x, y)
        assert (got - expected).abs().max() < 1e-4
        assert (net.eval()(t, x, y) - expected).abs().max() > 1e-3  # dropout did act


@pytest.mark.parametrize("cfg", [PAPER, dict(TINY_16, image_size=32)], ids=["paper", "tiny_32"])
def test_gan_head_matches_authors(cfg):
    ref = randomise_(reference_unet(cfg), seed=3).eval()
    c = cfg["num_channels"] * cfg["channel_mult"][-1]
    head = randomise_(authors_head(c), seed=4).eval()
    net = UNet(**dict(cfg, gan_head=True)).eval()
    ours = {k: v.shape for k, v in net.state_dict().items() if k.startswith("cls_pred_branch.")}
    assert ours == {f"cls_pred_branch.{k}": v.shape for k, v in head.state_dict().items()}
    assert list(net.state_dict())[-len(ours):] == list(ours)  # the head comes last, as theirs
    sd = ref.state_dict() | {f"cls_pred_branch.{k}": v for k, v in head.state_dict().items()}
    net.load_state_dict(sd, strict=True)

    t, x, y = inputs(cfg, 2)
    with torch.no_grad():  # the authors' forward_head: encoder and middle block, then the head
        emb = ref.time_embed(tcfm.timestep_embedding(t, ref.model_channels))
        if y is not None:
            emb = emb + ref.label_emb(y)
        h = x
        for block in ref.input_blocks:
            h = block(h, emb)
        expected = head(ref.middle_block(h, emb))
        got = net.forward_head(t, x, y)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < 1e-4


if __name__ == "__main__":
    write_keys_file()
    print(f"wrote {KEYS_FILE}")
    samples, projection = reference_golden_summary()
    print(f"GOLDEN_SAMPLES = {[round(v, 6) for v in samples]}")
    print(f"GOLDEN_PROJECTION = {projection:.6f}")
