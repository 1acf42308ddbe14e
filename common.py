"""Plumbing shared by the training and sampling scripts: device, data, checkpoints, logging.

Nothing here is paper mathematics; the objectives live in the stage scripts
(`train_teacher.py`, `distill.py`). Conventions that every script shares are named once here:

- pixels: uint8 in [0, 255] on disk, float in [-1, 1] in the networks (`from_uint8`, `to_uint8`);
- checkpoints: the authors' layouts (README, "Using the authors' checkpoints") plus a `config`
  entry describing the network;
- randomness: one seeded generator draws every per-update random tensor for the *global* batch,
  and each process / micro-batch takes its slice, so that one process, several processes and
  gradient accumulation see identical noise and data (this is what makes them comparable).
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import resource
import signal
import sys
import threading
import warnings
import zipfile

import numpy as np
import torch

import unet

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ---------------------------------------------------------------------------------------------
# Errors and command lines. Library code raises RealUIDError; only `cli` turns it into a one-line
# message and an exit code, so that notebooks importing the scripts never see SystemExit.

class RealUIDError(Exception):
    """Bad input or a run that cannot go on; the message names the problem and the fix."""


class Interrupted(Exception):
    """A run stopped by SIGINT / SIGTERM after saving; `code` is the exit status (128 + signal)."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def fail(message):
    """Raise the project's error with a one-line message naming the problem and the fix."""
    raise RealUIDError(message)


def _stop_outside_a_training_loop(signum, frame):
    raise Interrupted(f"stopped by {signal.Signals(signum).name} outside a training loop "
                      "(nothing more was saved)", 128 + signum)


def cli(main, parse_args):
    """Run `main(parse_args())` as a command: errors become one line on stderr and exit code 1,
    a stopped run exits with 128 + the signal number, as does a SIGINT / SIGTERM outside a
    training loop (during setup, say; the loop installs its own handlers, see Control)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop_outside_a_training_loop)
        # Ctrl-C raises KeyboardInterrupt even when started with SIGINT ignored (a shell's
        # background job inherits that): an interrupt must work the same way in every phase
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        args = parse_args()
        set_threads(getattr(args, "threads", None))
        main(args)
    except RealUIDError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except Interrupted as e:
        if str(e):  # the main process speaks for all
            print(str(e), file=sys.stderr, flush=True)
        sys.exit(e.code)
    except KeyboardInterrupt:
        print("stopped by SIGINT outside a training loop (nothing more was saved)",
              file=sys.stderr, flush=True)
        sys.exit(130)


def set_threads(threads):
    """--threads N: N threads for PyTorch's CPU work (None: PyTorch's default, one per core).
    With the default, say so when the machine is already busier than its cores: every
    process then runs one thread per core, and on a shared 2-core machine that made the quick
    start 5.5x slower than one thread (docs/speed_and_precision.md)."""
    if threads:
        torch.set_num_threads(threads)
        return
    cores, load = os.cpu_count() or 1, os.getloadavg()[0] if hasattr(os, "getloadavg") else 0
    if "OMP_NUM_THREADS" not in os.environ and load >= cores:
        print(f"note: the machine is busy (load {load:.1f} on {cores} cores); PyTorch runs "
              f"{torch.get_num_threads()} threads here. If this runs on the CPU, --threads 1 "
              "(or OMP_NUM_THREADS=1) is usually much faster on a busy machine",
              file=sys.stderr, flush=True)


def add_threads_arg(p):
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads of PyTorch (default: one per core; on a shared or busy "
                        "machine 1 is often several times faster)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default after its help, unless the flag has none (None) or its help
    already says what it is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or "default" in text.lower():
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`error: ...; see --help`), --help that shows defaults, no
    abbreviated flags (`--ou` is an error, not --out) and negative numbers in any notation
    taken as values (`--lr -1e-4` is refused as a negative rate, not as a missing value)."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        kw.setdefault("allow_abbrev", False)
        super().__init__(*a, **kw)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$", re.I)

    def error(self, message):
        required = "the following arguments are required: "
        if message.startswith(required):
            flags = message[len(required):]
            message = f"{flags} {'is' if ',' not in flags else 'are'} required"
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def _number(kind, ok, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value
    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
count = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0 and math.isfinite(v), "a number > 0")
nonnegative_float = _number(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")
unit_interval = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
decay = _number(float, lambda v: 0 < v < 1, "a decay in (0, 1)")
dropout_rate = _number(float, lambda v: 0 <= v < 1, "a rate in [0, 1)")


def decay_or_none(text):
    """An EMA decay in (0, 1), or 'none' for raw weights (returned as None)."""
    return None if str(text).lower() == "none" else decay(text)


def int_list(text):
    """Comma-separated integers, e.g. 1,2,2,2 (an empty string is the empty list)."""
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, "
                                         "e.g. 1,2,2,2") from None


# ---------------------------------------------------------------------------------------------
# Pixel convention (the authors' code; the paper's FID protocol)

def from_uint8(x):
    """uint8 [0, 255] -> float32 [-1, 1], as `(x / 127.5) - 1`."""
    return x.float() / 127.5 - 1


def to_uint8(x):
    """float [-1, 1] -> uint8, the quantisation of the paper's FID protocol (see fid.py)."""
    return (x.clamp(-1, 1) * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def class_labels(n, num_classes, label=None, device="cpu"):
    """Labels for n conditional samples: balanced `arange(n) % classes`, or all equal to `label`."""
    if num_classes is None:
        return None
    if label is not None:
        if not 0 <= label < num_classes:
            fail(f"--label {label} is outside the model's classes 0..{num_classes - 1}")
        return torch.full((n,), label, dtype=torch.long, device=device)
    return torch.arange(n, device=device) % num_classes


# ---------------------------------------------------------------------------------------------
# Devices and processes

def pick_device(name=None):
    """`--device` or the best available one: CUDA, Ascend NPU (torch_npu), Apple MPS, CPU. A
    named device must exist and work here."""
    if not name:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _import_torch_npu() and torch.npu.is_available():
            return torch.device("npu")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("npu"):
        _import_torch_npu()
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"--device {name} is not a device name; use cuda, cuda:1, npu, mps or cpu (or "
             "leave it out for the best available)")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, AttributeError) as e:
        fail(f"--device {name} is not usable here ({str(e).splitlines()[0][:120]}); pick "
             "another --device, or leave it out for the best available")
    return device


