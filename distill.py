"""RealUID: distill a flow-matching teacher into a one-step generator, with real data, no GAN.

Paper settings, CIFAR-10 (Kornilov et al., ICLR 2026; FIDs are the paper's, 50k samples,
best checkpoint, EMA 0.999; about 4.5 days on one 65 GB accelerator):

    python distill.py --teacher teacher_uncond.pt --alpha 0.94 --beta 0.96 --out runs/uncond  # 2.28
    python distill.py --teacher teacher_cond.pt   --alpha 0.98 --beta 0.96 --out runs/cond    # 2.02
    python distill.py --teacher teacher_uncond.pt --out runs/datafree   # alpha = beta = 1: 2.58
    python distill.py --teacher teacher_uncond.pt --gan-gen-coef 0.3 --gan-disc-coef 1.0  # 2.29
    python distill.py --teacher teacher_uncond.pt --alpha 0.94 --beta 0.96 --gamma 0.92   # General

then fine-tune with finetune.py and sample with sample.py. The teacher may be ours
(train_teacher.py) or the authors' file; its EMA 0.999 weights are used (--teacher-ema).

Legend (paper symbol -> code): teacher v* -> `teacher`, fake model f -> `fake`, generator G ->
`gen`, alpha/beta/gamma -> `alpha`/`beta`/`gamma`, real data p_d -> `x_d`, generated data p_G ->
`x_g = z + G(0, z, y)` (Appendix D), shared noise x0 and time t, x_t = t x1 + (1 - t) x0 with
t = 0 noise and t = 1 data, u = x1 - x0. One *step* is --fake-steps fake-model updates followed
by one generator update; every update draws fresh z, x0, t and a fresh real batch.
"""
import argparse
import copy
import os

import torch
import torch.nn.functional as F

import common


# ---------------------------------------------------------------------------------------------
# The mathematics. Each function stands alone: tensors [B, ...] of any shape (images or
# vectors), sums over all non-batch dimensions, mean over the batch; the value is minimised.
# Network outputs are cast to the data's dtype: under autocast the losses stay in float32.

def generate(G, z, y=None):
    """One-step generator x = z + G(0, z, y): the network at t = 0 plus a residual (Appendix D)."""
    t0 = torch.zeros(len(z), device=z.device, dtype=z.dtype)
    return z + G(t0, z, y).to(z.dtype)


def fake_model_loss(f, x_g, x_d, x0, t, y, alpha, beta):
    """RealUM(f) of eq. (17), minimised by the fake model f (the inner max of eq. (18) is
    max_f -RealUM(f)):

        E_gen[ alpha |f(t, x_t^g)|^2 - 2 beta <f, u_g> ] + E_real[ (1 - alpha) |f(t, x_t^d)|^2
        - 2 (1 - beta) <f, u_d> ],    u_g = x_g - x0,  u_d = x_d - x0,

    i.e. alpha |f - (beta/alpha) u_g|^2 + (1 - alpha) |f - ((1-beta)/(1-alpha)) u_d|^2 up to
    terms without f; its pointwise optimum is Lemma 2's f = (beta p_g v_G + (1 - beta) p_d v*) /
    (alpha p_g + (1 - alpha) p_d). x_g is generated without a graph; x_d (real data) may be None
    when alpha = beta = 1. The two batches share x0 and t and go through f in one forward pass.
    """
    t_ = t.view(-1, *[1] * (x0.dim() - 1))
    u_g = x_g - x0
    if alpha == 1 and beta == 1:  # data-free UID: the real-data terms vanish
        f_g = f(t, t_ * x_g + (1 - t_) * x0, y).to(x0.dtype)
        return (alpha * (f_g * f_g) - 2 * beta * (f_g * u_g)).flatten(1).sum(1).mean()
    u_d = x_d - x0
    xt = torch.cat([t_ * x_g + (1 - t_) * x0, t_ * x_d + (1 - t_) * x0])
    f_g, f_d = f(t.repeat(2), xt, None if y is None else y.repeat(2)).to(x0.dtype).chunk(2)
    loss = (alpha * (f_g * f_g) - 2 * beta * (f_g * u_g)
            + (1 - alpha) * (f_d * f_d) - 2 * (1 - beta) * (f_d * u_d))
    return loss.flatten(1).sum(1).mean()


