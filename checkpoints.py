"""Checkpoint files: written atomically, read as data (weights_only=True), and what is inside them.

Written atomically (save_checkpoint: a temporary file, then a rename); read as data: torch zip
records that would be inflated, overlap or run past the file are refused before torch.load
(check_zip_records). A run folder's own rules (its lock, the leftovers of killed writers, which
checkpoints it holds) are run_folder.py's.

Our files and the authors' share their layouts: a teacher holds `net_model` and `ema_models`
{decay: state dict}, a distilled run `gen`, `u` (the fake model), `ema_gens` and the optimizer
states; ours add a `config` (the network, the run's arguments) and what a resume needs.
Building networks from what is read is networks.py's job.
"""
import hashlib
import os
import struct
import zipfile

import torch

from common import Interrupted, fail


# ---------------------------------------------------------------------------------------------
# Writing: atomically, one writer per folder, no leftovers of killed writers

ZIP_LOCAL_HEADER = b"PK\x03\x04"  # how a zip file (torch.save's format) starts


def save_checkpoint(obj, path):
    """torch.save to a temporary file, then an atomic rename: a crash (even kill -9) never
    leaves half a file under `path`, and an interrupted write removes its temporary file (one
    left by kill -9 is removed by the next run in the folder: remove_stale_temporaries)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# One writer per run folder: <folder>/.lock


# Outputs of the other commands (eval_pairs.py --out, fid.py ref --out): never over a
# checkpoint or a file of another kind

def is_torch_file(path):
    """Whether `path` looks like a torch.save file (a checkpoint, weights): a zip archive with a
    `data.pkl` record, or the legacy format's pickle header. Cheap: the first bytes and, for a
    zip, its directory."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            if head == ZIP_LOCAL_HEADER:
                f.seek(0)
                return any(n == "data.pkl" or n.endswith("/data.pkl")
                           for n in zipfile.ZipFile(f).namelist())
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return False
    return head[:1] == b"\x80"  # a pickle (the legacy format starts with one)


# ---------------------------------------------------------------------------------------------
# Reading: as data, nothing inflated

def check_zip_records(path, what="checkpoint"):
    """Refuse a zip-format torch file that torch.load would inflate into far more memory than
    the file holds, before torch.load reads it. torch's zip reader inflates whatever it finds
    (a 2 MB file of deflated zeros became 2.7 GB before a key was looked at), and records
    that overlap, or claim more bytes than the file has, multiply that; torch.save stores every
    record uncompressed, once, so a file that does otherwise was not written by it. Only the
    central directory and the local headers are read. Legacy (non-zip) torch files, which
    torch recognises by their first bytes, are left to torch.load."""
    def refuse(why):
        fail(f"cannot read {what} {path}: {why}, which torch.save never writes; refusing to "
             "load it (use another copy or an earlier checkpoint)")
    try:
        with open(path, "rb") as f:
            if f.read(4) != ZIP_LOCAL_HEADER:
                return  # not a zip file: torch.load reads it as the legacy format (or fails)
            size = os.fstat(f.fileno()).st_size
            try:
                records = zipfile.ZipFile(f).infolist()
            except Interrupted:
                raise
            except Exception as e:  # BadZipFile, or whatever else a mangled directory raises
                fail(f"cannot read {what} {path}: corrupt or not a PyTorch checkpoint (its zip "
                     f"directory: {e}); use another copy or an earlier checkpoint")
            spans = []
            for r in records:
                if r.compress_type != zipfile.ZIP_STORED:
                    refuse(f"its record {r.filename} is compressed")
                if r.file_size != r.compress_size:
                    refuse(f"its record {r.filename} claims {r.file_size} bytes in "
                           f"{r.compress_size}")
                f.seek(r.header_offset)
                header = f.read(30)
                if len(header) < 30 or header[:4] != ZIP_LOCAL_HEADER:
                    refuse(f"its record {r.filename} points at no record header")
                name_len, extra_len = struct.unpack("<HH", header[26:30])
                end = r.header_offset + 30 + name_len + extra_len + r.compress_size
                if end > size:
                    refuse(f"its record {r.filename} ends at byte {end}, beyond the file's "
                           f"{size} bytes")
                spans.append((r.header_offset, end, r.filename))
            spans.sort()
            for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
                if start < end:
                    refuse(f"its records {name} and {other} overlap")
    except OSError as e:
        fail(f"cannot read {what} {path} ({e.strerror}); check the file's permissions")


