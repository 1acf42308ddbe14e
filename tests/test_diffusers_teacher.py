"""diffusers_teacher.py: the DDPM schedules, the change of variables from DDPM predictions to
the flow field (against closed forms for Gaussian data), and, when diffusers is installed
(it is optional; CI does not install it), tiny random UNet2DModels read from both folder
layouts, DDIM's sampler, the refusal of pickled weights and the export round trip."""
import copy
import json
import math
import os
import pickle
import sys

import pytest
import torch

import diffusers_teacher as dt
from common import RealUIDError
from flow import euler

torch.set_default_dtype(torch.float32)

# The three schedules diffusers' DDPM / DDIM schedulers compute (scaled_linear with latent
# diffusion's betas), and their ranges of t.
SCHEDULES = {
    "linear": dict(beta_schedule="linear"),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
}
RANGES = {"linear": (0.00631, 0.99010), "squaredcos_cap_v2": (0.000049, 0.99362),
          "scaled_linear": (0.06404, 0.97166)}


# How far diffusers' float32 schedules are from ours (float64): measured 4e-7 (linear), 9e-7
# (scaled_linear) and 1.3e-5 for squaredcos_cap_v2, whose betas near the 0.999 cap lose up to
# 3e-5 of 1 - beta when diffusers rounds them to float32.
SCHEDULE_RTOL = {"linear": 2e-6, "scaled_linear": 2e-6, "squaredcos_cap_v2": 5e-5}


def gaussian_predictor(mu, table, prediction_type):
    """The exact DDPM predictors of data x1 ~ N(mu, I) per pixel at a (fractional) timestep k:
    x_k = a x1 + b eps ~ N(a mu, I) with a = sqrt(abar_k), b = sqrt(1 - abar_k), so
    E[x1 | x_k] = mu + a (x_k - a mu), E[eps | x_k] = b (x_k - a mu), v* = a eps* - b x1*."""
    def predict(x_k, k):
        abar = dt.alpha_bar_of_timestep(k, table).view(-1, 1, 1, 1)
        a, b = abar.sqrt(), (1 - abar).sqrt()
        x1, eps = mu + a * (x_k - a * mu), b * (x_k - a * mu)
        return {"epsilon": eps, "v_prediction": a * eps - b * x1, "sample": x1}[prediction_type]
    return predict


def gaussian_flow(mu, t, x):
    """The exact flow field of x_t = t x1 + (1 - t) x0, x1 ~ N(mu, I), x0 ~ N(0, I):
    v(t, x) = mu + ((2t - 1) / s^2) (x - t mu), s^2 = t^2 + (1 - t)^2."""
    t = t.view(-1, 1, 1, 1)
    return mu + (2 * t - 1) / (t ** 2 + (1 - t) ** 2) * (x - t * mu)


# ---------------------------------------------------------------------------------------------
# Pure math: no diffusers needed

