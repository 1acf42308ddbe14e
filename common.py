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
import atexit
import contextlib
import datetime
import hashlib
import json
import math
import os
import resource
import signal
import sys
import threading
import time
import warnings
import weakref

import numpy as np
import torch
import torch.distributed as dist

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
        main(parse_args())
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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default after its help, unless the flag has none (None) or its help
    already says what it is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or "default" in text.lower():
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`error: ...; see --help`) and --help that shows defaults."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(*a, **kw)

    def error(self, message):
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
    """`--device` or the best available one: CUDA, Ascend NPU (torch_npu), Apple MPS, CPU."""
    if name:
        if name.startswith("npu"):
            _import_torch_npu()
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _import_torch_npu() and torch.npu.is_available():
        return torch.device("npu")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _import_torch_npu():
    try:
        import torch_npu  # noqa: F401  (registers the "npu" device with torch)
    except ImportError:
        return False
    return True


class Dist:
    """Rank, world size and device of this process; torchrun sets the environment."""

    def __init__(self, device_name=None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = pick_device(device_name)
        if self.world > 1 and device.type in ("cuda", "npu"):
            device = torch.device(device.type, local_rank)
            getattr(torch, device.type).set_device(device)
        self.device = device
        self.cpu_group = None
        if self.world > 1:
            if not dist.is_initialized():
                backend = {"cuda": "nccl", "npu": "hccl"}.get(device.type, "gloo")
                dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
            # The once-per-step agreement on logging, saving and stopping (Control) runs on the
            # CPU, so that it never waits for the accelerator's queue.
            self.cpu_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" \
                else dist.group.WORLD
        self.main = self.rank == 0

    def split(self, global_batch, grad_accum):
        """Per-process micro-batch size; the global batch must split evenly."""
        parts = self.world * grad_accum
        if global_batch % parts:
            fail(f"--batch-size {global_batch} does not split into {self.world} processes x "
                 f"--grad-accum {grad_accum}; choose a multiple of {parts}")
        return global_batch // parts

    def mean(self, x):
        """Average of a tensor over processes (for logged values)."""
        if self.world > 1:
            x = x.clone()
            dist.all_reduce(x)
            x /= self.world
        return x

    def agree(self, *flags):
        """Each flag true on every process if it is true on any (one small CPU all-reduce)."""
        if self.world == 1:
            return flags
        t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return tuple(bool(v) for v in t.tolist())

    def broadcast(self, value):
        """rank 0's python value on every process."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self):
        """Leave the process group together: a rank that tears down its connections while
        another still uses them makes gloo abort ("terminate called without an active
        exception")."""
        if self.world > 1 and dist.is_initialized():
            dist.barrier(group=self.cpu_group)
            dist.destroy_process_group()


def seed_init(seed):
    """Seed weight initialisation: the same on every process, so all start from equal weights."""
    torch.manual_seed(seed)


def seed_dropout(seed, rank):
    """After initialisation the global RNG only drives dropout: a different stream per process."""
    torch.manual_seed(seed + 1 + rank)


def noise_generator(device, seed):
    """The generator of all per-update noise (same on every rank, sliced per rank)."""
    try:
        return torch.Generator(device=device).manual_seed(seed)
    except RuntimeError:  # a backend without device generators: draw on the CPU
        return torch.Generator().manual_seed(seed)


def randn(gen, shape, device):
    return torch.randn(shape, generator=gen, device=gen.device).to(device, non_blocking=True)


def rand(gen, shape, device):
    return torch.rand(shape, generator=gen, device=gen.device).to(device, non_blocking=True)


def randint(gen, high, shape, device):
    return torch.randint(high, shape, generator=gen, device=gen.device).to(device)


def rank_slice(tensors, dist_info):
    """This process's rows of tensors drawn for the global batch (None stays None)."""
    return {k: (None if v is None else v.chunk(dist_info.world)[dist_info.rank])
            for k, v in tensors.items()}


def micro_batches(tensors, micro):
    """Successive micro-batches of size `micro` of a dict of per-process tensors."""
    n = len(next(v for v in tensors.values() if v is not None))
    for lo in range(0, n, micro):
        yield {k: (None if v is None else v[lo:lo + micro]) for k, v in tensors.items()}


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
        self.files, self.size = files, size
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


class Batches:
    """Global batches of data indices in a seeded order, epoch after epoch (drop last).

    Every process walks the same sequence and loads only its slice of each global batch, so a
    run with N processes sees exactly the data of a one-process run; `consumed` is saved in
    checkpoints so that a resumed run continues with the very next batch.
    """

    def __init__(self, data, global_batch, seed, dist_info, workers=0, consumed=0):
        if len(data) < global_batch:
            fail(f"the data has {len(data)} images, fewer than one batch of {global_batch}; "
                 "lower --batch-size or add data")
        self.data, self.batch, self.seed, self.dist = data, global_batch, seed, dist_info
        self.consumed = consumed
        self.per_rank = global_batch // dist_info.world
        self._epoch = self._order = None
        self.loader = None
        if data.folder is not None and workers > 0:
            self.loader = iter(torch.utils.data.DataLoader(
                data.folder, batch_sampler=self._rank_indices(), num_workers=workers,
                pin_memory=dist_info.device.type == "cuda", persistent_workers=True,
                worker_init_fn=_ignore_stop_signals,
                # its own generator: the loader's seed for its workers would otherwise be
                # drawn from the global RNG, whose stream the run's noise relies on, and a
                # run with workers (or resumed with them) would differ from one without
                generator=torch.Generator().manual_seed(seed)))
            # The workers ignore SIGTERM, so multiprocessing's own exit hook (terminate, then
            # join) would wait for them forever: shut them down first, on every way out of
            # the process (atexit hooks run last-registered first).
            atexit.register(_close_batches, weakref.ref(self))

    def _global_indices(self, k):
        per_epoch = len(self.data) // self.batch
        epoch, i = divmod(k, per_epoch)
        if self._epoch != epoch:  # one permutation per epoch, not one per batch
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.data))
        return self._order[i * self.batch:(i + 1) * self.batch]

    def _rank_indices(self):
        k = self.consumed
        while True:
            lo = self.dist.rank * self.per_rank
            yield self._global_indices(k)[lo:lo + self.per_rank].tolist()
            k += 1

    def next(self):
        """This process's slice of the next global batch on the device: uint8 images, labels
        (or None) and, for a pairs file, uint8 sources (or None).
        On CUDA the host copies are page-locked, so the transfer runs asynchronously (a copy
        from pageable memory would make the host wait for the device's queue)."""
        src = None
        if self.loader is not None:
            x, y = next(self.loader)
            y = y if self.data.has_labels else None
        else:
            lo = self.dist.rank * self.per_rank
            x, y, src = self.data.get(self._global_indices(self.consumed)[lo:lo + self.per_rank])
        self.consumed += 1
        device = self.dist.device
        return to_device(x, device), to_device(y, device), to_device(src, device)

    def close(self):
        """Stop the loader workers (idempotent; the data cannot be read afterwards)."""
        if self.loader is not None:
            self.loader._shutdown_workers()
            self.loader = None


