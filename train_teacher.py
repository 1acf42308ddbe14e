"""Train the flow-matching teacher v*(t, x, y) that RealUID distills (paper section 2).

Paper setting, CIFAR-10 (the authors' official defaults; 400k steps at batch 256):

    python train_teacher.py --data cifar10 --out runs/teacher_uncond
    python train_teacher.py --data cifar10 --cond --out runs/teacher_cond

Expected (the paper's numbers, Euler with 100 steps, FID on 50k samples vs the train set):
3.57 unconditional, 5.56 class-conditional. CelebA 64x64 (authors: lr 4e-5):
`--data path/to/celeba_folder --image-size 64 --lr 4e-5`.

Image-to-image teachers (Appendix C; coupling.py): a built-in corruption of any data set, or a
pairs .npz (uint8 `source` and `images`), on the bridge or the cond-fm path:

    python train_teacher.py --data cifar10 --task sr4 --path bridge --source-noise 0.25 \
        --out runs/sr4_teacher

Conventions (the paper's section 2 and the authors' code): noise x0 ~ N(0, I) at t = 0 (for a
coupling the start x0 = kappa s + sigma_s eps), data x1 at t = 1, t ~ U[0, 1] per sample,
x_t = t x1 + (1 - t) x0, target velocity u = x1 - x0; pixels in [-1, 1]; random horizontal
flips. Checkpoints keep the authors' layout: {net_model, ema_models{str(decay)}, optim, sched,
step} plus our `config` (network settings, coupling), RNG and data position for an exact
--resume.
"""
import argparse
import copy
import os

import torch

import common
import coupling
import distill
import sample


def flow_matching_loss(v, x1, x0, t, y=None, s=None):
    """Conditional flow matching (Lipman et al.; paper section 2), minimised by the teacher v.

    x1: data [B, ...], x0: the start like x1 (noise, or kappa s + sigma_s eps for a coupling),
    t: [B] in [0, 1], y: labels [B] or None, s: source images [B, ...] or None (Appendix C).
    Returns mean over all elements of (v(t, x_t, y[, s]) - (x1 - x0))^2, i.e. F.mse_loss, exactly
    the authors' reduction, with x_t = t x1 + (1 - t) x0.
    """
    xt = distill.interpolate(x1, x0, t)
    return (distill.field(v, t, xt, y, s).to(x1.dtype) - (x1 - x0)).pow(2).mean()


def build_parser():
    p = common.Parser(description=__doc__.split("\n\n")[0])
    common.add_data_args(p)
    p.add_argument("--cond", action="store_true",
                   help="class-conditional teacher (labels read from the data)")
    net = common.add_net_args(p)
    net.add_argument("--dropout", type=common.dropout_rate, default=0.1,
                     help="dropout of the teacher")
    coupling.add_args(p, teacher=True)
    common.add_run_args(p, steps=400_000, batch=256, lr=2e-4, warmup_steps=5000,
                        ema=[0.999, 0.9996, 0.9999], log_every=100, sample_every=5000,
                        save_every=5000)
    p.add_argument("--sample-nfe", type=common.positive_int, default=100,
                   help="Euler steps for the sample grids and in-training FID (the paper's "
                        "teacher FID uses 100)")
    p.add_argument("--init-from", default=None,
                   help="start from the raw weights of this teacher checkpoint (ours or the "
                        "authors') instead of a fresh network; optimizer state is not taken")
    common.add_fid_args(p)
    return p


def parse_args(argv=None):
    return common.parse_run_args(build_parser(), argv, "train_teacher.py", "--init-from {path}")


