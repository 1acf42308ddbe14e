"""Image-to-image RealUID (Appendix C) through its functions and its command lines: the built-in
corruptions against hand computations, pairs files, a coupling teacher and its distillation for
both paths (cond-fm with a class-conditional pairs file, bridge with a built-in task), resume,
the data-free setting that never reads the targets, sample.py's translations and
eval_pairs.py, and the one-line errors. The losses' closed forms are in
test_coupling_losses.py."""
import json
import math
import os

import numpy as np
import pytest
import torch

import common
import coupling
import distill
import eval_pairs
import finetune
import sample
import train_teacher
import unet
from conftest import FAST, TINY_NET, load, run, shapes_dataset, tensors_equal
from test_errors import fails


# ---------------------------------------------------------------------------------------------
# The conventions by hand

def test_corruptions_against_hand_computations():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4) / 48 - 1
    # sr2: every 2x2 block becomes its mean
    s = coupling.corrupt(x, "sr2")
    block = x[0, 1, :2, 2:].mean()
    assert torch.allclose(s[0, 1, :2, 2:], block.expand(2, 2))
    assert torch.allclose(s[1, 2, 2:, :2], x[1, 2, 2:, :2].mean().expand(2, 2))
    # sr4: the whole 4x4 image of each channel becomes its mean
    s = coupling.corrupt(x, "sr4")
    assert torch.allclose(s, x.mean((2, 3), keepdim=True).expand_as(x))
    # inpaint: the centred 2x2 square (rows 1-2, columns 1-2 of 4x4) is 0, the rest untouched
    s = coupling.corrupt(x, "inpaint")
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[1:3, 1:3] = True
    assert torch.all(s[..., mask] == 0) and torch.equal(s[..., ~mask], x[..., ~mask])
    # gray: luminance into all three channels
    s = coupling.corrupt(x, "gray")
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for c in range(3):
        assert torch.allclose(s[:, c], luma)
    # denoise: x + 0.2 noise, with the caller's noise
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(coupling.corrupt(x, "denoise", noise), x + 0.2 * noise)
    # odd sizes: the inpainting square of a 5x5 image is rows/columns 1-2
    s = coupling.corrupt(torch.ones(1, 1, 5, 5), "inpaint")
    assert s[0, 0].sum() == 25 - 4 and s[0, 0, 1:3, 1:3].abs().sum() == 0
    assert "divisible by 4" in coupling.check_task("sr4", (3, 6, 6))
    assert "RGB" in coupling.check_task("gray", (1, 8, 8))
    assert coupling.check_task("sr2", (3, 8, 8)) is None


def test_paths_and_psnr():
    assert coupling.path_coefficients("cond-fm", 0.3) == (0.0, 1.0)
    assert coupling.path_coefficients("bridge", 0.3) == (1.0, 0.3)
    s, eps = torch.randn(3, 2), torch.randn(3, 2)
    assert torch.equal(coupling.start(s, eps, 0.0, 1.0), eps)  # cond-fm: exactly the noise
    assert torch.allclose(coupling.start(s, eps, 1.0, 0.3), s + 0.3 * eps)
    a = torch.full((2, 3, 4, 4), 100, dtype=torch.uint8)
    assert coupling.psnr(a + 1, a) == pytest.approx(10 * math.log10(255 ** 2))
    b = a.clone()
    b[0] += 2  # MSE = (4 + 0) / 2 = 2 over the set
    assert coupling.psnr(b, a) == pytest.approx(10 * math.log10(255 ** 2 / 2))


def test_unet_image_condition():
    cfg = dict(image_size=8, num_channels=32, channel_mult=(1,), num_res_blocks=1,
               attention_resolutions="8", num_heads=1, num_head_channels=-1)
    plain, cond = unet.UNet(**cfg), unet.UNet(**cfg, cond_channels=3)
    assert list(plain.state_dict()) == list(cond.state_dict())  # same keys, one wider conv
    assert plain.input_blocks[0][0].weight.shape[1] == 3
    assert cond.input_blocks[0][0].weight.shape[1] == 6
    assert unet.UNet(**plain.config).config == plain.config and plain.config["cond_channels"] == 0
    torch.manual_seed(0)
    for p in cond.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, t, s = torch.randn(2, 3, 8, 8), torch.rand(2), torch.randn(2, 3, 8, 8)
    out = cond(t, x, None, s)
    assert out.shape == x.shape and not torch.allclose(out, cond(t, x, None, s + 1))
    with pytest.raises(ValueError, match=r"pass a source s of shape \[2, 3, 8, 8\], got None"):
        cond(t, x)
    with pytest.raises(ValueError, match="no image condition"):
        plain(t, x, None, s)


