"""Plumbing shared by every script: errors and command lines, the pixel convention, devices
and precision, image grids and the flags the scripts share. No mathematics (losses.py), no
files (checkpoints.py, image_data.py), no networks (networks.py).

- errors: library code raises RealUIDError; only `cli` turns it into a one-line message;
- pixels: uint8 in [0, 255] on disk, float in [-1, 1] in the networks (`from_uint8`, `to_uint8`).
"""
import argparse
import contextlib
import json
import math
import os
import re
import resource
import signal
import sys
import threading
import warnings

import torch

import unet


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


