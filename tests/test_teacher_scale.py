"""The scale flags and the later stages on the two newer teacher kinds, a Hugging Face diffusers
folder (diffusers_teacher.py) and an EDM2 pickle (edm2.py): torchrun with 2 processes gives the
update of one process, --grad-accum 2 that of one batch, --precision bf16 / fp16 stay finite
and close to float32, and finetune.py (--init-from a distilled run of that teacher; in-training
FID on the EDM2 case) runs.

As in tests/test_scale.py: the runs take their steps at a negligible learning rate and the
witness of "the same update" is Adam's exp_avg, which with the distillation's betas (0, 0.999)
is the last update's gradient; --fake-init random, so that the generator's gradient
is not the rounding noise of f = v* (tests/test_faults_edm.py); --grad-clip 0, so that exp_avg
is the gradient itself, magnitude included (clipped to norm 1, as by default, it would keep
only the direction of the fake model's gradient, norm ~1e3 here); and the GAN head is on, so
that its discriminator (on the bottleneck of these networks: gan_head.py) is under DDP too.
The diffusers case needs diffusers (optional: skipped without); the EDM2 case does not.
"""
import json
import math

import numpy as np
import pytest
import torch

import distill
import edm2
import finetune
import inception
import networks
import teachers
from conftest import FAST, load, run
from test_scale import grads, rel_diff, torchrun

KINDS = ["diffusers", "edm2"]
STEPS = 2  # the second update is where DDP finds a parameter without a gradient


@pytest.fixture(scope="module")
def teacher(request, tmp_path_factory):
    """A tiny teacher of the kind request.param (tests/test_diffusers_distill.py's DDPM folder,
    tests/test_edm2_teacher.py's fp16 EDM2 pickle); (kind, path)."""
    kind, d = request.param, tmp_path_factory.mktemp(request.param)
    if kind == "diffusers":
        pytest.importorskip("diffusers")
        pytest.importorskip("safetensors")
        from diffusers import DDPMScheduler
        from test_diffusers_teacher import save_folder, tiny_unet
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                  prediction_type="epsilon")
        return kind, save_folder(d / "ddpm-toy", tiny_unet(), scheduler, "pipeline")
    from test_edm2 import CASES, build, write_edm2_pickle
    path = d / "edm2-img8-toy.pkl"
    write_edm2_pickle(path, build("pixel uncond"), CASES["pixel uncond"], dtype=torch.float16)
    return kind, path


def distill_argv(teacher_path, data, out, *extra):
    return ["--teacher", teacher_path, "--data", data, "--out", out, "--alpha", 0.94,
            "--beta", 0.96, "--gan-gen-coef", 0.3, "--gan-disc-coef", 1.0,
            "--fake-init", "random", "--steps", STEPS, "--fake-steps", 1, "--lr", 1e-9,
            "--warmup", 0, "--grad-clip", 0, *FAST, *extra]


@pytest.fixture(scope="module")
def baseline(teacher, tiny_data, tmp_path_factory):
    """One process, fp32, one batch: the run every other one is compared with; its checkpoint."""
    out = tmp_path_factory.mktemp("baseline")
    run(distill, distill_argv(teacher[1], tiny_data["uncond"], out))
    return load(out / "latest.pt")


@pytest.mark.parametrize("teacher", KINDS, indirect=True)
def test_two_processes_equal_one_process(teacher, baseline, tiny_data, tmp_path):
    """torchrun with 2 processes (DistributedDataParallel, gloo on CPU), the same global batch
    and seed: 2 updates of each player (RealUID with real data and the GAN head) give one
    process's gradients and weights. (EDM2's students used to stop at the second update:
    their uncertainty head logvar_linear, which no loss here uses, is now frozen:
    networks.freeze_unused.)"""
    torchrun("distill.py", *distill_argv(teacher[1], tiny_data["uncond"], tmp_path / "two"))
    a, b = baseline, load(tmp_path / "two" / "latest.pt")
    assert a["step"] == b["step"] == STEPS and len(b["rng"]["per_rank"]) == 2
    assert any(k.startswith("cls_pred_branch.") for k in b["u"])  # the GAN head was trained
    for opt in ("optim_u", "optim_gen"):
        ga, gb = grads(a, opt), grads(b, opt)
        assert ga.norm() > 0 and rel_diff(ga, gb) < 1e-4, opt
    for key in ("gen", "u"):
        assert a[key].keys() == b[key].keys()
        for name, w in a[key].items():
            assert torch.allclose(w, b[key][name], rtol=0, atol=1e-7), (key, name)


