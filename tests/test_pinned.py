"""Today's results, pinned: with no image condition (no source), every loss and the whole pipeline
must give what they gave before the image-to-image extension and the DDP / precision work.

The values below were computed at commit d42cc60 (before those changes) by this very file
(`python tests/test_pinned.py` prints them). Losses are pinned in float64 to 1e-12; the pipeline
(float32, several CPU kernels) by fingerprints of the gradients the optimizers saw (Adam's
exp_avg after steps at a negligible learning rate, see test_scale.py for why) and of the logged
losses, to 1e-4 relative plus 1e-5 absolute (a fresh fake model's loss is ~1e-7): rounding
differences between CPU hosts stay far below that, while a change of the mathematics, of the
noise draws or of the data order moves them by O(1).
"""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import distill  # noqa: E402
import finetune  # noqa: E402
import train_teacher  # noqa: E402
import unet  # noqa: E402
from conftest import FAST, TINY_NET, run, shapes_dataset  # noqa: E402


# ---------------------------------------------------------------------------------------------
# The losses on fixed float64 inputs

def _net(seed, d=4):
    g = torch.Generator().manual_seed(seed)
    w1 = 0.5 * torch.randn(d + 2, 8, generator=g, dtype=torch.float64)
    w2 = 0.5 * torch.randn(8, d, generator=g, dtype=torch.float64)
    params = [w1.requires_grad_(True), w2.requires_grad_(True)]

    def f(t, x, y=None):
        extra = torch.zeros_like(t) if y is None else y.to(x.dtype)
        return torch.tanh(torch.cat([x, t[:, None], extra[:, None]], 1) @ w1) @ w2
    return f, params


def _batch(seed=7, n=16, d=4):
    g = torch.Generator().manual_seed(seed)
    r = lambda: torch.randn(n, d, generator=g, dtype=torch.float64)  # noqa: E731
    return r(), r() + 1, r(), torch.rand(n, generator=g, dtype=torch.float64), \
        torch.randint(0, 3, (n,), generator=g)


def loss_values():
    """Each loss's value and the norm of its gradient (over x_g or f's parameters)."""
    f, f_params = _net(0)
    teacher, _ = _net(1)
    G, _ = _net(2)
    x_g, x_d, x0, t, y = _batch()
    out = {}
    for alpha, beta in [(1.0, 1.0), (0.94, 0.96), (0.98, 0.96), (1.0, 0.9)]:
        for label in (None, y):
            key = f"{alpha},{beta},{'y' if label is not None else '-'}"
            loss = distill.fake_model_loss(f, x_g, None if (alpha, beta) == (1, 1) else x_d,
                                           x0, t, label, alpha=alpha, beta=beta)
            grad = torch.autograd.grad(loss, f_params)
            out[f"fake {key}"] = [loss.item(), math.sqrt(sum((g * g).sum().item() for g in grad))]
            xg = x_g.clone().requires_grad_(True)
            loss = distill.generator_loss(teacher, f, xg, x0, t, label, alpha=alpha, beta=beta)
            out[f"gen {key}"] = [loss.item(), torch.autograd.grad(loss, xg)[0].norm().item()]
            for gamma in (alpha, 0.9):
                loss = distill.general_fake_model_loss(teacher, f, x_g, x_d, x0, t, label,
                                                       alpha=alpha, beta=beta, gamma=gamma)
                grad = torch.autograd.grad(loss, f_params)
                out[f"general fake {key},{gamma}"] = [
                    loss.item(), math.sqrt(sum((g * g).sum().item() for g in grad))]
                xg = x_g.clone().requires_grad_(True)
                loss = distill.general_generator_loss(teacher, f, xg, x0, t, label,
                                                      alpha=alpha, beta=beta, gamma=gamma)
                out[f"general gen {key},{gamma}"] = [
                    loss.item(), torch.autograd.grad(loss, xg)[0].norm().item()]
    D = lambda tt, x, yy=None: f(tt, x, yy)[:, :1]  # noqa: E731
    xg = x_g.clone().requires_grad_(True)
    loss = distill.gan_discriminator_loss(D, xg, x_d, x0, t, y)
    out["gan disc"] = [loss.item(), torch.autograd.grad(loss, xg)[0].norm().item()]
    xg = x_g.clone().requires_grad_(True)
    loss = distill.gan_generator_loss(D, xg, x0, t, y)
    out["gan gen"] = [loss.item(), torch.autograd.grad(loss, xg)[0].norm().item()]
    loss = train_teacher.flow_matching_loss(f, x_d, x0, t, y)
    grad = torch.autograd.grad(loss, f_params)
    out["flow matching"] = [loss.item(), math.sqrt(sum((g * g).sum().item() for g in grad))]
    out["generate"] = [distill.generate(G, x0, y).sum().item(),
                       distill.generate(G, x0).square().sum().item()]
    return out