@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_ranges(schedule):
    """t_min = t(abar_{T-1}), t_max = t(abar_0) are the documented numbers; abar(t(abar)) =
    abar; the linear schedule is the product of 1 - beta written out."""
    t_min, t_max = dt.schedule_t_range(SCHEDULES[schedule])
    lo, hi = RANGES[schedule]
    assert t_min == pytest.approx(lo, abs=5e-6 if lo > 1e-3 else 5e-7)
    assert t_max == pytest.approx(hi, abs=5e-6)
    abar = dt.schedule_alphas_cumprod(SCHEDULES[schedule])
    assert abar.dtype == torch.float64 and abar.shape == (1000,)
    assert (abar[1:] < abar[:-1]).all()
    assert torch.allclose(dt.alpha_bar_of_t(dt.t_of_alpha_bar(abar)), abar, rtol=1e-12)
    if schedule == "linear":
        prod, out = 1.0, []
        for i in range(1000):
            prod *= 1 - (1e-4 + i * (0.02 - 1e-4) / 999)
            out.append(prod)
        assert torch.allclose(abar, torch.tensor(out, dtype=torch.float64), rtol=1e-12)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_fractional_timesteps_invert_the_log_snr(schedule):
    """k(t) hits the integers at the schedule's own levels, is monotone, and is linear in the
    log-SNR between them: alpha_bar_of_timestep(k(t)) = abar(t)."""
    abar = dt.schedule_alphas_cumprod(SCHEDULES[schedule])
    table = dt.log_snr(abar)
    k = torch.arange(1000, dtype=torch.float64)
    assert torch.allclose(dt.timestep_of_t(dt.t_of_alpha_bar(abar), table), k, atol=1e-8)
    assert torch.allclose(dt.alpha_bar_of_timestep(k, table), abar, rtol=1e-12)
    t_min, t_max = dt.schedule_t_range(SCHEDULES[schedule])
    t = torch.linspace(t_min, t_max, 2001, dtype=torch.float64)
    kt = dt.timestep_of_t(t, table)
    assert (kt[1:] < kt[:-1]).all() and kt[0] == pytest.approx(999) and kt[-1] == pytest.approx(0)
    assert torch.allclose(dt.alpha_bar_of_timestep(kt, table), dt.alpha_bar_of_t(t), rtol=1e-10)
    mid = dt.timestep_of_t(dt.t_of_alpha_bar(torch.sigmoid((table[:-1] + table[1:]) / 2)), table)
    assert torch.allclose(mid, k[:-1] + 0.5, atol=1e-8)  # the log-SNR midpoint is k + 1/2
    # outside the range: the end timesteps
    assert dt.timestep_of_t(torch.tensor([t_min / 2, (1 + t_max) / 2], dtype=torch.float64),
                            table).tolist() == [999, 0]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("prediction_type", dt.PREDICTION_TYPES)
def test_exact_predictors_give_the_exact_flow_field(schedule, prediction_type):
    """For Gaussian data the exact DDPM predictor of each type, through the conversion, is the
    exact flow field, at the schedule's integer timesteps and in between (fractional k)."""
    torch.manual_seed(0)
    mu = torch.randn(3, 4, 4, dtype=torch.float64) * 0.5
    abar = dt.schedule_alphas_cumprod(SCHEDULES[schedule])
    table = dt.log_snr(abar)
    integer_k = torch.tensor([999, 998, 700, 500, 250, 10, 1, 0])
    t_int = dt.t_of_alpha_bar(abar[integer_k])
    t_min, t_max = dt.schedule_t_range(SCHEDULES[schedule])
    t_frac = t_min + (t_max - t_min) * torch.rand(8, dtype=torch.float64)
    predict = gaussian_predictor(mu, table, prediction_type)
    for t in (t_int, t_frac):
        x = torch.randn(len(t), 3, 4, 4, dtype=torch.float64)
        v = dt.flow_field(predict, t, x, table, prediction_type)
        ref = gaussian_flow(mu, t, x)
        assert torch.allclose(v, ref, rtol=1e-9, atol=1e-9 * ref.abs().max().item())
    assert not torch.allclose(dt.timestep_of_t(t_frac, table),
                              dt.timestep_of_t(t_frac, table).round())  # really fractional

    # At integer timesteps the schedule's own abar_k, without the interpolation
    def at_integers(x_k, k):
        assert torch.allclose(k, k.round(), atol=1e-8)
        a = abar[k.round().long()].view(-1, 1, 1, 1).sqrt()
        b = (1 - a ** 2).sqrt()
        x1, eps = mu + a * (x_k - a * mu), b * (x_k - a * mu)
        return {"epsilon": eps, "v_prediction": a * eps - b * x1, "sample": x1}[prediction_type]
    x = torch.randn(len(t_int), 3, 4, 4, dtype=torch.float64)
    ref = gaussian_flow(mu, t_int, x)
    assert torch.allclose(dt.flow_field(at_integers, t_int, x, table, prediction_type), ref,
                          rtol=1e-9, atol=1e-9 * ref.abs().max().item())


def test_scheduler_refusals():
    ok = dt.scheduler_settings({"_class_name": "DDIMScheduler", "beta_end": None})
    assert ok["beta_end"] == 0.02 and ok["prediction_type"] == "epsilon"
    for bad, words in [({"_class_name": "PNDMScheduler"}, "PNDMScheduler"),
                       ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
                       ({"beta_schedule": "sigmoid"}, "sigmoid"),
                       ({"rescale_betas_zero_snr": True}, "zero_snr"),
                       ({"prediction_type": "flow"}, "flow"),
                       ({"num_train_timesteps": 1}, "num_train_timesteps"),
                       ({"beta_start": 0.0}, "beta_start")]:
        with pytest.raises(RealUIDError, match=words) as e:
            dt.schedule_alphas_cumprod(bad)
        assert "\n" not in str(e.value)