@pytest.mark.parametrize("teacher", KINDS, indirect=True)
def test_gradient_accumulation_equals_one_batch(teacher, baseline, tiny_data, tmp_path):
    """--grad-accum 2 (two micro-batches of 4, each loss halved) gives the gradients of one
    batch of 8, for both players; another --seed (other initial weights of the fake model,
    another batch) does not (the comparison can fail)."""
    run(distill, distill_argv(teacher[1], tiny_data["uncond"], tmp_path / "acc",
                              "--grad-accum", 2))
    acc = load(tmp_path / "acc" / "latest.pt")
    assert acc["config"]["args"]["grad_accum"] == 2
    for opt in ("optim_u", "optim_gen"):
        assert rel_diff(grads(baseline, opt), grads(acc, opt)) < 1e-5, opt
    if teacher[0] == "edm2":  # once (the case that runs without diffusers)
        run(distill, distill_argv(teacher[1], tiny_data["uncond"], tmp_path / "seed",
                                  "--seed", 7))
        other = load(tmp_path / "seed" / "latest.pt")
        for opt in ("optim_u", "optim_gen"):
            assert rel_diff(grads(baseline, opt), grads(other, opt)) > 0.1, opt


# fp16's gradient scaler starts at 2^16 and halves on each overflow (a skipped step): the
# generator of the diffusers toy overflows for 4 steps, EDM2's never.
FP16_STEPS = {"diffusers": 6, "edm2": STEPS}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("teacher", KINDS, indirect=True)
def test_mixed_precision_runs_and_stays_close(teacher, baseline, tiny_data, tmp_path,
                                              precision):
    """--precision bf16 (autocast) and fp16 (autocast and gradient scalers), with
    --channels-last: the generator's gradients (bf16: the fake model's too) agree with
    float32's to the precision's few significant digits, and differ from them (the flag took
    effect); weights stay float32 and finite (EDM2's stay normalised)."""
    kind, path = teacher
    steps = FP16_STEPS[kind] if precision == "fp16" else STEPS
    a = baseline
    if steps != STEPS:
        run(distill, distill_argv(path, tiny_data["uncond"], tmp_path / "fp32", "--steps", steps))
        a = load(tmp_path / "fp32" / "latest.pt")
    run(distill, distill_argv(path, tiny_data["uncond"], tmp_path / precision, "--steps", steps,
                              "--precision", precision, "--channels-last"))
    b = load(tmp_path / precision / "latest.pt")
    assert b["config"]["args"]["precision"] == precision and b["step"] == steps
    # close, and not float32's numbers (measured: 3e-3 to 5e-2; two float32 runs: 1e-6)
    assert 1e-4 < rel_diff(grads(a, "optim_gen"), grads(b, "optim_gen")) < 0.1
    if precision == "bf16":  # (fp16's fake model overflows for more steps than these)
        assert 1e-4 < rel_diff(grads(a, "optim_u"), grads(b, "optim_u")) < 0.1
    for sd in (b["gen"], b["u"], *b["ema_gens"].values()):
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in sd.values())
    if precision == "fp16":
        assert 0 < b["scaler_gen"]["scale"] <= 2.0 ** 16
    if kind == "edm2":
        gen = networks.build_network(b["config"]["net"], b["gen"])
        for m in gen.modules():
            if isinstance(m, edm2.MPConv):
                assert torch.allclose(m.weight, edm2.normalize(m.weight), atol=1e-5)


