"""The diffusion path, pinned: distill.py on an EDM pickle, as tests/test_pinned.py pins the
flow-matching path (which it does not reach: no EDM teacher, no SiD law or weight, and its
learning rate 1e-9 leaves the EMAs equal to the generator).

Four witnesses, each a few summary numbers per tensor group:
- an EDM-pickle RealUID run through the command line (class-conditional, real data, the
  diffusion defaults: EDM's law of t and weight for the fake model, SiD's for the generator,
  f from the teacher): the logged losses and the fake model's gradient (Adam's exp_avg after 2
  steps at a negligible learning rate, see tests/test_scale.py for why); the generator's
  gradient is not pinned there: f starts at v*, so it is the rounding of f - v* ~ 0;
- SiD (--recipe sid): one fake-model and one generator update through distill.py's setup /
  fake_update / generator_update, on a fake model moved off the teacher (fixed offsets), so
  that SiD's generator gradient (gamma 2.4, its weight and normalisation) is not zero;
- one fake-model update under the diffusion defaults with real data: the law of t drawn, the
  loss, the gradient;
- the EMAs after two updates at lr 1e-3: per tensor group the distance of each EMA (decays
  0.7 and 0.9) to the teacher and to the generator.

The teachers are tiny DDPM++ EDMPrecond networks (augment_dim 9, as EDM's CIFAR-10 pickles)
with tests/test_edm.py's well-conditioned deterministic weights (set_pin_weights), so that
float32 rounding stays rounding. Summaries are float64 sums; the tolerance (TOL) is about ten
times the largest change measured when the same runs are repeated with 1 and 2 threads and with
other kernels (ATEN_CPU_CAPABILITY=default / avx2, MKL_CBWR=COMPATIBLE / AVX / AVX2,
DNNL_MAX_CPU_ISA=AVX2 / SSE41), which stand in for other x86 hosts; a change of the mathematics
or of the noise moves these numbers by far more. Mutations of distill.py that turn them red
(checked when the values were pinned): EDM's law of t fed uniform numbers (all four), the
fake-model weight ignored (all four), the EMAs replaced by the raw weights (ema_run), SiD's
generator weight dropped (sid_updates, ema_run), --gen-gamma ignored (sid_updates).
`python tests/test_pinned_diffusion.py` prints the values again.
"""
import json
import os
import sys

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import distill  # noqa: E402
import edm  # noqa: E402
import players  # noqa: E402
import teachers  # noqa: E402
from conftest import FAST, run, shapes_dataset  # noqa: E402
from test_edm import ARCHS, _hash_uniform, set_pin_weights, write_edm_pickle  # noqa: E402


def edm_teacher(path, label_dim):
    """A tiny EDM pickle (DDPM++ EDMPrecond, 8x8, augment_dim 9) with deterministic weights."""
    kwargs = dict(ARCHS["ddpmpp"], img_channels=3, label_dim=label_dim)
    net = set_pin_weights(edm.EDMPrecond(**kwargs)).eval()
    write_edm_pickle(path, net, kwargs)
    return str(path)


def inputs(tmp):
    images, labels = shapes_dataset(64)
    np.savez(os.path.join(tmp, "uncond.npz"), images=images)
    np.savez(os.path.join(tmp, "cond.npz"), images=images, labels=labels)
    return {"uncond": edm_teacher(os.path.join(tmp, "edm-uncond.pkl"), 0),
            "cond": edm_teacher(os.path.join(tmp, "edm-cond.pkl"), 3),
            "uncond_data": os.path.join(tmp, "uncond.npz"),
            "cond_data": os.path.join(tmp, "cond.npz")}


GROUPS = ("map_", "enc.", "dec.")  # embedding layers, encoder, decoder of the U-Net


def group_of(name):
    return next(g for g in GROUPS if f"model.{g}" in name)


def fingerprint(tensors):
    """(norm, projection on a fixed random direction) of a list of tensors, in float64."""
    flat = torch.cat([t.detach().double().flatten() for t in tensors])
    direction = torch.from_numpy(np.random.default_rng(0).standard_normal(len(flat)))
    return [flat.norm().item(), (flat @ direction).item()]


def grads_by_group(ckpt_or_opt, net_sd_names):
    """Adam's exp_avg (beta1 = 0: the last update's gradient) fingerprinted per group; the
    optimizer state is indexed like the network's parameters."""
    state = ckpt_or_opt["state"]
    out = {}
    for g in GROUPS:
        ids = [i for i, name in enumerate(net_sd_names) if group_of(name) == g]
        out[g] = fingerprint([state[i]["exp_avg"] for i in ids if i in state])
    return out