# ---------------------------------------------------------------------------------------------
# The pipeline through the command lines, on a deterministic tiny teacher

TINY_CFG = dict(unet.PAPER_CONFIG, image_size=8, num_channels=32, channel_mult=[1],
                num_res_blocks=1, attention_resolutions=[8], num_heads=1, num_head_channels=-1)


def deterministic_teacher(path, num_classes):
    """A tiny teacher file whose weights come from a seeded generator (no training, so no
    rounding history): every layer, the zero-initialised ones too, gets N(0, 0.05^2)."""
    torch.manual_seed(0)
    net = unet.UNet(**dict(TINY_CFG, num_classes=num_classes))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    sd = net.state_dict()
    torch.save({"net_model": sd, "ema_models": {"0.999": sd}, "step": 0,
                "config": {"kind": "teacher", "net": net.config}}, path)


def fingerprint(tensors):
    """(norm, projection on a fixed random direction) of a list of tensors, in float64."""
    flat = torch.cat([t.detach().double().flatten() for t in tensors])
    direction = torch.from_numpy(np.random.default_rng(0).standard_normal(len(flat)))
    return [flat.norm().item(), (flat @ direction).item()]


def adam_grads(ckpt, name):
    state = ckpt[name]["state"]
    return [state[i]["exp_avg"] for i in sorted(state)]


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    keep = ("loss_fm", "loss_fake", "loss_gen", "loss_gan_disc", "loss_gan_gen", "grad_norm",
            "grad_norm_gen", "grad_norm_fake")
    return [[r[k] for k in keep if k in r] for r in rows if "step" in r and "fid" not in r]


def pipeline_values(tmp):
    """Runs every stage through its command line; returns the fingerprints to pin."""
    images, labels = shapes_dataset(64)
    np.savez(os.path.join(tmp, "uncond.npz"), images=images)
    np.savez(os.path.join(tmp, "cond.npz"), images=images, labels=labels)
    teachers = {}
    for kind, classes in (("uncond", None), ("cond", 3)):
        teachers[kind] = os.path.join(tmp, f"teacher_{kind}.pt")
        deterministic_teacher(teachers[kind], classes)
    out, values = {}, {}
    j = lambda *p: os.path.join(tmp, *p)  # noqa: E731

    # The teacher stage: 2 flow-matching updates from a fresh network, dropout on.
    run(train_teacher, ["--data", j("cond.npz"), "--cond", "--out", j("t"), "--steps", 2,
                        "--lr", 1e-3, "--warmup", 0, "--dropout", 0.1, *TINY_NET, *FAST])
    ckpt = torch.load(j("t", "latest.pt"), weights_only=True)
    values["teacher"] = records(j("t")) + [fingerprint(adam_grads(ckpt, "optim"))]

    slow = ["--steps", 2, "--fake-steps", 2, "--lr", 1e-9, "--warmup", 0, *FAST]
    runs = {
        "realuid": ["--teacher", teachers["uncond"], "--data", j("uncond.npz"),
                    "--alpha", 0.94, "--beta", 0.96],
        "datafree_cond": ["--teacher", teachers["cond"], "--data", j("missing.npz")],
        "general_gan_cond": ["--teacher", teachers["cond"], "--data", j("cond.npz"),
                             "--alpha", 0.98, "--beta", 0.96, "--gamma", 0.9,
                             "--gan-gen-coef", 0.3, "--gan-disc-coef", 1.0],
        "accum_cond": ["--teacher", teachers["cond"], "--data", j("cond.npz"), "--alpha", 0.94,
                       "--beta", 0.96, "--grad-accum", 2],
    }
    for name, argv in runs.items():
        run(distill, [*argv, "--out", j(name), *slow])
        ckpt = torch.load(j(name, "latest.pt"), weights_only=True)
        values[name] = records(j(name)) + [fingerprint(adam_grads(ckpt, "optim_u")),
                                           fingerprint(adam_grads(ckpt, "optim_gen"))]
        out[name] = j(name, "latest.pt")
    run(finetune, ["--teacher", teachers["uncond"], "--init-from", out["realuid"],
                   "--data", j("uncond.npz"), "--out", j("ft"), *slow])
    ckpt = torch.load(j("ft", "latest.pt"), weights_only=True)
    # (the generator's gradient is ~1e-6 here, f starting at v*: rounding, not pinned)
    values["finetune"] = records(j("ft")) + [fingerprint(adam_grads(ckpt, "optim_u"))]
    return values


