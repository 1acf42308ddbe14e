"""Plumbing shared by the training and sampling scripts: device, data, checkpoints, logging.

Nothing here is paper mathematics; the objectives live in the stage scripts
(`train_teacher.py`, `distill.py`). Conventions that every script shares are named once here:

- pixels: uint8 in [0, 255] on disk, float in [-1, 1] in the networks (`from_uint8`, `to_uint8`);
- checkpoints: the authors' layouts (SPEC section 3) plus a `config` entry describing the network;
- randomness: one seeded generator draws every per-update random tensor for the *global* batch,
  and each process / micro-batch takes its slice, so that one process, several processes and
  gradient accumulation see identical noise and data (this is what makes them comparable).
"""
import contextlib
import datetime
import json
import math
import os
import resource
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist

import unet

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def fail(message):
    """Stop with a one-line error and exit code 1 (the message names the problem and the fix)."""
    raise SystemExit(f"error: {message}")


# ---------------------------------------------------------------------------------------------
# Pixel convention (SPEC sections 1 and 7)

def from_uint8(x):
    """uint8 [0, 255] -> float32 [-1, 1], as `(x / 127.5) - 1`."""
    return x.float() / 127.5 - 1


def to_uint8(x):
    """float [-1, 1] -> uint8, the quantisation of the paper's FID protocol (SPEC section 7)."""
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
        if self.world > 1 and not dist.is_initialized():
            backend = {"cuda": "nccl", "npu": "hccl"}.get(device.type, "gloo")
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        self.main = self.rank == 0

    def split(self, global_batch, grad_accum):
        """Per-process micro-batch size; the global batch must split evenly."""
        parts = self.world * grad_accum
        if global_batch % parts:
            fail(f"--batch-size {global_batch} does not split into {self.world} processes x "
                 f"--grad-accum {grad_accum}; choose a multiple of {parts}")
        return global_batch // parts

    def all_reduce_grads(self, params):
        """Average the gradients over processes: one flat all-reduce (no DDP wrapper, see README)."""
        if self.world == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def mean(self, x):
        """Average of a tensor over processes (for logged values)."""
        if self.world > 1:
            x = x.clone()
            dist.all_reduce(x)
            x /= self.world
        return x

    def broadcast(self, value):
        """rank 0's python value on every process."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self):
        if self.world > 1 and dist.is_initialized():
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


def precision_context(device, precision):
    """Autocast for the networks; losses and optimizer state stay float32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype)


def configure_backends(device):
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # autotune convolutions; inputs have fixed shapes
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def prepare_model(net, args):
    """Memory format and torch.compile as asked; returns the module to call (weights stay in net)."""
    if args.channels_last:
        net.to(memory_format=torch.channels_last)
    if args.compile:
        if not hasattr(torch, "compile"):
            fail("--compile needs torch >= 2.0; drop --compile")
        return torch.compile(net)
    return net


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "cpu":  # the process's peak resident set, Linux reports KiB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return None


# ---------------------------------------------------------------------------------------------
# Data: --data cifar10 | a folder of images | an .npz of uint8 images [N, H, W, C] (+ labels)

class ImageData:
    """uint8 images [N, C, H, W] and int64 labels (or None), in memory or read lazily."""

    def __init__(self, images=None, labels=None, folder=None):
        self.images, self.labels, self.folder = images, labels, folder

    def __len__(self):
        return len(self.folder) if self.folder is not None else len(self.images)

    @property
    def shape(self):
        return tuple(self.folder.shape if self.folder is not None else self.images.shape[1:])

    @property
    def has_labels(self):
        return (self.folder.labels if self.folder is not None else self.labels) is not None

    @property
    def num_classes(self):
        labels = self.folder.labels if self.folder is not None else self.labels
        return None if labels is None else int(labels.max()) + 1

    def get(self, index):
        if self.folder is not None:
            items = [self.folder[i] for i in index]
            x = torch.stack([a for a, _ in items])
            y = torch.tensor([b for _, b in items]) if self.has_labels else None
            return x, y
        index = torch.as_tensor(index)
        return self.images[index], (None if self.labels is None else self.labels[index])


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
    """uint8 images [N, H, W, C] from an .npz (key `images`, `arr_0` or its only array)."""
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
    except (OSError, ValueError) as e:
        fail(f"cannot read {path} as .npz ({e}); pass an .npz of uint8 images [N, H, W, C]")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        fail(f"{path}: expected uint8 images [N, H, W, C] with C in (1, 3), got "
             f"{images.dtype} {list(images.shape)}")
    return images, labels


