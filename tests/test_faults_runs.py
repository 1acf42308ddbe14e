"""Faults of a run's life on disk found on 29328e5, each with the test that shows it fixed: one
run per folder (<out>/.lock), no resume over a newer state, no --out over a checkpoint, the
temporary files of killed saves, a SIGTERM during a load, restored flags checked and bounded,
unreadable images found up front and a save when an error ends a run, and torch files whose
zip records would be inflated refused before torch.load."""
import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import common
import distill
import eval_pairs
import fid
import train_teacher
from conftest import FAST, ROOT, TINY_NET, load, run, shapes_dataset, tensors_equal
from test_errors import fails
from test_runs_safety import (comparable, distill_argv, distilled_run, files_of,  # noqa: F401
                              logged_steps, start_in_background)

try:
    import checkpoints
    import image_data
    import runs
except ImportError:  # 29328e5 kept checkpoints and data sets in common.py
    checkpoints = image_data = common
    import runs

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def dead_pid():
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def teacher_argv(data, out, steps, *extra):
    return ["--data", data, "--out", out, "--steps", steps, "--lr", 1e-3, "--warmup", 0,
            *TINY_NET, *FAST, *extra]


# ---------------------------------------------------------------------------------------------
# 14a. One run per folder

def test_a_live_runs_folder_refuses_a_second_run_and_a_stale_lock_is_replaced(
        teachers, tiny_data, tmp_path, capsys):
    """A run that trains and has not saved yet: a second run with its --out is refused in one
    line and leaves the first run's metrics.jsonl in place (29328e5 accepted it and moved the
    live metrics aside). Once the first is killed (-9: its lock stays), its lock is stale: the
    next run replaces it with a note, and removes it when it ends."""
    out = tmp_path / "run"
    first = start_in_background("distill.py", distill_argv(
        teachers["uncond"], tiny_data["uncond"], out, 500, "--save-every", 0,
        "--save-minutes", 0))
    try:
        lines = []
        for line in first.stdout:
            lines.append(line)
            if line.startswith("step 1/"):
                break
        else:
            pytest.fail(f"no step 1 in {lines}: {first.stderr.read()[-2000:]}")
        live = (out / "metrics.jsonl").read_text()
        message = fails(distill, distill_argv(teachers["uncond"], tiny_data["uncond"], out, 2),
                        "is in use by another run")
        assert f"pid {first.pid} " in message, message
        assert (out / "metrics.jsonl").read_text().startswith(live)
        assert not (out / "metrics.jsonl.unsaved-attempt").exists()
    finally:
        first.kill()
        first.communicate(timeout=60)
    assert (out / ".lock").exists()  # kill -9 leaves it
    capsys.readouterr()
    run(distill, distill_argv(teachers["uncond"], tiny_data["uncond"], out, 2))
    assert "was left by a run that is no longer running" in capsys.readouterr().out
    assert load(out / "latest.pt")["step"] == 2 and logged_steps(out) == [1, 2]
    assert not (out / ".lock").exists()