# ---------------------------------------------------------------------------------------------
# Pinned at commit d42cc60 (python tests/test_pinned.py)

PINNED_LOSSES = {
    'fake 1.0,1.0,-': [3.1520966289504004, 5.936249263628692],
    'gen 1.0,1.0,-': [-3.1685764774170955, 1.5098802970629097],
    'general fake 1.0,1.0,-,1.0': [3.1685764774170955, 5.936249263628693],
    'general gen 1.0,1.0,-,1.0': [-3.1685764774170955, 1.5098802970629093],
    'general fake 1.0,1.0,-,0.9': [3.166199998219966, 5.9465570940013786],
    'general gen 1.0,1.0,-,0.9': [-2.872338076288685, 1.4870875778596773],
    'fake 1.0,1.0,y': [5.373729644031754, 8.39130930410967],
    'gen 1.0,1.0,y': [-4.403729228691425, 1.5037405035381453],
    'general fake 1.0,1.0,y,1.0': [4.403729228691425, 8.39130930410967],
    'general gen 1.0,1.0,y,1.0': [-4.403729228691425, 1.5037405035381453],
    'general fake 1.0,1.0,y,0.9': [4.462755819460119, 8.424269699591061],
    'general gen 1.0,1.0,y,0.9': [-3.952657021660718, 1.490040895343353],
    'fake 0.94,0.96,-': [3.028480035296621, 5.941997554946523],
    'gen 0.94,0.96,-': [-3.0119232833862832, 1.4460957451509322],
    'general fake 0.94,0.96,-,0.94': [3.070595504800958, 5.941997554946522],
    'general gen 0.94,0.96,-,0.94': [-3.0119232833862823, 1.4460957451509322],
    'general fake 0.94,0.96,-,0.9': [3.0696449131221053, 5.948933871027486],
    'general gen 0.94,0.96,-,0.9': [-2.893427922934919, 1.4368436718860245],
    'fake 0.94,0.96,y': [5.163097383892782, 8.130756117013613],
    'gen 0.94,0.96,y': [-4.182410073439904, 1.4422960676529601],
    'general fake 0.94,0.96,y,0.94': [4.288712813618575, 8.130756117013611],
    'general gen 0.94,0.96,y,0.94': [-4.182410073439904, 1.44229606765296],
    'general fake 0.94,0.96,y,0.9': [4.312323449926052, 8.146000330489485],
    'general gen 0.94,0.96,y,0.9': [-4.001981190627621, 1.4365723794474243],
    'fake 0.98,0.96,-': [3.0127852485202564, 5.931710125181542],
    'gen 0.98,0.96,-': [-3.071743553254539, 1.4529529723175147],
    'general fake 0.98,0.96,-,0.98': [3.05168404087008, 5.931710125181542],
    'general gen 0.98,0.96,-,0.98': [-3.0717435532545387, 1.4529529723175147],
    'general fake 0.98,0.96,-,0.9': [3.049782857512377, 5.9450113088934],
    'general gen 0.98,0.96,-,0.9': [-2.8347528323518114, 1.4345210054631445],
    'fake 0.98,0.96,y': [5.14096318074304, 8.128181081989515],
    'gen 0.98,0.96,y': [-4.272750045647633, 1.4449697498025547],
    'general fake 0.98,0.96,y,0.98': [4.289183191377621, 8.128181081989515],
    'general gen 0.98,0.96,y,0.98': [-4.272750045647632, 1.4449697498025547],
    'general fake 0.98,0.96,y,0.9': [4.336404463992578, 8.16030535002711],
    'general gen 0.98,0.96,y,0.9': [-3.911892280023067, 1.4336822513078928],
    'fake 1.0,0.9,-': [2.7841996944045855, 5.987795782148944],
    'gen 1.0,0.9,-': [-3.0012695043460265, 1.3770696664969742],
    'general fake 1.0,0.9,-,1.0': [2.8527060561359634, 5.987795782148943],
    'general gen 1.0,0.9,-,1.0': [-3.0012695043460265, 1.3770696664969742],
    'general fake 1.0,0.9,-,0.9': [2.850329576938834, 6.012713777322061],
    'general gen 1.0,0.9,-,0.9': [-2.7050311032176166, 1.3537580212640083],
    'fake 1.0,0.9,y': [4.764145731872794, 7.79784910254054],
    'gen 1.0,0.9,y': [-4.1892062363416045, 1.3611655791790682],
    'general fake 1.0,0.9,y,1.0': [4.117952107605727, 7.79784910254054],
    'general gen 1.0,0.9,y,1.0': [-4.189206236341604, 1.3611655791790684],
    'general fake 1.0,0.9,y,0.9': [4.176978698374421, 7.851907073686613],
    'general gen 1.0,0.9,y,0.9': [-3.7381340293108964, 1.3466533442814757],
    'gan disc': [1.561990894782127, 0.12996006494217008],
    'gan gen': [0.525323398589097, 0.08120222156984165],
    'flow matching': [4.402657959587222, 3.0915698938113274],
    'generate': [-3.6517306229620905, 93.13628118583762],
}
PINNED_PIPELINE = {
    'teacher': [
        [1.6612216234207153, 2.637993812561035],
        [1.5738182067871094, 2.527827024459839],
        [0.18801562730938745, -0.12465254873736177],
    ],
    'realuid': [
        [-4.925548751089082e-07, 0.23997841775417328, 10.784832000732422, 142.3421630859375],
        [-2.468338834660244e-06, 1.1461094617843628, 10.738710403442383, 137.2830047607422],
        [0.9999999409726761, 1.1947543926954547],
        [0.999999849335089, 0.9389519909391908],
    ],
    'datafree_cond': [
        [-2.0962241364941292e-07, -0.22425971925258636, 6.533351898193359, 128.10223388671875],
        [-1.2331413472566055e-06, -0.6597490310668945, 6.5047430992126465, 126.44336700439453],
        [0.999999971753288, 0.7213743596174584],
        [0.9999999373481916, -1.3797398150574458],
    ],
    'general_gan_cond': [
        [0.16104191541671753, -0.483907550573349, 1.408775806427002, 0.7746186852455139, 6.255941867828369, 136.91184997558594],
        [0.006097078323364258, 0.1697971075773239, 1.4115421772003174, 0.7669295072555542, 6.297080039978027, 134.81739807128906],
        [1.0000001049456695, -0.2957790189058702],
        [0.999999879639081, -1.3535568277912762],
    ],
    'accum_cond': [
        [-3.542565423231281e-07, -0.21934427320957184, 6.27212381362915, 132.09185791015625],
        [-1.672619987402868e-06, -0.6374749541282654, 6.244604587554932, 126.6436538696289],
        [0.9999999693228643, 0.6273048745473184],
        [0.9999998549969564, -1.3797453478197987],
    ],
    'finetune': [
        [-0.1876448392868042, -1.5476663861591078e-07, 9.072293778444873e-07, 18.580421447753906],
        [0.20082640647888184, 1.3323268603926408e-06, 8.086607294899295e-07, 17.375497817993164],
        [0.9999998229113333, 0.4423650504181903],
    ],
}


