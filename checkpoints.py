"""Checkpoint files: written atomically, read as data (weights_only=True), and what is inside them.

Our files and the authors' share their layouts: a teacher holds `net_model` and `ema_models`
{decay: state dict}, a distilled run `gen`, `u` (the fake model), `ema_gens` and the optimizer
states; ours add a `config` (the network, the run's arguments) and what a resume needs.
Building networks from what is read is networks.py's job.
"""
import hashlib
import os

import torch

from common import fail


def save_checkpoint(obj, path):
    """torch.save to a temporary file, then an atomic rename: a crash (even kill -9) never
    leaves half a file under `path`, and an interrupted write removes its temporary file."""
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


def load_checkpoint(path, what="checkpoint", mmap=False):
    """A checkpoint is data: weights_only=True; clear errors for missing or corrupt files; a run
    folder stands for its latest.pt.
    mmap=True maps the file instead of reading it (cheap when only a few entries are needed)."""
    if not path:
        fail(f"no {what} given")
    if os.path.isdir(path):  # a run folder: its latest checkpoint, as --resume takes it
        path = os.path.join(path, "latest.pt")
    if not os.path.isfile(path):
        fail(f"{what} file not found: {path}; check the path")
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            ckpt = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except Exception as e:
        fail(f"cannot read {what} {path}: corrupt or not a PyTorch checkpoint "
             f"({type(e).__name__}); use another copy or an earlier checkpoint")
    if not isinstance(ckpt, dict):
        fail(f"{what} {path} is not a checkpoint dict (got {type(ckpt).__name__})")
    return ckpt


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
