"""Runs that survive interruption and resume with no flags: SIGTERM / SIGINT through the command
line (then --resume RUN_DIR alone gives the weights of an uninterrupted run), a second signal,
kill -9 during a save, the restored and refused flags, --save-every 0, status lines, and the
continuation of the authors' distilled checkpoints."""
import contextlib
import copy
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import common
import distill
import fid
import inception
import players
import runs
import sample
import train_teacher
import unet
from conftest import FAST, ROOT, TINY_NET, load, run, tensors_equal
from test_errors import error_of, fails


def comparable(path):
    ckpt = load(path)
    ckpt["config"].pop("args")
    return ckpt


def start(script, argv):
    """A command line as a child process (one thread, output piped line by line)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, script, *map(str, argv)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(script, argv):
    """A command line run to its end as a child process, in the environment of `start`
    (results are bit-identical only for equal thread counts)."""
    proc = start(script, argv)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return out


def wait_for_line(proc, text, timeout=240):
    """Read the child's stdout until a line contains `text`; returns the lines read."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    proc.kill()
    pytest.fail(f"no line with {text!r} in {lines} (stderr: {proc.stderr.read()[-2000:]})")


def distill_argv(teacher, data, out, steps, *extra):
    return ["--teacher", teacher, "--data", data, "--out", out, "--steps", steps,
            "--alpha", 0.94, "--beta", 0.96, "--fake-steps", 2, "--lr", 1e-3, "--warmup", 2,
            "--ema", 0.95, "--batch-size", 8, "--log-every", 1, "--sample-every", 0,
            "--device", "cpu", "--workers", 0, *extra]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_and_resume_alone_continues_exactly(teachers, tiny_data, tmp_path, sig):
    """A signal mid-run: the step finishes, latest.pt is written, the exit code is 128 + the
    signal and the last line names the resume command; `--resume RUN_DIR` alone then ends
    with exactly the checkpoint of an uninterrupted run."""
    steps = 12
    finish("distill.py", distill_argv(teachers["cond"], tiny_data["cond"], tmp_path / "straight",
                                      steps))
    out = tmp_path / "stopped"
    proc = start("distill.py", distill_argv(teachers["cond"], tiny_data["cond"], out, steps))
    wait_for_line(proc, f"step 3/{steps}")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + sig, err
    last = err.strip().splitlines()[-1]
    stopped_at = load(out / "latest.pt")["step"]
    assert 3 <= stopped_at < steps, last
    assert last == (f"stopped by {signal.Signals(sig).name} at step {stopped_at}/{steps}: "
                    f"{out}/latest.pt written; continue with: python distill.py --resume {out}")
    assert not [f for f in os.listdir(out) if ".tmp" in f]

    assert f"resumed {out}/latest.pt at step {stopped_at}" in finish("distill.py",
                                                                      ["--resume", out])
    assert tensors_equal(comparable(tmp_path / "straight" / "latest.pt"),
                         comparable(out / "latest.pt")) == []
    steps_logged = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps_logged == list(range(1, stopped_at + 1)) + list(range(stopped_at + 1,
                                                                         steps + 1))


def test_second_signal_stops_at_once(teachers, tiny_data, tmp_path):
    """A second signal more than a second after the first ends the run without saving."""
    out = tmp_path / "run"
    # 200 fake-model updates per step: a step long enough to send two signals within it
    proc = start("distill.py", distill_argv(teachers["uncond"], tiny_data["uncond"], out, 5,
                                            "--fake-steps", 200, "--save-every", 1))
    wait_for_line(proc, "step 1/5")
    proc.send_signal(signal.SIGINT)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    assert "stopped at once by a second SIGINT during step 2, without saving; " \
           f"{out}/latest.pt is from step 1" in err.strip().splitlines()[-1]
    assert load(out / "latest.pt")["step"] == 1


