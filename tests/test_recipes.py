"""distill.py's named recipes (recipes.py): resolution order, what each sets, refusals, the pieces
they brought to the loop (no clipping, an EMA by half-life, SiD's non-finite gradients), and a
few steps of each recipe on tiny teachers."""
import json
import math

import pytest
import torch

import distill
import finetune
import players
import recipes
from common import RealUIDError
from conftest import FAST, load, run
from flow import generate
from test_edm import write_edm_pickle
from test_teachers import sid_generator_loss, small_edm


def parse(*argv):
    return distill.parse_args([str(a) for a in argv])


def test_recipe_sets_its_flags_and_explicit_flags_win(tmp_path):
    args = parse("--teacher", "t.pt", "--recipe", "sid", "--out", tmp_path / "a")
    sid = recipes.RECIPES["sid"]["settings"]
    assert all(getattr(args, k) == v for k, v in sid.items())
    args = parse("--teacher", "t.pt", "--recipe", "sid", "--lr", 3e-4, "--dropout", 0.0,
                 "--out", tmp_path / "b")
    assert (args.lr, args.dropout, args.gen_gamma) == (3e-4, 0.0, 2.4)
    # the default recipe changes nothing: today's defaults
    assert vars(parse("--teacher", "t.pt", "--out", tmp_path / "c")) == {
        **vars(distill.build_parser().parse_args(["--teacher", "t.pt", "--out",
                                                  str(tmp_path / "c")])),
        "resume": None, "from_authors": False}
    # sid-real is sid with real data
    real = recipes.RECIPES["sid-real"]["settings"]
    assert {k: v for k, v in real.items() if k not in ("alpha", "beta")} == \
        {k: v for k, v in sid.items() if k not in ("alpha", "beta")}
    assert (real["alpha"], real["beta"]) == (0.94, 0.96)


def test_teacher_defaults_fill_only_open_flags():
    values = {"fake_init": None, "fake_t": "uniform", "gen_t": None, "fake_weight": None,
              "gen_weight": "none", "sigma_init": None}
    got = recipes.teacher_settings(values, diffusion=True)
    assert got == {"fake_init": "teacher", "gen_t": "sid", "fake_weight": "edm",
                   "sigma_init": 2.5}
    assert recipes.teacher_settings(values, diffusion=False)["fake_init"] == "random"
    with pytest.raises(KeyError):
        recipes.recipe_settings("nope", set())


def test_help_lists_every_recipe(capsys):
    with pytest.raises(SystemExit):
        distill.build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, recipe in recipes.RECIPES.items():
        assert f"{name}: " in text
    assert "AugmentPipe" in text  # what sid does not reproduce is said


def test_dmd_with_alpha_not_beta_is_refused(tmp_path, teachers, tiny_data):
    argv = ["--teacher", teachers["uncond"], "--data", tiny_data["uncond"], "--recipe",
            "dmd-real", "--alpha", 0.9, "--steps", 1, "--out", tmp_path / "r", *FAST]
    with pytest.raises(RealUIDError) as e:
        run(distill, argv)
    assert "alpha = beta" in str(e.value) and "linear in p_g" in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "r" / "latest.pt").exists()


def test_two_objectives_are_refused(tmp_path, teachers):
    args = parse("--teacher", teachers["uncond"], "--recipe", "normalized", "--param-delta",
                 "beta", "--out", tmp_path / "r")
    with pytest.raises(RealUIDError, match="two different objectives"):
        distill.check_objective(args)


@pytest.mark.parametrize("recipe", ["realuid", "uid", "gan", "normalized", "dmd", "dmd-real"])
def test_each_recipe_runs_and_saves_itself_resolved(tmp_path, teachers, tiny_data, recipe):
    out = tmp_path / recipe
    run(distill, ["--teacher", teachers["uncond"], "--data", tiny_data["uncond"], "--recipe",
                  recipe, "--steps", 2, "--fake-steps", 2, "--out", out, *FAST])
    ckpt = load(out / "latest.pt")
    saved = ckpt["config"]["args"]
    assert saved["recipe"] == recipe and ckpt["step"] == 2
    for k, v in recipes.RECIPES[recipe]["settings"].items():
        assert saved[k] == v, k
    assert saved["fake_t"] == "uniform"  # a flow-matching teacher's defaults, resolved
    assert json.load(open(out / "args.json"))["recipe"] == recipe
    assert all(torch.isfinite(v).all() for v in ckpt["gen"].values())
    run(distill, ["--resume", out, "--steps", 3])  # resumes with its own resolved flags
    assert load(out / "latest.pt")["step"] == 3


