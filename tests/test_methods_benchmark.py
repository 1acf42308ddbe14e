"""benchmarks/methods.py (every recipe on the CPU toy teachers, docs/methods.md): its budget and
shared flags, and an end-to-end run in its --smoke mode (tiny networks, a few updates)."""
import json
import math
import shlex

import distill
import recipes
from benchmarks import methods


def test_every_recipe_gets_the_same_updates_and_the_shared_flags(tmp_path):
    """36 updates are 6 steps of 5 + 1 and 18 steps of SiD's 1 + 1; the quick start's lr, batch,
    warm-up and EMA 0.95 replace each recipe's own (the `sid` recipes' half-life and ramp-up
    included), everything else stays the recipe's; `realuid` runs at 0.94, 0.96 (its default
    1, 1 would be `uid`), realuid-delta is it with --param-delta beta."""
    assert set(methods.METHODS) == {*recipes.RECIPES, "realuid-delta"}
    for name in methods.METHODS:
        cmd, fake_steps, steps = methods.distill_command("t.pt", "d.npz", name, 36, 42,
                                                         str(tmp_path / name))
        assert steps * (fake_steps + 1) == 36
        assert steps == (18 if name in ("sid", "sid-real") else 6)
        args = distill.parse_args(shlex.split(cmd)[2:])
        assert (args.lr, args.batch_size, args.warmup, args.ema) == (2e-4, 32, 10, [0.95])
        recipe = methods.recipe_of(name)
        assert args.recipe == recipe and args.seed == 42 and args.steps == steps
        kept = {k: v for k, v in recipes.RECIPES[recipe]["settings"].items()
                if k not in methods.OVERRIDES}
        assert {k: getattr(args, k) for k in kept} == kept
        if recipe == "realuid":
            assert (args.alpha, args.beta) == (0.94, 0.96)
            assert args.param_delta == ("beta" if name == "realuid-delta" else "f")
    assert methods.overridden("sid", str(tmp_path)) == {
        "lr": [1e-5, 2e-4], "warmup": [0, 10],
        "ema_halflife": [0.5, float(f"{methods.HALFLIFE:.6g}")], "ema_rampup": [0.05, 1e9]}
    assert methods.overridden("realuid", str(tmp_path)) == {}


def test_smoke_run_writes_its_json_and_figure(tmp_path):
    work = tmp_path / "work"
    methods.main(methods.parse_args(["--smoke", "--work", str(work),
                                     "--methods", "realuid,sid,dmd"]))
    report = json.loads((work / "methods_cpu.json").read_text())
    assert (work / "methods_samples.png").stat().st_size > 0
    assert report["smoke"] and report["host"] and report["commit"]["head"]
    assert report["command"].startswith("python benchmarks/methods.py --smoke")
    runs = report["runs"]
    assert [(r["teacher"], r["method"]) for r in runs] == [
        (k, n) for k in ("fm", "diffusion") for n in ("realuid", "sid", "dmd")]
    for r in runs:
        assert r["exit_code"] == 0, r["command"]
        assert r["steps"] * (r["fake_steps"] + 1) == r["updates"] == 6
        assert math.isfinite(r["pixel_fd_ema"]) and math.isfinite(r["pixel_fd_start"])
        assert r["sec_per_update"] > 0 and r["peak_rss_mb"] > 0
    for kind in ("fm", "diffusion"):
        assert set(report["summary"][kind]) == {"realuid", "sid", "dmd"}
        assert "teacher, 20 Euler steps" in report["references"][kind]
    # SiD's start is sigma_init 2.5 for either teacher; RealUID's flow-matching start is t_g 0
    t_g = {(r["teacher"], r["method"]): r["t_g"] for r in runs}
    assert t_g[("fm", "realuid")] == 0 and abs(t_g[("fm", "sid")] - 1 / 3.5) < 1e-9
    assert abs(t_g[("diffusion", "realuid")] - 1 / 3.5) < 1e-9