def generator_loss(teacher, f, x_g, x0, t, y, alpha, beta):
    """The generator's side of eq. (18), RealUM(v*) - RealUM(f) on the generated batch (the
    real-data terms do not depend on G), minimised by G:

        E_gen[ alpha |v*|^2 - 2 beta <v*, u_g> - alpha |f|^2 + 2 beta <f, u_g> ]
        = E_gen[ alpha |v* - (beta/alpha) u_g|^2 - alpha |f - (beta/alpha) u_g|^2 ].

    Gradients reach G through x_t and u_g; teacher v* and fake model f are frozen (their
    parameters should not require grad, so that no parameter gradients are computed).
    """
    t_ = t.view(-1, *[1] * (x0.dim() - 1))
    xt, u_g = t_ * x_g + (1 - t_) * x0, x_g - x0
    v, fv = teacher(t, xt, y).to(x0.dtype), f(t, xt, y).to(x0.dtype)
    loss = alpha * (v * v - fv * fv) - 2 * beta * ((v - fv) * u_g)
    return loss.flatten(1).sum(1).mean()


def general_fake_model_loss(f, teacher, x_g, x_d, x0, t, y, alpha, beta, gamma):
    """General RealUID (Appendix A.2, delta form, delta = f - v*), minimised by f: minus

        E_gen[ -gamma |delta|^2 + 2 beta <delta, u_g> - 2 alpha <delta, v*> ]
      + E_real[ -(1 - gamma) |delta|^2 + 2 (1 - beta) <delta, u_d> - 2 (1 - alpha) <delta, v*> ].

    gamma = alpha gives RealUID: this is then RealUM(f) - RealUM(v*), fake_model_loss up to a
    constant. Needs the teacher on both batches (no gradient). x_d may be None if
    alpha = beta = gamma = 1.
    """
    t_ = t.view(-1, *[1] * (x0.dim() - 1))
    u_g = x_g - x0
    real = not (alpha == 1 and beta == 1 and gamma == 1)
    xt = t_ * x_g + (1 - t_) * x0
    tt, yy = t, y
    if real:
        xt = torch.cat([xt, t_ * x_d + (1 - t_) * x0])
        tt, yy = t.repeat(2), None if y is None else y.repeat(2)
    with torch.no_grad():
        v = teacher(tt, xt, yy).to(x0.dtype)
    delta = f(tt, xt, yy).to(x0.dtype) - v
    if not real:
        gain = -gamma * delta * delta + 2 * beta * delta * u_g - 2 * alpha * delta * v
        return -gain.flatten(1).sum(1).mean()
    (d_g, d_d), (v_g, v_d) = delta.chunk(2), v.chunk(2)
    gain = (-gamma * d_g * d_g + 2 * beta * d_g * u_g - 2 * alpha * d_g * v_g
            - (1 - gamma) * d_d * d_d + 2 * (1 - beta) * d_d * (x_d - x0)
            - 2 * (1 - alpha) * d_d * v_d)
    return -gain.flatten(1).sum(1).mean()


def general_generator_loss(teacher, f, x_g, x0, t, y, alpha, beta, gamma):
    """General RealUID (Appendix A.2), generator side, minimised by G (delta = f - v*):

        E_gen[ -gamma |delta|^2 + 2 beta <delta, u_g> - 2 alpha <delta, v*> ].

    With gamma = alpha this equals generator_loss exactly.
    """
    t_ = t.view(-1, *[1] * (x0.dim() - 1))
    xt, u_g = t_ * x_g + (1 - t_) * x0, x_g - x0
    v = teacher(t, xt, y).to(x0.dtype)
    delta = f(t, xt, y).to(x0.dtype) - v
    loss = -gamma * delta * delta + 2 * beta * delta * u_g - 2 * alpha * delta * v
    return loss.flatten(1).sum(1).mean()


