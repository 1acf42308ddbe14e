"""A run's folder on disk: one run at a time (<folder>/.lock, a stale lock of a killed run
recognised), the temporary files of killed writers removed, the checkpoints it holds and their
steps, what a command may write over, and the size of the flags a run saved.
"""
import atexit
import contextlib
import datetime
import json
import os
import re
import socket
import sys
import time

from checkpoints import is_torch_file, load_checkpoint
from common import RealUIDError, fail


# The temporary file of save_checkpoint: `{path}.tmp{pid}`. A kill -9 during the write leaves it
# behind (nothing in the dying process can remove it); remove_stale_temporaries clears them.
TEMPORARY = re.compile(r"\.pt\.tmp(\d+)$")


def pid_alive(pid):
    """Whether process `pid` of this host is running (a zombie, dead but not yet reaped by its
    parent, is not; a process of another user is)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): os.kill's answer


def remove_stale_temporaries(folder):
    """Remove the temporary files `*.pt.tmp<pid>` of save_checkpoint that a killed process left
    in `folder` (only those whose process is no longer running: a live one is still writing);
    returns (count, bytes) removed."""
    count = size = 0
    try:
        names = os.listdir(folder)
    except OSError:
        return 0, 0
    for name in names:
        match = TEMPORARY.search(name)
        path = os.path.join(folder, name)
        if not match or pid_alive(int(match.group(1))) or not os.path.isfile(path):
            continue
        try:
            nbytes = os.path.getsize(path)
            os.remove(path)
        except OSError:  # removed meanwhile, or not ours to remove: leave it
            continue
        count, size = count + 1, size + nbytes
    return count, size


LOCK = ".lock"


_HELD = {}  # absolute run folder -> its lock file, for the locks this process holds


def _process_start(pid):
    """When process `pid` started, in clock ticks since boot (Linux /proc; None elsewhere):
    with the pid it names one process, so a lock whose pid was reused by another process is
    still recognised as stale."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _read_lock(path):
    """(text, record) of a lock file: (None, None) if there is none, record {} if its text is
    not a lock record (being written this instant, or mangled)."""
    try:
        with open(path) as f:
            text = f.read(4096)
    except FileNotFoundError:
        return None, None
    except OSError:
        return "", {}
    try:
        record = json.loads(text)
    except ValueError:
        return text, {}
    return text, record if isinstance(record, dict) else {}


def _lock_state(path, record):
    """'mine' (taken by this process: an earlier run of it that ended before its loop could
    release it, in a notebook say), 'stale' (its process is not running on this host) or
    'live' (running, or on another host, where this one cannot tell)."""
    pid, host = record.get("pid"), record.get("host")
    if not isinstance(pid, int) or not isinstance(host, str):
        try:  # a lock being written this instant is live; one half written long ago is not
            return "stale" if time.time() - os.path.getmtime(path) > 60 else "live"
        except OSError:
            return "stale"
    if host != socket.gethostname():
        return "live"
    if pid == os.getpid():
        return "mine"
    alive = pid_alive(pid) and record.get("process_start") in (None, _process_start(pid))
    return "live" if alive else "stale"


def _lock_holder(record):
    if not record.get("pid"):
        return "a run that is starting"
    return (f"pid {record['pid']} on {record.get('host')}, started {record.get('started')}"
            + (f" ({record['command']})" if record.get("command") else ""))


def _in_use(folder, path, record):
    fail(f"--out {folder} is in use by another run ({_lock_holder(record)}): a run folder has "
         "one run at a time; wait for that run to end, or pass another --out (if no run is "
         f"going on there, delete {path})")


def check_not_in_use(folder):
    """Refuse, before any work, a folder whose lock a running process holds. runs.start_run
    then takes the lock itself (that is the check that counts: two runs may pass this one at the
    same moment). Under torchrun only the main process (RANK 0) checks, as only it takes it."""
    if os.environ.get("RANK", "0") != "0":
        return
    path = os.path.join(folder, LOCK)
    text, record = _read_lock(path)
    if text is not None and _lock_state(path, record) == "live":
        _in_use(folder, path, record)