def test_only_the_main_process_checks_and_takes_the_lock(tmp_path, monkeypatch):
    """Under torchrun every rank parses the flags; only RANK 0 looks at the lock and takes it."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
    with pytest.raises(common.RealUIDError, match="is in use by another run"):
        runs.check_not_in_use(str(out))
    monkeypatch.setenv("RANK", "1")
    runs.check_not_in_use(str(out))  # another rank: nothing to check

    class Rank1:
        main = False
    runs.start_run(str(out), {}, Rank1(), fresh=True)
    assert not (out / "args.json").exists()


# ---------------------------------------------------------------------------------------------
# 14b. No resume over a newer state

def test_resume_of_an_older_checkpoint_never_overwrites_the_runs_newer_state(
        teachers, tiny_data, tmp_path):
    """`--resume RUN/ckpt_0000001.pt` of a run at step 3 refused, naming both steps and the
    ways on (29328e5 wrote step 2 over the step-3 latest.pt); the same checkpoint into a new
    folder, and the snapshot at the latest step in place, are continuations."""
    out = tmp_path / "run"
    run(distill, distill_argv(teachers["uncond"], tiny_data["uncond"], out, 3,
                              "--snapshot-every", 1))
    before = files_of(out)
    message = fails(distill, ["--resume", out / "ckpt_0000001.pt", "--steps", 4],
                    f"is at step 1, but {out}/latest.pt is at step 3")
    assert f"--resume {out}`" in message and "--out NEW_FOLDER" in message, message
    assert files_of(out) == before
    new = tmp_path / "new"
    run(distill, ["--resume", out / "ckpt_0000001.pt", "--out", new, "--steps", 2])
    assert load(new / "latest.pt")["step"] == 2 and files_of(out) == before
    run(distill, ["--resume", out / "ckpt_0000003.pt", "--steps", 4])
    assert load(out / "latest.pt")["step"] == 4


def test_a_new_run_never_overwrites_checkpoints_without_a_latest(distilled_run, tmp_path,
                                                                 teachers, tiny_data):
    """A folder with a run's best.pt and snapshots but no latest.pt is still a run's."""
    out = copy_run(distilled_run, tmp_path / "run")
    os.replace(out / "latest.pt", out / "ckpt_0000001.pt")
    before = files_of(out)
    fails(distill, distill_argv(teachers["uncond"], tiny_data["uncond"], out, 1),
          "holds checkpoints of a run (ckpt_0000001.pt)")
    assert files_of(out) == before


# ---------------------------------------------------------------------------------------------
# 14c. No --out over a checkpoint

def test_eval_pairs_out_never_replaces_a_checkpoint(tiny_data, tmp_path):
    tdir = tmp_path / "sr2"
    run(train_teacher, teacher_argv(tiny_data["uncond"], tdir, 1, "--task", "sr2"))
    ckpt = tdir / "latest.pt"
    before = ckpt.read_bytes()
    argv = ["--ckpt", ckpt, "--data", tiny_data["uncond"], "--n", 8, "--nfe", 2, "--device",
            "cpu"]
    fails(eval_pairs, [*argv, "--out", ckpt], f"--out {ckpt} is a checkpoint")
    assert ckpt.read_bytes() == before
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    fails(eval_pairs, [*argv, "--out", notes], "not an eval_pairs.py results file")
    assert notes.read_text() == "mine"
    table = tmp_path / "table.json"
    run(eval_pairs, [*argv, "--out", table])
    run(eval_pairs, [*argv, "--out", table])  # its own results: replaced
    assert json.loads(table.read_text())["n"] == 8
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_fid_ref_out_never_replaces_a_checkpoint(distilled_run, tmp_path, weights):
    data = tmp_path / "d.npz"
    np.savez(data, images=shapes_dataset(16, size=8)[0])
    ckpt = copy_run(distilled_run, tmp_path / "run") / "latest.pt"
    before = ckpt.read_bytes()
    argv = ["ref", "--data", data, "--weights", weights, "--device", "cpu", "--batch-size", 16]
    with pytest.raises(common.RealUIDError, match=f"--out {ckpt} is a checkpoint"):
        run(fid, [*argv, "--out", ckpt])
    assert ckpt.read_bytes() == before
    stats = tmp_path / "ref.npz"
    run(fid, [*argv, "--out", stats])
    run(fid, [*argv, "--out", stats])  # a statistics file: replaced
    assert fid.inception.load_stats(str(stats))["n"] == 16


def test_sample_out_never_replaces_a_checkpoint(distilled_run, tmp_path):
    """sample.py --out RUN/latest.pt would have written samples over the checkpoint."""
    import sample
    ckpt = copy_run(distilled_run, tmp_path / "run") / "latest.pt"
    bad = tmp_path / "run" / "latest.npz"
    bad.write_bytes(ckpt.read_bytes())  # a checkpoint under a samples name
    before = bad.read_bytes()
    with pytest.raises(common.RealUIDError, match="is a checkpoint"):
        run(sample, ["--ckpt", ckpt, "--n", 2, "--out", bad])
    assert bad.read_bytes() == before
    out = tmp_path / "s.npz"
    run(sample, ["--ckpt", ckpt, "--n", 2, "--out", out])
    run(sample, ["--ckpt", ckpt, "--n", 2, "--out", out])  # its own samples: replaced


# ---------------------------------------------------------------------------------------------
# 14d. The temporary files of killed saves

def test_temporaries_of_killed_saves_are_removed_at_the_next_start(distilled_run, tmp_path):
    """Only `*.pt.tmp<pid>` files whose process is gone; a live writer's stays."""
    out = copy_run(distilled_run, tmp_path / "run")
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        gone, live = dead_pid(), writer.pid
        (out / f"latest.pt.tmp{gone}").write_bytes(b"x" * 1000)
        (out / f"ckpt_0000001.pt.tmp{gone}").write_bytes(b"x" * 1000)
        (out / f"latest.pt.tmp{live}").write_bytes(b"x")
        (out / "notes.tmp5").write_text("mine")
        run(distill, ["--resume", out, "--steps", 2])
        left = sorted(f for f in os.listdir(out) if ".tmp" in f)
        assert left == sorted([f"latest.pt.tmp{live}", "notes.tmp5"]), left
    finally:
        writer.kill()
        writer.wait()