def setup(args, d):
    """Everything a run needs, as one namespace: network, EMAs, player, data, noise.

    Initialisation: a fresh network (torchcfm's init: zero output layers; or --init-from's raw
    weights), EMAs equal to it. A --resume checkpoint then overrides all state (weights,
    optimizer, RNG, data position).
    """
    device = d.device
    s = argparse.Namespace(d=d, device=device)
    data = common.open_data(args.data, args.data_root, args.image_size)
    s.coupling = coupling.for_teacher(args, data)
    if s.coupling and args.fid_every:
        common.fail("--fid-every scores noise-to-image models; score an image-to-image "
                    "teacher with `python fid.py pairs` instead")
    s.cfg = cfg = common.net_config_from_args(
        args, in_channels=data.shape[0], dropout=args.dropout,
        num_classes=data.num_classes if args.cond else None,
        cond_channels=data.shape[0] if s.coupling else 0)
    common.check_data(data, cfg, args.cond)
    s.grid_pairs = coupling.fixed_pairs(data, s.coupling, 16, device) if s.coupling else None
    s.shape, s.data_size, s.data_desc = data.shape, len(data), common.describe_data(data)

    init_sd = None
    if args.init_from:
        ickpt = common.load_checkpoint(args.init_from, "--init-from checkpoint")
        common.require_kind(ickpt, "teacher", args.init_from)
        init_sd = common.pick_weights(ickpt, None, args.init_from)
    common.seed_init(args.seed)
    s.net = common.build_net(cfg, init_sd, what=f"--init-from weights {args.init_from}").to(device)
    s.emas = {common.ema_key(decay): copy.deepcopy(s.net).requires_grad_(False).eval()
              for decay in args.ema}
    common.seed_dropout(args.seed, d.rank)
    if args.channels_last:
        for net in (s.net, *s.emas.values()):
            net.to(memory_format=torch.channels_last)
    s.player = common.Player(s.net, teacher_objective, args, d, args.lr, (0.9, 0.999),
                             args.warmup)
    s.noise_gen = common.noise_generator(device, args.seed)
    s.check = common.FiniteCheck()

    s.step, consumed, s.last_saved, s.best_fid, s.elapsed = 0, 0, None, float("inf"), 0.0
    if args.resume:
        ckpt = common.load_checkpoint(args.resume, "resume checkpoint")
        common.require_kind(ckpt, "teacher", args.resume)
        if not common.same_net(ckpt.get("config", {}).get("net"), cfg) or \
                ckpt["config"].get("coupling") != s.coupling:
            common.fail(f"{args.resume} was trained with another network or data "
                        f"({ckpt.get('config', {}).get('net')}); use the original flags")
        common.check_same_inputs(ckpt["config"], None, s.data_desc, args.resume)
        common.load_state(s.net, ckpt["net_model"])
        for k, m in s.emas.items():
            common.load_state(m, ckpt["ema_models"][k])
        s.player.opt.load_state_dict(ckpt["optim"])
        s.player.sched.load_state_dict(ckpt["sched"])
        s.player.scaler.load_state_dict(ckpt.get("scaler", {}))
        common.set_rng_state(ckpt["rng"], s.noise_gen, d)
        s.step, consumed = ckpt["step"], ckpt["data_batches"]
        s.last_saved, s.best_fid = s.step, ckpt.get("best_fid", float("inf"))
        s.elapsed = ckpt.get("elapsed_s", 0.0)
        common.check_resume_step(args, s.step)
        if d.main:
            print(f"resumed {args.resume} at step {s.step}")

    s.batches = common.Batches(data, args.batch_size, args.seed, d, args.workers, consumed)
    s.micro = d.split(args.batch_size, args.grad_accum)
    s.amp = common.precision_context(device, args.precision)
    s.net.train()
    return s


def teacher_objective(net, mb):
    """The teacher's objective on one micro-batch (common.Player): flow matching (with the
    source s of a coupling as the extra condition)."""
    loss = flow_matching_loss(net, mb["x1"], mb["x0"], mb["t"], mb["y"], mb["s"])
    return loss, {"loss_fm": loss}


def draw(s, args):
    """Noise for the global batch from the shared generator (this process takes its rows) and
    this process's slice of the next real batch, randomly flipped. For a coupling, the source
    of each image (pairs file or built-in task) and the path's start x0 = kappa s + sigma eps."""
    B, gen = args.batch_size, s.noise_gen
    noise = {"x0": common.randn(gen, (B, *s.shape), s.device),
             "t": common.rand(gen, (B,), s.device),
             "flip": common.rand(gen, (B,), s.device) < 0.5}
    if s.coupling and s.coupling["task"] == "denoise":
        noise["task"] = common.randn(gen, (B, *s.shape), s.device)
    batch = common.rank_slice(noise, s.d)
    x_u8, y, src_u8 = s.batches.next()
    flip = batch.pop("flip")
    batch["x1"] = common.flip(common.from_uint8(x_u8), flip)
    batch["y"] = y if args.cond else None
    batch["s"] = None
    if s.coupling:
        c = s.coupling
        batch["s"] = coupling.make_source(c, batch["x1"], src_u8, flip, batch.pop("task", None))
        batch["x0"] = coupling.start(batch["s"], batch["x0"], c["kappa"], c["sigma"])
    return batch


def teacher_update(s, args, batch):
    """One optimizer update on the flow-matching loss, then the EMAs; returns (loss, norm) on
    the device."""
    parts, norm = s.player.update(batch, s.micro, s.amp, args.grad_clip)
    s.check.add("flow-matching loss", parts["loss_fm"], s.step)
    for decay in args.ema:
        common.ema_update(s.emas[common.ema_key(decay)], s.net, decay)
    return parts["loss_fm"], norm


