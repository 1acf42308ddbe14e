"""Speed and scale flags: gradient accumulation and torchrun processes give the update of one
large batch; precision, channels-last and compile run.

Weights after an Adam step are a poor witness of "the same update": with beta1 = 0 (the
distillation's betas) Adam moves every weight by about lr / sqrt(1 - beta2) times the sign of
its gradient, so rounding noise in near-zero gradients flips whole lr-sized steps. The
optimizer state is the sharp witness: after one step Adam's exp_avg is (1 - beta1) times the
(clipped) gradient. So the runs below take one step at a negligible learning rate and compare
the gradients the optimizers saw.
"""
import functools
import subprocess
import sys

import pytest
import torch

import distill
import train_teacher
from conftest import FAST, ROOT, TINY_NET, load, run, tensors_equal


def grads(ckpt, optimizer):
    state = ckpt[optimizer]["state"]
    return torch.cat([state[i]["exp_avg"].flatten() for i in sorted(state)]).double()


def rel_diff(a, b):
    return ((a - b).norm() / a.norm()).item()


def distill_argv(teacher, data, out, *extra):
    return ["--teacher", teacher, "--data", data, "--out", out, "--alpha", 0.94, "--beta", 0.96,
            "--gan-gen-coef", 0.3, "--gan-disc-coef", 1.0, "--steps", 1, "--fake-steps", 1,
            "--lr", 1e-9, "--warmup", 0, *FAST, *extra]


def test_gradient_accumulation_equals_one_large_batch(teachers, tiny_data, tmp_path):
    run(distill, distill_argv(teachers["cond"], tiny_data["cond"], tmp_path / "one"))
    run(distill, distill_argv(teachers["cond"], tiny_data["cond"], tmp_path / "acc",
                              "--grad-accum", 4))
    a, b = load(tmp_path / "one" / "latest.pt"), load(tmp_path / "acc" / "latest.pt")
    for opt in ("optim_u", "optim_gen"):
        assert rel_diff(grads(a, opt), grads(b, opt)) < 1e-5, opt
    # the same holds for the teacher (Adam betas (0.9, 0.999): exp_avg = 0.1 g)
    argv = ["--data", tiny_data["uncond"], "--steps", 1, "--lr", 1e-9, "--dropout", 0,
            *TINY_NET, *FAST]
    run(train_teacher, [*argv, "--out", tmp_path / "t1"])
    run(train_teacher, [*argv, "--out", tmp_path / "t2", "--grad-accum", 2])
    assert rel_diff(grads(load(tmp_path / "t1" / "latest.pt"), "optim"),
                    grads(load(tmp_path / "t2" / "latest.pt"), "optim")) < 1e-5
    # and a different batch really gives different gradients (the comparison can fail)
    run(distill, distill_argv(teachers["cond"], tiny_data["cond"], tmp_path / "seed",
                              "--seed", 7))
    assert rel_diff(grads(a, "optim_u"), grads(load(tmp_path / "seed" / "latest.pt"),
                                                  "optim_u")) > 0.1


def torchrun(*argv):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *map(str, argv)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_processes_equal_one_process(teachers, tiny_data, tmp_path):
    """torchrun with 2 processes (DistributedDataParallel, gloo on CPU) and the same global
    batch and seed gives the gradients of one process, with and without gradient accumulation
    (no_sync for all but the last micro-batch); a run resumed under torchrun equals an
    uninterrupted one."""
    run(distill, distill_argv(teachers["cond"], tiny_data["cond"], tmp_path / "one"))
    torchrun("distill.py", *distill_argv(teachers["cond"], tiny_data["cond"], tmp_path / "two"))
    torchrun("distill.py", *distill_argv(teachers["cond"], tiny_data["cond"], tmp_path / "acc",
                                         "--grad-accum", 2))
    a = load(tmp_path / "one" / "latest.pt")
    for other in ("two", "acc"):
        b = load(tmp_path / other / "latest.pt")
        for opt in ("optim_u", "optim_gen"):
            assert rel_diff(grads(a, opt), grads(b, opt)) < 1e-4, (other, opt)
        assert len(b["rng"]["per_rank"]) == 2

    base = distill_argv(teachers["cond"], tiny_data["cond"], None)[6:] + ["--lr", 1e-3]
    torchrun("distill.py", "--teacher", teachers["cond"], "--data", tiny_data["cond"],
             "--out", tmp_path / "straight", *base, "--steps", 2)
    torchrun("distill.py", "--teacher", teachers["cond"], "--data", tiny_data["cond"],
             "--out", tmp_path / "split", *base, "--steps", 1)
    torchrun("distill.py", "--teacher", teachers["cond"], "--data", tiny_data["cond"],
             "--out", tmp_path / "split", *base, "--steps", 2, "--resume")
    a, b = load(tmp_path / "straight" / "latest.pt"), load(tmp_path / "split" / "latest.pt")
    a["config"].pop("args"), b["config"].pop("args")
    assert tensors_equal(a, b) == []


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_and_stays_close(teachers, tiny_data, tmp_path, precision):
    # fp16's gradient scaler starts at 2^16 and halves on overflow: give it steps to settle.
    steps = ["--steps", 10 if precision == "fp16" else 1]
    run(distill, distill_argv(teachers["uncond"], tiny_data["uncond"], tmp_path / "fp32",
                              *steps))
    run(distill, distill_argv(teachers["uncond"], tiny_data["uncond"], tmp_path / precision,
                              "--precision", precision, "--channels-last", *steps))
    a, b = load(tmp_path / "fp32" / "latest.pt"), load(tmp_path / precision / "latest.pt")
    # the gradients of the generator agree to the precision's few significant digits
    assert rel_diff(grads(a, "optim_gen"), grads(b, "optim_gen")) < 0.1
    for sd in (b["gen"], b["u"]):
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in sd.values())
    if precision == "fp16":
        assert b["scaler_gen"]["scale"] > 0


def test_compile_flag(teachers, tiny_data, tmp_path, monkeypatch):
    # Inductor's C++ build takes minutes on this CPU; the eager backend still runs Dynamo's
    # tracing, recompiles and wrappers, which is what our code must cope with.
    monkeypatch.setattr(torch, "compile",
                        functools.partial(torch.compile, backend="eager"))
    run(distill, distill_argv(teachers["uncond"], tiny_data["uncond"], tmp_path / "c",
                              "--compile", "--steps", 2))
    ckpt = load(tmp_path / "c" / "latest.pt")
    assert not any("_orig_mod" in k for k in ckpt["gen"])  # clean keys, official layout
    run(distill, distill_argv(teachers["uncond"], tiny_data["uncond"], tmp_path / "e",
                              "--steps", 2))
    assert rel_diff(grads(load(tmp_path / "e" / "latest.pt"), "optim_gen"),
                    grads(ckpt, "optim_gen")) < 1e-4


def test_deterministic_flag_changes_nothing_on_cpu(teachers, tiny_data, tmp_path):
    """--deterministic picks deterministic kernels; on a CPU, where runs are deterministic
    anyway, the update is bit-identical to the default one."""
    try:
        run(distill, distill_argv(teachers["uncond"], tiny_data["uncond"], tmp_path / "det",
                                  "--deterministic"))
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    run(distill, distill_argv(teachers["uncond"], tiny_data["uncond"], tmp_path / "plain"))
    a, b = load(tmp_path / "det" / "latest.pt"), load(tmp_path / "plain" / "latest.pt")
    a["config"].pop("args"), b["config"].pop("args")
    assert tensors_equal(a, b) == []