def open_data(data, root, image_size):
    """The --data source as ImageData; image_size is used to resize folders, checked otherwise."""
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
        images, labels = read_npz_images(data)
    else:
        fail(f"--data {data} is neither cifar10, an existing folder nor an .npz file")
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    if labels is not None:
        labels = torch.from_numpy(np.asarray(labels)).long().reshape(-1)
        if len(labels) != len(images):
            fail(f"--data has {len(images)} images but {len(labels)} labels")
    return ImageData(images, labels)


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
        self.loader = None
        if data.folder is not None and workers > 0:
            self.loader = iter(torch.utils.data.DataLoader(
                data.folder, batch_sampler=self._rank_indices(), num_workers=workers,
                pin_memory=dist_info.device.type == "cuda", persistent_workers=True))

    def _global_indices(self, k):
        per_epoch = len(self.data) // self.batch
        epoch, i = divmod(k, per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.data))
        return order[i * self.batch:(i + 1) * self.batch]

    def _rank_indices(self):
        k = self.consumed
        while True:
            lo = self.dist.rank * self.per_rank
            yield self._global_indices(k)[lo:lo + self.per_rank].tolist()
            k += 1

    def next(self):
        """This process's slice of the next global batch: uint8 images and labels on device."""
        if self.loader is not None:
            x, y = next(self.loader)
            y = y if self.data.has_labels else None
        else:
            lo = self.dist.rank * self.per_rank
            x, y = self.data.get(self._global_indices(self.consumed)[lo:lo + self.per_rank])
        self.consumed += 1
        device = self.dist.device
        return x.to(device, non_blocking=True), (None if y is None else y.to(device))


def flip(x, mask):
    """Horizontal flip of the images where mask is True (random flips, SPEC section 1)."""
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)


# ---------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, safe reads, the authors' layouts

