"""Runs that are safe to stop, resume and misuse: each test pins one bug reported against
1ecc78f (it fails there and passes now), through the command line wherever the bug concerns
one. The authors' continuation that no longer rewinds on resume and runs --lr, resumes that
never write into another run or read other data, denoise evaluation on training's float
sources, a Ctrl-C or SIGTERM at any moment of start-up, the other player in eval mode and the
GAN head in float32 under mixed precision, --grad-accum on resume, --threads, and one-line,
accurate messages instead of tracebacks, misleading errors or silently ignored flags."""
import json
import os
import shutil
import signal
import math
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import common
import coupling
import distill
import losses
import sample
import sampling
import toy_data
import train_teacher
import unet
from conftest import FAST, ROOT, TINY_NET, load, run, shapes_dataset, tensors_equal
from test_errors import fails
from test_runs import TINY_CFG, AuthorsRun

try:
    import runs
    import players
except ImportError:  # 1ecc78f kept the run machinery in common.py
    runs = None


def distill_argv(teacher, data, out, steps, *extra):
    """A tiny RealUID run: one fake-model update per step, a record every step."""
    return ["--teacher", teacher, "--data", data, "--out", out, "--steps", steps,
            "--alpha", 0.94, "--beta", 0.96, "--fake-steps", 1, "--lr", 1e-3, "--warmup", 2,
            "--ema", 0.95, *FAST, *extra]


def comparable(path):
    """A checkpoint without its flags (which name --out, --steps, --resume)."""
    ckpt = load(path)
    ckpt["config"].pop("args")
    return ckpt


def logged_steps(out):
    return [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]


def files_of(folder):
    return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder))
            if (folder / f).is_file()}


@pytest.fixture(scope="module")
def distilled_run(tmp_path_factory, teachers, tiny_data):
    """A one-step distillation run that tests read (copy it before resuming it)."""
    out = tmp_path_factory.mktemp("distilled") / "run"
    run(distill, distill_argv(teachers["uncond"], tiny_data["uncond"], out, 1))
    return out


@pytest.fixture
def authors_file(tmp_path):
    """The authors' train_distil.py after 13 updates (two generator updates: step 2 here),
    saved in their layout, base lr 1e-3 with a warm-up of 3."""
    authors = AuthorsRun(tmp_path)
    authors.train(13)
    authors.path = tmp_path / "cifar10_uncond_dist_step_12.pt"
    authors.save(authors.path)
    return authors


def authors_argv(authors, data, out, steps, *extra):
    return ["--resume", authors.path, "--teacher", authors.teacher_path, "--data", data,
            "--alpha", 0.94, "--beta", 0.96, "--warmup", 3, "--ema", 0.999, "--steps", steps,
            "--out", out, *TINY_NET, *FAST, *extra]


# ---------------------------------------------------------------------------------------------
# 1, 4. The authors' continuation

