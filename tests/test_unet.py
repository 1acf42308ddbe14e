"""unet.UNet on its own (no torchcfm needed): shapes, zero start, closed forms, the paper network's
size and state-dict layout (tests/data/unet_paper_keys.txt), config round trip, input errors.
The comparison with torchcfm itself is in test_unet_reference.py."""

import json
import math
from pathlib import Path

import pytest
import torch

from unet import PAPER_CONFIG, AttentionBlock, UNet, timestep_embedding

KEYS_FILE = Path(__file__).parent / "data" / "unet_paper_keys.txt"

TINY = dict(image_size=8, num_channels=32, channel_mult=(1, 2), num_res_blocks=1,
            attention_resolutions="4", num_heads=2, num_head_channels=-1)
TINY_CONFIGS = {
    "tiny": TINY,
    "tiny_head_channels": dict(TINY, num_head_channels=16),
    "three_levels_gray": dict(image_size=16, in_channels=1, num_channels=32, channel_mult=[1, 1, 2],
                              num_res_blocks=2, attention_resolutions=[8, 4], num_head_channels=32),
    "no_attention_levels": dict(TINY, attention_resolutions="", channel_mult=(2, 1)),
}


def pseudo_uniform(shape, seed):
    """Uniform-looking numbers in [-1, 1] from a fixed formula rather than an RNG, so that they are
    the same on every platform and torch version and the golden values below stay valid."""
    k = torch.arange(math.prod(shape), dtype=torch.float64)
    u = torch.sin(12.9898 * k + 78.233 * seed) * 43758.5453
    return (2 * (u - u.floor()) - 1).float().reshape(shape)


def randomise_(net, seed=0):
    """Weights that make every layer act, the zero-initialised ones too: conv/linear weights of
    variance 1/fan_in, GroupNorm scales 1 +- 0.4, biases +- 0.4, label embeddings of variance 1."""
    with torch.no_grad():
        i = 0
        for module in net.modules():
            for name, p in module.named_parameters(recurse=False):
                u = pseudo_uniform(p.shape, 1000 * seed + i)
                if isinstance(module, torch.nn.Embedding):
                    p.copy_(3 ** 0.5 * u)
                elif p.dim() > 1:
                    p.copy_((3 / p[0].numel()) ** 0.5 * u)
                elif isinstance(module, torch.nn.GroupNorm) and name == "weight":
                    p.copy_(1 + 0.4 * u)
                else:
                    p.copy_(0.4 * u)
                i += 1
    return net.eval()


def inputs(net, batch=3, seed=1):
    cfg = net.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg["in_channels"], cfg["image_size"], cfg["image_size"], generator=g)
    t = torch.rand(batch, generator=g)
    y = None if cfg["num_classes"] is None else torch.randint(0, cfg["num_classes"], (batch,),
                                                             generator=g)
    return t, x, y


# Golden values, so that the numerics are pinned even where torchcfm is not installed: torchcfm
# 1.0.7's UNetModelWrapper on GOLDEN_CONFIG with randomise_(net, seed=3) and golden_inputs() gives
# these golden_summary() numbers. test_unet_reference.py checks them against torchcfm, and
# `PYTHONPATH=/opt/ref:. python tests/test_unet_reference.py` prints fresh ones.
GOLDEN_CONFIG = dict(image_size=16, in_channels=3, num_channels=32, num_res_blocks=1,
                     channel_mult=[1, 2, 2], attention_resolutions=[16, 8], num_heads=1,
                     num_head_channels=16, dropout=0.0, num_classes=10)
GOLDEN_SAMPLES = [0.358547, -0.477321, -0.245029, -0.155073, -0.061659, 0.302159,
                  0.078512, 0.151154, 0.214735, -0.018817, -0.151741, -0.336732]
GOLDEN_PROJECTION = 13.322613


def golden_inputs():
    return torch.tensor([0.3, 0.8]), pseudo_uniform((2, 3, 16, 16), seed=-1), torch.tensor([3, 7])