def gan_discriminator_loss(D, x_g, x_d, x0, t_gan, y):
    """Optional GAN baseline (eqs. (7)-(9), Appendix D), discriminator side, minimised:
    mean softplus(D(x_t^g)) + mean softplus(-D(x_t^d)) on interpolations at t_gan (the authors
    use t_gan = 1 - 0.2 U[0, 1]). D(t, x, y) returns logits, e.g. fake.forward_head."""
    t_ = t_gan.view(-1, *[1] * (x0.dim() - 1))
    xt = torch.cat([t_ * x_g + (1 - t_) * x0, t_ * x_d + (1 - t_) * x0])
    logits = D(t_gan.repeat(2), xt, None if y is None else y.repeat(2)).to(x0.dtype)
    logit_g, logit_d = logits.chunk(2)
    return F.softplus(logit_g).mean() + F.softplus(-logit_d).mean()


def gan_generator_loss(D, x_g, x0, t_gan, y):
    """Optional GAN baseline, generator side (non-saturating), minimised: mean softplus(-D)."""
    t_ = t_gan.view(-1, *[1] * (x0.dim() - 1))
    return F.softplus(-D(t_gan, t_ * x_g + (1 - t_) * x0, y).to(x0.dtype)).mean()


# ---------------------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r = p.add_argument_group("RealUID")
    r.add_argument("--teacher", required=True,
                   help="teacher checkpoint: ours (train_teacher.py) or the authors' file")
    r.add_argument("--teacher-ema", default="0.999",
                   help="EMA decay of the teacher weights to distill, or 'none' for raw weights")
    r.add_argument("--alpha", type=float, default=1.0,
                   help="alpha in (0, 1] (eq. 17): weight of generated data in the quadratic "
                        "term; 1 - alpha goes to real data. Paper: 0.94 uncond, 0.98 cond")
    r.add_argument("--beta", type=float, default=1.0,
                   help="beta in (0, 1] (eq. 17): weight of generated data in the linear term. "
                        "alpha = beta = 1 is data-free; paper: 0.96, beta/alpha near 1 +- 0.02")
    r.add_argument("--gamma", type=float, default=None,
                   help="General RealUID (Appendix A.2): quadratic-term weight in (0, 1]; "
                        "default: alpha (plain RealUID)")
    r.add_argument("--fake-steps", type=int, default=5,
                   help="fake-model updates per generator update (the official 5 + 1 cycle)")
    r.add_argument("--gan-gen-coef", type=float, default=0.0,
                   help="GAN baseline (SPEC 5): generator loss weight (paper: 0.3 uncond; 0 off)")
    r.add_argument("--gan-disc-coef", type=float, default=0.0,
                   help="GAN baseline: discriminator loss weight (paper: 1.0, ratio 3; 0 off)")
    r.add_argument("--fake-init", choices=["random", "teacher"], default="random",
                   help="fake model f starts from a fresh network (distillation) or the "
                        "teacher's weights (fine-tuning, section 4.2)")
    r.add_argument("--init-from", default=None,
                   help="start the generator from this distilled checkpoint instead of the "
                        "teacher (fine-tuning; see finetune.py)")
    r.add_argument("--init-ema", default="0.999",
                   help="EMA decay of --init-from's generator weights, or 'none'")
    r.add_argument("--dropout", type=float, default=0.0,
                   help="dropout of generator and fake model (the paper: 0)")
    r.add_argument("--cond", action="store_true",
                   help="assert the teacher is class-conditional (conditioning always follows "
                        "the teacher; labels come from the data)")
    common.add_data_args(p, image_size_default=None).title = (
        "data (--image-size defaults to the teacher's)")
    common.add_net_args(p).title = ("network of a teacher file without config (the authors' "
                                    "files); ours describe themselves")
    # 66,667 steps x 6 updates = the paper's 400k updates (the official script's default is
    # 800k updates, i.e. 133,333 steps).
    common.add_run_args(p, steps=66_667, batch=256, lr=3e-5, warmup_steps=500,
                        ema=[0.999, 0.9996, 0.9999], log_every=100, sample_every=5000,
                        save_every=5000)
    common.add_fid_args(p)
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def check_args(args):
    common.check_run_args(args)
    for name in ("alpha", "beta", "gamma"):
        value = getattr(args, name)
        if value is not None and not 0 < value <= 1:
            common.fail(f"--{name} {value} is outside (0, 1]; the paper uses values in "
                        "[0.85, 1], e.g. --alpha 0.94 --beta 0.96")
    if args.alpha == 1 and args.beta != 1:
        common.warn("alpha = 1 with beta != 1 leaves a real-data term linear in f (unbounded); "
                    "the paper reports this setting as unstable (Table 1, row alpha = 1)")
    if args.fake_steps < 1:
        common.fail("--fake-steps must be at least 1")
    if args.gan_gen_coef < 0 or args.gan_disc_coef < 0:
        common.fail("--gan-gen-coef and --gan-disc-coef must be >= 0 (0 turns the GAN off)")


