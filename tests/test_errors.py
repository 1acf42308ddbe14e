"""Bad input fails with a one-line `error: ...` naming the problem, a non-zero exit, and nothing
half written."""
import contextlib
import io
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
import train_teacher
from conftest import FAST, ROOT, TINY_NET, load, run, shapes_dataset


def error_of(module, argv):
    """Run a command line in-process; return its one-line error: the library's RealUIDError,
    or argparse's (exit code 2, one line on stderr). Fails the test if there is none."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            run(module, argv)
    except common.RealUIDError as e:
        return f"error: {e}"
    except SystemExit as e:
        assert e.code == 2, e.code
        return stderr.getvalue().rstrip("\n")
    pytest.fail(f"{module.__name__} {argv} did not fail")


def fails(module, argv, match, out=None):
    """Expect a one-line `error:` message matching `match`, and nothing half written in out."""
    message = error_of(module, argv)
    assert message.startswith("error: ") and "\n" not in message, message
    assert match in message, message
    if out is not None and os.path.isdir(out):
        assert not [f for f in os.listdir(out) if f.endswith(".pt") or ".tmp" in f]
    return message


def distill_args(teacher, data, out, *extra):
    return ["--teacher", teacher, "--data", data, "--out", out, "--steps", 1, "--fake-steps", 1,
            "--alpha", 0.94, "--beta", 0.96, *FAST, *extra]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, teachers):
    d = tmp_path_factory.mktemp("bad")
    (d / "garbage.pt").write_bytes(os.urandom(2000))
    good = (teachers["uncond"]).read_bytes()
    (d / "truncated.pt").write_bytes(good[: len(good) // 2])
    torch.save([1, 2, 3], d / "list.pt")
    sd = load(teachers["uncond"])["ema_models"]["0.999"]
    torch.save({"gen": sd, "ema_gens": {"0.999": sd}}, d / "generator.pt")
    nan_sd = {k: v.clone() for k, v in sd.items()}
    next(iter(nan_sd.values())).fill_(float("nan"))
    ckpt = load(teachers["uncond"])
    ckpt["ema_models"]["0.999"] = nan_sd
    torch.save(ckpt, d / "nan_teacher.pt")
    big, _ = shapes_dataset(16, size=16)
    np.savez(d / "big.npz", images=big)
    gray, _ = shapes_dataset(16, channels=1)
    np.savez(d / "gray.npz", images=gray)
    np.savez(d / "float.npz", images=np.zeros((16, 8, 8, 3), np.float32))
    return d


@pytest.mark.parametrize("teacher,match", [
    ("missing.pt", "not found"),
    ("garbage.pt", "corrupt"),
    ("truncated.pt", "corrupt"),
    ("list.pt", "not a checkpoint dict"),
    ("generator.pt", "is a distilled checkpoint, but a train_teacher.py checkpoint"),
    ("nan_teacher.pt", "NaN/inf"),
])
def test_bad_teacher_files(bad_files, tiny_data, tmp_path, teacher, match):
    fails(distill, distill_args(bad_files / teacher, tiny_data["uncond"], tmp_path), match,
          tmp_path)


@pytest.mark.parametrize("data,match", [
    ("big.npz", "3x16x16 but the teacher"),
    ("gray.npz", "1x8x8 but the teacher"),
    ("float.npz", "expected uint8 images"),
    ("missing.npz", "does not exist"),
])
def test_data_that_does_not_fit(bad_files, teachers, tmp_path, data, match):
    fails(distill, distill_args(teachers["uncond"], bad_files / data, tmp_path), match, tmp_path)


def test_conditional_teacher_needs_labels(teachers, tiny_data, tmp_path):
    fails(distill, distill_args(teachers["cond"], tiny_data["uncond"], tmp_path), "labels",
          tmp_path)
    fails(train_teacher, ["--data", tiny_data["uncond"], "--cond", "--out", tmp_path,
                          "--steps", 1, *TINY_NET, *FAST], "labels", tmp_path)


def test_cond_flag_with_unconditional_teacher(teachers, tiny_data, tmp_path):
    fails(distill, distill_args(teachers["uncond"], tiny_data["uncond"], tmp_path, "--cond"),
          "unconditional", tmp_path)


@pytest.mark.parametrize("flag,value", [("--alpha", 0), ("--alpha", 1.5), ("--beta", 0),
                                        ("--beta", 1.2), ("--gamma", -0.1)])
def test_coefficients_outside_the_unit_interval(teachers, tiny_data, tmp_path, flag, value):
    fails(distill, distill_args(teachers["uncond"], tiny_data["uncond"], tmp_path, flag, value),
          f"argument {flag}: {value} is not a number in (0, 1]", tmp_path)


def test_wrong_kind_for_finetuning_and_resume(teachers, tiny_data, tmp_path):
    fails(finetune, ["--teacher", teachers["uncond"], "--init-from", teachers["uncond"],
                     "--data", tiny_data["uncond"], "--out", tmp_path, "--steps", 1, *FAST],
          "is a teacher checkpoint, but a distill.py", tmp_path)
    fails(distill, distill_args(teachers["uncond"], tiny_data["uncond"], tmp_path, "--resume"),
          "latest.pt not found", tmp_path)
    message = fails(train_teacher, ["--data", tiny_data["cond"], "--out", tmp_path, "--steps", 9,
                                    "--resume", teachers["cond"], *TINY_NET, "--num-channels",
                                    64, *FAST], "differ from the run's own flags")
    assert "--num-channels 64 (the run: 32)" in message and "--init-from" in message


def test_batch_larger_than_the_data(teachers, tiny_data, tmp_path):
    fails(distill, distill_args(teachers["uncond"], tiny_data["uncond"], tmp_path,
                                "--batch-size", 128), "fewer than one batch", tmp_path)
    fails(distill, distill_args(teachers["uncond"], tiny_data["uncond"], tmp_path,
                                "--batch-size", 6, "--grad-accum", 4), "does not split", tmp_path)


def test_sample_errors(teachers, tmp_path):
    fails(sample, ["--ckpt", teachers["uncond"], "--ema", "0.5", "--out", tmp_path / "a.npz"],
          "no EMA 0.5; available: 0.999, 0.9996, 0.9999")
    fails(sample, ["--ckpt", teachers["uncond"], "--out", tmp_path / "a.jpg"], ".npz")
    fails(sample, ["--ckpt", teachers["uncond"], "--label", 1, "--out", tmp_path / "a.npz"],
          "unconditional")
    assert not os.listdir(tmp_path)


def test_toy_data_errors(tmp_path):
    import toy_data
    fails(toy_data, ["--n", 0, "--out", tmp_path / "t.npz"], "--n: 0 is not an integer >= 1")
    fails(toy_data, ["--size", "x", "--out", tmp_path / "t.npz"], "'x' is not an integer >= 1")
    assert not os.listdir(tmp_path)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path):
    # An absurd learning rate makes the weights overflow after the first update.
    message = fails(train_teacher, ["--data", tiny_data["uncond"], *TINY_NET, "--out", tmp_path,
                                    "--steps", 5, "--lr", 1e30, "--warmup", 0, "--save-every", 1,
                                    *FAST], "flow-matching loss is")
    assert "at step 2" in message and "latest.pt (step 1)" in message
    ckpt = load(tmp_path / "latest.pt")
    assert ckpt["step"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["net_model"].values())
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_non_finite_distillation_loss_stops(teachers, tiny_data, tmp_path):
    # The fake model overflows in its first update, the generator loss at step 1 is not finite.
    message = fails(distill, distill_args(teachers["uncond"], tiny_data["uncond"], tmp_path,
                                          "--lr", 1e30, "--warmup", 0, "--save-every", 1),
                    "generator loss is", tmp_path)
    assert "at step 1" in message and "no checkpoint was written" in message


def test_command_line_exit_code_and_single_line(tmp_path):
    result = subprocess.run([sys.executable, "distill.py", "--teacher", str(tmp_path / "no.pt"),
                             "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: teacher checkpoint file not found: {tmp_path / 'no.pt'}; check the path"]