def golden_summary(out):
    """Every 128th output value, and the output projected on a fixed pseudo-random direction."""
    return out.flatten()[::128].tolist(), (out * pseudo_uniform(out.shape, seed=-2)).sum().item()


@pytest.fixture(scope="module")
def paper_nets():
    torch.manual_seed(0)
    return {"uncond": UNet(), "cond": UNet(num_classes=10), "head": UNet(gan_head=True)}


def paper_key_lines():
    """(name, shape, part) from the checked-in file; part is base, cond or head."""
    rows = [l.split() for l in KEYS_FILE.read_text().splitlines() if l and not l.startswith("#")]
    return [(name, tuple(int(s) for s in shape.split(",")), part) for name, shape, part in rows]


# --- shapes, zero start, dependence on the inputs ---------------------------------------------

@pytest.mark.parametrize("num_classes", [None, 10])
@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_fresh_net_has_output_shape_and_is_exactly_zero(name, num_classes):
    net = UNet(**TINY_CONFIGS[name], num_classes=num_classes)
    t, x, y = inputs(net)
    out = net(t, x, y)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(x))


def test_fresh_paper_net_outputs_zero(paper_nets):
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(paper_nets["uncond"](torch.rand(1), x), torch.zeros_like(x))


def test_exactly_the_residual_ends_and_the_output_start_at_zero(paper_nets):
    """Zero init: each residual block's last conv, each attention proj_out and the output conv
    (GroupNorm biases start at zero too); every other tensor is random or one."""
    names = [n for n, _ in paper_nets["uncond"].named_parameters()]
    zero_convs = [n for n in names
                  if ".out_layers.3." in n or ".proj_out." in n or n.startswith("out.2.")]
    norm_biases = [n for n in names if n.endswith(("in_layers.0.bias", "out_layers.0.bias",
                                                   "norm.bias", "out.0.bias"))]
    # 22 residual blocks, 6 attention blocks, 1 output conv / norm in the paper net
    assert (len(zero_convs), len(norm_biases)) == (2 * (22 + 6 + 1), 2 * 22 + 6 + 1)
    expected = [n for n in names if n in zero_convs or n in norm_biases]
    zero = [n for n, p in paper_nets["uncond"].named_parameters() if not p.any()]
    assert zero == expected


def test_output_depends_on_t_x_and_y():
    net = randomise_(UNet(**TINY, num_classes=10))
    t, x, y = inputs(net)
    with torch.no_grad():
        out = net(t, x, y)
        assert (net(1.0 - t, x, y) - out).abs().amax(dim=(1, 2, 3)).min() > 1e-3
        assert (net(t, torch.randn_like(x), y) - out).abs().amax(dim=(1, 2, 3)).min() > 1e-3
        assert (net(t, x, (y + 1) % 10) - out).abs().amax(dim=(1, 2, 3)).min() > 1e-3


@pytest.mark.parametrize("name", ["tiny", "three_levels_gray"])
def test_samples_do_not_mix_across_the_batch(name):
    """GroupNorm and attention act per sample: a wrong head/batch reshape would mix samples."""
    net = randomise_(UNet(**TINY_CONFIGS[name]))
    t, x, _ = inputs(net, batch=4)
    with torch.no_grad():
        together = net(t, x)
        alone = torch.cat([net(t[i:i + 1], x[i:i + 1]) for i in range(4)])
    assert (together - alone).abs().max() < 1e-5


def test_every_parameter_gets_a_gradient():
    net = randomise_(UNet(**TINY, num_classes=10, gan_head=True)).train()
    t, x, y = inputs(net)
    (net(t, x, y).square().sum() + net.forward_head(t, x, y).sum()).backward()
    assert [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()] == []