def _import_torch_npu():
    try:
        import torch_npu  # noqa: F401  (registers the "npu" device with torch)
    except ImportError:
        return False
    return True


PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16", "mixed")


def resolve_precision(precision, device):
    """--precision auto: "mixed" on a CUDA GPU with bf16 (Ampere and newer), where it keeps the
    generator's gradient within 0.4% of fp32 while bf16 alone loses it late in training (the
    README's precision table); fp32 elsewhere."""
    if precision != "auto":
        return precision
    return "mixed" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def precision_context(device, precision):
    """Autocast for the networks (losses and optimizer state stay float32): bf16 or fp16 for
    every network; "mixed" is bf16 except where a stage wraps a network in full_precision;
    fp32 and tf32 run without autocast (tf32 is a backend switch, see configure_backends)."""
    if precision in ("fp32", "tf32"):
        return contextlib.nullcontext()
    if precision not in ("bf16", "fp16", "mixed"):
        raise ValueError(f"precision {precision!r}: resolve 'auto' with resolve_precision first")
    return torch.autocast(device.type, dtype=torch.float16 if precision == "fp16"
                          else torch.bfloat16)


def full_precision(net):
    """`net` evaluated in float32 even inside an autocast region: the mixed policy runs the
    teacher and the fake model this way in the generator update, whose gradient is the small
    difference of their two vector-Jacobian products (see README, Precision)."""
    def call(t, x, *cond):
        with torch.autocast(x.device.type, enabled=False):
            return net(t, x.float(), *cond)
    return call


def configure_backends(device, precision="fp32", deterministic=False):
    """fp32 means fp32: TF32 matrix products and convolutions on CUDA only with --precision
    tf32 (PyTorch's own default turns them on for convolutions). --deterministic picks
    deterministic kernels (cuDNN, cuBLAS workspace) for bit-exact resumes on GPUs."""
    if device.type == "cuda":
        tf32 = precision == "tf32" and not deterministic
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = not deterministic  # autotuning picks kernels by speed
        torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)  # warns for ops without one


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "cpu":  # the process's peak resident set, Linux reports KiB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return None


# ---------------------------------------------------------------------------------------------
# Data: --data cifar10 | a folder of images | an .npz of uint8 images [N, H, W, C] (+ labels)