# ---------------------------------------------------------------------------------------------
# 14e. A SIGTERM during a load is a stop

SLOW_LOAD = """
import sys, time, torch
import common
try:
    import checkpoints
except ImportError:
    checkpoints = common
def slow_load(*a, **k):
    print("loading", flush=True)
    time.sleep(120)
torch.load = slow_load
common.cli(lambda args: checkpoints.load_checkpoint(sys.argv[1], "resume checkpoint"),
           lambda: None)
"""


def test_sigterm_while_a_checkpoint_loads_exits_143(distilled_run):
    """common.cli's SIGTERM handler raises Interrupted inside torch.load: exit 143 with the
    stop's line (29328e5: exit 1, "corrupt or not a PyTorch checkpoint")."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_LOAD, str(distilled_run / "latest.pt")],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "loading", proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, (proc.returncode, err)
    assert err.strip().splitlines() == [
        "stopped by SIGTERM outside a training loop (nothing more was saved)"], err


def test_load_checkpoint_reraises_an_interruption(distilled_run, monkeypatch):
    def interrupted(*a, **k):
        raise common.Interrupted("stopped by SIGTERM", 143)
    monkeypatch.setattr(torch, "load", interrupted)
    with pytest.raises(common.Interrupted):
        checkpoints.load_checkpoint(str(distilled_run / "latest.pt"))


# ---------------------------------------------------------------------------------------------
# 15. Restored flags, checked as if typed and bounded

def with_saved_args(src, dst, **changes):
    """A copy of the run `src` whose latest.pt carries edited saved flags."""
    out = copy_run(src, dst)
    ckpt = load(out / "latest.pt")
    ckpt["config"]["args"].update(changes)
    torch.save(ckpt, out / "latest.pt")
    return out


@pytest.mark.parametrize("key,value,match", [
    ("lr", -1.0, "saved --lr is '-1.0', which the flag refuses"),
    ("precision", "fp64", "saved --precision is 'fp64', not one of"),
    ("fake_steps", "many", "saved --fake-steps is 'many'"),
    ("ema", 0.95, "saved --ema is 0.95, not a list"),
    ("compile", "yes", "saved --compile is 'yes'"),
])
def test_restored_flags_are_checked_as_if_typed(distilled_run, tmp_path, key, value, match):
    out = with_saved_args(distilled_run, tmp_path / "run", **{key: value})
    before = files_of(out)
    fails(distill, ["--resume", out, "--steps", 2], match)
    assert files_of(out) == before


def test_restored_flags_are_bounded(distilled_run, tmp_path):
    """Shared references (a few KB pickled) that expand to 10^K values, and a flat list of
    2 MB, are refused before anything is written (29328e5 wrote them into args.json)."""
    def tree(depth):
        node = ["x"]
        for _ in range(depth):
            node = [node] * 10
        return node
    out = with_saved_args(distilled_run, tmp_path / "a", fid_weights=tree(5))
    fails(distill, ["--resume", out, "--steps", 2], "nest values under --fid-weights")
    out = with_saved_args(distilled_run, tmp_path / "b", fid_weights=["y" * 1000] * 2000)
    fails(distill, ["--resume", out, "--steps", 2], "larger than 1 MB as JSON")
    out = with_saved_args(distilled_run, tmp_path / "c", fid_weights=tree(40))  # 10^40 values
    fails(distill, ["--resume", out, "--steps", 2], "nest values under --fid-weights")
    # ... from a file barely larger than the run's own
    assert os.path.getsize(out / "latest.pt") - os.path.getsize(distilled_run / "latest.pt") \
        < 10_000


def test_restored_flags_of_a_real_run_are_restored_unchanged(distilled_run, tmp_path):
    """Every value this code saves reads back as itself (the resumed flags, bit for bit)."""
    out = copy_run(distilled_run, tmp_path / "run")
    saved = load(out / "latest.pt")["config"]["args"]
    args = distill.parse_args(["--resume", str(out)])
    for key, value in saved.items():
        if key not in ("out", "resume", "from_authors"):
            assert common.json_safe(getattr(args, key)) == value, key
            assert type(common.json_safe(getattr(args, key))) is type(value), key


# ---------------------------------------------------------------------------------------------
# 16. Unreadable images found up front; a save when an error ends a run

def image_folder(root, n=16):
    from PIL import Image
    root.mkdir()
    for i, im in enumerate(shapes_dataset(n, size=8)[0]):
        Image.fromarray(im).save(root / f"{i:03d}.png")
    return root


@pytest.mark.parametrize("bad", ["text", "truncated png", "truncated jpeg"])
def test_an_unreadable_image_is_named_when_the_folder_is_opened(tmp_path, bad):
    from PIL import Image
    root = image_folder(tmp_path / "images")
    good = (root / "000.png").read_bytes()
    if bad == "text":
        (root / "broken.png").write_text("not an image")
    elif bad == "truncated png":
        (root / "broken.png").write_bytes(good[:len(good) // 2])
    else:
        big = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(big).save(tmp_path / "full.jpg", quality=95)
        data = (tmp_path / "full.jpg").read_bytes()
        (root / "broken.jpg").write_bytes(data[:len(data) // 2])
    with pytest.raises(common.RealUIDError, match=r"cannot read broken\.(png|jpg) \(") as e:
        image_data.FolderImages(str(root), 8)
    assert "\n" not in str(e.value)


def test_an_unreadable_image_stops_the_run_before_it_starts(tmp_path):
    root = image_folder(tmp_path / "images")
    (root / "broken.png").write_text("not an image")
    out = tmp_path / "run"
    fails(train_teacher, teacher_argv(root, out, 4), "cannot read broken.png")
    assert not out.exists()


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   common.RealUIDError("cannot compute the FID")])
def test_an_error_after_a_step_saves_it(tiny_data, tmp_path, monkeypatch, error):
    """An error in end_step (a sample grid that cannot be written, an FID that cannot be
    computed) ends the run after step 3: latest.pt holds step 3, and resuming it ends where
    an uninterrupted run ends."""
    def failing_grids(state, args, z, y):
        raise error
    monkeypatch.setattr(train_teacher, "save_grids" if hasattr(train_teacher, "save_grids")
                        else "save_grid", failing_grids)  # 29328e5's name
    out = tmp_path / "run"
    argv = teacher_argv(tiny_data["uncond"], out, 5, "--save-every", 0, "--save-minutes", 0,
                        "--sample-every", 3)
    with pytest.raises(type(error), match=str(error.args[-1])):
        run(train_teacher, argv)
    assert load(out / "latest.pt")["step"] == 3 and not (out / "crash.pt").exists()
    assert not (out / ".lock").exists()
    monkeypatch.undo()
    run(train_teacher, ["--resume", out, "--sample-every", 0])
    straight = tmp_path / "straight"
    run(train_teacher, teacher_argv(tiny_data["uncond"], straight, 5))
    assert tensors_equal(comparable(straight / "latest.pt"), comparable(out / "latest.pt")) == []


def test_an_error_inside_a_step_saves_crash_pt(tiny_data, tmp_path, monkeypatch, capsys):
    """An error in the middle of step 3 (the data gone, out of memory: here the update
    itself) leaves latest.pt alone (that state is no step of the run) and writes crash.pt,
    labelled step 2."""
    real, calls = train_teacher.teacher_update, []

    def failing_update(*a):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real(*a)
    monkeypatch.setattr(train_teacher, "teacher_update", failing_update)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="out of memory"):
        run(train_teacher, teacher_argv(tiny_data["uncond"], out, 5, "--save-every", 0,
                                        "--save-minutes", 0))
    assert "saved as" in capsys.readouterr().err
    assert not (out / "latest.pt").exists() and load(out / "crash.pt")["step"] == 2
    monkeypatch.undo()
    run(train_teacher, ["--resume", out / "crash.pt"])
    assert load(out / "latest.pt")["step"] == 5


# ---------------------------------------------------------------------------------------------
# 4. Torch files whose zip records torch would inflate

def rewritten(src, dst, edit=None, compress=zipfile.ZIP_STORED):
    """A copy of the zip `src`, its records recompressed, then its bytes edited."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compress) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info), compress_type=compress)
    if edit:
        data = bytearray(dst.read_bytes())
        edit(data)
        dst.write_bytes(bytes(data))
    return dst


