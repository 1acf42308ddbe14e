"""End to end through the command lines: teacher -> distill -> finetune -> sample, on tiny data."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import distill
import finetune
import sample
import sampling
import train_teacher
import unet
from conftest import FAST, ROOT, TINY_NET, load, run, tensors_equal


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_teacher_run_writes_the_official_layout(teachers, tmp_path):
    ckpt = load(teachers["uncond"])
    assert {"net_model", "ema_models", "optim", "sched", "step"} <= set(ckpt)
    assert set(ckpt["ema_models"]) == {"0.999", "0.9996", "0.9999"}
    assert ckpt["step"] == 3 and ckpt["config"]["kind"] == "teacher"
    net = unet.UNet(**ckpt["config"]["net"])
    net.load_state_dict(ckpt["net_model"], strict=True)
    out = os.path.dirname(teachers["uncond"])
    recs = records(out)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert {"loss_fm", "lr", "sec_per_step"} <= set(recs[0])
    assert json.load(open(os.path.join(out, "args.json")))["steps"] == 3
    cond = load(teachers["cond"])
    assert cond["config"]["net"]["num_classes"] == 3 and "label_emb.weight" in cond["net_model"]


@pytest.mark.parametrize("kind,extra", [
    ("uncond", ["--alpha", 0.94, "--beta", 0.96]),
    ("uncond", ["--gan-gen-coef", 0.3, "--gan-disc-coef", 1.0]),
    ("cond", ["--alpha", 0.98, "--beta", 0.96, "--gamma", 0.9]),
    ("cond", ["--alpha", 0.94, "--beta", 0.96, "--gan-gen-coef", 0.3, "--gan-disc-coef", 1.0]),
])
def test_distill_finetune_sample(teachers, tiny_data, tmp_path, kind, extra):
    out = tmp_path / "distill"
    run(distill, ["--teacher", teachers[kind], "--data", tiny_data[kind], "--out", out,
                  "--steps", 2, "--fake-steps", 2, *FAST, "--sample-every", 2, *extra])
    ckpt = load(out / "latest.pt")
    assert {"gen", "u", "ema_gens", "optim_gen", "optim_u", "sched", "step"} <= set(ckpt)
    assert ckpt["step"] == 2 and ckpt["config"]["kind"] == "distilled"
    gan = "--gan-gen-coef" in extra
    assert any(k.startswith("cls_pred_branch.") for k in ckpt["u"]) == gan
    # the generator started from the teacher and moved; the fake model started fresh and moved
    teacher_sd = load(teachers[kind])["ema_models"]["0.999"]
    assert any(not torch.equal(ckpt["gen"][k], teacher_sd[k]) for k in teacher_sd)
    recs = records(out)
    assert [r["step"] for r in recs] == [1, 2]
    want = {"loss_fake", "loss_gen", "lr", "sec_per_step"} | (
        {"loss_gan_disc", "loss_gan_gen"} if gan else set())
    assert want <= set(recs[0]) and all(np.isfinite(r["loss_gen"]) for r in recs)
    assert sorted(os.listdir(out / "samples")) == [
        "0000000_ema0.999.png", "0000000_gen.png", "0000002_ema0.999.png", "0000002_gen.png"]

    ft = tmp_path / "finetune"
    run(finetune, ["--teacher", teachers[kind], "--init-from", out / "latest.pt",
                   "--data", tiny_data[kind], "--out", ft, "--steps", 1, "--fake-steps", 1, *FAST])
    ft_ckpt = load(ft / "latest.pt")
    args = json.load(open(ft / "args.json"))
    assert (args["lr"], args["warmup"], args["alpha"], args["beta"]) == (1e-5, 0, 0.94, 1.0)

    npz, png = tmp_path / "s.npz", tmp_path / "s.png"
    run(sample, ["--ckpt", ft / "latest.pt", "--n", 7, "--out", npz, png, "--batch-size", 3])
    with np.load(npz) as f:
        assert f["images"].shape == (7, 8, 8, 3) and f["images"].dtype == np.uint8
        if kind == "cond":
            assert f["labels"].tolist() == [0, 1, 2, 0, 1, 2, 0]
        else:
            assert "labels" not in f
    assert png.stat().st_size > 0
    # the samples are the EMA generator's, one step: recompute them independently
    cfg = ft_ckpt["config"]["net"]
    net = unet.UNet(**cfg).eval()
    net.load_state_dict(ft_ckpt["ema_gens"]["0.999"])
    z = sampling.latents(0, 0, 7, (3, 8, 8))
    y = torch.arange(7) % 3 if kind == "cond" else None
    with torch.no_grad():
        expect = common.to_uint8(z + net(torch.zeros(7), z, y)).permute(0, 2, 3, 1).numpy()
    with np.load(npz) as f:
        assert np.array_equal(f["images"], expect)


def test_teacher_with_one_euler_step_is_the_generator_start(teachers, tmp_path):
    out = tmp_path / "t.npz"
    run(sample, ["--ckpt", teachers["uncond"], "--nfe", 1, "--n", 5, "--out", out, "--seed", 3])
    ckpt = load(teachers["uncond"])
    net = unet.UNet(**ckpt["config"]["net"]).eval()
    net.load_state_dict(ckpt["ema_models"]["0.999"])
    z = sampling.latents(3, 0, 5, (3, 8, 8))
    with torch.no_grad():
        start = distill.generate(net, z)   # z + v*(0, z)
    with np.load(out) as f:
        assert np.array_equal(f["images"], common.to_uint8(start).permute(0, 2, 3, 1).numpy())


def test_sample_labels_seed_and_batch_independence(teachers, tmp_path):
    a, b, c = tmp_path / "a.npz", tmp_path / "b.npz", tmp_path / "c.npz"
    run(sample, ["--ckpt", teachers["cond"], "--nfe", 2, "--n", 6, "--out", a, "--label", 2])
    run(sample, ["--ckpt", teachers["cond"], "--nfe", 2, "--n", 6, "--out", b, "--label", 2,
                 "--batch-size", 4])
    run(sample, ["--ckpt", teachers["cond"], "--nfe", 2, "--n", 6, "--out", c, "--label", 2,
                 "--seed", 1])
    fa, fb, fc = (np.load(p) for p in (a, b, c))
    assert fa["labels"].tolist() == [2] * 6
    assert np.array_equal(fa["images"], fb["images"])       # batch size does not matter
    assert not np.array_equal(fa["images"], fc["images"])   # the seed does


def test_data_free_run_never_reads_real_data(teachers, tmp_path):
    # alpha = beta = 1: the --data file does not even exist, and nothing complains.
    out = tmp_path / "free"
    run(distill, ["--teacher", teachers["cond"], "--data", tmp_path / "missing.npz",
                  "--out", out, "--steps", 1, "--fake-steps", 1, *FAST])
    assert load(out / "latest.pt")["data_batches"] == 0


def test_alpha_one_beta_below_one_warns(teachers, tiny_data, tmp_path):
    with pytest.warns(UserWarning, match="unstable"):
        run(distill, ["--teacher", teachers["uncond"], "--data", tiny_data["uncond"],
                      "--out", tmp_path, "--alpha", 1.0, "--beta", 0.96, "--steps", 1,
                      "--fake-steps", 1, *FAST])


@pytest.mark.parametrize("script", ["teacher", "distill"])
def test_resume_gives_the_same_weights(teachers, tiny_data, tmp_path, script):
    """Stop after 2 steps, resume to 4: the checkpoint equals that of a run straight to 4."""
    if script == "teacher":
        module = train_teacher
        base = ["--data", tiny_data["cond"], "--cond", "--lr", 1e-3, "--dropout", 0.1,
                *TINY_NET, *FAST]
    else:
        module = distill
        base = ["--teacher", teachers["cond"], "--data", tiny_data["cond"], "--alpha", 0.94,
                "--beta", 0.96, "--gan-gen-coef", 0.3, "--gan-disc-coef", 1.0,
                "--fake-steps", 2, "--lr", 1e-3, *FAST]
    run(module, [*base, "--out", tmp_path / "straight", "--steps", 4])
    run(module, [*base, "--out", tmp_path / "split", "--steps", 2])
    run(module, [*base, "--out", tmp_path / "split", "--steps", 4, "--resume"])
    a, b = load(tmp_path / "straight" / "latest.pt"), load(tmp_path / "split" / "latest.pt")
    a["config"].pop("args"), b["config"].pop("args")
    assert tensors_equal(a, b) == []
    assert [r["step"] for r in records(tmp_path / "split")] == [1, 2, 3, 4]


def test_authors_checkpoint_layouts_load(tmp_path, tiny_data):
    """Files as the authors' code writes them: no config, GAN head in every state dict."""
    cfg = dict(unet.PAPER_CONFIG, image_size=8, num_channels=32, channel_mult=[1],
               num_res_blocks=1, attention_resolutions=[8], num_heads=1, num_head_channels=-1,
               num_classes=3, gan_head=True)
    torch.manual_seed(0)
    net = unet.UNet(**cfg)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    sd = net.state_dict()
    teacher_file = tmp_path / "cifar10_cond_FM_400000.pt"
    torch.save({"net_model": sd, "ema_models": {"0.999": sd, "0.9996": sd, "0.9999": sd},
                "optim": {}, "sched": {}, "step": 399999}, teacher_file)
    out = tmp_path / "d"
    run(distill, ["--teacher", teacher_file, "--data", tiny_data["cond"], "--out", out,
                  "--alpha", 0.94, "--beta", 0.96, "--steps", 1, "--fake-steps", 1, *TINY_NET,
                  *FAST])
    ckpt = load(out / "latest.pt")
    assert ckpt["config"]["net"]["num_classes"] == 3  # read from the label embedding
    gen_file = tmp_path / "cifar10_cond_dist.pt"
    gsd = dict(ckpt["gen"], **{k: v for k, v in sd.items() if k.startswith("cls_pred_branch")})
    torch.save({"gen": gsd, "u": gsd, "ema_gens": {"0.9999": gsd}, "optim_gen": {},
                "optim_u": {}, "sched": {}, "step": 6000}, gen_file)
    run(sample, ["--ckpt", gen_file, "--ema", "0.9999", "--n", 3, "--out", tmp_path / "g.npz",
                 *TINY_NET])
    with np.load(tmp_path / "g.npz") as f:
        assert f["labels"].tolist() == [0, 1, 2]
    # without the network flags, the paper network is assumed and the tiny weights do not fit
    with pytest.raises(common.RealUIDError, match="do not fit the network"):
        run(sample, ["--ckpt", gen_file, "--ema", "0.9999", "--n", 3, "--out",
                     tmp_path / "h.npz"])