def _close_batches(ref):
    batches = ref()
    if batches is not None:
        batches.close()


def _ignore_stop_signals(worker_id):
    """Loader workers leave SIGINT / SIGTERM to the main process, which finishes its step
    with them (a terminal's Ctrl-C reaches every process of the group); they still exit when
    the main process dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


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
    """A checkpoint is data: weights_only=True; clear errors for missing or corrupt files.
    mmap=True maps the file instead of reading it (cheap when only a few entries are needed)."""
    if not path:
        fail(f"no {what} given")
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


def describe_data(data):
    """What a resumed run checks of its data: size and image shape (None: no data used)."""
    return None if data is None else {"n": len(data), "shape": list(data.shape)}


def check_same_inputs(saved_config, teacher_fingerprint, data_desc, path):
    """A resumed run must see the teacher and data of the run (files may have moved)."""
    saved = saved_config.get("teacher_fingerprint")
    if saved and saved != teacher_fingerprint:
        fail(f"--teacher is not the teacher {path} was trained with (weights differ); pass the "
             "original teacher file")
    saved = saved_config.get("data", "unrecorded")
    if saved != "unrecorded" and saved != data_desc:
        fail(f"--data is not the data {path} was trained with (it had {saved}, now "
             f"{data_desc}); pass the original data")


def load_authors_adam(opt, state, n_params, path):
    """An Adam state of the authors' code into our optimizer of `n_params` parameters: their
    networks always carry the GAN head, registered last, so its entries (absent from our
    networks without GAN) are dropped; `maximize` is turned off (see distill.continue_authors)
    and our kernel choice (foreach / fused) is kept."""
    if len(state.get("param_groups", [])) != 1:
        fail(f"{path}: expected one Adam parameter group, found "
             f"{len(state.get('param_groups', []))}")
    group = state["param_groups"][0]
    if len(group["params"]) < n_params:
        fail(f"{path}: its optimizer has {len(group['params'])} parameters, the network "
             f"{n_params}; pass the network flags of the authors' run")
    ours = opt.state_dict()["param_groups"][0]
    kept = {k: ours[k] for k in ("foreach", "fused", "capturable", "differentiable")
            if k in ours}
    index = group["params"][:n_params]
    opt.load_state_dict({
        "state": {i: state["state"][p] for i, p in enumerate(index) if p in state["state"]},
        "param_groups": [dict(group, **kept, params=list(range(n_params)), maximize=False)]})


def set_warmup_position(sched, updates):
    """Put a warm-up scheduler (common.warmup) at `updates` updates done."""
    sched.last_epoch = updates - 1
    with warnings.catch_warnings():  # "step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        sched.step()


def rng_state(gen, dist_info):
    """RNG states for an exact resume: the shared noise generator and each process's own."""
    own = {"torch": torch.get_rng_state()}
    if dist_info.device.type == "cuda":
        own["cuda"] = torch.cuda.get_rng_state(dist_info.device)
    per_rank = [own]
    if dist_info.world > 1:
        per_rank = [None] * dist_info.world
        dist.all_gather_object(per_rank, own)
    return {"noise": gen.get_state(), "per_rank": per_rank}