def param_names(sd):
    """Parameter names in parameter order: the state dict's names less its buffers (in these
    networks only the resampling filters)."""
    return [k for k in sd if not k.endswith("resample_filter")]


def records(out, keys=("loss_fake", "loss_gen", "grad_norm_fake", "grad_norm_gen")):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [[r[k] for k in keys] for r in rows if "step" in r and "loss_fake" in r]


def setup(argv):
    args = distill.parse_args([str(a) for a in argv])
    return args, distill.setup(args, players.Process("cpu"))


def offset_fake(state, scale=0.05):
    """Moves the fake model off the teacher by fixed offsets (no RNG)."""
    with torch.no_grad():
        for i, p in enumerate(state.fake.parameters()):
            p.add_(scale * _hash_uniform(p.numel(), 1000 + i).reshape(p.shape).to(p.dtype))


# ---------------------------------------------------------------------------------------------
# The four witnesses

def realuid_run(tmp, files):
    out = os.path.join(tmp, "realuid")
    run(distill, ["--teacher", files["cond"], "--data", files["cond_data"], "--alpha", 0.94,
                  "--beta", 0.96, "--steps", 2, "--fake-steps", 2, "--lr", 1e-9, "--warmup", 0,
                  "--out", out, *FAST])
    ckpt = torch.load(os.path.join(out, "latest.pt"), weights_only=True)
    saved = ckpt["config"]["args"]
    assert (saved["fake_t"], saved["fake_weight"], saved["gen_t"], saved["gen_weight"],
            saved["fake_init"]) == ("edm", "edm", "sid", "sid", "teacher")
    names = param_names(ckpt["u"])
    assert len(names) == len(ckpt["optim_u"]["state"])
    # (loss_gen and grad_norm_gen are the rounding of f - v* ~ 0 here: not pinned)
    return {"records": records(out, ("loss_fake", "grad_norm_fake")),
            "fake_grads": grads_by_group(ckpt["optim_u"], names)}


def sid_updates(tmp, files):
    args, state = setup(["--teacher", files["uncond"], "--recipe", "sid", "--dropout", 0,
                         "--lr", 1e-9, "--batch-size", 8, "--device", "cpu", "--workers", 0,
                         "--out", os.path.join(tmp, "sid")])
    assert (args.gen_gamma, args.gen_weight, args.gen_t, args.grad_clip) == (2.4, "sid", "sid", 0)
    offset_fake(state)
    fake_terms, fake_norm = distill.fake_update(state, args, distill.draw(state, args, args.fake_t))
    gen_terms, gen_norm = distill.generator_update(state, args,
                                                   distill.draw(state, args, args.gen_t))
    names = [n for n, _ in state.gen.named_parameters()]
    return {"losses": [fake_terms["loss_fake"].item(), fake_norm.item(),
                       gen_terms["loss_gen"].item(), gen_norm.item()],
            "fake_grads": grads_by_group(state.fake_player.opt.state_dict(), names),
            "gen_grads": grads_by_group(state.gen_player.opt.state_dict(), names)}


def fake_update_defaults(tmp, files):
    args, state = setup(["--teacher", files["uncond"], "--data", files["uncond_data"],
                         "--alpha", 0.94, "--beta", 0.96, "--lr", 1e-9, "--batch-size", 8,
                         "--device", "cpu", "--workers", 0, "--out", os.path.join(tmp, "fake")])
    assert (args.fake_t, args.fake_weight, args.fake_init) == ("edm", "edm", "teacher")
    batch = distill.draw(state, args, args.fake_t)
    t = batch["t"].double()
    terms, norm = distill.fake_update(state, args, batch)
    names = [n for n, _ in state.fake.named_parameters()]
    return {"t": [t.sum().item(), t.square().sum().item(), t.min().item()],
            "losses": [terms["loss_fake"].item(), norm.item()],
            "fake_grads": grads_by_group(state.fake_player.opt.state_dict(), names)}