def ema_arg(value):
    return None if str(value).lower() == "none" else float(value)


def setup(args, d):
    """Everything a run needs, as one namespace: networks, optimizers, data, noise, flags.

    Initialisation: teacher v* frozen; generator G from the teacher's weights (or from a
    distilled generator with --init-from); fake model f a fresh network (or the teacher's
    weights with --fake-init teacher); EMAs equal to G. A --resume checkpoint then overrides
    all state (weights, optimizers, schedules, RNG, data position).
    """
    device = d.device
    s = argparse.Namespace(d=d, device=device, alpha=args.alpha, beta=args.beta)
    s.gamma = args.alpha if args.gamma is None else args.gamma
    s.general = args.gamma is not None and args.gamma != args.alpha
    s.gan = args.gan_gen_coef > 0 or args.gan_disc_coef > 0
    s.uses_real = (s.alpha, s.beta, s.gamma) != (1, 1, 1) or s.gan

    tckpt = common.load_checkpoint(args.teacher, "teacher checkpoint")
    common.require_kind(tckpt, "teacher", args.teacher)
    t_sd = common.pick_weights(tckpt, ema_arg(args.teacher_ema), args.teacher)
    fallback = common.net_config_from_args(
        argparse.Namespace(**{**vars(args), "image_size": args.image_size or 32}))
    s.cfg = cfg = dict(common.net_config_from(tckpt, t_sd, fallback), dropout=args.dropout)
    s.teacher = common.build_net(cfg, t_sd, dropout=0.0,
                                 what=f"teacher weights in {args.teacher}")
    s.teacher.to(device).eval().requires_grad_(False)
    s.cond = cfg["num_classes"] is not None
    if args.cond and not s.cond:
        common.fail(f"--cond given but the teacher {args.teacher} is unconditional")
    g_sd = t_sd
    if args.init_from:
        ickpt = common.load_checkpoint(args.init_from, "--init-from checkpoint")
        common.require_kind(ickpt, "distilled", args.init_from)
        g_sd = common.pick_weights(ickpt, ema_arg(args.init_ema), args.init_from)
    common.seed_init(args.seed)
    s.gen = common.build_net(cfg, g_sd, what="generator weights").to(device)
    s.fake = common.build_net(cfg, t_sd if args.fake_init == "teacher" else None,
                              gan_head=s.gan, what="teacher weights").to(device)
    s.emas = {common.ema_key(decay): copy.deepcopy(s.gen).requires_grad_(False).eval()
              for decay in args.ema}
    common.seed_dropout(args.seed, d.rank)
    s.shape = (cfg["in_channels"], cfg["image_size"], cfg["image_size"])

    data = None
    if s.uses_real:
        data = common.open_data(args.data, args.data_root, cfg["image_size"])
        common.check_data(data, cfg, s.cond, what=f"the teacher {args.teacher}")

    # Adam with betas (0, 0.999) for both players, linear warm-up per optimizer (SPEC 4).
    s.opt_g = common.adam(s.gen.parameters(), args.lr, (0.0, 0.999), device)
    s.opt_f = common.adam(s.fake.parameters(), args.lr, (0.0, 0.999), device)
    s.sched_g, s.sched_f = common.warmup(s.opt_g, args.warmup), common.warmup(s.opt_f, args.warmup)
    s.scaler_g = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    s.scaler_f = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    s.noise_gen = common.noise_generator(device, args.seed)

    s.step, consumed, s.last_saved, s.best_fid = 0, 0, None, float("inf")
    path = common.resume_path(args)
    if path:
        ckpt = common.load_checkpoint(path, "resume checkpoint")
        common.require_kind(ckpt, "distilled", path)
        saved = ckpt.get("config", {})
        if saved.get("net") != cfg or saved.get("gan_head") != s.gan:
            common.fail(f"{path} was made with another teacher network or GAN setting; resume "
                        "with the original --teacher and GAN flags")
        common.load_state(s.gen, ckpt["gen"])
        common.load_state(s.fake, ckpt["u"])
        for k, m in s.emas.items():
            common.load_state(m, ckpt["ema_gens"][k])
        s.opt_g.load_state_dict(ckpt["optim_gen"])
        s.opt_f.load_state_dict(ckpt["optim_u"])
        s.sched_g.load_state_dict(ckpt["sched"])
        s.sched_f.load_state_dict(ckpt["sched_u"])
        s.scaler_g.load_state_dict(ckpt.get("scaler_gen", {}))
        s.scaler_f.load_state_dict(ckpt.get("scaler_u", {}))
        common.set_rng_state(ckpt["rng"], s.noise_gen, d)
        s.step, consumed = ckpt["step"], ckpt["data_batches"]
        s.last_saved, s.best_fid = s.step, ckpt.get("best_fid", float("inf"))
        if d.main:
            print(f"resumed {path} at step {s.step}")

    s.batches = common.Batches(data, args.batch_size, args.seed, d, args.workers, consumed) \
        if s.uses_real else None
    s.run_gen, s.run_fake = common.prepare_model(s.gen, args), common.prepare_model(s.fake, args)
    s.run_teacher = common.prepare_model(s.teacher, args)
    s.micro = d.split(args.batch_size, args.grad_accum)
    s.amp = common.precision_context(device, args.precision)
    s.gen_params, s.fake_params = list(s.gen.parameters()), list(s.fake.parameters())
    s.gen.train(), s.fake.train()
    return s