class ImageData:
    """uint8 images [N, C, H, W], int64 labels (or None) and, for paired data, uint8 sources
    like the images (or None), in memory or read lazily from a folder."""

    def __init__(self, images=None, labels=None, folder=None, sources=None):
        self.images, self.labels, self.folder, self.sources = images, labels, folder, sources

    def __len__(self):
        return len(self.folder) if self.folder is not None else len(self.images)

    @property
    def shape(self):
        return tuple(self.folder.shape if self.folder is not None else self.images.shape[1:])

    @property
    def has_labels(self):
        return (self.folder.labels if self.folder is not None else self.labels) is not None

    @property
    def has_sources(self):
        return self.sources is not None

    @property
    def num_classes(self):
        labels = self.folder.labels if self.folder is not None else self.labels
        return None if labels is None else int(labels.max()) + 1

    def fingerprint(self):
        """sha256 (16 hex digits) of the content: every image, label and source of in-memory
        data (an .npz, CIFAR-10; about a second for 50k images); for a folder, the files'
        relative names and sizes (reading every image would cost a pass over the data)."""
        h = hashlib.sha256()
        if self.folder is not None:
            for f in self.folder.files:
                h.update(f"{os.path.relpath(f, self.folder.root)}:{os.path.getsize(f)};".encode())
        else:
            for a in (self.images, self.labels, self.sources):
                h.update(b"-" if a is None else a.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def get(self, index):
        """(images, labels or None, sources or None) at the given indices."""
        if self.folder is not None:
            items = [self.folder[i] for i in index]
            x = torch.stack([a for a, _ in items])
            y = torch.tensor([b for _, b in items]) if self.has_labels else None
            return x, y, None
        index = torch.as_tensor(index)
        return (self.images[index], None if self.labels is None else self.labels[index],
                None if self.sources is None else self.sources[index])


class FolderImages(torch.utils.data.Dataset):
    """Image files below `root`, center-cropped and resized to `size`; class = sub-folder name."""

    def __init__(self, root, size):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                       if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            fail(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
        classes = sorted({os.path.relpath(os.path.dirname(f), root) for f in files})
        self.files, self.size, self.root = files, size, root
        self.labels = None
        if classes != ["."]:
            index = {c: i for i, c in enumerate(classes)}
            self.labels = torch.tensor([index[os.path.relpath(os.path.dirname(f), root)]
                                        for f in files])
        self.shape = (3, size, size)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image
        with Image.open(self.files[i]) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            if s != self.size:
                im = im.resize((self.size, self.size), Image.BICUBIC)
            x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
        return x, (-1 if self.labels is None else int(self.labels[i]))


def read_npz_images(path):
    """uint8 images [N, H, W, C] from an .npz (key `images`, `arr_0` or its only array), its
    `labels` (or None) and, for a pairs file, its `source` images (or None)."""
    if not zipfile.is_zipfile(path):
        fail(f"{path} is not an .npz archive (np.savez / np.savez_compressed); pass an .npz of "
             "uint8 images [N, H, W, C] under the key `images`")
    try:
        with np.load(path) as f:
            keys = list(f.keys())
            key = next((k for k in ("images", "arr_0") if k in keys), keys[0] if len(keys) == 1
                       else None)
            if key is None:
                fail(f"{path} has no `images` array (keys: {', '.join(keys)}); save the uint8 "
                     "images [N, H, W, C] under the key `images`")
            images = f[key]
            labels = f["labels"] if "labels" in keys else None
            sources = f["source"] if "source" in keys else None
    except (OSError, ValueError) as e:
        fail(f"cannot read {path} as .npz ({e}); pass an .npz of uint8 images [N, H, W, C]")
    for name, a in (("images", images), ("source", sources)):
        if a is not None and (a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] not in (1, 3)):
            fail(f"{path}: expected uint8 {name} [N, H, W, C] with C in (1, 3), got "
                 f"{a.dtype} {list(a.shape)}")
    if sources is not None and sources.shape != images.shape:
        fail(f"pairs file {path}: `source` {list(sources.shape)} and `images` "
             f"{list(images.shape)} differ in shape; save each source at its target's size")
    return images, labels, sources


def open_data(data, root, image_size):
    """The --data source as ImageData; image_size is used to resize folders, checked otherwise."""
    sources = None
    if data == "cifar10":
        from torchvision.datasets import CIFAR10
        try:
            ds = CIFAR10(root, train=True, download=True)
        except Exception as e:  # no network, a broken archive, ...
            fail(f"cannot load CIFAR-10 into {root} ({e}); check the network or --data-root")
        images, labels = np.asarray(ds.data), np.asarray(ds.targets)
    elif os.path.isdir(data):
        return ImageData(folder=FolderImages(data, image_size))
    elif data.endswith(".npz"):
        if not os.path.isfile(data):
            fail(f"--data {data} does not exist; pass cifar10, an image folder or an .npz file")
        images, labels, sources = read_npz_images(data)
    else:
        fail(f"--data {data} is neither cifar10, an existing folder nor an .npz file")
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    if sources is not None:
        sources = torch.from_numpy(sources).permute(0, 3, 1, 2).contiguous()
    if labels is not None:
        labels = torch.from_numpy(np.asarray(labels)).long().reshape(-1)
        if len(labels) != len(images):
            fail(f"--data has {len(images)} images but {len(labels)} labels")
    return ImageData(images, labels, sources=sources)


def check_data(data, net_config, cond, what="the network"):
    """Data must have the network's channels and size, and labels if the model is conditional."""
    c, h, w = data.shape
    want = (net_config["in_channels"], net_config["image_size"], net_config["image_size"])
    if (c, h, w) != want:
        fail(f"data images are {c}x{h}x{w} but {what} expects {want[0]}x{want[1]}x{want[2]}; "
             "resize the data or set --image-size / use a matching checkpoint")
    if cond and not data.has_labels:
        fail("a class-conditional model needs labels: add a `labels` array to the .npz or use "
             "one sub-folder per class (or train an unconditional model without --cond)")
    if cond and data.num_classes > net_config["num_classes"]:
        fail(f"data has {data.num_classes} classes but the model has {net_config['num_classes']}")


def to_device(x, device):
    """A host tensor on `device` without stalling the host (page-locked on CUDA); None stays."""
    if x is None or x.device == device:
        return x
    if device.type == "cuda" and not x.is_pinned():
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def flip(x, mask):
    """Horizontal flip of the images where mask is True (the authors' random flips)."""
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)