def ema_run(tmp, files):
    out = os.path.join(tmp, "ema")
    run(distill, ["--teacher", files["uncond"], "--steps", 2, "--fake-steps", 1, "--lr", 1e-3,
                  "--warmup", 0, "--ema", 0.7, 0.9, "--out", out, *FAST])
    ckpt = torch.load(os.path.join(out, "latest.pt"), weights_only=True)
    teacher = edm_teacher_sd(files["uncond"])
    gen = ckpt["gen"]
    values = {}
    for key, ema in sorted(ckpt["ema_gens"].items()):
        for g in GROUPS:
            names = [n for n in ema if group_of(n) == g and not n.endswith("resample_filter")]
            to_teacher = torch.cat([(ema[n].double() - teacher[n].double()).flatten()
                                    for n in names])
            to_gen = torch.cat([(ema[n].double() - gen[n].double()).flatten() for n in names])
            values[f"{key} {g}"] = [to_teacher.norm().item(), to_gen.norm().item()]
    for g in GROUPS:
        names = [n for n in gen if group_of(n) == g and not n.endswith("resample_filter")]
        values[f"gen {g}"] = [torch.cat([(gen[n].double() - teacher[n].double()).flatten()
                                         for n in names]).norm().item()]
    return values


def edm_teacher_sd(path):
    return teachers.load_teacher(path).state_dict()


WITNESSES = {"realuid_run": realuid_run, "sid_updates": sid_updates,
             "fake_update_defaults": fake_update_defaults, "ema_run": ema_run}


# ---------------------------------------------------------------------------------------------
# Pinned at 21b898e plus this change, torch 2.14.1 CPU (python tests/test_pinned_diffusion.py)

PINNED = {
    'realuid_run': {
        'records': [
            [-63.324668884277344, 273.0015869140625],
            [-60.96238327026367, 255.1094512939453],
        ],
        'fake_grads': {
            'map_': [0.2306442559823136, -0.07317647259745716],
            'enc.': [0.4009335803913878, -0.6400587008742787],
            'dec.': [0.8865976333821398, -0.32963892861365146],
        },
    },
    'sid_updates': {
        'losses': [-85.83734893798828, 272.3182067871094, -10.699531555175781, 41.589298248291016],
        'fake_grads': {
            'map_': [31.328520012997952, -46.78080465995443],
            'enc.': [153.5171106783902, 79.54577295721307],
            'dec.': [222.72903599888633, 122.80799600000395],
        },
        'gen_grads': {
            'map_': [5.71475305686338, -5.878952088650575],
            'enc.': [22.433541376745794, 8.269762374089208],
            'dec.': [34.550650824038165, -31.883386640503826],
        },
    },
    'fake_update_defaults': {
        't': [4.987920746207237, 3.7059953563214156, 0.17354770004749298],
        'losses': [-91.06672668457031, 305.3526306152344],
        'fake_grads': {
            'map_': [0.147065072893367, 0.15084288752392191],
            'enc.': [0.5570270535026642, -0.8153388388943235],
            'dec.': [0.8173694350661407, -0.41601534300196763],
        },
    },
    'ema_run': {
        '0.7 map_': [0.02071596904360337, 0.02980467888371146],
        '0.7 enc.': [0.05692360458102883, 0.08302057617088512],
        '0.7 dec.': [0.11615568571065309, 0.16717354288232994],
        '0.9 map_': [0.00753498035923071, 0.04213600087254344],
        '0.9 enc.': [0.020600828136123503, 0.11764871497797284],
        '0.9 dec.': [0.042153553586316735, 0.23722323459696643],
        'gen map_': [0.0492054625197688],
        'gen enc.': [0.13731310713357495],
        'gen dec.': [0.27721076729064387],
    },
}

TOL_REL, TOL_ABS = 2e-4, 1e-6  # measured at most 1.6e-5 and 3.5e-8 (module docstring)


def close(a, b, rel=TOL_REL, abs_=TOL_ABS):
    if isinstance(a, dict):
        return sorted(a) == sorted(b) and all(close(a[k], b[k], rel, abs_) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(close(x, y, rel, abs_) for x, y in zip(a, b))
    return abs(a - b) <= rel * max(abs(a), abs(b)) + abs_


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return inputs(str(tmp_path_factory.mktemp("pinned_diffusion")))


@pytest.mark.parametrize("name", list(WITNESSES))
def test_diffusion_path_gives_the_pinned_values(name, files, tmp_path):
    got = WITNESSES[name](str(tmp_path), files)
    assert close(got, PINNED[name]), (got, PINNED[name])


if __name__ == "__main__":
    import contextlib
    import tempfile
    torch.set_num_threads(int(os.environ.get("NT", "1")))
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        made = inputs(tmp)
        values = {name: f(tmp, made) for name, f in WITNESSES.items()}
    print(json.dumps(values, indent=1))