def load_checkpoint(path, what="checkpoint", mmap=False):
    """A checkpoint is data: weights_only=True; clear errors for missing or corrupt files
    (zip records that torch would inflate are refused first: check_zip_records); a run
    folder stands for its latest.pt. A SIGINT / SIGTERM during the load stops the command as
    an interruption (exit 128 + the signal), never as a corrupt file.
    mmap=True maps the file instead of reading it (cheap when only a few entries are needed)."""
    if not path:
        fail(f"no {what} given")
    if os.path.isdir(path):  # a run folder: its latest checkpoint, as --resume takes it
        path = os.path.join(path, "latest.pt")
    if not os.path.isfile(path):
        fail(f"{what} file not found: {path}; check the path")
    check_zip_records(path, what)
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            ckpt = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except Interrupted:
        # common.cli's SIGTERM handler raises Interrupted (an Exception) wherever the main
        # thread is, here inside torch.load for a large file: a stop, not a read error
        raise
    except Exception as e:
        fail(f"cannot read {what} {path}: corrupt or not a PyTorch checkpoint "
             f"({type(e).__name__}); use another copy or an earlier checkpoint")
    if not isinstance(ckpt, dict):
        fail(f"{what} {path} is not a checkpoint dict (got {type(ckpt).__name__})")
    return ckpt


# ---------------------------------------------------------------------------------------------
# What a run folder holds, what is inside its checkpoints


def checkpoint_differences(a, b, path="ckpt", ignore=("elapsed_s",)):
    """The paths at which two checkpoint structures differ (tensors bit for bit), skipping the
    entries named in `ignore` (by default the wall-clock training time, the one entry an exact
    resume may change). [] means equal."""
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return [f"{path}: keys {sorted(set(a) ^ set(b)) if isinstance(b, dict) else b!r}"]
        return [d for k in a if k not in ignore
                for d in checkpoint_differences(a[k], b[k], f"{path}.{k}", ignore)]
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return [f"{path}: lengths differ"]
        return [d for i, (x, y) in enumerate(zip(a, b))
                for d in checkpoint_differences(x, y, f"{path}[{i}]", ignore)]
    if torch.is_tensor(a):
        return [] if torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b) else [path]
    return [] if a == b else [path]


def checkpoint_kind(ckpt):
    """'teacher' (net_model / ema_models), 'distilled' (gen / ema_gens) or None."""
    if "gen" in ckpt or "ema_gens" in ckpt:
        return "distilled"
    if "net_model" in ckpt or "ema_models" in ckpt:
        return "teacher"
    return None


def require_kind(ckpt, kind, path):
    found = checkpoint_kind(ckpt)
    if found == kind:
        return
    hint = {"teacher": "a train_teacher.py checkpoint (keys net_model / ema_models)",
            "distilled": "a distill.py / finetune.py checkpoint (keys gen / ema_gens)"}[kind]
    what = f"a {found} checkpoint" if found else f"not a model checkpoint (keys: {sorted(ckpt)})"
    fail(f"{path} is {what}, but {hint} is needed here")


def clean_state_dict(sd):
    """Strip the `module.` (DataParallel) and `_orig_mod.` (torch.compile) prefixes."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def ema_key(decay):
    """EMA dictionaries are keyed by str(decay) in the authors' files: 0.999 -> '0.999'."""
    return str(float(decay))


def first_ema(ckpt):
    """The first EMA decay a checkpoint tracks (the authors' files: 0.999), None if none."""
    emas = ckpt.get("ema_gens" if checkpoint_kind(ckpt) == "distilled" else "ema_models", {})
    return float(next(iter(emas))) if emas else None


def pick_weights(ckpt, ema, path):
    """The state dict of a teacher (net_model / ema_models) or generator (gen / ema_gens)."""
    raw, emas = ("gen", "ema_gens") if checkpoint_kind(ckpt) == "distilled" else \
        ("net_model", "ema_models")
    if ema is None:
        if raw not in ckpt:
            fail(f"{path} has no raw weights `{raw}`; pick an EMA with --ema "
                 f"({', '.join(ckpt.get(emas, {}))})")
        return clean_state_dict(ckpt[raw])
    available = ckpt.get(emas, {})
    if ema_key(ema) not in available:
        fail(f"{path} has no EMA {ema_key(ema)}; available: "
             f"{', '.join(available) or 'none'} (or 'none' for the raw weights)")
    return clean_state_dict(available[ema_key(ema)])


def fingerprint(sd):
    """sha256 (16 hex digits) of a state dict's tensors in key order: names a network's weights
    exactly, so a resumed run can check that a moved --teacher file is the same teacher."""
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
