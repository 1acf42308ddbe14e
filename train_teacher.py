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
import startup  # noqa: F401  (first: Ctrl-C works while torch loads)
import argparse
import copy
import math
import os

import torch

import checkpoints
import common
import coupling
import inception
import image_data
import networks
import players
import runs
from flow import euler
from losses import edm_weight, flow_matching_loss, noise_levels


def edm_network(args, shape, num_classes):
    """An EDM-preconditioned denoiser (EDMPrecond around a DDPM++ SongUNet, edm.py) with the
    network flags, as a flow field (networks.DenoiserField): --param edm."""
    c, h, _ = shape
    return networks.build_edm({"edm": "EDMPrecond", "args": [], "kwargs": dict(
        img_resolution=h, img_channels=c, label_dim=num_classes or 0, model_type="SongUNet",
        model_channels=args.num_channels, channel_mult=list(args.channel_mult),
        num_blocks=args.num_res_blocks, attn_resolutions=list(args.attention_resolutions),
        dropout=args.dropout, embedding_type="positional", encoder_type="standard",
        decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1])})


SCRIPT = "train_teacher.py"  # named in resume hints


def build_parser():
    p = common.Parser(description=__doc__.split("\n\n")[0])
    common.add_data_args(p)
    p.add_argument("--cond", action="store_true",
                   help="class-conditional teacher (labels read from the data)")
    net = common.add_net_args(p)
    net.add_argument("--dropout", type=common.dropout_rate, default=0.1,
                     help="dropout of the teacher")
    p.add_argument("--param", choices=["fm", "edm"], default="fm",
                   help="fm: the flow-matching U-Net of the paper; edm: a diffusion teacher, EDM's "
                        "preconditioned denoiser (DDPM++ SongUNet with the network flags) "
                        "trained with EDM's loss (ln sigma ~ N(-1.2, 1.2^2), weight (sigma^2 + "
                        "sigma_d^2) / (sigma sigma_d)^2), read by teachers.load_teacher")
    coupling.add_args(p, teacher=True)
    runs.add_run_args(p, steps=400_000, batch=256, lr=2e-4, warmup_steps=5000,
                        ema=[0.999, 0.9996, 0.9999], log_every=100, sample_every=5000,
                        save_every=5000)
    p.add_argument("--sample-nfe", type=common.positive_int, default=100,
                   help="Euler steps for the sample grids and in-training FID (the paper's "
                        "teacher FID uses 100)")
    p.add_argument("--init-from", default=None,
                   help="start from the raw weights of this teacher checkpoint (ours or the "
                        "authors') instead of a fresh network; optimizer state is not taken")
    runs.add_fid_args(p)
    return p


def parse_args(argv=None):
    return runs.parse_run_args(build_parser(), argv, SCRIPT, "--init-from {path}", "teacher")