# ---------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, safe reads, the authors' layouts

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


def same_net(a, b):
    """Two network configs describe the same network (configs written before a key existed,
    e.g. cond_channels, hold its default)."""
    return a is not None and dict(unet.PAPER_CONFIG, **a) == dict(unet.PAPER_CONFIG, **b)


def net_config_from(ckpt, sd, fallback):
    """The network config stored in our files; for the authors' files (no config) the paper
    network described by `fallback`, with class conditioning read from the label embedding."""
    if "config" in ckpt:
        return dict(ckpt["config"]["net"])
    cfg = dict(fallback)
    cfg["num_classes"] = sd["label_emb.weight"].shape[0] if "label_emb.weight" in sd else None
    return cfg


HEAD = "cls_pred_branch."  # the optional GAN head: the only keys allowed to be absent or extra


def build_net(cfg, sd=None, gan_head=False, dropout=None, what="weights"):
    """UNet from a config, loaded strictly from `sd`; only the GAN head may be absent (it then
    keeps its fresh initialisation) or extra (the authors' files always carry it)."""
    cfg = dict(cfg, gan_head=gan_head)
    if dropout is not None:
        cfg["dropout"] = dropout
    try:
        net = unet.UNet(**cfg)
    except (TypeError, ValueError) as e:
        fail(f"cannot build the network from its config ({e})")
    if sd is None:
        return net
    expected = net.state_dict()
    sd = {k: v for k, v in clean_state_dict(sd).items() if gan_head or not k.startswith(HEAD)}
    missing = [k for k in expected if k not in sd and not k.startswith(HEAD)]
    unexpected = [k for k in sd if k not in expected]
    wrong = [k for k in sd if k in expected and sd[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}"
                  if unexpected else f"{wrong[0]} has shape {tuple(sd[wrong[0]].shape)}, "
                  f"expected {tuple(expected[wrong[0]].shape)}")
        fail(f"{what} do not fit the network {cfg} ({detail}); pass the network flags the "
             "checkpoint was trained with")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        fail(f"{what} contain NaN/inf values (e.g. {bad[0]}); use an earlier checkpoint")
    net.load_state_dict({**{k: v for k, v in expected.items() if k.startswith(HEAD)}, **sd},
                        strict=True)
    return net