def save(s, args, name="latest.pt"):
    """<out>/latest.pt (or best.pt), written atomically, in the authors' layout plus our config
    and resume state."""
    ckpt = {"net_model": s.net.state_dict(),
            "ema_models": {k: m.state_dict() for k, m in s.emas.items()},
            "optim": s.player.opt.state_dict(), "sched": s.player.sched.state_dict(),
            "step": s.step,
            "config": {"kind": "teacher", "net": s.cfg, "coupling": s.coupling,
                       "data": s.data_desc, "args": common.json_safe(vars(args))},
            "scaler": s.player.scaler.state_dict(), "rng": common.rng_state(s.noise_gen, s.d),
            "data_batches": s.batches.consumed, "best_fid": s.best_fid,
            "elapsed_s": s.log.elapsed()}
    if s.d.main:
        common.save_checkpoint(ckpt, os.path.join(args.out, name))
        if name == "latest.pt" and args.snapshot_every and s.step % args.snapshot_every == 0:
            common.save_checkpoint(ckpt, common.snapshot_name(args.out, s.step))
    if name == "latest.pt":
        s.last_saved = s.step


@torch.no_grad()
def save_grid(s, args, z, y):
    """The first EMA teacher's samples (Euler, --sample-nfe steps) from fixed latents; for a
    coupling, rows source | output | target of 16 fixed data pairs."""
    ema = s.emas[common.ema_key(args.ema[0])]
    path = os.path.join(args.out, "samples", f"{s.step:07d}_ema.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not s.coupling:
        common.save_grid(sample.euler(ema, z, y, nfe=args.sample_nfe), path)
        return
    src, x1, labels = s.grid_pairs
    c, n = s.coupling, len(src)
    x0 = coupling.start(src, z[:n], c["kappa"], c["sigma"])
    out = sample.euler(ema, x0, labels if args.cond else None, src, nfe=args.sample_nfe)
    common.save_grid(torch.cat([src, out, x1]), path, nrow=n)


def main(args):
    d = common.Dist(args.device)
    common.configure_backends(d.device, args.precision, args.deterministic)
    s = setup(args, d)
    fid_eval = common.InTrainingFID(args, d.device, s.shape, s.cfg["num_classes"]) \
        if args.fid_every and d.main else None
    common.start_run(args, d)
    if d.main:
        pairs = "" if not s.coupling else (
            f", image-to-image {s.coupling['task'] or 'pairs file'} on the {s.coupling['path']} "
            f"path (sigma_s {s.coupling['sigma']})")
        print(f"teacher: {sum(p.numel() for p in s.player.params):,} parameters, data "
              f"{s.data_size} images {'x'.join(map(str, s.shape))}{pairs}, device {d.device}, "
              f"{d.world} process(es), {args.precision}")
    grid_z = torch.randn(64, *s.shape, generator=torch.Generator().manual_seed(0)).to(d.device)
    grid_y = common.class_labels(64, s.cfg["num_classes"], device=d.device)

    running = torch.zeros((), device=d.device)
    s.log = log = common.RunLog(args.out, args.steps, s.step, s.elapsed, enabled=d.main)
    with common.Control(args, d, s, "train_teacher.py") as control:
        while s.step < args.steps:
            s.step += 1
            loss, grad_norm = teacher_update(s, args, draw(s, args))
            running += loss

            step = s.step
            do_log, do_save, stop = control.due(step)
            if do_log:
                s.check.check(d, args.out, s.last_saved)
                n = step - log.last_step  # steps since the last record (also after a resume)
                log.step(step, {"loss_fm": d.mean(running / n), "grad_norm": grad_norm,
                                "lr": s.player.sched.get_last_lr()[0]}, d.device)
                running.zero_()
            if d.main and args.sample_every and (step % args.sample_every == 0
                                                 or step == args.steps):
                save_grid(s, args, grid_z, grid_y)
            if args.fid_every and step % args.fid_every == 0:
                s.check.check(d, args.out, s.last_saved)
                ema = s.emas[common.ema_key(args.ema[0])]
                common.evaluate_fid(s, args, fid_eval,
                                    lambda z, y: sample.euler(ema, z, y, nfe=args.sample_nfe),
                                    f"EMA {args.ema[0]}, {args.sample_nfe} Euler steps", log,
                                    save)
            if do_save:
                s.check.check(d, args.out, s.last_saved)
                save(s, args)
            if stop:
                d.close()
                raise control.stopped(step)
    d.close()


if __name__ == "__main__":
    common.cli(main, parse_args)