def set_rng_state(state, gen, dist_info):
    gen.set_state(state["noise"])
    if len(state["per_rank"]) != dist_info.world:  # a resume on another process count
        return
    own = state["per_rank"][dist_info.rank]
    torch.set_rng_state(own["torch"])
    if "cuda" in own and dist_info.device.type == "cuda":
        torch.cuda.set_rng_state(own["cuda"], dist_info.device)


# ---------------------------------------------------------------------------------------------
# Optimisation helpers

def adam(params, lr, betas, device):
    """Adam with the multi-tensor (or fused CUDA) kernels instead of a per-tensor loop."""
    kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.Adam(params, lr=lr, betas=betas, **kind)


def warmup(optimizer, steps):
    """Linear warm-up: update k = 1, 2, ... uses lr * min(1, k / steps) (steps = 0: none)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: min(1.0, (k + 1) / steps) if steps > 0 else 1.0)


@torch.no_grad()
def ema_update(ema_net, net, decay):
    """ema <- decay * ema + (1 - decay) * net, all tensors in one multi-tensor op."""
    torch._foreach_lerp_(list(ema_net.parameters()), list(net.parameters()), 1 - decay)


class Objective(torch.nn.Module):
    """One player's whole objective as a module: its network plus a loss function
    `loss(net, micro_batch) -> (objective, {name: loss term})`.

    DistributedDataParallel and torch.compile wrap this module rather than the bare network, so
    that everything the network computes in one update (the fused generated + real pass, the GAN
    head) is one forward call before one backward. Networks of the other players are reached by
    the loss function itself, never registered here: DDP neither broadcasts nor reduces them.
    """

    def __init__(self, net, loss):
        super().__init__()
        self.net, self.loss = net, loss

    def forward(self, mb):
        return self.loss(self.net, mb)


class Player:
    """A trained network with its optimizer, warm-up, gradient scaler and objective.

    `net` holds the weights (EMAs, checkpoints, sampling and the other player read it);
    `run` computes the objective: the Objective module, inside DistributedDataParallel with
    several processes (gradient buckets all-reduced while the backward pass runs; `no_sync` for
    all but the last micro-batch of --grad-accum) and compiled with --compile.
    """

    def __init__(self, net, loss, args, d, lr, betas, warmup_steps):
        self.net = net
        self.objective = Objective(net, loss)
        self.ddp = None
        run = self.objective
        if d.world > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.objective, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                broadcast_buffers=False)
            run = self.ddp
        if args.compile:
            run = torch.compile(run, mode=None if args.compile_mode == "default"
                                else args.compile_mode)
        self.run, self.params = run, list(net.parameters())
        self.opt = adam(self.params, lr, betas, d.device)
        self.sched = warmup(self.opt, warmup_steps)
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=args.precision == "fp16")

    def update(self, batch, micro, amp, clip):
        """One optimizer update on a batch split into micro-batches of `micro` rows: the mean of
        the objective over the batch is minimised. Returns ({name: mean term}, pre-clip grad
        norm), both on the device (read them at log steps only: no synchronisation here)."""
        chunks = list(micro_batches(batch, micro))
        totals = {}
        for i, mb in enumerate(chunks):
            last = i == len(chunks) - 1
            with self.ddp.no_sync() if self.ddp is not None and not last else \
                    contextlib.nullcontext():
                with amp:
                    objective, parts = self.run(mb)
                self.scaler.scale(objective / len(chunks)).backward()
            for k, v in parts.items():
                totals[k] = totals.get(k, 0) + v.detach() / len(chunks)
        self.scaler.unscale_(self.opt)
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True)
        self.scaler.step(self.opt)
        self.scaler.update()
        with warnings.catch_warnings():  # fp16: the scaler skips steps with inf grads, by design
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return totals, norm


def frozen_alias(net):
    """A second module on `net`'s very parameter storage that never requires grad: the other
    player's view of a network. Updates of `net` show through, no parameter gradients are
    computed through it, and DDP (which wraps `net`) never sees it. Make it after `net` has
    its final device and memory format (moving a module gives it new storage)."""
    with torch.device("meta"):
        alias = type(net)(**net.config)
    alias.load_state_dict(net.state_dict(), assign=True)
    return alias.requires_grad_(False).train(net.training)


class FiniteCheck:
    """NaN/inf losses without a host synchronisation per update: each update records, on the
    device, the first step at which a loss was not finite; `check` reads the record (at log
    and save steps), so a bad run stops there and never overwrites a good checkpoint."""

    def __init__(self):
        self.first = {}  # name -> (step, value) of the first non-finite value, step inf if none

    def add(self, name, value, step):
        value = value.detach().double()
        if name not in self.first:
            self.first[name] = (torch.full((), math.inf, dtype=torch.float64,
                                           device=value.device), torch.zeros_like(value))
        first_step, first_value = self.first[name]
        bad = ~torch.isfinite(value) & torch.isinf(first_step)
        first_step.copy_(torch.where(bad, float(step), first_step))
        first_value.copy_(torch.where(bad, value, first_value))

    def check(self, d, out, last_saved):
        for name, (first_step, first_value) in self.first.items():
            step = first_step.clone()
            if d.world > 1:
                dist.all_reduce(step, op=dist.ReduceOp.MIN)
            if math.isfinite(step.item()):
                kept = (f"the last good checkpoint is {out}/latest.pt (step {last_saved})"
                        if last_saved else "no checkpoint was written")
                fail(f"the {name} is {first_value.item()} at step {int(step.item())}; stopped "
                     f"without saving; {kept}; lower --lr or check the inputs")


# ---------------------------------------------------------------------------------------------
# Runs: args.json, metrics.jsonl, console status lines, image grids

class RunLog:
    """Status lines on the console and the same records in <out>/metrics.jsonl (main rank).

    Speed and ETA come from the average rate since this process started (or resumed), not
    from the last interval; records carry the wall-clock time and the run's elapsed training
    time (continued across resumes)."""

    def __init__(self, out, total_steps, start_step, elapsed=0.0, enabled=True):
        self.out, self.total, self.enabled = out, total_steps, enabled
        self.start_step, self.start_time, self.elapsed_before = start_step, time.perf_counter(), \
            elapsed
        self.last_time, self.last_step = self.start_time, start_step
        self.path = os.path.join(out, "metrics.jsonl")

    def elapsed(self, now=None):
        """Seconds of training in this run so far (until perf_counter `now`), resumes
        included."""
        return self.elapsed_before + (time.perf_counter() if now is None else now) - \
            self.start_time

    def write(self, record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def step(self, step, values, device):
        """One status line: step, each value, speed, ETA, peak memory; the same record in
        metrics.jsonl with `sec_per_step` (since the last record), `time`, `elapsed_s`."""
        now = time.perf_counter()
        sec = (now - self.last_time) / max(1, step - self.last_step)
        self.last_time, self.last_step = now, step
        record = {"step": step, **{k: _plain(v) for k, v in values.items()},
                  "sec_per_step": sec, "time": round(time.time(), 3),
                  "elapsed_s": round(self.elapsed(now), 3)}
        mem = peak_memory_mb(device)
        if mem is not None:
            record["peak_mem_mb"] = round(mem, 1)
        self.write(record)
        if self.enabled:
            rate = (step - self.start_step) / max(now - self.start_time, 1e-9)
            eta = datetime.timedelta(seconds=round((self.total - step) / max(rate, 1e-9)))
            speed = f"{rate:.2f} it/s" if rate >= 1 else f"{1 / max(rate, 1e-9):.2f} s/it"
            parts = [f"{k} {_fmt(record[k])}" for k in values]
            mem_txt = f" | {mem:.0f} MB" if mem is not None else ""
            print(f"step {step}/{self.total} | " + " | ".join(parts) +
                  f" | {speed} | ETA {eta}{mem_txt}", flush=True)
        return record


class Control:
    """When to log, save and stop, decided once per step and agreed by all processes.

    - log: after the first step, then every --log-every steps or --log-seconds, whichever
      comes first, and at the end;
    - save <out>/latest.pt: every --save-every steps (0: never by count), every --save-minutes
      (0: never by time), with every --snapshot-every snapshot, at the end and on a stop;
    - stop: SIGINT / SIGTERM ask the run to finish its current step, save and exit with
      128 + the signal number; a second signal (more than a second later: torchrun and
      schedulers forward one signal twice) stops at once, without saving.
    Use as a context manager around the training loop (it installs the signal handlers).
    """

    def __init__(self, args, d, s, script):
        self.args, self.d, self.s, self.script = args, d, s, script
        self.start_step = s.step
        self.last_log = self.last_save = time.monotonic()
        self.signal, self.signal_time, self.previous = None, None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False

    def _on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal, self.signal_time = signum, time.monotonic()
            if self.d.main:
                print(f"\nreceived {name}: finishing step {self.s.step}, then saving "
                      f"{self.args.out}/latest.pt (send it again to stop at once, unsaved)",
                      file=sys.stderr, flush=True)
        elif time.monotonic() - self.signal_time > 1.0:
            kept = (f"{self.args.out}/latest.pt is from step {self.s.last_saved}"
                    if self.s.last_saved else "nothing was saved")
            raise Interrupted(f"stopped at once by a second {name} during step {self.s.step}, "
                              f"without saving; {kept}", 128 + signum)

    def due(self, step):
        """(log, save, stop) after `step`, the same on every process."""
        a, now = self.args, time.monotonic()
        last = step >= a.steps
        log = (step == self.start_step + 1 or step % a.log_every == 0 or last
               or (a.log_seconds and now - self.last_log >= a.log_seconds))
        save = (last or (a.save_every and step % a.save_every == 0)
                or (a.snapshot_every and step % a.snapshot_every == 0)
                or (a.save_minutes and now - self.last_save >= 60 * a.save_minutes))
        log, save, stop = self.d.agree(log, save, self.signal is not None)
        if log:
            self.last_log = now
        if save or stop:
            self.last_save = now
        return log, save or stop, stop

    def stopped(self, step):
        """The exception that ends a run stopped by a signal (after its checkpoint is saved)."""
        signum = self.signal or signal.SIGTERM  # the signal reached another process
        message = (f"stopped by {signal.Signals(signum).name} at step {step}/{self.args.steps}: "
                   f"{self.args.out}/latest.pt written; continue with: python {self.script} "
                   f"--resume {self.args.out}" + (" (under the same launcher, e.g. torchrun)"
                                                  if self.d.world > 1 else ""))
        return Interrupted(message if self.d.main else "", 128 + signum)


def _plain(v):
    return v.item() if torch.is_tensor(v) else v


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def start_run(args, d):
    """Create <out> and write args.json, once setup has succeeded (a run that fails on its
    inputs leaves no empty folder behind)."""
    if d.main:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(json_safe(vars(args)), f, indent=2)


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
# Flags shared by the training scripts (torchcfm's names for the network)

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


def add_run_args(p, steps, batch, lr, warmup_steps, ema, log_every, sample_every, save_every,
                 precisions=("fp32", "tf32", "bf16", "fp16"), precision="fp32"):
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/run",
                   help="output folder of the run (with --resume RUN_DIR: RUN_DIR)")
    g.add_argument("--steps", type=positive_int, default=steps,
                   help="total steps of the run (a larger value extends a resumed run)")
    g.add_argument("--batch-size", type=positive_int, default=batch,
                   help="global batch size (split over processes and --grad-accum)")
    g.add_argument("--lr", type=positive_float, default=lr, help="Adam learning rate")
    g.add_argument("--warmup", type=count, default=warmup_steps,
                   help="linear learning-rate warm-up, in optimizer updates (0: none)")
    g.add_argument("--grad-clip", type=positive_float, default=1.0,
                   help="gradient-norm clipping")
    g.add_argument("--ema", type=decay, nargs="+", default=ema,
                   help="EMA decays to track (keys str(decay) in the checkpoint)")
    g.add_argument("--seed", type=count, default=42, help="random seed")
    g.add_argument("--device", default=None,
                   help="cuda, cuda:1, npu, mps or cpu (default: the best available)")
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="RUN",
                   help="continue a run exactly, with its own flags: a run folder, a checkpoint "
                        "file, or no value for <out>/latest.pt. Only the flags listed under "
                        "'resumable' in the README may change (--steps, intervals, device, ...)")
    g.add_argument("--log-every", type=positive_int, default=log_every,
                   help="status line and metrics.jsonl record every N steps (and after step 1)")
    g.add_argument("--log-seconds", type=nonnegative_float, default=30.0,
                   help="... or after this many seconds, whichever comes first (0: by count)")
    g.add_argument("--sample-every", type=count, default=sample_every,
                   help="sample grid every N steps (0: never)")
    g.add_argument("--save-every", type=count, default=save_every,
                   help="write <out>/latest.pt every N steps (0: only by --save-minutes, at "
                        "the end and when stopped by SIGINT / SIGTERM)")
    g.add_argument("--save-minutes", type=nonnegative_float, default=10.0,
                   help="also write <out>/latest.pt when it is this many minutes old, so that "
                        "a hard kill loses at most that much (0: never by time)")
    g.add_argument("--snapshot-every", type=count, default=0,
                   help="also keep a numbered copy <out>/ckpt_<step>.pt every N steps (0: never)")
    s = p.add_argument_group("speed")
    s.add_argument("--precision", choices=list(precisions), default=precision,
                   help="fp32 (no TF32); tf32 (TF32 matrix products on CUDA); bf16 / fp16 "
                        "(autocast, losses and optimizer in fp32, fp16 with gradient scaling)"
                        + ("; mixed (bf16, but teacher and fake model in fp32 in the generator "
                           "update, see README); auto: mixed on a CUDA GPU with bf16, fp32 "
                           "elsewhere" if "mixed" in precisions else ""))
    s.add_argument("--grad-accum", type=positive_int, default=1,
                   help="accumulate gradients over K micro-batches (same update as one batch)")
    s.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile each update's objective (network and loss, forward and "
                        "backward)")
    s.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune",
                            "max-autotune-no-cudagraphs"],
                   help="torch.compile mode; reduce-overhead captures CUDA graphs")
    s.add_argument("--deterministic", action="store_true",
                   help="deterministic GPU kernels (cuDNN, cuBLAS) for bit-exact resumes on a "
                        "GPU; slower. On a CPU runs are deterministic anyway")
    return g


def add_fid_args(p):
    g = p.add_argument_group("in-training FID (cheap and labelled as such; final numbers: fid.py)")
    g.add_argument("--fid-every", type=count, default=0,
                   help="FID of the first EMA model every N steps, logged to metrics.jsonl; the "
                        "best one is kept as <out>/best.pt (0: never)")
    g.add_argument("--fid-n", type=_number(int, lambda v: v >= 2, "an integer >= 2"),
                   default=10_000,
                   help="samples per in-training FID (the paper's protocol uses 50,000)")
    g.add_argument("--fid-ref", default=None,
                   help="reference statistics from `python fid.py ref` (e.g. "
                        "cifar10_train_tf.npz); needed with --fid-every")
    g.add_argument("--fid-weights", default=None,
                   help="Inception weights file (default: torch hub cache, see fid.py)")
    g.add_argument("--fid-mode", choices=["tf", "pytorch-fid"], default="tf",
                   help="FID preprocessing (tf: the paper's clean-fid legacy_tensorflow)")
    g.add_argument("--fid-batch", type=positive_int, default=250,
                   help="images per sampling batch")
    return g


# Flags a resumed run may change on the command line: how long, how often, where and how fast
# it runs. Flags not given are all restored from the checkpoint; giving another value to a flag
# outside this set is refused. (--teacher and --data may point to moved files: setup checks
# their content; --init-from only matters at the start of a run.)
RESUMABLE = {"steps", "out", "resume", "device", "workers", "data_root", "log_every",
             "log_seconds", "sample_every", "save_every", "save_minutes", "snapshot_every",
             "fid_every", "fid_n", "fid_ref", "fid_weights", "fid_mode", "fid_batch",
             "compile", "compile_mode", "channels_last", "deterministic", "teacher", "data",
             "init_from", "sample_nfe"}


def given_flags(parser, argv):
    """The destinations of the flags present in argv (not those left at their defaults)."""
    unset = object()
    probe = argparse.Namespace(**{a.dest: unset for a in parser._actions
                                  if a.dest != argparse.SUPPRESS})
    parser.parse_args(argv, namespace=probe)
    return {k for k, v in vars(probe).items() if v is not unset}


def resume_path(resume, out):
    """The checkpoint of --resume: a file, a run folder's latest.pt, or <out>/latest.pt."""
    path = os.path.join(out, "latest.pt") if resume == "latest" else resume
    if os.path.isdir(path):
        path = os.path.join(path, "latest.pt")
    if not os.path.isfile(path):
        fail(f"--resume: {path} not found; start without --resume or give a run folder or "
             "checkpoint file")
    return path


