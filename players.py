"""The optimisation machinery of the training scripts: processes (DDP), the seeded noise and
data order, and the players (a network with its optimizer, warm-up and gradient scaler).

- randomness: one seeded generator draws every per-update random tensor for the *global* batch,
  and each process / micro-batch takes its slice, so that one process, several processes and
  gradient accumulation see identical noise and data (this is what makes them comparable);
- a player's `forward` is its network, inside DistributedDataParallel with several processes;
  the update itself (loss, backward, clipping, step) is written out in the stage scripts.

A run's life on disk (logging, checkpoints, resume, signals) is runs.py's.
"""
import atexit
import contextlib
import copy
import math
import datetime
import os
import signal
import warnings
import weakref

import numpy as np
import torch
import torch.distributed as dist

from common import class_labels, fail, pick_device, to_device


class Process:
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


def randn(rng, shape, device):
    return torch.randn(shape, generator=rng, device=rng.device).to(device, non_blocking=True)


def rand(rng, shape, device):
    return torch.rand(shape, generator=rng, device=rng.device).to(device, non_blocking=True)


def randint(rng, high, shape, device):
    return torch.randint(high, shape, generator=rng, device=rng.device).to(device)


def rank_slice(tensors, proc):
    """This process's rows of tensors drawn for the global batch (None stays None)."""
    return {k: (None if v is None else v.chunk(proc.world)[proc.rank])
            for k, v in tensors.items()}


def micro_batches(tensors, micro):
    """Successive micro-batches of size `micro` of a dict of per-process tensors."""
    n = len(next(v for v in tensors.values() if v is not None))
    for lo in range(0, n, micro):
        yield {k: (None if v is None else v[lo:lo + micro]) for k, v in tensors.items()}