# ---------------------------------------------------------------------------------------------
# Through the command lines

@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    """Clean images (for --task), a class-labelled pairs file (sr2 sources) and a second pairs
    file with the same sources but other targets."""
    d = tmp_path_factory.mktemp("pairs")
    images, labels = shapes_dataset(64)
    x1 = common.from_uint8(torch.from_numpy(images).permute(0, 3, 1, 2))
    src = common.to_uint8(coupling.corrupt(x1, "sr2")).permute(0, 2, 3, 1).numpy()
    np.savez(d / "clean.npz", images=images, labels=labels)
    np.savez(d / "pairs.npz", source=src, images=images, labels=labels)
    np.savez(d / "pairs_other_targets.npz", source=src, images=images[::-1].copy(),
             labels=labels)
    held, held_labels = shapes_dataset(32, seed=9)
    np.savez(d / "held.npz", images=held, labels=held_labels)
    return d


def teacher_run(out, data, *extra, steps=3):
    run(train_teacher, ["--data", data, "--out", out, "--steps", steps, "--lr", 2e-3,
                        "--warmup", 0, "--ema", 0.9, *TINY_NET, *FAST, *extra])
    return out / "latest.pt"


@pytest.fixture(scope="module")
def coupling_teachers(tmp_path_factory, pair_files):
    d = tmp_path_factory.mktemp("coupling_teachers")
    return {"bridge": teacher_run(d / "bridge", pair_files / "clean.npz", "--task", "sr2",
                                  "--path", "bridge", "--source-noise", 0.3),
            "cond-fm": teacher_run(d / "condfm", pair_files / "pairs.npz", "--cond",
                                   "--path", "cond-fm")}


def test_teacher_checkpoint_records_the_coupling(coupling_teachers):
    cfg = load(coupling_teachers["bridge"])["config"]
    assert cfg["coupling"] == {"task": "sr2", "path": "bridge", "kappa": 1.0, "sigma": 0.3}
    assert cfg["net"]["cond_channels"] == 3
    cfg = load(coupling_teachers["cond-fm"])["config"]
    assert cfg["coupling"] == {"task": None, "path": "cond-fm", "kappa": 0.0, "sigma": 1.0}
    assert cfg["net"]["num_classes"] == 3


@pytest.mark.parametrize("path", ["bridge", "cond-fm"])
def test_distill_resume_finetune_sample_score(coupling_teachers, pair_files, tmp_path, path):
    """RealUID + GAN on a coupling: a split run resumed with --resume RUN_DIR alone equals a
    straight one; fine-tuning, sampling (--data and --source, several per source) and
    eval_pairs.py run on the result."""
    data = pair_files / ("clean.npz" if path == "bridge" else "pairs.npz")
    base = ["--teacher", coupling_teachers[path], "--teacher-ema", 0.9, "--data", data,
            "--alpha", 0.94, "--beta", 0.96, "--gan-gen-coef", 0.3, "--gan-disc-coef", 1.0,
            "--fake-steps", 2, "--lr", 1e-3, "--ema", 0.9, *FAST]
    run(distill, [*base, "--out", tmp_path / "straight", "--steps", 3])
    run(distill, [*base, "--out", tmp_path / "split", "--steps", 2])
    run(distill, ["--resume", tmp_path / "split", "--steps", 3])
    a, b = load(tmp_path / "straight" / "latest.pt"), load(tmp_path / "split" / "latest.pt")
    assert a["config"]["coupling"] == load(coupling_teachers[path])["config"]["coupling"]
    a["config"].pop("args"), b["config"].pop("args")
    assert tensors_equal(a, b) == []

    run(finetune, ["--teacher", coupling_teachers[path], "--teacher-ema", 0.9,
                   "--init-from", tmp_path / "straight" / "latest.pt", "--init-ema", 0.9,
                   "--data", data, "--out", tmp_path / "ft", "--steps", 1, "--fake-steps", 1,
                   "--ema", 0.9, *FAST])
    gen = tmp_path / "straight" / "latest.pt"
    held = pair_files / ("held.npz" if path == "bridge" else "pairs.npz")
    run(sample, ["--ckpt", gen, "--data", held, "--n", 5, "--per-source", 2, "--out",
                 tmp_path / "t.npz", tmp_path / "t.png"])
    with np.load(tmp_path / "t.npz") as f:
        assert f["images"].shape == f["source"].shape == f["targets"].shape == (10, 8, 8, 3)
        assert np.array_equal(f["source"][0], f["source"][1])  # two per source, aligned
        assert not np.array_equal(f["images"][0], f["images"][1])  # different noise
        if path == "cond-fm":
            assert f["labels"].tolist() == np.repeat(np.load(held)["labels"][:5], 2).tolist()
    run(sample, ["--ckpt", gen, "--source", tmp_path / "t.npz", "--n", 3, "--out",
                 tmp_path / "u.npz"])
    with np.load(tmp_path / "u.npz") as f:
        assert f["images"].shape == (3, 8, 8, 3)
    table = run(eval_pairs, ["--ckpt", gen, "--data", held, "--n", 16, "--nfe", 3,
                      "--device", "cpu", "--out", tmp_path / "score.json"])
    assert list(table)[:3] == ["source itself", "one-step start x0 + v*(0, x0, s)",
                               "teacher, 3 Euler steps"]
    assert json.load(open(tmp_path / "score.json"))["n"] == 16
    assert all(np.isfinite(r["psnr_db"]) and r["pixel_fd"] >= 0 for r in table.values())