def test_param_delta_beta_runs(tmp_path, teachers, tiny_data):
    run(distill, ["--teacher", teachers["uncond"], "--data", tiny_data["uncond"], "--alpha", 0.94,
                  "--beta", 0.96, "--param-delta", "beta", "--steps", 1, "--fake-steps", 1,
                  "--out", tmp_path / "b", *FAST])
    assert load(tmp_path / "b" / "latest.pt")["config"]["args"]["param_delta"] == "beta"


def test_finetune_takes_a_recipe(tmp_path, teachers, tiny_data):
    run(distill, ["--teacher", teachers["uncond"], "--steps", 1, "--fake-steps", 1,
                  "--out", tmp_path / "d", *FAST])
    args = finetune.parse_args([str(a) for a in [
        "--teacher", teachers["uncond"], "--init-from", tmp_path / "d" / "latest.pt",
        "--recipe", "normalized", "--data", tiny_data["uncond"], "--steps", 1, "--fake-steps", 1,
        "--out", tmp_path / "f",
        *FAST]])
    assert (args.objective, args.lr, args.warmup) == ("normalized", 1e-5, 0)  # its own defaults
    finetune.main(args)
    assert load(tmp_path / "f" / "latest.pt")["config"]["args"]["objective"] == "normalized"


def test_sid_recipe_on_an_edm_pickle_has_sids_generator_gradient(tmp_path):
    """`--recipe sid` sets up exactly SiD's generator update (the gradient against SiD's formula
    written out, as tests/test_teachers.py does for the flags spelled out), without clipping."""
    net, kwargs = small_edm()
    pkl = tmp_path / "edm-toy.pkl"
    write_edm_pickle(pkl, net, kwargs)
    args = parse("--teacher", pkl, "--recipe", "sid", "--dropout", 0.0, "--batch-size", 4,
                 "--device", "cpu", "--workers", 0, "--out", tmp_path / "run")
    assert args.grad_clip == 0 and args.ema == [round(0.5 ** (4 / 5e5), 6)]
    state = distill.setup(args, players.Process("cpu"))
    assert (args.fake_t, args.gen_t, args.fake_weight, args.gen_weight, args.fake_init) == \
        ("edm", "sid", "edm", "sid", "teacher")
    torch.manual_seed(8)
    for p in state.fake.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    for p in state.gen.parameters():  # a large gradient: clipping at 1 would change it
        p.data.add_(0.05 * torch.randn_like(p))
    state.gen_player.step = lambda: None
    batch = distill.draw(state, args, args.gen_t)
    distill.generator_update(state, args, batch)
    ours = torch.cat([p.grad.flatten() for p in state.gen.parameters() if p.grad is not None])
    state.gen.zero_grad()
    x_g = generate(state.gen, batch["z"], t_g=1 / 3.5)
    sid_generator_loss(state.teacher, state.fake_frozen, x_g, batch["x0"], batch["t"],
                       1.2).backward()
    theirs = torch.cat([p.grad.flatten() for p in state.gen.parameters() if p.grad is not None])
    assert theirs.norm() > 1
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-4


def test_sid_recipe_runs_on_an_edm_pickle(tmp_path, tiny_data):
    net, kwargs = small_edm()
    pkl = tmp_path / "edm-toy.pkl"
    write_edm_pickle(pkl, net, kwargs)
    for recipe in ("sid", "sid-real", "dmd"):
        out = tmp_path / recipe
        run(distill, ["--teacher", pkl, "--data", tiny_data["uncond"], "--recipe", recipe,
                      "--steps", 2, "--out", out, *FAST])
        saved = load(out / "latest.pt")["config"]["args"]
        assert saved["precision"] == ("fp32" if recipe.startswith("sid") else saved["precision"])
        assert saved["gen_t"] == "sid" and saved["fake_t"] == "edm"


def test_halflife_decay_closed_form():
    B, H = 256, 0.5
    decay = players.halflife_decay(math.inf, B, H)
    assert decay ** (H * 1e6 / B) == pytest.approx(0.5, rel=1e-9)  # half after H Mimg
    assert players.halflife_decay(0, B, H, 0.05) == 0.0  # first update: the EMA is the network
    early = players.halflife_decay(10_000, B, H, 0.05)  # half-life 500 images, not 0.5 Mimg
    assert early ** (500 / B) == pytest.approx(0.5, rel=1e-9)


def test_no_clipping_and_sids_nonfinite_gradients():
    net = torch.nn.Linear(3, 2)
    player = players.Player(net, 1e-3, (0.0, 0.999), 0, players.Process("cpu"))
    net.weight.grad = torch.full_like(net.weight, 100.0)
    net.bias.grad = torch.tensor([float("nan"), float("inf")])
    player.nan_to_num_grads()
    assert net.bias.grad.tolist() == [0.0, 1e5]
    before = net.weight.grad.clone()
    norm = player.clip(0.0)  # 0: no clipping, the norm still reported
    assert torch.equal(net.weight.grad, before) and norm > 1e4