def test_kill_9_during_a_save_leaves_the_previous_checkpoint(tiny_data, tmp_path):
    """kill -9 while latest.pt is being written: the previous latest.pt stays readable and the
    run resumes from it (the temporary file of the interrupted write is ignored)."""
    out = tmp_path / "run"
    argv = ["--data", tiny_data["uncond"], "--out", out, "--steps", 400, "--lr", 1e-3,
            "--save-every", 1, *TINY_NET, "--num-channels", 64, *FAST]
    for attempt in range(20):
        proc = start("train_teacher.py", argv + (["--resume"] if attempt else []))
        wait_for_line(proc, "step 2/")  # latest.pt of step 1 exists by now

        def saving():
            return any(".tmp" in f for f in os.listdir(out))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not saving():
            time.sleep(0.0005)
        proc.kill()
        proc.communicate()
        if saving():
            break
    else:
        pytest.fail("never caught a save in progress")
    ckpt = load(out / "latest.pt")
    assert ckpt["step"] >= 1 and all(torch.isfinite(v).all() for v in ckpt["net_model"].values())
    run(train_teacher, ["--resume", out, "--steps", ckpt["step"] + 1])
    assert load(out / "latest.pt")["step"] == ckpt["step"] + 1


def test_resume_restores_every_flag_and_refuses_changes(teachers, tiny_data, tmp_path):
    out = tmp_path / "run"
    run(distill, distill_argv(teachers["cond"], tiny_data["cond"], out, 2, "--gamma", 0.9,
                              "--grad-accum", 2))
    args = distill.parse_args(["--resume", out, "--steps", 3, "--log-every", 5])
    saved = load(out / "latest.pt")["config"]["args"]
    for key in ("teacher", "data", "alpha", "beta", "gamma", "fake_steps", "lr", "ema",
                "batch_size", "grad_accum", "warmup", "seed"):
        assert common.json_safe(getattr(args, key)) == saved[key], key
    assert (args.steps, args.log_every, args.out) == (3, 5, str(out))
    assert args.resume == str(out / "latest.pt")
    message = fails(distill, ["--resume", out, "--alpha", 0.9, "--lr", 1e-4, "--ema", 0.9,
                              "0.99", "--steps", 3], "differ from the run's own flags")
    assert "--alpha 0.9 (the run: 0.94)" in message and "--lr 0.0001 (the run: 0.001)" in message
    assert "--ema 0.9 0.99 (the run: 0.95)" in message
    assert f"--init-from {out}/latest.pt --init-ema none --fake-init init-from" in message
    fails(distill, ["--resume", out], "already at step 2 of --steps 2")
    # the teacher file may move, but it must hold the same teacher
    other = load(teachers["cond"])
    other["ema_models"]["0.999"] = {k: v + 1e-3 for k, v in other["ema_models"]["0.999"].items()}
    torch.save(other, tmp_path / "moved_teacher.pt")
    fails(distill, ["--resume", out, "--teacher", tmp_path / "moved_teacher.pt", "--steps", 3],
          "is not the teacher")
    run(distill, ["--resume", out, "--teacher", teachers["cond"], "--steps", 3])
    assert load(out / "latest.pt")["step"] == 3
    # the same command again without --resume never overwrites the run it could continue
    before = open(out / "latest.pt", "rb").read()
    message = fails(distill, distill_argv(teachers["cond"], tiny_data["cond"], out, 5),
                    "already holds a run")
    assert f"python distill.py --resume {out}" in message
    assert open(out / "latest.pt", "rb").read() == before


def test_save_every_zero_and_status_lines(teachers, tiny_data, tmp_path, monkeypatch, capsys):
    saved = []
    real_save = distill.save
    monkeypatch.setattr(distill, "save", lambda s, a, name="latest.pt": (
        saved.append((s.run.step, name)), real_save(s, a, name)))
    out = tmp_path / "run"
    run(distill, distill_argv(teachers["uncond"], tiny_data["uncond"], out, 4,
                              "--save-every", 0, "--save-minutes", 0, "--log-every", 100,
                              "--log-seconds", 0))
    assert saved == [(4, "latest.pt")]
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 4]  # after the first step, and at the end
    assert all(abs(r["time"] - time.time()) < 600 and r["elapsed_s"] > 0 for r in records)
    assert records[1]["elapsed_s"] >= records[0]["elapsed_s"]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert lines[0].startswith("step 1/4 | loss_fake ") and "ETA" in lines[0]
    assert "it/s" in lines[0] or "s/it" in lines[0]