def test_resumed_authors_continuation_continues_where_it_stopped(tmp_path, tiny_data,
                                                                  authors_file, capsys):
    """Their 13 updates are our step 2; a continuation stopped at step 4 and resumed alone
    goes on with steps 5 and 6 as one of our runs (RNG and data position restored), and ends
    bit for bit where an uninterrupted continuation ends."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run(distill, authors_argv(authors_file, tiny_data["uncond"], straight, 6, "--lr", 1e-3))
    run(distill, authors_argv(authors_file, tiny_data["uncond"], stopped, 4, "--lr", 1e-3))
    assert load(stopped / "latest.pt")["step"] == 4
    assert logged_steps(stopped) == [3, 4]
    assert json.load(open(stopped / "args.json"))["resume"] == str(authors_file.path)
    capsys.readouterr()
    run(distill, ["--resume", stopped, "--steps", 6])  # its args.json names their file
    out = capsys.readouterr().out
    assert f"resumed {stopped}/latest.pt at step 4" in out, out
    assert "authors' checkpoint" not in out, out
    assert logged_steps(stopped) == [3, 4, 5, 6]
    assert load(stopped / "latest.pt")["step"] == 6
    assert tensors_equal(comparable(straight / "latest.pt"),
                         comparable(stopped / "latest.pt")) == []


def test_authors_continuation_runs_the_command_lines_lr(tmp_path, tiny_data, authors_file):
    """Their files carry their base lr (1e-3 here) in `sched` and in the Adam groups; the
    continuation runs --lr 1e-4 for both players (their warm-up was over at step 3)."""
    assert authors_file.opt_g.param_groups[0]["initial_lr"] == 1e-3
    out = tmp_path / "ours"
    run(distill, authors_argv(authors_file, tiny_data["uncond"], out, 3, "--lr", 1e-4))
    ckpt = load(out / "latest.pt")
    assert ckpt["step"] == 3
    for optim, sched in (("optim_gen", "sched"), ("optim_u", "sched_u")):
        group = ckpt[optim]["param_groups"][0]
        assert group["lr"] == pytest.approx(1e-4), (optim, group["lr"])
        assert ckpt[sched]["base_lrs"] == [pytest.approx(1e-4)], sched
    assert ckpt["optim_gen"]["param_groups"][0]["initial_lr"] == pytest.approx(1e-4)
    record = json.loads(open(out / "metrics.jsonl").readlines()[-1])
    assert record["step"] == 3 and record["lr"] == pytest.approx(1e-4)
    # and so does the run resumed as ours
    run(distill, ["--resume", out, "--steps", 4])
    ckpt = load(out / "latest.pt")
    assert ckpt["step"] == 4
    for optim in ("optim_gen", "optim_u"):
        assert ckpt[optim]["param_groups"][0]["lr"] == pytest.approx(1e-4), optim


# ---------------------------------------------------------------------------------------------
# 2, 3, 8. What a resume may and may not do

def test_continuing_the_authors_file_never_writes_into_the_default_out(
        tmp_path, teachers, tiny_data, authors_file, monkeypatch):
    """Their file carries no run folder: without --out the continuation would write into the
    default runs/run, which may hold another run; it is refused, and that run is untouched."""
    monkeypatch.chdir(tmp_path)
    run(distill, distill_argv(teachers["uncond"], tiny_data["uncond"], "runs/run", 1))
    before = files_of(tmp_path / "runs" / "run")
    argv = authors_argv(authors_file, tiny_data["uncond"], "unused", 3)
    argv = argv[:argv.index("--out")] + argv[argv.index("--out") + 2:]  # no --out
    fails(distill, argv, "holds another run")
    assert files_of(tmp_path / "runs" / "run") == before


def test_resume_never_writes_into_another_run(tmp_path, teachers, tiny_data, distilled_run):
    a = tmp_path / "a"
    shutil.copytree(distilled_run, a)
    b = tmp_path / "b"
    run(distill, distill_argv(teachers["uncond"], tiny_data["uncond"], b, 1, "--seed", 7))
    only_args, only_metrics = tmp_path / "only_args", tmp_path / "only_metrics"
    only_args.mkdir()
    (only_args / "args.json").write_text("{}\n")
    only_metrics.mkdir()
    (only_metrics / "metrics.jsonl").write_text('{"step": 1}\n')
    for target in (b, only_args, only_metrics):
        before = files_of(target)
        fails(distill, ["--resume", a, "--out", target, "--steps", 2], "holds another run")
        assert files_of(target) == before, target
    assert load(a / "latest.pt")["step"] == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    run(distill, ["--resume", a, "--out", empty, "--steps", 2])
    assert load(empty / "latest.pt")["step"] == 2 and logged_steps(empty) == [2]
    assert load(a / "latest.pt")["step"] == 1


def test_resume_refuses_other_data_of_the_same_shape(tmp_path, tiny_data, distilled_run):
    a = tmp_path / "a"
    shutil.copytree(distilled_run, a)
    other = tmp_path / "other.npz"
    np.savez(other, images=shapes_dataset(64, seed=1)[0])  # 64 images 8x8x3, other content
    fails(distill, ["--resume", a, "--data", other, "--steps", 2], "--data is not the data")
    assert load(a / "latest.pt")["step"] == 1
    moved = tmp_path / "moved.npz"
    shutil.copy(tiny_data["uncond"], moved)
    run(distill, ["--resume", a, "--data", moved, "--steps", 2])
    assert load(a / "latest.pt")["step"] == 2


def test_grad_accum_may_change_on_resume(tmp_path, distilled_run):
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(distilled_run, one)
    shutil.copytree(distilled_run, two)
    run(distill, ["--resume", one, "--steps", 3])
    run(distill, ["--resume", two, "--steps", 3, "--grad-accum", 2])
    a, b = load(one / "latest.pt"), load(two / "latest.pt")
    assert b["config"]["args"]["grad_accum"] == 2
    assert (a["step"], a["data_batches"]) == (b["step"], b["data_batches"]) == (3, 6)
    assert tensors_equal(a["rng"], b["rng"]) == []  # the same noise and data
    # The same updates up to the order of float sums: Adam with beta1 = 0 moves a weight whose
    # gradient is rounding noise by +-lr either way (test_scale.py), so compare the whole
    # difference with the resumed steps' own movement of the weights.
    start = load(distilled_run / "latest.pt")
    for key in ("gen", "u"):
        flat = lambda ckpt: torch.cat([v.flatten() for v in ckpt[key].values()])  # noqa: E731
        moved = (flat(a) - flat(start)).norm()
        assert moved > 0 and (flat(a) - flat(b)).norm() < 0.01 * moved, key
        assert (flat(a) - flat(b)).abs().gt(1e-5).float().mean() < 0.01, key


# ---------------------------------------------------------------------------------------------
# 5. Image-to-image evaluation sees training's sources

def test_denoise_evaluation_uses_the_float_sources_of_training(tmp_path, tiny_data):
    tdir = tmp_path / "denoise"
    run(train_teacher, ["--data", tiny_data["uncond"], "--task", "denoise", "--out", tdir,
                        "--steps", 1, "--lr", 1e-3, "--warmup", 0, *TINY_NET, *FAST])
    model = sampling.load_model(str(tdir / "latest.pt"), "first", unet.PAPER_CONFIG)
    assert model.coupling["task"] == "denoise"
    shape, n, seed = (3, 8, 8), 16, 3
    src, targets, _ = sampling.held_out_pairs(str(tiny_data["uncond"]), model.coupling, shape, n,
                                            seed)
    images = np.load(tiny_data["uncond"])["images"][:n]
    x1 = common.from_uint8(torch.from_numpy(images).permute(0, 3, 1, 2))
    noise = torch.randn(x1.shape, generator=torch.Generator().manual_seed(seed))
    assert src.is_floating_point(), src.dtype
    assert torch.equal(src, coupling.corrupt(x1, "denoise", noise))  # x1 + 0.2 n, as trained
    assert (src.abs() > 1).any()  # neither clipped ...
    assert not torch.equal(src, common.from_uint8(common.to_uint8(src)))  # ... nor quantised
    assert np.array_equal(targets.permute(0, 2, 3, 1).numpy(), images)

    out = tmp_path / "out.npz"
    run(sample, ["--ckpt", tdir / "latest.pt", "--data", tiny_data["uncond"], "--n", n,
                 "--nfe", 2, "--seed", seed, "--out", out, "--device", "cpu"])
    c = model.coupling
    model.net.eval()
    z = coupling.start(src, sampling.latents(seed, 0, n, shape), c["kappa"], c["sigma"])
    with torch.no_grad():
        expected = common.to_uint8(sampling.one_pass(model, z, None, src, 2).float())
    assert np.array_equal(np.load(out)["images"], expected.permute(0, 2, 3, 1).numpy())


# ---------------------------------------------------------------------------------------------
# 6. A stop at any moment of start-up

def start_in_background(script, argv):
    """A command as a shell's background job starts it: SIGINT inherited ignored."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, script, *map(str, argv)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_during_start_up_is_one_line(teachers, tiny_data, tmp_path, sig):
    """At 0.3 s (importing torch) and at 60% of the time this host takes to import distill.py
    in a fresh interpreter (still inside the imports: a fixed 2 s landed in the loop on an idle
    2-core Intel Xeon VM, where the loop starts before 2 s): exit status 128 + the signal, one
    line on stderr, no traceback, no checkpoint; the same command again is then accepted.
    (SIGINT is inherited ignored, as in a shell's background job.)"""
    name = signal.Signals(sig).name
    imports = math.inf
    for _ in range(2):  # the second one with the files cached, as the run below will have them
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import distill"], cwd=ROOT, check=True)
        imports = min(imports, time.perf_counter() - start)
    for delay in (0.3, max(0.3, round(0.6 * imports, 2))):
        out = tmp_path / f"after_{delay}s"
        argv = distill_argv(teachers["uncond"], tiny_data["uncond"], out, 2)
        proc = start_in_background("distill.py", argv)
        time.sleep(delay)
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
        assert proc.returncode == 128 + sig, (delay, proc.returncode, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, (delay, err)
        assert err.startswith(f"stopped by {name} ") and "at step" not in err, (delay, err)
        assert not (out / "latest.pt").exists(), delay
    run(distill, argv)  # the same command again
    assert load(out / "latest.pt")["step"] == 2 and logged_steps(out) == [1, 2]


def test_a_new_run_sets_aside_the_records_of_an_attempt_that_saved_nothing(teachers,
                                                                           tiny_data,
                                                                           tmp_path):
    """An attempt killed after logging, before its first save, leaves metrics.jsonl and no
    latest.pt: a new run in that folder is accepted and its metrics.jsonl holds only its own
    records (the attempt's are kept aside)."""
    out = tmp_path / "run"
    proc = start_in_background("distill.py", distill_argv(
        teachers["uncond"], tiny_data["uncond"], out, 500, "--save-every", 0,
        "--save-minutes", 0))
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step 1/"):
                break
        else:
            pytest.fail(f"no step 1 in {lines}: {proc.stderr.read()[-2000:]}")
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert not (out / "latest.pt").exists() and logged_steps(out)
    attempt = (out / "metrics.jsonl").read_text()
    run(distill, distill_argv(teachers["uncond"], tiny_data["uncond"], out, 2, "--save-every",
                              0, "--save-minutes", 0))
    assert logged_steps(out) == [1, 2]
    assert (out / "metrics.jsonl.unsaved-attempt").read_text() == attempt


# ---------------------------------------------------------------------------------------------
# 7. The other player

def test_frozen_alias_is_in_eval_mode_and_shares_the_weights():
    frozen_alias = players.frozen_alias if runs is not None else common.frozen_alias
    torch.manual_seed(0)
    net = unet.UNet(**dict(TINY_CFG, dropout=0.5)).train()
    with torch.no_grad():  # no zero output layer: every weight shows in the output
        for p in net.parameters():
            p.normal_(0, 0.05)
    alias = frozen_alias(net)
    assert not any(m.training for m in alias.modules())
    assert net.training  # the trained network keeps its own mode
    assert not any(p.requires_grad for p in alias.parameters())
    assert all(p.data_ptr() == q.data_ptr() for p, q in zip(net.parameters(),
                                                              alias.parameters()))
    t, x = torch.rand(4), torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        first = alias(t, x)
        assert torch.equal(first, alias(t, x))  # no dropout
        assert torch.equal(first, net.eval()(t, x))
        for p in net.parameters():  # an update of net shows through
            p.mul_(1.5)
        assert not torch.equal(first, alias(t, x))


def test_mixed_precision_gan_head_runs_in_float32(teachers, tiny_data, tmp_path,
                                                  monkeypatch):
    """--precision mixed: the GAN generator loss's head (the fake model's encoder and
    discriminator branch) runs in float32 inside the generator update's bf16 autocast."""
    inside, seen = [], []
    real = losses.gan_generator_loss

    def spy(*a, **k):
        inside.append(True)
        try:
            return real(*a, **k)
        finally:
            inside.pop()
    monkeypatch.setattr(distill, "gan_generator_loss", spy)

    def record(module, inputs, output):
        if inside and isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            seen.append(output.dtype)
    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        def dtypes(precision):
            seen.clear()
            run(distill, distill_argv(teachers["uncond"], tiny_data["uncond"],
                                      tmp_path / precision, 1, "--precision", precision,
                                      "--gan-gen-coef", 0.3, "--gan-disc-coef", 1.0))
            return set(seen)
        if torch.bfloat16 not in dtypes("bf16"):  # the spy sees autocast at work here
            pytest.skip("bf16 autocast does not cast convolutions on this CPU")
        assert dtypes("mixed") == {torch.float32}
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------
# 9. --threads

THREADS_ARGV = {  # the least each command line needs to parse
    "train_teacher": lambda tmp: ["--out", tmp / "o"],
    "distill": lambda tmp: ["--teacher", tmp / "t.pt", "--out", tmp / "o"],
    "finetune": lambda tmp: ["--teacher", tmp / "t.pt", "--init-from", tmp / "g.pt", "--out",
                             tmp / "o"],
    "sample": lambda tmp: ["--ckpt", tmp / "g.pt"],
    "fid": lambda tmp: ["calc", tmp / "s.npz", "--ref", tmp / "r.npz"],
    "eval_pairs": lambda tmp: ["--ckpt", tmp / "g.pt", "--data", tmp / "d.npz"],
    "toy_data": lambda tmp: ["--out", tmp / "t.npz"],
}


@pytest.mark.parametrize("script", sorted(THREADS_ARGV))
def test_threads_flag_everywhere(script, tmp_path, capsys):
    module = __import__(script)
    args = module.parse_args([str(a) for a in THREADS_ARGV[script](tmp_path)]
                             + ["--threads", "3"])
    assert args.threads == 3
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        module.parse_args(["calc", "--help"] if script == "fid" else ["--help"])
    assert e.value.code == 0
    assert "--threads" in capsys.readouterr().out


def test_threads_set_torch_and_a_busy_machine_is_named(tmp_path, monkeypatch, capsys):
    before = torch.get_num_threads(), signal.getsignal(signal.SIGINT), \
        signal.getsignal(signal.SIGTERM)
    try:
        common.cli(toy_data.main, lambda: toy_data.parse_args(
            ["--out", str(tmp_path / "t.npz"), "--n", "4", "--size", "8", "--threads", "3"]))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before[0])
        signal.signal(signal.SIGINT, before[1])
        signal.signal(signal.SIGTERM, before[2])
    assert (tmp_path / "t.npz").exists()
    capsys.readouterr()
    monkeypatch.setattr(os, "getloadavg", lambda: (os.cpu_count() + 3.0, 1.0, 1.0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    common.set_threads(None)
    assert capsys.readouterr().err == ""  # threads chosen by the environment: nothing to say
    monkeypatch.delenv("OMP_NUM_THREADS")
    common.set_threads(None)
    err = capsys.readouterr().err
    assert err.startswith("note: the machine is busy") and err.count("\n") == 1, err
    assert "--threads 1" in err
    assert torch.get_num_threads() == before[0]


# ---------------------------------------------------------------------------------------------
# 10. One-line errors instead of tracebacks

@pytest.mark.parametrize("device,match", [
    ("cuda", "--device cuda is not usable here"),
    ("foo", "--device foo is not a device name"),
])
def test_a_device_that_does_not_work_here(teachers, tiny_data, tmp_path, device, match):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    out = tmp_path / "run"
    fails(distill, distill_argv(teachers["uncond"], tiny_data["uncond"], out, 1, "--device",
                                device), match, out)
    assert not out.exists()


def test_a_bad_device_through_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, "sample.py", "--ckpt", str(tmp_path / "g.pt"),
                             "--device", "foo", "--out", str(tmp_path / "s.npz")], cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: --device foo is not a device name; use cuda, cuda:1, npu, mps or cpu (or leave "
        "it out for the best available)"]


def test_an_out_that_cannot_be_a_run_folder(teachers, tiny_data, tmp_path):
    fails(distill, distill_argv(teachers["uncond"], tiny_data["uncond"], "/proc/nope/run", 1),
          "--out /proc/nope/run cannot be written")
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    fails(distill, distill_argv(teachers["uncond"], tiny_data["uncond"], a_file, 1),
          "is a file, not a folder")
    fails(train_teacher, ["--data", tiny_data["uncond"], "--out", a_file, "--steps", 1,
                          *TINY_NET, *FAST], "is a file, not a folder")
    assert a_file.read_text() == "mine"


def test_noise_state_of_another_device(tmp_path, distilled_run):
    """A GPU run's noise generator state resumed on the CPU (simulated: a state of another
    size) is named, not a traceback from the generator."""
    a = tmp_path / "a"
    shutil.copytree(distilled_run, a)
    ckpt = load(a / "latest.pt")
    ckpt["rng"]["noise"] = torch.zeros(16, dtype=torch.uint8)
    torch.save(ckpt, a / "latest.pt")
    before = files_of(a)
    fails(distill, ["--resume", a, "--steps", 2], "drew its noise on another kind of device")
    assert files_of(a) == before


# ---------------------------------------------------------------------------------------------
# 11. Messages that say what is wrong

def test_a_negative_number_is_a_value(teachers, tiny_data, tmp_path):
    fails(distill, distill_argv(teachers["uncond"], tiny_data["uncond"], tmp_path / "o", 1,
                                "--lr", "-1e-4"), "argument --lr: -1e-4 is not a number > 0")


def test_resume_with_the_wrong_script(teachers, distilled_run):
    teacher_run = teachers["uncond"].parent
    message = fails(distill, ["--resume", teacher_run, "--steps", 9], "is a teacher run")
    assert "python train_teacher.py --resume" in message
    message = fails(train_teacher, ["--resume", distilled_run, "--steps", 9],
                    "is a distilled run")
    assert "python distill.py --resume" in message
    assert load(distilled_run / "latest.pt")["step"] == 1


def test_a_text_file_named_npz(tmp_path):
    bad = tmp_path / "images.npz"
    bad.write_text("these are not images\n")
    message = fails(train_teacher, ["--data", bad, "--out", tmp_path / "o", "--steps", 1,
                                    *TINY_NET, *FAST], "is not an .npz archive")
    assert "pickle" not in message


def test_sample_reads_a_run_folder(distilled_run, tmp_path):
    run(sample, ["--ckpt", distilled_run, "--n", 4, "--out", tmp_path / "a.npz", "--device",
                 "cpu"])
    run(sample, ["--ckpt", distilled_run / "latest.pt", "--n", 4, "--out", tmp_path / "b.npz",
                 "--device", "cpu"])
    assert np.array_equal(np.load(tmp_path / "a.npz")["images"],
                          np.load(tmp_path / "b.npz")["images"])


def test_distill_help_shows_teacher_required_and_no_readme_section():
    parser = distill.build_parser()
    usage = " ".join(parser.format_usage().split())
    assert " --teacher TEACHER " in usage and "[--teacher TEACHER]" not in usage, usage
    resume = next(a for a in parser._actions if a.dest == "resume").help
    assert "README" not in resume and "'resumable'" not in resume, resume


# ---------------------------------------------------------------------------------------------
# 12. Said, not silently accepted

def test_data_free_run_says_its_data_is_not_read(teachers, tiny_data, tmp_path, capsys):
    run(distill, ["--teacher", teachers["uncond"], "--data", tiny_data["uncond"], "--out",
                  tmp_path / "free", "--steps", 1, "--fake-steps", 1, *FAST])
    out = capsys.readouterr().out
    assert f"note: --data {tiny_data['uncond']} is not read: alpha = beta = 1 is data-free" \
        in out, out


def test_sample_names_the_flags_it_ignores(distilled_run, tmp_path, capsys):
    run(sample, ["--ckpt", distilled_run / "latest.pt", "--nfe", 5, "--image-size", 16, "--n",
                 4, "--out", tmp_path / "a.npz", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "note: --nfe ignored: a distilled generator samples in one step" in out, out
    assert "note: --image-size ignored: the checkpoint describes its own network" in out, out
    assert np.load(tmp_path / "a.npz")["images"].shape == (4, 8, 8, 3)


@pytest.mark.parametrize("flag", ["--ou", "--step"])
def test_abbreviated_flags_are_refused(teachers, tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as e:
        distill.parse_args(["--teacher", str(teachers["uncond"]), "--out", str(tmp_path / "o"),
                            flag, "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unrecognized arguments: ") and flag in err, err
    assert len(err.splitlines()) == 1