def take_lock(folder):
    """Create <folder>/.lock with O_EXCL (atomic: of two runs starting at once, one gets it),
    holding this process's pid, host, process start and start time; refuse a folder whose lock
    a running process holds; replace a stale lock (its process is gone: kill -9, a crash of
    the machine) with a note. Released by release_lock (runs.Run's context manager) or at exit."""
    path = os.path.join(folder, LOCK)
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "process_start": _process_start(os.getpid()),
          "started": datetime.datetime.now().isoformat(timespec="seconds"),
          "command": os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else None}
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except OSError as e:
            if not isinstance(e, FileExistsError):
                fail(f"--out {folder} cannot be written ({e.strerror}); pass a folder you can "
                     "write to")
            text, record = _read_lock(path)
            if text is None:
                continue  # released meanwhile
            state = _lock_state(path, record)
            if state == "live":
                _in_use(folder, path, record)
            if state == "stale":
                print(f"note: {path} was left by a run that is no longer running "
                      f"({_lock_holder(record)}); replaced", flush=True)
            _remove_unchanged(path, text)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        _HELD[os.path.abspath(folder)] = path
        return
    fail(f"--out {folder}: could not take {path}, other runs keep starting there; try again")


def _remove_unchanged(path, text):
    """Remove a stale lock, but not a fresh one that another starting run put in its place
    after `text` was read: move the file aside (atomic), and put it back if it changed."""
    aside = f"{path}.stale{os.getpid()}"
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    except OSError as e:
        fail(f"cannot replace the stale lock {path} ({e.strerror}); delete it if no run is "
             "going on in that folder")
    try:
        if _read_lock(aside)[0] != text:
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)  # unless yet another run took the lock meanwhile
    finally:
        with contextlib.suppress(OSError):
            os.remove(aside)


def release_lock(folder):
    """Remove the lock this process took on `folder` (nothing if it holds none)."""
    path = _HELD.pop(os.path.abspath(folder), None)
    if path is None:
        return
    record = _read_lock(path)[1] or {}
    if record.get("pid") == os.getpid():  # never another's (none can replace ours as stale)
        with contextlib.suppress(OSError):
            os.remove(path)


@atexit.register
def _release_all():
    """A command that fails between runs.start_run and its loop leaves no lock behind."""
    for folder in list(_HELD):
        release_lock(folder)


def check_output_file(path, flag, is_own, own):
    """Refuse to write `path` over anything but a file of the kind the command writes: an
    existing folder, checkpoint, or any other file that `is_own(path)` does not recognise
    (`own` names that kind in the message). A missing path is fine."""
    if not os.path.lexists(path):
        return
    if os.path.isdir(path):
        fail(f"{flag} {path} is a folder; pass a file name")
    if not is_own(path):
        what = "a checkpoint" if is_torch_file(path) or path.endswith((".pt", ".pth")) else \
            "a file that this command did not write"
        fail(f"{flag} {path} is {what}, not {own}; refusing to replace it: pass a new file "
             "name (or delete that file first)")


SNAPSHOT = re.compile(r"^ckpt_(\d+)\.pt$")  # runs.save_run_checkpoint's snapshots


RUN_CHECKPOINTS = ("latest.pt", "best.pt", "crash.pt")  # crash.pt: runs.Run._save_on_error


def run_checkpoints(folder):
    """The names of the checkpoints a run writes that `folder` holds: latest.pt, best.pt,
    crash.pt and the snapshots ckpt_<step>.pt."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted(n for n in names if n in RUN_CHECKPOINTS or SNAPSHOT.match(n))


def saved_step(folder, name):
    """The step of a run's checkpoint `name` in `folder`: a snapshot's from its name, the
    others' from the file (memory-mapped: cheap); None if it cannot be read (a corrupt
    latest.pt may be why a snapshot is resumed)."""
    match = SNAPSHOT.match(name)
    if match:
        return int(match.group(1))
    try:
        step = load_checkpoint(os.path.join(folder, name), name, mmap=True).get("step")
    except RealUIDError:
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


# The saved flags of a run are data read from a file: bounded before they are looked at (a
# tree of shared references, a few KB pickled, expands to 10^K elements when written out).
SAVED_ARGS_MAX_CHARS = 1_000_000


SAVED_ARGS_MAX_FLAGS = 10_000


def check_saved_args_size(saved, path):
    """Refuse saved flags that are not a flat record: a dict of flag names to single values
    (None, bool, int, float, text) or flat lists of them, at most about 1 MB as JSON. The walk
    counts as it goes, never expanding shared references."""
    def refuse(why):
        fail(f"--resume {path}: its saved flags {why}; they were not written by this code: "
             "start a new run from its weights with --init-from instead")
    if not isinstance(saved, dict):
        refuse(f"are a {type(saved).__name__}, not a record of flags")
    if len(saved) > SAVED_ARGS_MAX_FLAGS:
        refuse(f"hold {len(saved)} entries")
    chars = 0
    for key, value in saved.items():
        if not isinstance(key, str):
            refuse(f"have a key {type(key).__name__}, not a flag name")
        flag = f"--{key.replace('_', '-')}"[:100]
        items = value if isinstance(value, (list, tuple)) else [value]
        if len(items) > SAVED_ARGS_MAX_CHARS:
            refuse(f"hold a list of {len(items)} values under {flag}")
        chars += len(key) + 4
        for item in items:
            if isinstance(item, (list, tuple, dict)):
                refuse(f"nest values under {flag} (flags are single values or flat lists)")
            if isinstance(item, str):
                chars += len(item) + 4
            elif isinstance(item, int):  # a huge int counts its digits (no str(): limited)
                chars += item.bit_length() // 3 + 4
            elif item is None or isinstance(item, float):
                chars += 24
            else:
                refuse(f"hold a {type(item).__name__} under {flag}")
            if chars > SAVED_ARGS_MAX_CHARS:
                refuse(f"are larger than {SAVED_ARGS_MAX_CHARS // 10**6} MB as JSON "
                       f"(at {flag})")


def resume_path(resume, out):
    """The checkpoint of --resume: a file, a run folder's latest.pt, or <out>/latest.pt."""
    path = os.path.join(out, "latest.pt") if resume == "latest" else resume
    if os.path.isdir(path):
        path = os.path.join(path, "latest.pt")
    if not os.path.isfile(path):
        fail(f"--resume: {path} not found; start without --resume or give a run folder or "
             "checkpoint file")
    return path