class Batches:
    """Global batches of data indices in a seeded order, epoch after epoch (drop last).

    Every process walks the same sequence and loads only its slice of each global batch, so a
    run with N processes sees exactly the data of a one-process run; `consumed` is saved in
    checkpoints so that a resumed run continues with the very next batch.
    """

    def __init__(self, data, global_batch, seed, proc, workers=0, consumed=0):
        if len(data) < global_batch:
            fail(f"the data has {len(data)} images, fewer than one batch of {global_batch}; "
                 "lower --batch-size or add data")
        self.data, self.batch, self.seed, self.proc = data, global_batch, seed, proc
        self.consumed = consumed
        self.per_rank = global_batch // proc.world
        self._epoch = self._order = None
        self.loader = None
        if data.folder is not None and workers > 0:
            self.loader = iter(torch.utils.data.DataLoader(
                data.folder, batch_sampler=self._rank_indices(), num_workers=workers,
                pin_memory=proc.device.type == "cuda", persistent_workers=True,
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
            lo = self.proc.rank * self.per_rank
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
            lo = self.proc.rank * self.per_rank
            x, y, src = self.data.get(self._global_indices(self.consumed)[lo:lo + self.per_rank])
        self.consumed += 1
        device = self.proc.device
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


def rng_state(noise, proc):
    """RNG states for an exact resume: the shared noise generator and each process's own."""
    own = {"torch": torch.get_rng_state()}
    if proc.device.type == "cuda":
        own["cuda"] = torch.cuda.get_rng_state(proc.device)
    per_rank = [own]
    if proc.world > 1:
        per_rank = [None] * proc.world
        dist.all_gather_object(per_rank, own)
    return {"noise": noise.get_state(), "per_rank": per_rank}


def set_rng_state(saved, noise, proc, path="the checkpoint"):
    try:
        noise.set_state(saved["noise"])
    except RuntimeError:
        fail(f"{path} drew its noise on another kind of device than {noise.device.type}; resume "
             "it on the device type it was trained on (--device), or start a new run from its "
             "weights with --init-from")
    if len(saved["per_rank"]) != proc.world:  # a resume on another process count
        return
    own = saved["per_rank"][proc.rank]
    torch.set_rng_state(own["torch"])
    if "cuda" in own and proc.device.type == "cuda":
        torch.cuda.set_rng_state(own["cuda"], proc.device)


def adam(params, lr, betas, device):
    """Adam with the multi-tensor (or fused CUDA) kernels instead of a per-tensor loop."""
    kind = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.Adam(params, lr=lr, betas=betas, **kind)


def warmup(optimizer, steps):
    """Linear warm-up: update k = 1, 2, ... uses lr * min(1, k / steps) (steps = 0: none)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: min(1.0, (k + 1) / steps) if steps > 0 else 1.0)


@torch.no_grad()
def halflife_decay(images_seen, batch_size, halflife_mimg, rampup=None):
    """The EMA decay of a half-life in millions of images (EDM's and SiD's --ema): after
    halflife images the old weights count half; with a ramp-up the half-life is at most
    rampup x the images seen so far (early EMAs follow the network closely)."""
    halflife = halflife_mimg * 1e6
    if rampup is not None:
        halflife = min(halflife, images_seen * rampup)
    return 0.5 ** (batch_size / max(halflife, 1e-8))


def ema_update(ema_net, net, decay):
    """ema <- decay * ema + (1 - decay) * net, all tensors in one multi-tensor op."""
    torch._foreach_lerp_(list(ema_net.parameters()), list(net.parameters()), 1 - decay)


class Player:
    """A trained network with its optimizer (Adam), linear warm-up and gradient scaler.

    `net` holds the weights (EMAs, checkpoints, sampling and the other player read it);
    `forward` is what the player's own loss calls: the network itself, inside
    DistributedDataParallel with several processes (gradient buckets all-reduced while the
    backward pass runs) and compiled with `compile_mode`. The update itself is written out in
    the stage scripts: for each micro-batch of `micro_batches` the loss, `backward`; then `clip`
    and `step`.
    """

    def __init__(self, net, lr, betas, warmup_steps, proc, compile_mode=None, fp16=False,
                 after_step=None):
        self.net, self.params, self.ddp = net, list(net.parameters()), None
        self.after_step = after_step  # restores a weight constraint (networks.forced_weight_norm)
        self.forward = net
        if proc.world > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[proc.device.index] if proc.device.type == "cuda" else None,
                broadcast_buffers=False)
            self.forward = self.ddp
        if compile_mode:
            self.forward = torch.compile(self.forward, mode=None if compile_mode == "default"
                                         else compile_mode)
        self.opt = adam(self.params, lr, betas, proc.device)
        self.sched = warmup(self.opt, warmup_steps)
        self.scaler = torch.amp.GradScaler(proc.device.type, enabled=fp16)

    def micro_batches(self, batch, micro):
        """Gradient accumulation: (micro-batch, number of micro-batches, DDP context) for each
        micro-batch of `micro` rows. Divide each loss by the number, so that the update is that
        of the mean over the batch; with several processes the gradients are all-reduced only
        in the backward pass of the last one (the context is DDP's no_sync for the others)."""
        chunks = list(micro_batches(batch, micro))
        for i, mb in enumerate(chunks):
            last = i == len(chunks) - 1
            yield mb, len(chunks), (self.ddp.no_sync() if self.ddp is not None and not last
                                    else contextlib.nullcontext())

    def backward(self, loss):
        """loss.backward(), through the fp16 gradient scaler (a no-op at other precisions)."""
        self.scaler.scale(loss).backward()

    def clip(self, max_norm):
        """Clip the gradients' global norm to max_norm (0: no clipping); returns the norm before
        clipping (on the device: read it at log steps only, no synchronisation here)."""
        self.scaler.unscale_(self.opt)
        return torch.nn.utils.clip_grad_norm_(self.params, max_norm or math.inf, foreach=True)

    def nan_to_num_grads(self):
        """SiD's handling of non-finite gradients (mingyuanzhou/SiD, sid_training_loop.py):
        NaN entries become 0, +-inf become +-1e5, and the update goes on."""
        for p in self.params:
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)

    def step(self):
        """The optimizer step (skipped by the fp16 scaler after inf gradients), the warm-up
        schedule's step, and zeroed gradients for the next update."""
        self.scaler.step(self.opt)
        self.scaler.update()
        with warnings.catch_warnings():  # fp16: the scaler skips steps with inf grads, by design
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if self.after_step is not None:
            self.after_step()


def add_terms(total, terms, n):
    """total[name] += term / n for each loss term of a micro-batch (detached: for the log)."""
    for k, v in terms.items():
        total[k] = total.get(k, 0) + v.detach() / n
    return total


def frozen_alias(net):
    """A second module on `net`'s very parameter storage that never requires grad: the other
    player's view of a network. Updates of `net` show through, no parameter gradients are
    computed through it, and DDP (which wraps `net`) never sees it. Make it after `net` has
    its final device and memory format (moving a module gives it new storage)."""
    if "edm" in net.config or "diffusers" in net.config:  # a denoiser's field: copied, shared
        alias = copy.deepcopy(net)
    else:
        with torch.device("meta"):
            alias = type(net)(**net.config)
    alias.load_state_dict(net.state_dict(), assign=True)
    # eval mode: the other player's dropout is off, as in the authors' code
    return alias.requires_grad_(False).eval()


def grid_latents(shape, num_classes, device, n=64):
    """The fixed latents (seed 0) and balanced labels of a run's sample grids, the same at every
    step so that grids compare across steps."""
    z = torch.randn(n, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    return z, class_labels(n, num_classes, device=device)