def draw(s, args):
    """Fresh noise for the global batch (shared generator), this process's rows, and this
    process's slice of a fresh real batch (randomly flipped)."""
    B, device, gen = args.batch_size, s.device, s.noise_gen
    g = {"z": common.randn(gen, (B, *s.shape), device),
         "x0": common.randn(gen, (B, *s.shape), device),
         "t": common.rand(gen, (B,), device)}
    if s.gan:
        g["t_gan"] = 1 - 0.2 * common.rand(gen, (B,), device)
    if s.uses_real:
        g["flip"] = common.rand(gen, (B,), device) < 0.5
    elif s.cond:  # data-free and conditional: labels uniform over the classes
        g["y"] = common.randint(gen, s.cfg["num_classes"], (B,), device)
    batch = common.rank_slice(g, s.d)
    batch.setdefault("y", None)
    batch["x_d"] = None
    if s.uses_real:
        x_u8, y = s.batches.next()
        batch["x_d"] = common.flip(common.from_uint8(x_u8), batch.pop("flip"))
        batch["y"] = y if s.cond else None
    return batch


def fake_update(s, args, batch):
    """One update of f: minimise the fake-model loss (+ GAN discriminator loss); G runs without
    a graph. Returns (loss, gan loss, grad norm), averaged over micro-batches."""
    total, gan_total = torch.zeros((), device=s.device), torch.zeros((), device=s.device)
    for mb in common.micro_batches(batch, s.micro):
        with s.amp:
            with torch.no_grad():
                x_g = generate(s.run_gen, mb["z"], mb["y"])
            if s.general:
                loss = general_fake_model_loss(s.run_fake, s.run_teacher, x_g, mb["x_d"],
                                               mb["x0"], mb["t"], mb["y"], s.alpha, s.beta,
                                               s.gamma)
            else:
                loss = fake_model_loss(s.run_fake, x_g, mb["x_d"], mb["x0"], mb["t"], mb["y"],
                                       s.alpha, s.beta)
            objective = loss
            if s.gan:
                loss_gan = gan_discriminator_loss(s.fake.forward_head, x_g, mb["x_d"], mb["x0"],
                                                  mb["t_gan"], mb["y"])
                objective = loss + args.gan_disc_coef * loss_gan
                gan_total += loss_gan.detach() / args.grad_accum
        s.scaler_f.scale(objective / args.grad_accum).backward()
        total += loss.detach() / args.grad_accum
    common.stop_if_not_finite(total + gan_total, "fake-model loss", s.step, args.out,
                              s.last_saved)
    norm = common.optimizer_step(s.fake_params, s.opt_f, s.sched_f, s.scaler_f, s.d,
                                 args.grad_clip)
    return total, gan_total, norm