def test_run_log_rate_and_eta(tmp_path, monkeypatch, capsys):
    """Speed and ETA from the average since the (re)start, s/it below one step a second."""
    clock = iter([100.0, 110.0, 130.0])  # the start, then two records
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    log = runs.RunLog(str(tmp_path), total_steps=50, start_step=10, elapsed=5.0)
    log.step(11, {"loss": 1.0}, torch.device("meta"))   # 1 step in 10 s
    log.step(14, {"loss": 2.0}, torch.device("meta"))   # 4 steps in 30 s: 7.5 s/step average
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("10.00 s/it | ETA 0:06:30")   # 39 steps left x 10 s
    assert out[1].endswith("7.50 s/it | ETA 0:04:30")    # 36 x 7.5 s
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["elapsed_s"] for r in records] == [15.0, 35.0]
    assert records[1]["sec_per_step"] == pytest.approx(20 / 3)


def test_numeric_flags_and_defaults_fail_in_one_line(teachers, tiny_data, tmp_path,
                                                     monkeypatch):
    for argv, match in [(["--save-every", -1], "argument --save-every: -1 is not an integer"),
                        (["--lr", "fast"], "argument --lr: 'fast' is not a number > 0"),
                        (["--ema", "0.995x"], "argument --ema: '0.995x' is not a decay"),
                        (["--channel-mult", "1,x"], "not a comma-separated list")]:
        fails(distill, distill_argv(teachers["uncond"], tiny_data["uncond"], tmp_path, 1)
              + argv, match, tmp_path)
    fails(distill, ["--out", tmp_path / "x"], "--teacher is required")
    fails(sample, ["--ckpt", teachers["uncond"], "--ema", "0.995x"], "is not a decay")
    # an input that does not exist fails before any weights download
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: pytest.fail("tried to download"))
    with pytest.raises(inception.FIDError, match="missing.npz is not 'cifar10'"):
        run(fid, ["calc", tmp_path / "missing.npz", "--ref", tmp_path / "ref.npz"])
    # gamma = 1 with real data: the real-data part is linear in f
    with pytest.warns(UserWarning, match="gamma = 1"):
        run(distill, distill_argv(teachers["uncond"], tiny_data["uncond"], tmp_path / "g", 1,
                                  "--gamma", 1.0))


def test_sample_defaults_to_the_first_ema_the_checkpoint_tracks(teachers, tiny_data, tmp_path):
    out = tmp_path / "run"
    run(distill, distill_argv(teachers["uncond"], tiny_data["uncond"], out, 1, "--ema", 0.95,
                              0.9))
    run(sample, ["--ckpt", out / "latest.pt", "--n", 4, "--out", tmp_path / "a.npz"])
    run(sample, ["--ckpt", out / "latest.pt", "--n", 4, "--ema", 0.95, "--out",
                 tmp_path / "b.npz"])
    assert np.array_equal(np.load(tmp_path / "a.npz")["images"],
                          np.load(tmp_path / "b.npz")["images"])


# ---------------------------------------------------------------------------------------------
# The authors' distilled checkpoints

TINY_CFG = dict(unet.PAPER_CONFIG, image_size=8, num_channels=32, channel_mult=[1],
                num_res_blocks=1, attention_resolutions=[8], num_heads=1, num_head_channels=-1)


def authors_fake_loss(u, t, x0, x_g, x_d, alpha, beta):
    """The authors' dist_loss(generator_turn=False): maximised with Adam(maximize=True)."""
    t_ = t.view(-1, 1, 1, 1)
    xt_g, xt_d = t_ * x_g + (1 - t_) * x0, t_ * x_d + (1 - t_) * x0
    loss = -alpha * torch.sum((u(t, xt_g) - beta / alpha * (x_g - x0)) ** 2)
    loss = loss - (1 - alpha) * torch.sum((u(t, xt_d) - (1 - beta) / (1 - alpha)
                                           * (x_d - x0)) ** 2)
    return loss / len(x0)


def authors_gen_loss(u, teacher, t, x0, x_g, alpha, beta):
    t_ = t.view(-1, 1, 1, 1)
    xt = t_ * x_g + (1 - t_) * x0
    return (alpha * torch.sum((teacher(t, xt) - beta / alpha * (x_g - x0)) ** 2)
            - alpha * torch.sum((u(t, xt) - beta / alpha * (x_g - x0)) ** 2)) / len(x0)