def test_authors_paper_size_generator_file_samples(tmp_path):
    # The paper network, conditional, with the GAN head, no config: sample.py assumes the paper
    # CIFAR-10 network and reads conditioning from label_emb.
    torch.manual_seed(0)
    net = unet.UNet(num_classes=10, gan_head=True)
    sd = net.state_dict()
    path = tmp_path / "cifar10_cond_finetuned.pt"
    torch.save({"gen": sd, "ema_gens": {"0.9999": sd}, "step": 1}, path)
    run(sample, ["--ckpt", path, "--ema", "0.9999", "--n", 2, "--out", tmp_path / "p.npz"])
    with np.load(tmp_path / "p.npz") as f:
        assert f["images"].shape == (2, 32, 32, 3) and f["labels"].tolist() == [0, 1]


@pytest.mark.parametrize("module", [train_teacher, distill, finetune, sample])
def test_help_explains_every_flag(module):
    result = subprocess.run([sys.executable, os.path.basename(module.__file__), "--help"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage:" in result.stdout
    assert module.__doc__
    parser = (distill if module is finetune else module).build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        assert action.help, f"{module.__name__}: {action.option_strings} has no help text"
        text = formatter._get_help_string(action) % {"default": action.default}
        assert text.lower().count("default:") <= 1, text  # said once, never "(default: None)"
        assert "(default: None)" not in text, text


@pytest.mark.filterwarnings("ignore:.*not comparable with published FIDs")
def test_in_training_fid_keeps_the_best_checkpoint(teachers, tiny_data, tmp_path, weights):
    import inception
    extractor = inception.InceptionFeatures(weights, mode="tf", device="cpu")
    with np.load(tiny_data["uncond"]) as f:
        images = torch.from_numpy(f["images"][:16]).permute(0, 3, 1, 2)
    mu, sigma, n = inception.feature_stats([images[:8], images[8:]], extractor)
    ref = tmp_path / "ref.npz"
    inception.save_stats(ref, mu, sigma, "tf", n, extractor.weights_sha256)

    out = tmp_path / "run"
    flags = ["--fid-every", 1, "--fid-n", 6, "--fid-batch", 4, "--fid-ref", ref,
             "--fid-weights", weights]
    run(distill, ["--teacher", teachers["uncond"], "--data", tiny_data["uncond"], "--out", out,
                  "--alpha", 0.94, "--beta", 0.96, "--steps", 3, "--fake-steps", 1, "--lr", 1e-3,
                  "--warmup", 0, *FAST, *flags])
    fids = [r for r in records(out) if "fid" in r]
    assert [r["step"] for r in fids] == [1, 2, 3]
    assert all(r["fid_samples"] == 6 and r["fid_kind"] == "in-training" for r in fids)
    best = min(fids, key=lambda r: r["fid"])
    best_ckpt = load(out / "best.pt")
    assert best_ckpt["step"] == best["step"] and best_ckpt["best_fid"] == best["fid"]
    assert load(out / "latest.pt")["step"] == 3
    # the score is the FID of the EMA generator's samples, recomputed independently here
    ema = unet.UNet(**best_ckpt["config"]["net"]).eval()
    ema.load_state_dict(best_ckpt["ema_gens"]["0.999"])
    z = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():
        x = common.to_uint8(distill.generate(ema, z))
    mu2, sigma2, _ = inception.feature_stats([x[:4], x[4:]], extractor)
    assert inception.frechet_distance(mu2, sigma2, mu, sigma) == pytest.approx(best["fid"], rel=1e-6)

    # a wrong reference fails before training, in one line
    with pytest.raises(common.RealUIDError, match="statistics file .* not found"):
        run(distill, ["--teacher", teachers["uncond"], "--data", tiny_data["uncond"],
                      "--out", tmp_path / "bad", "--steps", 1, *FAST,
                      "--fid-every", 1, "--fid-ref", tmp_path / "nope.npz"])


@pytest.mark.parametrize("page,section,script", [
    ("README.md", "## CPU quick start", "quickstart"),
    ("docs/image_to_image.md", "## The CPU quick start: 4x super-resolution", "quickstart_pairs"),
    ("docs/diffusion.md", "## CPU quick start: a diffusion teacher", "quickstart_diffusion")])
def test_readme_quick_start_is_what_the_benchmark_measures(page, section, script):
    """The figures quoted under the quick starts (the README's, and those of the image-to-image
    and diffusion pages) come from benchmarks/quickstart.py, quickstart_pairs.py and
    quickstart_diffusion.py, which rerun their commands verbatim: the lists must not drift
    apart."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    module = __import__(script)
    text = open(os.path.join(ROOT, page), encoding="utf-8").read()
    block = text.split(section, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    readme = [" ".join(c.split()) for c in block.replace("\\\n", " ").splitlines()]
    readme = [c.split("#")[0].strip() for c in readme if c.strip()]
    assert readme == [" ".join(c.split()) for c in module.COMMANDS]