def test_data_free_coupling_reads_sources_but_never_targets(coupling_teachers, pair_files,
                                                           tmp_path):
    """alpha = beta = 1 (IBMD's setting): two pairs files with the same sources and different
    targets give the same run; with alpha, beta < 1 the targets matter."""
    def distil(name, data, *extra):
        run(distill, ["--teacher", coupling_teachers["cond-fm"], "--teacher-ema", 0.9,
                      "--data", data, "--out", tmp_path / name, "--steps", 2, "--fake-steps", 1,
                      "--lr", 1e-3, *FAST, *extra])
        return load(tmp_path / name / "latest.pt")
    a = distil("a", pair_files / "pairs.npz")
    b = distil("b", pair_files / "pairs_other_targets.npz")
    assert a["data_batches"] == 2 * 2  # the sources were read: one batch per update
    assert torch.equal(a["gen"]["out.2.weight"], b["gen"]["out.2.weight"])
    assert tensors_equal(a["gen"], b["gen"]) == [] and tensors_equal(a["u"], b["u"]) == []
    c = distil("c", pair_files / "pairs.npz", "--alpha", 0.94, "--beta", 0.96)
    d = distil("d", pair_files / "pairs_other_targets.npz", "--alpha", 0.94, "--beta", 0.96)
    assert tensors_equal(c["u"], d["u"]) != []


def test_coupling_errors(coupling_teachers, pair_files, teachers, tiny_data, tmp_path):
    bad = tmp_path / "bad.npz"
    images, _ = shapes_dataset(16)
    np.savez(bad, source=np.zeros((16, 4, 4, 3), np.uint8), images=images)
    out = tmp_path / "out"
    fails(train_teacher, ["--data", bad, "--out", out, "--steps", 1, *TINY_NET, *FAST],
          "differ in shape", out)
    fails(distill, ["--teacher", teachers["uncond"], "--data", tiny_data["uncond"], "--task",
                    "sr2", "--alpha", 0.94, "--beta", 0.96, "--out", out, *FAST],
          "was trained without one", out)
    fails(distill, ["--teacher", coupling_teachers["bridge"], "--teacher-ema", 0.9,
                    "--data", pair_files / "pairs.npz", "--out", out, *FAST],
          "pass clean images as --data, not pairs", out)
    fails(distill, ["--teacher", coupling_teachers["cond-fm"], "--teacher-ema", 0.9,
                    "--data", pair_files / "clean.npz", "--out", out, *FAST],
          "trained on a pairs file", out)
    unlabelled = tmp_path / "unlabelled.npz"
    with np.load(pair_files / "pairs.npz") as f:
        np.savez(unlabelled, source=f["source"], images=f["images"])
    fails(train_teacher, ["--data", unlabelled, "--cond", "--out", out, "--steps", 1,
                          *TINY_NET, *FAST], "needs labels", out)
    fails(train_teacher, ["--data", pair_files / "pairs.npz", "--task", "sr2", "--out", out,
                          "--steps", 1, *TINY_NET, *FAST], "drop one of them", out)
    from PIL import Image
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "big.png")
    fails(sample, ["--ckpt", coupling_teachers["bridge"], "--source", tmp_path / "big.png",
                   "--out", out / "x.png"], "sources are 3x16x16 but the model translates 3x8x8")
    fails(sample, ["--ckpt", coupling_teachers["bridge"], "--out", out / "x.png"],
          "give exactly one of --source")
    fails(sample, ["--ckpt", teachers["uncond"], "--source", tmp_path / "big.png", "--out",
                   out / "x.png"], "noise-to-image model")
    assert not out.exists()  # nothing half written, not even the folder