class AuthorsRun:
    """The authors' train_distil.py loop on the tiny network (GAN head in every network, as
    their UNetModelWrapperWithHead), for a few updates, saved in their layout."""

    def __init__(self, tmp, alpha=0.94, beta=0.96, lr=1e-3, warmup=3):
        torch.manual_seed(0)
        teacher = unet.UNet(**dict(TINY_CFG, gan_head=True))
        for p in teacher.parameters():
            torch.nn.init.normal_(p, std=0.05)
        self.teacher_path = tmp / "authors_teacher.pt"
        sd = teacher.state_dict()
        torch.save({"net_model": sd, "ema_models": {"0.999": sd}, "step": 0},
                   self.teacher_path)
        self.teacher = teacher.eval().requires_grad_(False)
        self.u = unet.UNet(**dict(TINY_CFG, gan_head=True))   # fresh, as their deepcopy
        self.gen = copy.deepcopy(teacher).requires_grad_(True)
        self.ema = copy.deepcopy(teacher)
        self.alpha, self.beta = alpha, beta
        self.opt_g = torch.optim.Adam(self.gen.parameters(), betas=(0.0, 0.999), lr=lr)
        self.opt_u = torch.optim.Adam(self.u.parameters(), betas=(0.0, 0.999), lr=lr,
                                      maximize=True)
        w = max(1, warmup)
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, lambda k: min(k, w) / w)
        self.sched_u = torch.optim.lr_scheduler.LambdaLR(self.opt_u, lambda k: min(k, w) / w)
        self.g = torch.Generator().manual_seed(1)
        self.step = 0

    def batch(self):
        r = lambda: torch.randn(8, 3, 8, 8, generator=self.g)  # noqa: E731
        return {"x_d": r().clamp(-1, 1), "x0": r(), "t": torch.rand(8, generator=self.g),
                "z": r(), "y": None, "s": None}

    def fake_update(self, b):
        self.opt_u.zero_grad()
        x_g = distill.generate(self.gen, b["z"]).detach()
        authors_fake_loss(self.u, b["t"], b["x0"], x_g, b["x_d"], self.alpha, self.beta
                          ).backward()
        torch.nn.utils.clip_grad_norm_(self.u.parameters(), 1.0)
        self.opt_u.step()
        self.sched_u.step()

    def gen_update(self, b):
        self.opt_g.zero_grad()
        x_g = distill.generate(self.gen, b["z"])
        authors_gen_loss(self.u, self.teacher, b["t"], b["x0"], x_g, self.alpha, self.beta
                         ).backward()
        torch.nn.utils.clip_grad_norm_(self.gen.parameters(), 1.0)
        self.opt_g.step()
        self.sched_g.step()
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.gen.parameters()):
                e.copy_(0.999 * e + 0.001 * p)

    def train(self, updates):
        for _ in range(updates):
            (self.gen_update if self.step % 6 == 5 else self.fake_update)(self.batch())
            self.step += 1

    def save(self, path):
        torch.save({"gen": self.gen.state_dict(), "u": self.u.state_dict(),
                    "ema_gens": {"0.999": self.ema.state_dict()},
                    "sched": self.sched_g.state_dict(), "optim_gen": self.opt_g.state_dict(),
                    "optim_u": self.opt_u.state_dict(), "step": self.step - 1}, path)


