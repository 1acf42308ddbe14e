"""Faults of distill.py found on 29328e5, each with the test that shows it fixed: the GAN's t
inside a denoiser's range, General RealUID keeping EDM's weight on a diffusion teacher, and
--init-from keeping the start t_g its generator was trained with."""
import pytest
import torch

import distill
import players
from common import RealUIDError
from conftest import FAST, load, run
from flow import interpolate
from test_edm import write_edm_pickle
from test_teachers import small_edm


@pytest.fixture()
def edm_pickle(tmp_path):
    net, kwargs = small_edm()
    path = tmp_path / "edm-toy.pkl"
    write_edm_pickle(path, net, kwargs)
    return path


def setup(tmp_path, *argv):
    args = distill.parse_args([str(a) for a in ["--batch-size", 8, "--device", "cpu",
                                                 "--workers", 0, "--out", tmp_path / "run",
                                                 *argv]])
    return args, distill.setup(args, players.Process("cpu"))


def test_gan_t_stays_inside_a_denoisers_range(tmp_path, edm_pickle, tiny_data):
    """t_gan = 1 - 0.2 U reaches 1, where a denoiser's field is not defined (EDM: t <= 0.998)."""
    args, state = setup(tmp_path, "--teacher", edm_pickle, "--data", tiny_data["uncond"],
                        "--gan-gen-coef", 0.3, "--gan-disc-coef", 1.0, "--batch-size", 64)
    t_min, t_max = state.t_range
    assert t_max < 1
    t_gan = torch.cat([distill.draw(state, args)["t_gan"] for _ in range(16)])
    assert t_gan.max() <= t_max and t_gan.min() >= 0.8
    assert (t_gan == t_max).any()  # the draws beyond the range sit on its end


def test_general_realuid_keeps_edms_weight_on_a_diffusion_teacher(tmp_path, edm_pickle,
                                                                  tiny_data):
    """--gamma with a diffusion teacher: the fake model's loss keeps EDM's per-sample weight
    ((1 - t)^2 + 0.25 t^2) / 0.25 (the default --fake-weight edm), written out here."""
    args, state = setup(tmp_path, "--teacher", edm_pickle, "--data", tiny_data["uncond"],
                        "--alpha", 0.94, "--beta", 0.96, "--gamma", 0.9)
    assert args.fake_weight == "edm" and state.general
    torch.manual_seed(1)
    for p in state.fake.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    batch = distill.draw(state, args, args.fake_t)
    state.fake_player.step = lambda: None
    terms, _ = distill.fake_update(state, args, batch)
    z, x_d, x0, t = batch["z"], batch["x_d"], batch["x0"], batch["t"]
    with torch.no_grad():
        from flow import generate
        x_g = generate(state.gen_frozen, z, t_g=state.t_g)
        a, b, g = 0.94, 0.96, 0.9
        total = 0
        for x, u, wa, wb, wg in ((x_g, x_g - x0, a, b, g), (x_d, x_d - x0, 1 - a, 1 - b, 1 - g)):
            xt = interpolate(x, x0, t)
            v, f = state.teacher(t, xt), state.fake(t, xt)
            delta = f - v
            total = total - (-wg * delta * delta + 2 * wb * delta * u
                             - 2 * wa * delta * v).flatten(1).sum(1)
        weight = ((1 - t) ** 2 + 0.25 * t ** 2) / 0.25
        want = (weight * total).mean()
    assert float(terms["loss_fake"]) == pytest.approx(float(want), rel=1e-4)
    assert abs(float(total.mean()) - float(want)) > 1e-3 * abs(float(want))  # the weight matters


def test_init_from_keeps_its_start(tmp_path, edm_pickle, tiny_data, teachers):
    common = ["--steps", 1, "--fake-steps", 1, *FAST]
    run(distill, ["--teacher", edm_pickle, "--sigma-init", 1.0, "--out", tmp_path / "d",
                  *common])
    assert load(tmp_path / "d" / "latest.pt")["config"]["t_g"] == 0.5
    # a new run from its weights starts where that generator was trained to, not at 2.5
    run(distill, ["--teacher", edm_pickle, "--init-from", tmp_path / "d" / "latest.pt",
                  "--init-ema", "none", "--out", tmp_path / "ft", *common])
    assert load(tmp_path / "ft" / "latest.pt")["config"]["t_g"] == 0.5
    with pytest.raises(RealUIDError, match="t_g"):
        run(distill, ["--teacher", edm_pickle, "--init-from", tmp_path / "d" / "latest.pt",
                      "--init-ema", "none", "--sigma-init", 2.5, "--out", tmp_path / "bad",
                      *common])
    # a flow-matching generator (t_g = 0) cannot be continued from another start either
    run(distill, ["--teacher", teachers["uncond"], "--out", tmp_path / "fm", *common])
    with pytest.raises(RealUIDError, match="t_g"):
        run(distill, ["--teacher", teachers["uncond"], "--init-from", tmp_path / "fm",
                      "--init-ema", "none", "--sigma-init", 2.5, "--out", tmp_path / "bad2",
                      *common])


def test_sids_generator_law_stays_inside_a_ve_teachers_range(tmp_path):
    """A VE teacher (sigma from 0.02: t up to 0.980) was queried by SiD's law up to t = 0.998."""
    from test_edm import build, write_edm_pickle as write
    net, kwargs = build("VEPrecond", "ddpmpp", 0)
    path = tmp_path / "baseline-ve.pkl"
    write(path, net, kwargs)
    args, state = setup(tmp_path, "--teacher", path, "--recipe", "sid", "--batch-size", 64)
    t_min, t_max = state.t_range
    assert args.gen_t == "sid" and t_max == pytest.approx(1 / 1.02)
    t = torch.cat([distill.draw(state, args, args.gen_t)["t"] for _ in range(16)])
    assert t.max() <= t_max + 1e-7 and t.max() > t_max - 0.01  # the grid reaches the end