def started(path):
    """The teacher's weights as a student's after its first step at a negligible learning rate:
    for EDM2 normalised when the player is made (networks.forced_weight_norm) and after the
    step (the toy's weights have EDM2's eps as their rms, so the two differ: test_edm2.py)."""
    net = teachers.load_teacher(path)
    after_step = networks.forced_weight_norm(net)
    if after_step is not None:  # and once more after the step (players.Player.step)
        after_step()
    return net.state_dict()


def close(a, b, keys):
    """a and b agree on `keys`: to 1e-3 of each weight (EDM2's normalisation after each step
    divides a unit-norm weight by 1 + 1e-4, its eps) and 1e-6 absolute."""
    return all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-6) for k in keys)


@pytest.mark.filterwarnings("ignore:.*not comparable with published FIDs")
@pytest.mark.parametrize("teacher", KINDS, indirect=True)
def test_finetune_a_distilled_generator_with_in_training_fid(teacher, tiny_data, tmp_path,
                                                             request):
    """finetune.py --init-from a distilled run of the teacher (its raw generator: --init-ema
    none): the generator starts from that run's (not from the teacher), the fake model from
    the teacher, one step at finetune.py's alpha / beta without warm-up. For EDM2 (the case
    that runs without diffusers) also the in-training FID of the EMA generator (conftest's
    random Inception weights, 2 samples): logged, and its checkpoint kept as best.pt. Only
    once: one FID costs ~6 s here, most of it the eigendecomposition of a 2048 x 2048
    covariance, and the FID's sampling is distill.generate, which every step runs anyway."""
    kind, path = teacher
    fid = kind == "edm2"
    dist = tmp_path / "distill"
    run(distill, ["--teacher", path, "--data", tiny_data["uncond"], "--out", dist,
                  "--alpha", 0.94, "--beta", 0.96, "--steps", 1, "--fake-steps", 1,
                  "--lr", 1e-2, "--warmup", 0, *FAST])
    d = load(dist / "latest.pt")
    start = started(path)
    keys = list(d["gen"])
    assert set(keys) <= set(start) and not close(d["gen"], start, keys)  # the run moved G

    flags = []
    if fid:
        # reference statistics of the right mode and weights (their values do not matter)
        weights, ref = request.getfixturevalue("weights"), tmp_path / "ref.npz"
        feats = np.random.default_rng(0).standard_normal((4, inception.FEATURE_DIM))
        inception.save_stats(ref, feats.mean(0), np.cov(feats, rowvar=False), "tf", 4,
                             inception.sha256_file(weights))
        flags = ["--fid-every", 1, "--fid-n", 2, "--fid-batch", 2, "--fid-ref", ref,
                 "--fid-weights", weights]
    ft = tmp_path / "finetune"
    run(finetune, ["--teacher", path, "--init-from", dist / "latest.pt", "--init-ema", "none",
                   "--data", tiny_data["uncond"], "--out", ft, "--steps", 1, "--fake-steps", 1,
                   "--lr", 1e-9, *FAST, *flags])
    f = load(ft / "latest.pt")
    with open(ft / "args.json") as fh:
        args = json.load(fh)
    assert (args["warmup"], args["alpha"], args["beta"], args["fake_init"]) == (
        0, 0.94, 1.0, "teacher")
    assert f["step"] == 1 and f["config"]["net"] == d["config"]["net"]
    assert f["config"]["t_g"] == pytest.approx(d["config"]["t_g"])
    assert close(f["gen"], d["gen"], keys)  # lr 1e-9: still the distilled generator
    assert close(f["u"], start, list(f["u"]))  # and the teacher as the fake model
    with open(ft / "metrics.jsonl") as fh:
        fids = [r for r in map(json.loads, fh) if "fid" in r]
    if not fid:
        assert fids == [] and not (ft / "best.pt").exists()
        return
    assert [r["step"] for r in fids] == [1] and fids[0]["fid_samples"] == 2
    assert fids[0]["fid_kind"] == "in-training" and math.isfinite(fids[0]["fid"])
    best = load(ft / "best.pt")
    assert best["step"] == 1 and best["best_fid"] == fids[0]["fid"]