def test_is_diffusers_folder(tmp_path):
    flat, pipe, run = tmp_path / "flat", tmp_path / "pipe", tmp_path / "run"
    for d in (flat, pipe / "unet", run):
        d.mkdir(parents=True)
    (flat / "config.json").write_text("{}")
    (flat / "diffusion_pytorch_model.bin").write_bytes(b"")  # refused later, but recognised
    (pipe / "model_index.json").write_text("{}")
    (run / "args.json").write_text("{}")
    (run / "latest.pt").write_bytes(b"")
    assert dt.is_diffusers_folder(flat) and dt.is_diffusers_folder(pipe)
    assert not dt.is_diffusers_folder(run) and not dt.is_diffusers_folder(run / "latest.pt")


def test_missing_diffusers_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(RealUIDError, match=r"needs: pip install diffusers safetensors$"):
        dt.load_diffusers_teacher(tmp_path)
    with pytest.raises(RealUIDError, match="pip install diffusers safetensors"):
        dt.build_diffusers({"diffusers": {}, "scheduler": {}})


# ---------------------------------------------------------------------------------------------
# With diffusers: tiny random UNet2DModels

def tiny_unet(seed=0, num_class_embeds=None, **kw):
    from diffusers import UNet2DModel
    torch.manual_seed(seed)
    cfg = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
               layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
               up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
               attention_head_dim=8, num_class_embeds=num_class_embeds)
    return UNet2DModel(**{**cfg, **kw}).eval()


def save_folder(path, unet, scheduler, layout, variant=None):
    """A diffusers folder written by diffusers itself: the pipeline layout (DDPMPipeline) or
    the flat one (the UNet's files with scheduler_config.json beside them)."""
    from diffusers import DDPMPipeline
    if layout == "pipeline":
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path, variant=variant)
    else:
        unet.save_pretrained(path, variant=variant)
        scheduler.save_pretrained(path)
    return str(path)


def reference_field(unet, scheduler, k, x_t, y=None):
    """diffusers' own network output at integer timesteps k, converted by DDIM's formulas with
    the scheduler's own abar_k: v = x1^ - eps^ at x_k = x_t / s (float64 arithmetic)."""
    abar = scheduler.alphas_cumprod.double()[k].view(-1, 1, 1, 1)
    a, b = abar.sqrt(), (1 - abar).sqrt()
    t = a / (a + b)
    x_k = x_t.double() / (t ** 2 + (1 - t) ** 2).sqrt()
    with torch.no_grad():
        out = unet(x_k.float(), k, class_labels=y).sample.double()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        x1, eps = (x_k - b * out) / a, out
    elif kind == "sample":
        x1, eps = out, (x_k - a * out) / b
    else:
        x1, eps = a * x_k - b * out, a * out + b * x_k
    return x1 - eps, t.flatten()


CASES = [  # layout, scheduler class, schedule, prediction type, classes, fp16 weights
    ("pipeline", "DDPMScheduler", "linear", "epsilon", None, False),
    ("flat", "DDIMScheduler", "squaredcos_cap_v2", "v_prediction", 3, True),
    ("flat", "DDPMScheduler", "scaled_linear", "sample", None, False),
    ("pipeline", "DDIMScheduler", "linear", "v_prediction", 2, True),
]