def generator_update(s, args, batch):
    """One update of G: minimise the generator loss (+ GAN generator loss); f and v* are frozen
    (no parameter gradients); then the EMAs. Returns (loss, gan loss, grad norm)."""
    total, gan_total = torch.zeros((), device=s.device), torch.zeros((), device=s.device)
    s.fake.requires_grad_(False)
    for mb in common.micro_batches(batch, s.micro):
        with s.amp:
            x_g = generate(s.run_gen, mb["z"], mb["y"])
            if s.general:
                loss = general_generator_loss(s.run_teacher, s.run_fake, x_g, mb["x0"], mb["t"],
                                              mb["y"], s.alpha, s.beta, s.gamma)
            else:
                loss = generator_loss(s.run_teacher, s.run_fake, x_g, mb["x0"], mb["t"], mb["y"],
                                      s.alpha, s.beta)
            objective = loss
            if s.gan:
                loss_gan = gan_generator_loss(s.fake.forward_head, x_g, mb["x0"], mb["t_gan"],
                                              mb["y"])
                objective = loss + args.gan_gen_coef * loss_gan
                gan_total += loss_gan.detach() / args.grad_accum
        s.scaler_g.scale(objective / args.grad_accum).backward()
        total += loss.detach() / args.grad_accum
    s.fake.requires_grad_(True)
    common.stop_if_not_finite(total + gan_total, "generator loss", s.step, args.out,
                              s.last_saved)
    norm = common.optimizer_step(s.gen_params, s.opt_g, s.sched_g, s.scaler_g, s.d,
                                 args.grad_clip)
    for decay in args.ema:
        common.ema_update(s.emas[common.ema_key(decay)], s.gen, decay)
    return total, gan_total, norm


def save(s, args, name="latest.pt"):
    """<out>/latest.pt (or best.pt), written atomically, in the authors' layout plus our config
    and resume state."""
    ckpt = {"gen": s.gen.state_dict(), "u": s.fake.state_dict(),
            "ema_gens": {k: m.state_dict() for k, m in s.emas.items()},
            "optim_gen": s.opt_g.state_dict(), "optim_u": s.opt_f.state_dict(),
            "sched": s.sched_g.state_dict(), "sched_u": s.sched_f.state_dict(), "step": s.step,
            "config": {"kind": "distilled", "net": s.cfg, "gan_head": s.gan,
                       "step_unit": f"{args.fake_steps} fake-model updates + 1 generator update",
                       "args": common.json_safe(vars(args))},
            "scaler_gen": s.scaler_g.state_dict(), "scaler_u": s.scaler_f.state_dict(),
            "rng": common.rng_state(s.noise_gen, s.d),
            "data_batches": s.batches.consumed if s.batches else 0, "best_fid": s.best_fid}
    if s.d.main:
        common.save_checkpoint(ckpt, os.path.join(args.out, name))
        if name == "latest.pt" and args.snapshot_every and s.step % args.snapshot_every == 0:
            common.save_checkpoint(ckpt, common.snapshot_name(args.out, s.step))
    if name == "latest.pt":
        s.last_saved = s.step