def test_t_as_python_float_or_0d_tensor_is_broadcast():
    net = randomise_(UNet(**TINY))
    _, x, _ = inputs(net)
    with torch.no_grad():
        full = net(torch.full((3,), 0.3), x)
        assert torch.equal(net(0.3, x), full)
        assert torch.equal(net(torch.tensor(0.3), x), full)
        assert torch.equal(net(torch.tensor(0.3, dtype=torch.float64), x), full)


def test_channels_last_and_autocast():
    net = randomise_(UNet(**TINY, num_classes=10))
    t, x, y = inputs(net)
    with torch.no_grad():
        out = net(t, x, y)
        net = net.to(memory_format=torch.channels_last)
        cl = net(t, x.to(memory_format=torch.channels_last), y)
        assert (cl - out).abs().max() < 1e-5
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(t, x, y)
    assert low.dtype == torch.bfloat16
    assert (low.float() - out).abs().max() < 0.05 * out.abs().max()


def test_golden_values_from_torchcfm():
    net = randomise_(UNet(**GOLDEN_CONFIG), seed=3)
    with torch.no_grad():
        samples, projection = golden_summary(net(*golden_inputs()))
    assert max(abs(a - b) for a, b in zip(samples, GOLDEN_SAMPLES)) < 1e-4
    assert abs(projection - GOLDEN_PROJECTION) < 1e-3


def test_compiles_as_one_graph():
    """No graph breaks (fullgraph=True); the eager backend keeps this fast on CPU."""
    net = randomise_(UNet(**TINY, num_classes=10))
    t, x, y = inputs(net)
    with torch.no_grad():
        out = torch.compile(net, fullgraph=True, backend="eager")(t, x, y)
        assert (out - net(t, x, y)).abs().max() < 1e-5


# --- closed forms -------------------------------------------------------------------------------

def test_time_embedding_closed_form():
    t = [0.0, 0.25, 1.0]
    dim = 8
    got = timestep_embedding(torch.tensor(t), dim)
    expected = [[math.cos(s * math.exp(-math.log(10000) * i / 4)) for i in range(4)]
                + [math.sin(s * math.exp(-math.log(10000) * i / 4)) for i in range(4)] for s in t]
    assert got.shape == (3, dim)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)


def test_attention_block_against_naive_legacy_attention():
    """Independent loop version: heads own consecutive 3*ch channel blocks [q_h; k_h; v_h]."""
    torch.manual_seed(0)
    c, heads, ch = 64, 2, 32
    block = AttentionBlock(c, heads)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.2)
        x = torch.randn(2, c, 3, 4)
        got = block(x)

        xs = x.reshape(2, c, 12)
        qkv = block.qkv(block.norm(xs))
        expected = torch.empty_like(xs)
        for b in range(2):
            for h in range(heads):
                q, k, v = (qkv[b, (3 * h + j) * ch:(3 * h + j + 1) * ch] for j in range(3))
                w = torch.softmax((q.T @ k) / math.sqrt(ch), dim=-1)  # [query T, key T]
                expected[b, h * ch:(h + 1) * ch] = v @ w.T
        expected = xs + block.proj_out(expected)
    assert (got - expected.reshape(x.shape)).abs().max() < 1e-5


# --- the paper network --------------------------------------------------------------------------

def test_paper_parameter_counts(paper_nets):
    def count(net):
        return sum(p.numel() for p in net.parameters())

    assert count(paper_nets["uncond"]) == 35_746_307
    assert count(paper_nets["cond"]) == 35_751_427
    assert count(paper_nets["head"]) - count(paper_nets["uncond"]) == 526_081
    assert len(paper_nets["uncond"].state_dict()) == 304
    assert len(paper_nets["cond"].state_dict()) == 305
    assert all(len(list(net.buffers())) == 0 for net in paper_nets.values())