def holds_run(folder):
    """Whether a folder holds (part of) a run: a checkpoint, its flags or its metrics."""
    return bool(run_checkpoints(folder)) or any(
        os.path.exists(os.path.join(folder, f)) for f in ("args.json", "metrics.jsonl"))


def check_no_newer_state(path, step, folder, script):
    """A resume that writes into the folder of its checkpoint overwrites that folder's
    latest.pt, snapshots and best.pt as it goes: refuse when any of them holds a later step
    than the resumed checkpoint (`--resume RUN/ckpt_0000010.pt` once replaced a step-30
    latest.pt and its best.pt with step 15). Resuming latest.pt itself, or a checkpoint at
    its step (the snapshot saved with it), is the run's own continuation: its exact resume
    writes again what is there (best.pt may be ahead of latest.pt: it is written at FID
    steps, latest.pt by --save-every / --save-minutes)."""
    latest = os.path.join(folder, "latest.pt")
    if os.path.isfile(latest):
        if os.path.samefile(latest, path) or (
                step is not None and saved_step(folder, "latest.pt") == step):
            return
    newer = []
    for name in run_checkpoints(folder):
        if os.path.samefile(os.path.join(folder, name), path):
            continue
        saved = saved_step(folder, name)
        if saved is not None and saved > (step if step is not None else -1):
            newer.append((saved, name))
    if newer:
        saved, name = max(newer)
        go_on = f"--resume {folder}" if os.path.isfile(latest) else \
            f"--resume {os.path.join(folder, name)}"
        at = f"at step {step}" if step is not None else "without a step of this code"
        fail(f"--resume {path} is {at}, but {os.path.join(folder, name)} is at step {saved}: "
             f"continuing in {folder} would overwrite that newer state; continue the run with "
             f"`python {script} {go_on}`, or continue this checkpoint in a new folder with "
             f"`python {script} --resume {path} --out NEW_FOLDER`")


def check_out(out):
    """--out must be a folder that can be made here; checked before any work, leaving nothing
    behind (the run creates it once its set-up has succeeded)."""
    if os.path.exists(out) and not os.path.isdir(out):
        fail(f"--out {out} is a file, not a folder; pass a folder for the run")
    missing, parent = [], os.path.abspath(out)
    while not os.path.exists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        fail(f"--out {out} cannot be written ({e.strerror}); pass a folder you can write to")
    finally:
        for folder in missing:  # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def note_newer_crash(path, step, folder, script):
    """Resuming latest.pt while crash.pt (written when an error ended the run in the middle of
    a step, Run._save_on_error) holds a later step: say so, as that state is otherwise
    silently dropped (and overwritten if the run crashes again)."""
    crash = os.path.join(folder, "crash.pt")
    if os.path.basename(path) != "latest.pt" or not os.path.isfile(crash) or \
            os.environ.get("RANK", "0") != "0":
        return
    saved = saved_step(folder, "crash.pt")
    if saved is not None and step is not None and saved > step:
        print(f"note: {crash} holds step {saved}, later than {path} (step {step}): an error "
              f"ended the run in the middle of a step; to keep those steps, stop and continue "
              f"with `python {script} --resume {crash}`", flush=True)