def load_state(module, sd, what="checkpoint weights"):
    """Load a state dict into a built network (resume): strict, after prefix cleaning."""
    try:
        module.load_state_dict(clean_state_dict(sd), strict=True)
    except RuntimeError as e:
        fail(f"{what} do not fit the network ({str(e).splitlines()[1].strip()[:160]}); "
             "pass the network and GAN flags the checkpoint was made with")


def fingerprint(sd):
    """sha256 (16 hex digits) of a state dict's tensors in key order: names a network's weights
    exactly, so a resumed run can check that a moved --teacher file is the same teacher."""
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Image grids and small helpers


def save_grid(x, path, nrow=None):
    """A PNG grid of images in [-1, 1] (the same quantisation as the FID protocol)."""
    from PIL import Image
    x = to_uint8(x.detach().float()).cpu()
    n, c, h, w = x.shape
    nrow = nrow or max(1, int(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = torch.zeros(c, rows * (h + 2) + 2, nrow * (w + 2) + 2, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, 2 + r * (h + 2):2 + r * (h + 2) + h, 2 + col * (w + 2):2 + col * (w + 2) + w] = x[i]
    arr = grid.permute(1, 2, 0).numpy()
    Image.fromarray(arr[..., 0] if c == 1 else arr).save(path)


def json_safe(d):
    return json.loads(json.dumps(d, default=str))


def warn(message):
    warnings.warn(message, stacklevel=2)
    sys.stderr.flush()


# ---------------------------------------------------------------------------------------------
# Flags shared by the scripts (torchcfm's names for the network)

def given_flags(parser, argv):
    """The destinations of the flags present in argv (not those left at their defaults)."""
    unset = object()
    probe = argparse.Namespace(**{a.dest: unset for a in parser._actions
                                  if a.dest != argparse.SUPPRESS})
    parser.parse_args(argv, namespace=probe)
    return {k for k, v in vars(probe).items() if v is not unset}


def add_data_args(p, image_size_default=32):
    g = p.add_argument_group("data")
    g.add_argument("--data", default="cifar10",
                   help="cifar10 (torchvision, downloaded to --data-root), a folder of images "
                        "(center-cropped and resized; one sub-folder per class for --cond), or "
                        "an .npz of uint8 images [N, H, W, C] with optional `labels`")
    g.add_argument("--data-root", default="./data", help="where cifar10 is downloaded")
    g.add_argument("--image-size", type=positive_int, default=image_size_default,
                   help="image side in pixels (CIFAR-10: 32, CelebA: 64)")
    g.add_argument("--workers", type=count, default=4,
                   help="data-loading processes for image folders (in-memory data needs none)")
    return g


def head_channels(text):
    value = int(text) if str(text).lstrip("-").isdigit() else None
    if value is None or not (value >= 1 or value == -1):
        raise argparse.ArgumentTypeError(f"{text} is not a channel count >= 1 or -1")
    return value


def add_net_args(p):
    g = p.add_argument_group("network (torchcfm UNetModelWrapper names; default: paper CIFAR-10)")
    c = unet.PAPER_CONFIG
    g.add_argument("--num-channels", type=positive_int, default=c["num_channels"],
                   help="base channel count (multiple of 32)")
    g.add_argument("--channel-mult", type=int_list, default=",".join(map(str, c["channel_mult"])),
                   help="channel multiplier per resolution level, e.g. 1,2,2,2")
    g.add_argument("--num-res-blocks", type=positive_int, default=c["num_res_blocks"],
                   help="residual blocks per level")
    g.add_argument("--attention-resolutions", type=int_list,
                   default=",".join(map(str, c["attention_resolutions"])),
                   help="resolutions with self-attention, e.g. 16 (comma separated)")
    g.add_argument("--num-heads", type=positive_int, default=c["num_heads"],
                   help="attention heads")
    g.add_argument("--num-head-channels", type=head_channels, default=c["num_head_channels"],
                   help="channels per head (overrides --num-heads; -1: use --num-heads)")
    return g


def net_config_from_args(args, in_channels=3, num_classes=None, dropout=0.0, cond_channels=0):
    return dict(unet.PAPER_CONFIG, image_size=args.image_size, in_channels=in_channels,
                cond_channels=cond_channels,
                num_channels=args.num_channels, channel_mult=list(args.channel_mult),
                num_res_blocks=args.num_res_blocks,
                attention_resolutions=list(args.attention_resolutions),
                num_heads=args.num_heads, num_head_channels=args.num_head_channels,
                dropout=dropout, num_classes=num_classes)