@pytest.mark.parametrize("layout,sched,schedule,prediction_type,classes,fp16", CASES)
def test_loaded_teacher_is_diffusers_network_converted(tmp_path, layout, sched, schedule,
                                                       prediction_type, classes, fp16):
    """load_diffusers_teacher's field at the schedule's integer timesteps equals diffusers' own
    network output converted by the formulas (1e-4 relative; measured <= 8e-6); its schedule
    is diffusers'."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = getattr(diffusers, sched)(prediction_type=prediction_type, **SCHEDULES[schedule])
    unet = tiny_unet(num_class_embeds=classes)
    path = save_folder(tmp_path / "model", unet.half() if fp16 else unet, scheduler, layout,
                       variant="fp16" if fp16 and layout == "flat" else None)
    unet = unet.float()  # the fp16-rounded weights, evaluated in float32
    field = dt.load_diffusers_teacher(path)
    assert not field.training and not any(p.requires_grad for p in field.parameters())
    assert next(field.parameters()).dtype == torch.float32
    assert field.label_dim == (classes or 0) and field.image_shape == (3, 8, 8)
    assert field.prediction_type == prediction_type and field.coupling is None
    assert (field.t_min, field.t_max) == pytest.approx(RANGES[schedule], abs=5e-6)
    assert torch.allclose(dt.schedule_alphas_cumprod(scheduler.config),
                          scheduler.alphas_cumprod.double(), rtol=SCHEDULE_RTOL[schedule])
    json.dumps(field.config)
    k = torch.tensor([999, 998, 900, 500, 123, 2, 1, 0])
    torch.manual_seed(1)
    x = torch.randn(len(k), 3, 8, 8)
    y = torch.randint(0, classes, (len(k),)) if classes else None
    ref, t = reference_field(unet, scheduler, k, x, y)
    with torch.no_grad():
        v = field(t.float(), x, y)
    assert v.dtype == torch.float32
    err = ((v.double() - ref).abs().amax(dim=(1, 2, 3)) / ref.abs().amax(dim=(1, 2, 3))).max()
    assert err < 1e-4, err
    with torch.no_grad():  # other dtypes in, the same dtype out (computed in float32)
        assert field(t.float(), x.bfloat16(), y).dtype == torch.bfloat16


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_matches_diffusers(schedule):
    """Our float64 schedule against diffusers' (float32) alphas_cumprod, DDPM and DDIM alike,
    also at another number of training steps."""
    diffusers = pytest.importorskip("diffusers")
    for T in (1000, 200):
        cfg = dict(SCHEDULES[schedule], num_train_timesteps=T)
        ours = dt.schedule_alphas_cumprod(cfg)
        for cls in (diffusers.DDPMScheduler, diffusers.DDIMScheduler):
            theirs = cls(**cfg).alphas_cumprod.double()
            assert torch.allclose(ours, theirs, rtol=SCHEDULE_RTOL[schedule], atol=0), \
                (ours / theirs - 1).abs().max()


def ddim_sample(unet, scheduler, z, steps):
    scheduler.set_timesteps(steps)
    x = z.clone()
    with torch.no_grad():
        for k in scheduler.timesteps:
            x = scheduler.step(unet(x, k).sample, k, x, eta=0.0).prev_sample
    return x


@pytest.mark.parametrize("prediction_type", dt.PREDICTION_TYPES)
def test_euler_on_ddim_grid_is_ddim(tmp_path, prediction_type):
    """DDIM (eta 0) is Euler's method in t of our field on DDIM's own grid of t (module
    docstring): from the same noise the two agree to float32 rounding (measured 8e-7, 5e-7 and
    8e-6 of the sample's largest value for epsilon, v and sample; asserted 1e-4)."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(prediction_type=prediction_type, clip_sample=False)
    unet = tiny_unet(seed=2)
    field = dt.load_diffusers_teacher(save_folder(tmp_path / "m", unet, scheduler, "flat"))
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    ddim = ddim_sample(unet, scheduler, z, 50)
    abar = scheduler.alphas_cumprod.double()
    ts = dt.t_of_alpha_bar(abar[scheduler.timesteps]).tolist() + [1.0]  # set_alpha_to_one
    x = z * math.sqrt(ts[0] ** 2 + (1 - ts[0]) ** 2)  # DDIM's x_k = z is x_t = s z
    with torch.no_grad():
        for a, b in zip(ts[:-1], ts[1:]):
            x = x + (b - a) * field(torch.full((len(z),), a), x)
    err = (x - ddim).abs().max() / ddim.abs().max()
    assert err < 1e-4, err


def test_flow_euler_converges_to_ddim(tmp_path):
    """flow.euler with uniform steps from t_min to t_max against DDIM over all 1000 timesteps
    (v-prediction, linear schedule), from the same noise. Both are first-order discretizations
    of the same ODE on different grids, so they differ by their discretization errors:
    measured 7e-3 of the sample's largest value at 125 Euler steps, 7e-4 at 500 (DDIM's own
    error is about 1e-3 for this random network); asserted 5e-3 at 500 and a decrease."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(prediction_type="v_prediction", clip_sample=False)
    unet = tiny_unet(seed=0)
    field = dt.load_diffusers_teacher(save_folder(tmp_path / "m", unet, scheduler, "flat"))
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ddim = ddim_sample(unet, scheduler, z, 1000)
    t0, t1 = field.t_min, field.t_max
    # flow.euler starts at x_t0 = (1 - t0) x0; DDIM at x_k = z, i.e. x_t0 = s0 z: same point
    x0 = z * math.sqrt(t0 ** 2 + (1 - t0) ** 2) / (1 - t0)
    errs = [((euler(field, x0, nfe=n, t0=t0, t1=t1) - ddim).abs().max() / ddim.abs().max())
            .item() for n in (125, 500)]
    assert errs[1] < 5e-3 and errs[1] < errs[0] / 3, errs


def test_bin_only_folder_is_refused_never_unpickled(tmp_path):
    """A folder whose only weights are a pickled .bin is refused with one line naming the fix;
    the pickle, which would touch a marker file when unpickled, never runs."""
    pytest.importorskip("diffusers")
    marker = tmp_path / "marker"

    class Bait:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    bait = pickle.dumps(Bait())
    scheduler = {"_class_name": "DDPMScheduler"}
    unet_cfg = dict(dt.unet_config(tiny_unet()), _class_name="UNet2DModel")
    flat, pipe = tmp_path / "flat", tmp_path / "pipe"
    for d in (flat, pipe / "unet", pipe / "scheduler"):
        d.mkdir(parents=True)
    for unet_dir, sched_file in ((flat, flat / "scheduler_config.json"),
                                 (pipe / "unet", pipe / "scheduler" / "scheduler_config.json")):
        (unet_dir / "config.json").write_text(json.dumps(unet_cfg))
        (unet_dir / "diffusion_pytorch_model.bin").write_bytes(bait)
        sched_file.write_text(json.dumps(scheduler))
    (pipe / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
         "scheduler": ["diffusers", "DDPMScheduler"]}))
    for folder in (flat, pipe):
        assert dt.is_diffusers_folder(folder)
        with pytest.raises(RealUIDError, match="safetensors") as e:
            dt.load_diffusers_teacher(folder)
        assert "\n" not in str(e.value) and "diffusion_pytorch_model.bin" in str(e.value)
    assert not marker.exists()
    pickle.loads(bait)  # the bait is live: unpickling it does touch the marker
    assert marker.exists()


def test_export_round_trip(tmp_path):
    """export_diffusers_unet writes a folder diffusers loads (UNet2DModel.from_pretrained of a
    local path) with identical outputs, that we read back identically; atomic, and never over
    a non-empty folder."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(prediction_type="epsilon")
    teacher = dt.load_diffusers_teacher(save_folder(tmp_path / "teacher",
                                                    tiny_unet(num_class_embeds=3), scheduler,
                                                    "pipeline"))
    student = dt.build_diffusers(dict(teacher.config, dropout=0.1), teacher.state_dict())
    assert student.config["diffusers"]["dropout"] == 0.1 and student.label_dim == 3
    with torch.no_grad():  # a "distilled" generator: other weights than the teacher's
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    student.eval()
    out = tmp_path / "exports" / "gen"
    (tmp_path / "exports").mkdir()
    out.mkdir()  # an empty folder may be the target
    assert dt.export_diffusers_unet(student, out, t_g=1 / 3.5) == str(out)
    assert sorted(os.listdir(out)) == ["config.json", "diffusion_pytorch_model.safetensors",
                                       "scheduler_config.json"]
    assert os.listdir(tmp_path / "exports") == ["gen"]  # no temporary folder left
    unet = diffusers.UNet2DModel.from_pretrained(str(out)).eval()
    diffusers.DDIMScheduler.from_pretrained(str(out))
    x, k, y = torch.randn(3, 3, 8, 8), torch.tensor([10, 500, 999]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        assert torch.equal(unet(x, k, class_labels=y).sample,
                           student.unet(x, k, class_labels=y).sample)
        back = dt.load_diffusers_teacher(out)
        t = torch.tensor([0.1, 0.5, 0.9])
        assert torch.equal(back(t, x, y), student(t, x, y))
    recipe = json.loads((out / "config.json").read_text())["_realuid"]
    assert recipe["t_g"] == pytest.approx(1 / 3.5) and 0 < recipe["timestep"] < 999
    # the recipe is the generator: x = x_tg + (1 - t_g) G(t_g, x_tg) = DDIM's x1^ of one step
    z = torch.randn(3, 3, 8, 8)
    t_g = torch.full((3,), 1 / 3.5)
    with torch.no_grad():
        gen = (1 - t_g[0]) * z + (1 - t_g[0]) * student(t_g, (1 - t_g[0]) * z, y)
        x_k = recipe["input_scale"] * z
        eps = unet(x_k, torch.full((3,), recipe["timestep"]), class_labels=y).sample
        abar = dt.alpha_bar_of_t(t_g[0].double()).item()
        x1 = (x_k - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
    assert torch.allclose(gen, x1, atol=1e-4)
    for target in (out, tmp_path / "exports"):  # non-empty: refused, left as it was
        with pytest.raises(RealUIDError, match="not an empty folder"):
            dt.export_diffusers_unet(student, target)
    with pytest.raises(RealUIDError, match="diffusers teacher"):
        dt.export_diffusers_unet(torch.nn.Linear(2, 2), tmp_path / "other")


def test_build_is_strict_and_has_a_gan_head(tmp_path):
    """build_diffusers rebuilds the field from its config (fresh or loaded weights, strict);
    only the GAN head may be absent; forward_head reads the mid block."""
    pytest.importorskip("diffusers")
    field = dt.DiffusersField(tiny_unet(num_class_embeds=2),
                              {"_class_name": "DDPMScheduler"}).eval()
    config = json.loads(json.dumps(field.config))
    sd = field.state_dict()
    assert all(k.startswith("unet.") for k in sd)
    copy_ = dt.build_diffusers(config, sd).eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([0.2, 0.7]), torch.tensor([0, 1])
    with torch.no_grad():
        assert torch.equal(copy_(t, x, y), field(t, x, y))
    fresh = dt.build_diffusers(config)
    assert fresh.config == field.config
    assert not torch.equal(fresh.state_dict()["unet.conv_in.weight"], sd["unet.conv_in.weight"])
    raw = dt.build_diffusers(config, field.unet.state_dict())  # the UNet's own keys
    assert torch.equal(raw.state_dict()["unet.conv_out.bias"], sd["unet.conv_out.bias"])
    head = dt.build_diffusers(config, sd, gan_head=True)
    assert head.forward_head(t, x, y).shape == (2, 1, 1, 1)
    assert any(k.startswith(dt.GAN_HEAD) for k in head.state_dict())
    assert torch.equal(dt.build_diffusers(config, head.state_dict(), gan_head=True)
                       .state_dict()["cls_pred_branch.0.weight"],
                       head.state_dict()["cls_pred_branch.0.weight"])
    missing = {k: v for k, v in sd.items() if k != "unet.conv_out.bias"}
    extra = {**sd, "unet.extra.weight": torch.zeros(1)}
    bad = {**sd, "unet.conv_out.bias": torch.full_like(sd["unet.conv_out.bias"], math.nan)}
    for wrong, words in ((missing, "conv_out.bias"), (extra, "extra"), (bad, "NaN")):
        with pytest.raises(RealUIDError, match=words):
            dt.build_diffusers(config, wrong)
    with pytest.raises(RealUIDError, match="class labels"):
        field(t, x)


def test_folder_errors_are_one_line(tmp_path):
    """Missing files, broken JSON, unsupported classes and corrupt weights: one line each."""
    diffusers = pytest.importorskip("diffusers")
    import safetensors.torch
    good = save_folder(tmp_path / "good", tiny_unet(), diffusers.DDPMScheduler(), "flat")

    def variant(name, edit):
        d = tmp_path / name
        d.mkdir()
        for f in os.listdir(good):
            (d / f).write_bytes(open(os.path.join(good, f), "rb").read())
        edit(d)
        return d

    def old_attention_names(d):  # diffusers' 2022 names of the attention weights
        sd = safetensors.torch.load_file(d / dt.WEIGHTS)
        for old, new in (("query", "to_q"), ("key", "to_k"), ("value", "to_v"),
                         ("proj_attn", "to_out.0")):
            sd = {k.replace(f".{new}.", f".{old}."): v for k, v in sd.items()}
        safetensors.torch.save_file(sd, d / dt.WEIGHTS)
    old = variant("old_names", old_attention_names)
    assert any(".query." in k for k in safetensors.torch.load_file(old / dt.WEIGHTS))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 0.6])
    with torch.no_grad():
        assert torch.equal(dt.load_diffusers_teacher(old)(t, x),
                           dt.load_diffusers_teacher(good)(t, x))

    def defaults_left_out(d):  # diffusers fills what a config.json leaves out
        c = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({k: v for k, v in c.items() if k not in
                                                   ("out_channels", "in_channels", "dropout")}))
    with torch.no_grad():
        assert torch.equal(dt.load_diffusers_teacher(variant("short", defaults_left_out))(t, x),
                           dt.load_diffusers_teacher(good)(t, x))

    def config_edit(**kw):
        def edit(d):
            c = json.loads((d / "config.json").read_text())
            (d / "config.json").write_text(json.dumps({**c, **kw}))
        return edit
    cases = [
        (variant("no_sched", lambda d: os.remove(d / "scheduler_config.json")),
         "scheduler_config.json not found"),
        (variant("bad_json", lambda d: (d / "config.json").write_text("{not json")),
         "not valid JSON"),
        (variant("list_json", lambda d: (d / "scheduler_config.json").write_text("[1]")),
         "JSON list"),
        (variant("no_weights", lambda d: os.remove(d / dt.WEIGHTS)), "no diffusion_pytorch"),
        (variant("corrupt", lambda d: (d / dt.WEIGHTS).write_bytes(b"\x00" * 64)), "corrupt"),
        (variant("cond_model", config_edit(_class_name="UNet2DConditionModel")),
         "only UNet2DModel"),
        (variant("fourier", config_edit(time_embedding_type="fourier")), "fourier"),
        (variant("learned_var", config_edit(out_channels=6)), "output channels"),
        (variant("pndm", lambda d: (d / "scheduler_config.json").write_text(
            json.dumps({"_class_name": "PNDMScheduler"}))), "PNDMScheduler"),
        (variant("wrong_shape", config_edit(block_out_channels=[8, 24])), "do not fit"),
        (tmp_path / "absent", "not found"),
    ]
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text(json.dumps({"unet": ["diffusers",
                                                                "UNet2DConditionModel"]}))
    cases.append((pipe, "only UNet2DModel"))
    pipeline = save_folder(tmp_path / "pipeline", tiny_unet(), diffusers.DDPMScheduler(),
                           "pipeline")
    cases.append((os.path.join(pipeline, "unet"), "pass the pipeline folder"))
    for path, words in cases:
        with pytest.raises(RealUIDError, match=words) as e:
            dt.load_diffusers_teacher(path)
        assert "\n" not in str(e.value), path


def test_float64_field_and_denoiser(tmp_path):
    """A field in float64 (its UNet made double) computes and returns float64; denoise is
    EDM's D(x; sigma) = x_t + (1 - t) v(t, x_t) at x = x_t / t, sigma = (1 - t) / t."""
    pytest.importorskip("diffusers")
    field = dt.DiffusersField(tiny_unet(), {"prediction_type": "sample"}).eval()
    f64 = copy.deepcopy(field).double()
    x, t = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([0.2, 0.8],
                                                                     dtype=torch.float64)
    with torch.no_grad():
        v64, v32 = f64(t, x), field(t.float(), x.float())
    assert v64.dtype == torch.float64 and torch.allclose(v64.float(), v32, atol=1e-5)
    with torch.no_grad():
        D = field.denoise(x.float() / t.float().view(-1, 1, 1, 1), (1 - t.float()) / t.float())
    assert torch.allclose(D, x.float() + (1 - t.float()).view(-1, 1, 1, 1) * v32, atol=1e-5)
    assert field.sigma_max == pytest.approx((1 - field.t_min) / field.t_min)
    assert (field.sigma_min, field.sigma_max) == pytest.approx((0.0100, 157.4), rel=1e-3)