def setup(args, proc):
    """Everything a run needs, as one namespace `state`: network, EMAs, player, data, noise.

    Initialisation: a fresh network (torchcfm's init: zero output layers; or --init-from's raw
    weights), EMAs equal to it. A --resume checkpoint then overrides all state (weights,
    optimizer, RNG, data position); `state.run` knows where
    the run stands.
    """
    device = proc.device
    args.precision = common.resolve_precision(args.precision, device)  # saved resolved
    common.configure_backends(device, args.precision, args.deterministic)
    state = argparse.Namespace(proc=proc, device=device)
    data = image_data.open_data(args.data, args.data_root, args.image_size)
    state.coupling = coupling.for_teacher(args.task, args.path, args.source_noise, data,
                                          args.data)
    if state.coupling and args.fid_every:
        common.fail("--fid-every scores noise-to-image models; score an image-to-image "
                    "teacher with `python eval_pairs.py` instead")
    state.cfg = cfg = common.net_config_from_args(
        args, in_channels=data.shape[0], dropout=args.dropout,
        num_classes=data.num_classes if args.cond else None,
        cond_channels=data.shape[0] if state.coupling else 0)
    image_data.check_data(data, cfg, args.cond)
    state.grid_pairs = coupling.fixed_pairs(data, state.coupling, 16, device) \
        if state.coupling else None
    state.shape, state.data_size = data.shape, len(data)
    state.data_desc = runs.describe_data(data)

    init_sd = None
    if args.init_from:
        ickpt = checkpoints.load_checkpoint(args.init_from, "--init-from checkpoint")
        checkpoints.require_kind(ickpt, "teacher", args.init_from)
        init_sd = checkpoints.pick_weights(ickpt, None, args.init_from)
    players.seed_init(args.seed)
    if args.param == "edm":
        if state.coupling:
            common.fail("--param edm trains noise-to-image denoisers; image-to-image teachers "
                        "are flow-matching ones (drop --task / the pairs file, or --param)")
        state.net = edm_network(args, data.shape, cfg["num_classes"])
        state.cfg = cfg = state.net.config
        if init_sd is not None:
            networks.load_state(state.net, init_sd, f"--init-from weights {args.init_from}")
    else:
        state.net = networks.build_net(cfg, init_sd,
                                     what=f"--init-from weights {args.init_from}")
    state.net.to(device)
    state.emas = {checkpoints.ema_key(decay): copy.deepcopy(state.net).requires_grad_(False).eval()
                  for decay in args.ema}
    players.seed_dropout(args.seed, proc.rank)
    if args.channels_last:
        for net in (state.net, *state.emas.values()):
            net.to(memory_format=torch.channels_last)
    state.player = players.Player(state.net, args.lr, (0.9, 0.999), args.warmup, proc,
                               args.compile_mode if args.compile else None,
                               fp16=args.precision == "fp16")
    state.noise = players.noise_generator(device, args.seed)

    state.run = runs.Run(SCRIPT, proc, args.out, args.steps, runs.Intervals.of(args))
    consumed = 0
    if args.resume:
        ckpt = checkpoints.load_checkpoint(args.resume, "resume checkpoint")
        checkpoints.require_kind(ckpt, "teacher", args.resume)
        if not networks.same_net(ckpt.get("config", {}).get("net"), cfg) or \
                ckpt["config"].get("coupling") != state.coupling:
            common.fail(f"{args.resume} was trained with another network or data "
                        f"({ckpt.get('config', {}).get('net')}); use the original flags")
        runs.check_same_inputs(ckpt["config"], None, state.data_desc, args.resume)
        networks.load_state(state.net, ckpt["net_model"])
        for k, m in state.emas.items():
            networks.load_state(m, ckpt["ema_models"][k])
        state.player.opt.load_state_dict(ckpt["optim"])
        state.player.sched.load_state_dict(ckpt["sched"])
        state.player.scaler.load_state_dict(ckpt.get("scaler", {}))
        players.set_rng_state(ckpt["rng"], state.noise, proc, args.resume)
        consumed = ckpt["data_batches"]
        state.run.resumed_at(ckpt["step"], ckpt.get("elapsed_s", 0.0),
                             ckpt.get("best_fid", math.inf))
        runs.check_resume_step(args.resume, ckpt["step"], args.steps)
        if proc.main:
            print(f"resumed {args.resume} at step {ckpt['step']}")

    state.batches = players.Batches(data, args.batch_size, args.seed, proc, args.workers, consumed)
    state.micro = proc.split(args.batch_size, args.grad_accum)
    state.amp = common.precision_context(device, args.precision)
    state.net.train()
    return state


def draw(state, args):
    """Noise for the global batch from the shared generator (this process takes its rows) and
    this process's slice of the next real batch, randomly flipped. For a coupling, the source
    of each image (pairs file or built-in task) and the path's start x0 = kappa s + sigma eps."""
    B, rng, device = args.batch_size, state.noise, state.device
    law = "edm" if args.param == "edm" else "uniform"  # EDM's: ln sigma normal, t = 1/(1+sigma)
    x0 = players.randn(rng, (B, *state.shape), device)
    r = (players.randn if law == "edm" else players.rand)(rng, (B,), device)
    noise = {"x0": x0, "t": noise_levels(law, r),
             "flip": players.rand(rng, (B,), device) < 0.5}
    if state.coupling and state.coupling["task"] == "denoise":
        noise["task"] = players.randn(rng, (B, *state.shape), device)
    batch = players.rank_slice(noise, state.proc)
    x_u8, y, src_u8 = state.batches.next()
    flip = batch.pop("flip")
    batch["x1"] = common.flip(common.from_uint8(x_u8), flip)
    batch["y"] = y if args.cond else None
    batch["s"] = None
    if state.coupling:
        c = state.coupling
        batch["s"] = coupling.make_source(c, batch["x1"], src_u8, flip, batch.pop("task", None))
        batch["x0"] = coupling.start(batch["s"], batch["x0"], c["kappa"], c["sigma"])
    return batch