def close(a, b, rel, abs_=0.0):
    if isinstance(a, list):
        return len(a) == len(b) and all(close(x, y, rel, abs_) for x, y in zip(a, b))
    return abs(a - b) <= rel * max(abs(a), abs(b)) + abs_


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_losses_give_todays_values(float64):
    got = loss_values()
    assert sorted(got) == sorted(PINNED_LOSSES)
    bad = {k: (got[k], PINNED_LOSSES[k]) for k in got if not close(got[k], PINNED_LOSSES[k], 1e-12)}
    assert not bad, bad


def test_pipeline_gives_todays_results(tmp_path):
    got = pipeline_values(str(tmp_path))
    assert sorted(got) == sorted(PINNED_PIPELINE)
    bad = {k: (got[k], PINNED_PIPELINE[k]) for k in got
           if not close(got[k], PINNED_PIPELINE[k], 1e-4, 1e-5)}
    assert not bad, bad


if __name__ == "__main__":
    import contextlib
    import tempfile
    torch.set_default_dtype(torch.float64)
    losses = loss_values()
    torch.set_default_dtype(torch.float32)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        pipeline = pipeline_values(tmp)
    print("PINNED_LOSSES =", json.dumps(losses, indent=1))
    print("PINNED_PIPELINE =", json.dumps(pipeline, indent=1))