def test_paper_state_dict_matches_checked_in_keys(paper_nets):
    rows = paper_key_lines()
    for net, parts in [(paper_nets["uncond"], {"base"}), (paper_nets["cond"], {"base", "cond"}),
                       (paper_nets["head"], {"base", "head"})]:
        expected = [(name, shape) for name, shape, part in rows if part in parts]
        assert [(k, tuple(v.shape)) for k, v in net.state_dict().items()] == expected
    assert paper_nets["uncond"].state_dict()["input_blocks.4.1.qkv.weight"].shape == (768, 256, 1)


def test_paper_config(paper_nets):
    assert paper_nets["uncond"].config == PAPER_CONFIG
    assert paper_nets["cond"].config == dict(PAPER_CONFIG, num_classes=10)


def test_forward_head_shapes(paper_nets):
    x = torch.randn(2, 3, 32, 32)
    assert paper_nets["head"].forward_head(torch.rand(2), x).shape == (2, 1, 1, 1)
    tiny = UNet(**TINY, gan_head=True)  # 4x4 bottleneck
    assert tiny.forward_head(0.5, torch.randn(3, 3, 8, 8)).shape == (3, 1, 1, 1)
    wider = UNet(**dict(TINY, image_size=16, attention_resolutions="8"), num_classes=10,
                 gan_head=True)  # 8x8 bottleneck
    out = wider.forward_head(0.5, torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 2]))
    assert out.shape == (3, 1, 2, 2)


# --- config round trip ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_config_rebuilds_the_same_network(name):
    net = randomise_(UNet(**TINY_CONFIGS[name], num_classes=5, gan_head=True))
    config = json.loads(json.dumps(net.config))
    assert config == net.config
    twin = UNet(**config).eval()
    assert twin.config == net.config
    twin.load_state_dict(net.state_dict(), strict=True)
    t, x, y = inputs(net)
    with torch.no_grad():
        assert torch.equal(twin(t, x, y), net(t, x, y))
        assert torch.equal(twin.forward_head(t, x, y), net.forward_head(t, x, y))


def test_attention_resolutions_spellings_agree():
    keys = [list(UNet(**dict(TINY, attention_resolutions=r)).state_dict())
            for r in ["4", "4,", [4], (4,), 4]]
    assert all(k == keys[0] for k in keys)
    assert any(".qkv." in k for k in keys[0] if k.startswith("input_blocks."))


# --- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, match", [
    (dict(num_channels=48), "multiple of 32"),
    (dict(channel_mult=(1, 1.5)), "multiple of 32"),
    (dict(image_size=10, channel_mult=(1, 2, 2)), "divisible by"),
    (dict(attention_resolutions="16"), "feature-map sizes"),
    (dict(num_heads=3), "divisible by num_heads"),
    (dict(num_head_channels=48), "num_head_channels"),
    (dict(num_res_blocks=0), "positive"),
    (dict(channel_mult=()), "positive"),
    (dict(num_classes=0), "num_classes"),
    (dict(dropout=1.0), "dropout"),
    (dict(image_size=4, gan_head=True), "GAN head"),
])
def test_bad_configs_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        UNet(**dict(TINY, **overrides))


def test_bad_inputs_raise():
    uncond, cond = UNet(**TINY), UNet(**TINY, num_classes=10)
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"expected x of shape \[B, 3, 8, 8\], got \[2, 1, 8, 8\]"):
        uncond(t, x[:, :1])
    with pytest.raises(ValueError, match=r"got \[2, 3, 16, 16\]"):
        uncond(t, torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"got \[3, 8, 8\]"):
        uncond(t, x[0])
    with pytest.raises(ValueError, match="unconditional"):
        uncond(t, x, y)
    with pytest.raises(ValueError, match="class conditional"):
        cond(t, x)
    with pytest.raises(ValueError, match=r"expected y of shape \[2\]"):
        cond(t, x, y[:1])
    with pytest.raises(ValueError, match=r"expected t of shape \[2\]"):
        uncond(torch.rand(3), x)
    with pytest.raises(RuntimeError, match="gan_head=True"):
        uncond.forward_head(t, x)