@torch.no_grad()
def save_grids(s, args, z, y):
    """Grids of the raw and the first EMA generator from a fixed latent batch."""
    os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
    for name, net in (("gen", s.gen), (f"ema{args.ema[0]}", s.emas[common.ema_key(args.ema[0])])):
        net.eval()
        common.save_grid(generate(net, z, y),
                         os.path.join(args.out, "samples", f"{s.step:07d}_{name}.png"))
    s.gen.train()


def main(args):
    check_args(args)
    d = common.Dist(args.device)
    common.configure_backends(d.device)
    os.makedirs(args.out, exist_ok=True)
    s = setup(args, d)
    if d.main:
        common.save_args(args, args.out)
        mode = "data-free UID" if not s.uses_real else \
            f"RealUID alpha={s.alpha} beta={s.beta}" + (
                f" gamma={s.gamma} (General)" if s.general else "")
        print(f"{mode}{' + GAN' if s.gan else ''}; teacher {args.teacher} "
              f"({'cond' if s.cond else 'uncond'} {'x'.join(map(str, s.shape))}); "
              f"device {d.device}, {d.world} process(es)")
    fid_eval = common.InTrainingFID(args, d.device, s.shape, s.cfg["num_classes"]) \
        if args.fid_every and d.main else None
    grid_z = torch.randn(64, *s.shape, generator=torch.Generator().manual_seed(0)).to(d.device)
    grid_y = common.class_labels(64, s.cfg["num_classes"], device=d.device)
    if d.main and args.sample_every and s.step == 0:
        save_grids(s, args, grid_z, grid_y)  # the starting point z + v*(0, z), for comparison

    keys = ["loss_fake", "loss_gen"] + (["loss_gan_disc", "loss_gan_gen"] if s.gan else [])
    running = {k: torch.zeros((), device=d.device) for k in keys}
    log = common.RunLog(args.out, args.steps, s.step, enabled=d.main)
    while s.step < args.steps:
        s.step += 1
        for _ in range(args.fake_steps):
            loss_f, gan_d, norm_f = fake_update(s, args, draw(s, args))
            running["loss_fake"] += loss_f / args.fake_steps
            if s.gan:
                running["loss_gan_disc"] += gan_d / args.fake_steps
        loss_g, gan_g, norm_g = generator_update(s, args, draw(s, args))
        running["loss_gen"] += loss_g
        if s.gan:
            running["loss_gan_gen"] += gan_g

        step = s.step
        if step % args.log_every == 0 or step == args.steps:
            n = step - log.last_step  # steps since the last record (also after a resume)
            values = {k: d.mean(v / n) for k, v in running.items()}
            values.update(grad_norm_gen=norm_g, grad_norm_fake=norm_f,
                          lr=s.sched_g.get_last_lr()[0])
            log.step(step, values, d.device)
            for v in running.values():
                v.zero_()
        if d.main and args.sample_every and (step % args.sample_every == 0 or step == args.steps):
            save_grids(s, args, grid_z, grid_y)
        if args.fid_every and step % args.fid_every == 0:
            ema = s.emas[common.ema_key(args.ema[0])]
            common.evaluate_fid(s, args, fid_eval, lambda z, y: generate(ema, z, y),
                                f"EMA {args.ema[0]}, one step", log, save)
        if step % args.save_every == 0 or step == args.steps or (
                args.snapshot_every and step % args.snapshot_every == 0):
            save(s, args)
    d.close()


if __name__ == "__main__":
    main(parse_args())