def save_checkpoint(obj, path):
    """torch.save to a temporary file, then an atomic rename: a crash never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, what="checkpoint"):
    """A checkpoint is data: weights_only=True; clear errors for missing or corrupt files."""
    if not path:
        fail(f"no {what} given")
    if not os.path.isfile(path):
        fail(f"{what} file not found: {path}; check the path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"cannot read {what} {path}: corrupt or not a PyTorch checkpoint "
             f"({type(e).__name__}); use another copy or an earlier checkpoint")
    if not isinstance(ckpt, dict):
        fail(f"{what} {path} is not a checkpoint dict (got {type(ckpt).__name__})")
    return ckpt


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


def load_state(module, sd):
    """Load a state dict we wrote ourselves (resume): strict, after prefix cleaning."""
    module.load_state_dict(clean_state_dict(sd), strict=True)


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


def optimizer_step(params, optimizer, scheduler, scaler, dist_info, clip):
    """Average gradients over processes, unscale, clip, step; returns the pre-clip grad norm."""
    dist_info.all_reduce_grads(params)
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    scaler.step(optimizer)
    scaler.update()
    with warnings.catch_warnings():  # fp16: the scaler skips steps with inf grads, by design
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def stop_if_not_finite(value, what, step, out, last_saved):
    """A NaN/inf loss stops the run before the update: the last checkpoint stays good."""
    if not torch.isfinite(value):
        kept = (f"the last good checkpoint is {out}/latest.pt (step {last_saved})"
                if last_saved else "no checkpoint was written")
        fail(f"the {what} is {value.item()} at step {step}; stopped before updating; {kept}; "
             "lower --lr or check the inputs")


# ---------------------------------------------------------------------------------------------
# Runs: args.json, metrics.jsonl, console status lines, image grids

class RunLog:
    """Status lines on the console and the same records in <out>/metrics.jsonl (main rank)."""

    def __init__(self, out, total_steps, start_step, enabled=True):
        self.out, self.total, self.enabled = out, total_steps, enabled
        self.last_time, self.last_step = time.perf_counter(), start_step
        self.path = os.path.join(out, "metrics.jsonl")

    def write(self, record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def step(self, step, values, device):
        """One status line: step, each value, lr, it/s, ETA, peak memory."""
        now = time.perf_counter()
        sec = (now - self.last_time) / max(1, step - self.last_step)
        self.last_time, self.last_step = now, step
        record = {"step": step, **{k: _plain(v) for k, v in values.items()},
                  "sec_per_step": sec}
        mem = peak_memory_mb(device)
        if mem is not None:
            record["peak_mem_mb"] = round(mem, 1)
        self.write(record)
        if self.enabled:
            eta = datetime.timedelta(seconds=int(sec * (self.total - step)))
            parts = [f"{k} {_fmt(v)}" for k, v in record.items() if k not in
                     ("step", "sec_per_step", "peak_mem_mb")]
            mem_txt = f" | {mem:.0f} MB" if mem is not None else ""
            print(f"step {step}/{self.total} | " + " | ".join(parts) +
                  f" | {1 / sec if sec > 0 else 0:.2f} it/s | ETA {eta}{mem_txt}", flush=True)
        return record


def _plain(v):
    return v.item() if torch.is_tensor(v) else v


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def save_args(args, out):
    with open(os.path.join(out, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=2)


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
    g.add_argument("--image-size", type=int, default=image_size_default,
                   help="image side in pixels (CIFAR-10: 32, CelebA: 64)")
    g.add_argument("--workers", type=int, default=4,
                   help="data-loading processes for image folders (in-memory data needs none)")
    return g


def add_net_args(p):
    g = p.add_argument_group("network (torchcfm UNetModelWrapper names; default: paper CIFAR-10)")
    c = unet.PAPER_CONFIG
    g.add_argument("--num-channels", type=int, default=c["num_channels"],
                   help="base channel count (multiple of 32)")
    g.add_argument("--channel-mult", default=",".join(map(str, c["channel_mult"])),
                   help="channel multiplier per resolution level, e.g. 1,2,2,2")
    g.add_argument("--num-res-blocks", type=int, default=c["num_res_blocks"],
                   help="residual blocks per level")
    g.add_argument("--attention-resolutions",
                   default=",".join(map(str, c["attention_resolutions"])),
                   help="resolutions with self-attention, e.g. 16 (comma separated)")
    g.add_argument("--num-heads", type=int, default=c["num_heads"], help="attention heads")
    g.add_argument("--num-head-channels", type=int, default=c["num_head_channels"],
                   help="channels per head (overrides --num-heads; -1: use --num-heads)")
    return g


def net_config_from_args(args, in_channels=3, num_classes=None, dropout=0.0):
    try:
        mult = [int(m) for m in str(args.channel_mult).split(",")]
        attn = [int(r) for r in str(args.attention_resolutions).split(",") if r.strip()]
    except ValueError:
        fail(f"--channel-mult {args.channel_mult} / --attention-resolutions "
             f"{args.attention_resolutions}: expected comma-separated integers, e.g. 1,2,2,2")
    return dict(unet.PAPER_CONFIG, image_size=args.image_size, in_channels=in_channels,
                num_channels=args.num_channels, channel_mult=mult,
                num_res_blocks=args.num_res_blocks,
                attention_resolutions=attn,
                num_heads=args.num_heads, num_head_channels=args.num_head_channels,
                dropout=dropout, num_classes=num_classes)


def add_run_args(p, steps, batch, lr, warmup_steps, ema, log_every, sample_every, save_every):
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/run", help="output folder of the run")
    g.add_argument("--steps", type=int, default=steps, help="total steps of the run")
    g.add_argument("--batch-size", type=int, default=batch,
                   help="global batch size (split over processes and --grad-accum)")
    g.add_argument("--lr", type=float, default=lr, help="Adam learning rate")
    g.add_argument("--warmup", type=int, default=warmup_steps,
                   help="linear learning-rate warm-up, in optimizer updates (0: none)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clipping")
    g.add_argument("--ema", type=float, nargs="+", default=ema,
                   help="EMA decays to track (keys str(decay) in the checkpoint)")
    g.add_argument("--seed", type=int, default=42, help="random seed")
    g.add_argument("--device", default=None,
                   help="cuda, cuda:1, npu, mps or cpu (default: the best available)")
    g.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue a run exactly: a checkpoint path, or no value for "
                        "<out>/latest.pt")
    g.add_argument("--log-every", type=int, default=log_every,
                   help="status line and metrics.jsonl record every N steps")
    g.add_argument("--sample-every", type=int, default=sample_every,
                   help="sample grid every N steps (0: never)")
    g.add_argument("--save-every", type=int, default=save_every,
                   help="write <out>/latest.pt every N steps (and at the end)")
    g.add_argument("--snapshot-every", type=int, default=0,
                   help="also keep a numbered copy <out>/ckpt_<step>.pt every N steps (0: never)")
    s = p.add_argument_group("speed")
    s.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="autocast precision of the networks (losses and optimizer in fp32)")
    s.add_argument("--grad-accum", type=int, default=1,
                   help="accumulate gradients over K micro-batches (same update as one batch)")
    s.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    s.add_argument("--compile", action="store_true", help="torch.compile the networks")
    return g


def add_fid_args(p):
    g = p.add_argument_group("in-training FID (cheap and labelled as such; final numbers: fid.py)")
    g.add_argument("--fid-every", type=int, default=0,
                   help="FID of the first EMA model every N steps, logged to metrics.jsonl; the "
                        "best one is kept as <out>/best.pt (0: never)")
    g.add_argument("--fid-n", type=int, default=10_000,
                   help="samples per in-training FID (the paper's protocol uses 50,000)")
    g.add_argument("--fid-ref", default=None,
                   help="reference statistics from `python fid.py ref` (e.g. "
                        "cifar10_train_tf.npz); needed with --fid-every")
    g.add_argument("--fid-weights", default=None,
                   help="Inception weights file (default: torch hub cache, see fid.py)")
    g.add_argument("--fid-mode", choices=["tf", "pytorch-fid"], default="tf",
                   help="FID preprocessing (tf: the paper's clean-fid legacy_tensorflow)")
    g.add_argument("--fid-batch", type=int, default=250, help="images per sampling batch")
    return g


class InTrainingFID:
    """FID of a model every N steps on --fid-n samples: the Inception network and the reference
    statistics are loaded once per run; the latents and labels are the same at every evaluation
    (balanced labels arange(n) % classes), so that scores are comparable across steps."""

    def __init__(self, args, device, shape, num_classes):
        import fid
        if not args.fid_ref:
            fail("--fid-every needs --fid-ref, statistics from `python fid.py ref`")
        if args.fid_n < 2:
            fail("--fid-n must be at least 2")
        try:
            self.ref = fid.load_stats(args.fid_ref)
            self.extractor = fid.InceptionFeatures(args.fid_weights, args.fid_mode, device)
            fid.check_compatible(self.ref, args.fid_ref, self.extractor.mode,
                                 self.extractor.weights_sha256)
        except fid.FIDError as e:
            fail(str(e))
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


def check_run_args(args):
    for name in ("steps", "batch_size", "grad_accum", "log_every"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1")
    if args.lr <= 0:
        fail("--lr must be positive")
    for d in args.ema:
        if not 0 < d < 1:
            fail(f"--ema {d} is not a decay in (0, 1)")


def resume_path(args):
    if args.resume is None:
        return None
    path = os.path.join(args.out, "latest.pt") if args.resume == "latest" else args.resume
    if not os.path.isfile(path):
        fail(f"--resume: {path} not found; start without --resume or give the checkpoint path")
    return path


def snapshot_name(out, step):
    return os.path.join(out, f"ckpt_{step:07d}.pt")