def parse_run_args(parser, argv, script, init_hint):
    """A training script's flags. With --resume, the run's own flags are restored from its
    checkpoint: flags given on the command line must be RESUMABLE or equal the saved ones.
    Sets args.resume to the checkpoint path (None without --resume) and args.from_authors for
    the authors' files, which carry no flags (all then come from the command line). Without
    --resume, an --out that already holds a run is refused: a repeated command never
    overwrites the checkpoint it could have resumed."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser.parse_args(argv)
    args.from_authors = False
    if args.resume is None:
        if os.path.exists(os.path.join(args.out, "latest.pt")):  # never overwrite a run
            fail(f"--out {args.out} already holds a run (latest.pt); continue it with "
                 f"`python {script} --resume {args.out}`, or pass another --out (delete the "
                 "folder to start that run over)")
        return args
    given = given_flags(parser, argv)
    path = resume_path(args.resume, args.out)
    ckpt = load_checkpoint(path, "resume checkpoint", mmap=True)
    saved = ckpt.get("config", {}).get("args")
    args.resume = path
    if saved is None:  # the authors' layout (or a file written by hand): no flags inside
        args.from_authors = True
        return args
    if "out" not in given:
        args.out = os.path.dirname(path) or "."
    differ = []
    for key, value in vars(args).items():
        if key not in saved or key in ("out", "resume"):
            continue
        if key not in given:
            setattr(args, key, saved[key])
        elif key not in RESUMABLE and json_safe(value) != saved[key]:
            differ.append(f"--{key.replace('_', '-')} {_flag_text(value)} (the run: "
                          f"{_flag_text(saved[key])})")
    if differ:
        fail(f"--resume {path}: {', '.join(differ)} differ from the run's own flags; drop them "
             f"to continue the run exactly, or start a new run from these weights: python "
             f"{script} {init_hint.format(path=path)} --out NEW_FOLDER ...")
    return args


def _flag_text(value):
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def check_resume_step(args, step):
    """A resumed run must have steps left to run."""
    if step >= args.steps:
        fail(f"the run in {args.resume} is already at step {step} of --steps {args.steps}; "
             "pass a larger --steps to extend it")


class InTrainingFID:
    """FID of a model every N steps on --fid-n samples: the Inception network and the reference
    statistics are loaded once per run; the latents and labels are the same at every evaluation
    (balanced labels arange(n) % classes), so that scores are comparable across steps."""

    def __init__(self, args, device, shape, num_classes):
        import fid
        if not args.fid_ref:
            fail("--fid-every needs --fid-ref, statistics from `python fid.py ref`")
        self.ref = fid.load_stats(args.fid_ref)  # fid.FIDError is a RealUIDError
        self.extractor = fid.InceptionFeatures(args.fid_weights, args.fid_mode, device)
        fid.check_compatible(self.ref, args.fid_ref, self.extractor.mode,
                             self.extractor.weights_sha256)
        self.fid, self.args, self.device = fid, args, device
        self.shape, self.num_classes = shape, num_classes

    @torch.no_grad()
    def __call__(self, sample):
        """FID of sample(z, y) -> images in [-1, 1] against the reference statistics."""
        n, b = self.args.fid_n, self.args.fid_batch
        gen = torch.Generator().manual_seed(1234)

        def batches():
            for lo in range(0, n, b):
                m = min(b, n - lo)
                z = torch.randn(m, *self.shape, generator=gen).to(self.device)
                y = None if self.num_classes is None else \
                    (torch.arange(lo, lo + m) % self.num_classes).to(self.device)
                x = to_uint8(sample(z, y).float())
                yield x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # gray -> RGB
        mu, sigma, _ = self.fid.feature_stats(batches(), self.extractor)
        return self.fid.frechet_distance(mu, sigma, self.ref["mu"], self.ref["sigma"])


def evaluate_fid(s, args, fid_eval, sample, model, log, save):
    """In-training FID on the main process (shared with the others), logged with its sample
    count and model; a new best is written to <out>/best.pt with save(s, args, "best.pt")."""
    score = s.d.broadcast(fid_eval(sample) if s.d.main else None)
    best = score < s.best_fid
    log.write({"step": s.step, "fid": score, "fid_samples": args.fid_n, "fid_model": model,
               "fid_mode": args.fid_mode, "fid_kind": "in-training"})
    if log.enabled:
        print(f"step {s.step} | in-training FID ({args.fid_n} samples, {model}): {score:.3f}"
              + (" (best so far: <out>/best.pt)" if best else ""), flush=True)
    if best:
        s.best_fid = score
        save(s, args, "best.pt")


def snapshot_name(out, step):
    return os.path.join(out, f"ckpt_{step:07d}.pt")