def central_entries(data):
    """(offset of each central directory entry, its file name) of a zip in `data`."""
    out, i = [], data.find(b"PK\x01\x02")
    while i >= 0:
        name_len = int.from_bytes(data[i + 28:i + 30], "little")
        out.append((i, bytes(data[i + 46:i + 46 + name_len]).decode()))
        i = data.find(b"PK\x01\x02", i + 46)
    return out


@pytest.fixture
def zeros_checkpoint(tmp_path):
    path = tmp_path / "zeros.pt"
    torch.save({"a": torch.zeros(256, 1024), "b": torch.ones(8)}, path)
    return path


def test_compressed_records_are_refused_before_torch_load(zeros_checkpoint, tmp_path):
    """1 MB of zeros deflates to 1 KB; torch.load would inflate it (29328e5 loaded it)."""
    bomb = rewritten(zeros_checkpoint, tmp_path / "bomb.pt", compress=zipfile.ZIP_DEFLATED)
    assert os.path.getsize(bomb) < 20_000
    with pytest.raises(common.RealUIDError, match="is compressed, which torch.save never"):
        checkpoints.load_checkpoint(str(bomb))


def test_overlapping_and_oversized_records_are_refused(zeros_checkpoint, tmp_path):
    """Two records on the same bytes (29328e5 loaded `b` from the bytes of `a`: each
    overlapping record is read in full once more), and a record that claims 4 GB."""
    pair = tmp_path / "pair.pt"
    torch.save({"a": torch.zeros(64, 1024), "b": torch.ones(64, 1024)}, pair)

    def overlap(data):  # the record of `b` points at the one of `a`
        entries = dict((name.rsplit("/", 1)[-1], i) for i, name in central_entries(data))
        a, b = entries["0"], entries["1"]
        data[b + 42:b + 46] = data[a + 42:a + 46]

    def oversized(data):  # the record of `a` claims 4 GB
        a = dict((name.rsplit("/", 1)[-1], i) for i, name in central_entries(data))["0"]
        data[a + 20:a + 28] = (0xFFFFFFF0).to_bytes(4, "little") * 2
    for src, edit, match in ((pair, overlap, "its records .* overlap"),
                             (zeros_checkpoint, oversized, "beyond the file's")):
        path = rewritten(src, tmp_path / f"{edit.__name__}.pt", edit)
        with pytest.raises(common.RealUIDError, match=match):
            checkpoints.load_checkpoint(str(path))


def test_plain_and_legacy_torch_files_still_load(zeros_checkpoint, tmp_path):
    """Not a fault: torch.save's own files (zip, and the legacy format) load as before."""
    legacy = tmp_path / "legacy.pt"
    torch.save({"a": torch.arange(4)}, legacy, _use_new_zipfile_serialization=False)
    for mmap in (False, True):
        assert torch.equal(checkpoints.load_checkpoint(str(legacy), mmap=mmap)["a"],
                           torch.arange(4))
        assert checkpoints.load_checkpoint(str(zeros_checkpoint), mmap=mmap)["b"].sum() == 8