def teacher_update(state, args, batch):
    """One optimizer update of the teacher on the flow-matching loss, then its EMAs; returns
    (loss, pre-clip gradient norm) on the device."""
    player, loss_fm = state.player, 0
    for mb, n, ddp_sync in player.micro_batches(batch, state.micro):
        with ddp_sync:
            with state.amp:
                weight = edm_weight(mb["t"]) if args.param == "edm" else None
                loss = flow_matching_loss(player.forward, mb["x1"], mb["x0"], mb["t"], mb["y"],
                                          mb["s"], weight)
            player.backward(loss / n)
        loss_fm = loss_fm + loss.detach() / n
    norm = player.clip(args.grad_clip)
    player.step()
    state.run.check.add("flow-matching loss", loss_fm, state.run.step)
    for decay in args.ema:
        players.ema_update(state.emas[checkpoints.ema_key(decay)], state.net, decay)
    return loss_fm, norm


def save(state, args, name="latest.pt"):
    """<out>/latest.pt (or best.pt), written atomically, in the authors' layout plus our config
    and resume state."""
    run, player = state.run, state.player
    ckpt = {"net_model": state.net.state_dict(),
            "ema_models": {k: m.state_dict() for k, m in state.emas.items()},
            "optim": player.opt.state_dict(), "sched": player.sched.state_dict(),
            "step": run.step,
            "config": {"kind": "teacher", "net": state.cfg, "coupling": state.coupling,
                       "data": state.data_desc, "args": common.json_safe(vars(args))},
            "scaler": player.scaler.state_dict(),
            "rng": players.rng_state(state.noise, state.proc),
            "data_batches": state.batches.consumed, "best_fid": run.best_fid,
            "elapsed_s": run.log.elapsed()}
    if state.proc.main:
        runs.save_run_checkpoint(ckpt, args.out, name, run.step, args.snapshot_every)


def sample_teacher(net, z, y, nfe):
    """Euler steps of the teacher's field, on its range of t (flow.euler)."""
    t0, t1 = networks.t_range(net)
    return euler(net, z, y, nfe=nfe, t0=t0, t1=t1)


@torch.no_grad()
def save_grids(state, args, z, y):
    """The first EMA teacher's samples (Euler, --sample-nfe steps) from fixed latents; for a
    coupling, rows source | output | target of 16 fixed data pairs."""
    ema = state.emas[checkpoints.ema_key(args.ema[0])]
    path = os.path.join(args.out, "samples", f"{state.run.step:07d}_ema.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not state.coupling:
        common.save_grid(sample_teacher(ema, z, y, args.sample_nfe), path)
        return
    src, x1, labels = state.grid_pairs
    c, n = state.coupling, len(src)
    x0 = coupling.start(src, z[:n], c["kappa"], c["sigma"])
    out = euler(ema, x0, labels if args.cond else None, src, nfe=args.sample_nfe)
    common.save_grid(torch.cat([src, out, x1]), path, nrow=n)


def main(args):
    proc = players.Process(args.device)
    state = setup(args, proc)
    fid_eval = inception.InTrainingFID(args.fid_ref, args.fid_weights, args.fid_mode, proc.device,
                                 state.shape, networks.num_classes(state.net), args.fid_n,
                                 args.fid_batch) if args.fid_every and proc.main else None
    runs.start_run(args.out, vars(args), proc, fresh=not args.resume)
    if proc.main:
        pairs = "" if not state.coupling else (
            f", image-to-image {state.coupling['task'] or 'pairs file'} on the "
            f"{state.coupling['path']} path (sigma_s {state.coupling['sigma']})")
        print(f"teacher: {sum(p.numel() for p in state.player.params):,} parameters, data "
              f"{state.data_size} images {'x'.join(map(str, state.shape))}{pairs}, device "
              f"{proc.device}, {proc.world} process(es), {args.precision}")
    grid_z, grid_y = players.grid_latents(state.shape, networks.num_classes(state.net),
                                           proc.device)
    run = state.run
    ema = state.emas[checkpoints.ema_key(args.ema[0])]
    in_training_fid = (fid_eval, lambda z, y: sample_teacher(ema, z, y, args.sample_nfe),
                       f"EMA {args.ema[0]}, {args.sample_nfe} Euler steps")
    running = {"loss_fm": torch.zeros((), device=proc.device)}

    with run:
        while run.step < args.steps:
            run.step += 1
            loss, grad_norm = teacher_update(state, args, draw(state, args))
            running["loss_fm"] += loss
            run.end_step(running, {"grad_norm": grad_norm,
                                   "lr": state.player.sched.get_last_lr()[0]},
                         grids=lambda: save_grids(state, args, grid_z, grid_y),
                         save=lambda name: save(state, args, name), fid=in_training_fid)
    proc.close()


if __name__ == "__main__":
    common.cli(main, parse_args)