def test_continue_the_authors_distilled_checkpoint(tmp_path, tiny_data, capsys):
    """Their file continues here: weights and Adam moments load, their maximize=True fake-model
    optimizer becomes our minimisation, and one more update of each player equals theirs."""
    authors = AuthorsRun(tmp_path)
    authors.train(13)  # updates 0..12: two generator updates, their saved step = 12
    path = tmp_path / "cifar10_uncond_dist_step_12.pt"
    authors.save(path)
    args = distill.parse_args(["--resume", path, "--teacher", authors.teacher_path,
                               "--data", tiny_data["uncond"], "--alpha", 0.94, "--beta", 0.96,
                               "--lr", 1e-3, "--warmup", 3, "--ema", 0.999, "--steps", 5,
                               "--out", tmp_path / "ours", *TINY_NET, *FAST])
    assert args.from_authors
    s = distill.setup(args, players.Process("cpu"))
    note = capsys.readouterr().out
    assert s.run.step == 13 // 6 == 2 and "their 13 updates = step 2 here" in note
    assert "not restored: RNG states and data position" in note
    assert not any(g["maximize"] for g in s.fake_player.opt.param_groups)
    assert s.gen_player.sched.last_epoch == authors.sched_g.last_epoch == 2
    assert s.gen_player.opt.param_groups[0]["lr"] == authors.opt_g.param_groups[0]["lr"]

    # One more update of each player on the same batch. Adam's state after it is the sharp
    # witness of "the same update" (see test_scale.py: with beta1 = 0, weights whose gradient
    # is rounding noise move by +-lr on either side); it must agree to rounding, which it
    # cannot if the moments were not kept or the sign of the fake model's gradient was wrong.
    for name, theirs, ours, update in (
            ("fake model", authors.opt_u, s.fake_player.opt, lambda b: (authors.fake_update(b),
                                                              distill.fake_update(s, args, b))),
            ("generator", authors.opt_g, s.gen_player.opt, lambda b: (authors.gen_update(b),
                                                             distill.generator_update(s, args,
                                                                                      b)))):
        before = torch.cat([v["exp_avg"].flatten() for v in ours.state.values()]).clone()
        update(authors.batch())
        mine, their = ours.state_dict()["state"], theirs.state_dict()["state"]
        for moment in ("exp_avg", "exp_avg_sq"):  # their GAN head comes last: same indices
            t = torch.cat([their[i][moment].flatten() for i in sorted(mine)]).double()
            o = torch.cat([mine[i][moment].flatten() for i in sorted(mine)]).double()
            assert ((t - o).norm() / t.norm()).item() < 1e-5, (name, moment)
            assert all(their[i]["step"] == mine[i]["step"] for i in mine)
        after = torch.cat([v["exp_avg"].flatten() for v in ours.state.values()])
        assert (after - before).norm() > 0.1 * after.norm(), name  # the update happened
    # and through the command line, it runs to the end and writes our layout
    run(distill, ["--resume", path, "--teacher", authors.teacher_path, "--data",
                  tiny_data["uncond"], "--alpha", 0.94, "--beta", 0.96, "--warmup", 3,
                  "--ema", 0.999, "--steps", 3, "--out", tmp_path / "cli", *TINY_NET, *FAST])
    ckpt = load(tmp_path / "cli" / "latest.pt")
    assert ckpt["step"] == 3 and "sched_u" in ckpt and ckpt["config"]["kind"] == "distilled"
    message = error_of(distill, ["--resume", path, "--teacher", authors.teacher_path,
                                 "--data", tiny_data["uncond"], "--ema", 0.9996, "--steps", 3,
                                 "--out", tmp_path / "x", *TINY_NET, *FAST])
    assert "tracks the EMAs 0.999, not 0.9996" in message


def test_runs_on_loader_workers_end_and_resume_exactly(tmp_path):
    """An image folder is read by loader workers, which ignore the stop signals: a run must
    still exit at its end and on SIGTERM (multiprocessing's exit hook would otherwise wait for
    them forever), and the resumed run must continue with the very next batch."""
    from PIL import Image
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    argv = lambda out, steps: ["--data", folder, *TINY_NET, "--batch-size", 4,  # noqa: E731
                               "--steps", steps, "--lr", 1e-3, "--warmup", 2, "--log-every", 1,
                               "--sample-every", 0, "--device", "cpu", "--workers", 2, "--out", out]
    steps = 12
    finish("train_teacher.py", argv(tmp_path / "straight", steps))
    out = tmp_path / "stopped"
    proc = start("train_teacher.py", argv(out, steps))
    wait_for_line(proc, f"step 2/{steps}")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert load(out / "latest.pt")["step"] < steps
    finish("train_teacher.py", ["--resume", out])
    assert tensors_equal(comparable(tmp_path / "straight" / "latest.pt"),
                         comparable(out / "latest.pt")) == []


def test_a_signal_outside_the_training_loop_is_one_line(capsys):
    """SIGTERM or Ctrl-C during setup (before the loop's own handlers) ends the command with
    one line and 128 + the signal, not a traceback or a silent kill."""
    def main(args):
        os.kill(os.getpid(), args)
        time.sleep(5)  # the handler raises before this ends
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a shell's background job
        for sig in (signal.SIGTERM, signal.SIGINT):
            with pytest.raises(SystemExit) as e:
                common.cli(main, lambda: sig)
            assert e.value.code == 128 + sig
            err = capsys.readouterr().err.strip()
            assert err == (f"stopped by {signal.Signals(sig).name} outside a training loop "
                           "(nothing more was saved)"), err
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
