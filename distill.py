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
Image-to-image (Appendix C): a teacher trained with `train_teacher.py --task` or on a pairs
file makes this the distillation of a one-step restoration model (every network also sees the
source s; coupling.py names the conventions), with the same flags:

    python distill.py --teacher runs/sr4_teacher/latest.pt --data cifar10 --alpha 0.94 --beta 0.96

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
import coupling


# ---------------------------------------------------------------------------------------------
# The mathematics. Each function stands alone: tensors [B, ...] of any shape (images or
# vectors), sums over all non-batch dimensions, mean over the batch; the value is minimised.
# One calling convention for all of them: the networks first, always in the order teacher v*,
# fake model f (or the discriminator D); then the tensors x_g, x_d, x0, t, y, s; then the
# coefficients, keyword-only (alpha=..., beta=..., gamma=...), so that no positional copy can
# swap two networks or two coefficients. y are class labels or None; s is the source image of
# an image-to-image coupling (Appendix C) or None. Networks are called v(t, x, y) without a
# source and v(t, x, y, s) with one. Network outputs are cast to the data's dtype: under
# autocast the losses stay in float32.

def field(net, t, x, y, s):
    """The flow field of a network at (t, x): net(t, x, y), or net(t, x, y, s) when there is a
    source, so that callables without an image condition (closed-form fields, the ablation's
    MLPs) keep their three-argument form."""
    return net(t, x, y) if s is None else net(t, x, y, s)


def _twice(v):
    """The conditioning of a batch for the fused pass over [generated; real] (None stays None)."""
    return None if v is None else torch.cat([v, v])


def interpolate(x1, x0, t):
    """x_t = t x1 + (1 - t) x0 with t [B] broadcast over the other dimensions."""
    t_ = t.view(-1, *[1] * (x0.dim() - 1))
    return t_ * x1 + (1 - t_) * x0


def generate(G, z, y=None, s=None):
    """One-step generator x = z + G(0, z, y[, s]): the network at t = 0 plus a residual
    (Appendix D). For couplings z is the generator's own start kappa s + sigma_s eps
    (coupling.start), drawn independently of the interpolations' x0."""
    t0 = torch.zeros(len(z), device=z.device, dtype=z.dtype)
    return z + field(G, t0, z, y, s).to(z.dtype)


def fake_model_loss(fake, x_g, x_d, x0, t, y=None, s=None, *, alpha, beta):
    """RealUM(f) of eq. (17), minimised by the fake model f (the inner max of eq. (18) is
    max_f -RealUM(f)):

        E_gen[ alpha |f(t, x_t^g)|^2 - 2 beta <f, u_g> ] + E_real[ (1 - alpha) |f(t, x_t^d)|^2
        - 2 (1 - beta) <f, u_d> ],    u_g = x_g - x0,  u_d = x_d - x0,

    i.e. alpha |f - (beta/alpha) u_g|^2 + (1 - alpha) |f - ((1-beta)/(1-alpha)) u_d|^2 up to
    terms without f; its pointwise optimum is Lemma 2's f = (beta p_g v_G + (1 - beta) p_d v*) /
    (alpha p_g + (1 - alpha) p_d). x_g is generated without a graph; x_d (real data) may be None
    when alpha = beta = 1. The two batches share x0 and t (and y, s) and go through f in one
    forward pass.
    """
    u_g = x_g - x0
    if alpha == 1 and beta == 1:  # data-free UID: the real-data terms vanish
        f_g = field(fake, t, interpolate(x_g, x0, t), y, s).to(x0.dtype)
        return (alpha * (f_g * f_g) - 2 * beta * (f_g * u_g)).flatten(1).sum(1).mean()
    u_d = x_d - x0
    xt = torch.cat([interpolate(x_g, x0, t), interpolate(x_d, x0, t)])
    f_g, f_d = field(fake, t.repeat(2), xt, _twice(y), _twice(s)).to(x0.dtype).chunk(2)
    loss = (alpha * (f_g * f_g) - 2 * beta * (f_g * u_g)
            + (1 - alpha) * (f_d * f_d) - 2 * (1 - beta) * (f_d * u_d))
    return loss.flatten(1).sum(1).mean()


def generator_loss(teacher, fake, x_g, x0, t, y=None, s=None, *, alpha, beta):
    """The generator's side of eq. (18), RealUM(v*) - RealUM(f) on the generated batch (the
    real-data terms do not depend on G), minimised by G:

        E_gen[ alpha |v*|^2 - 2 beta <v*, u_g> - alpha |f|^2 + 2 beta <f, u_g> ]
        = E_gen[ alpha |v* - (beta/alpha) u_g|^2 - alpha |f - (beta/alpha) u_g|^2 ].

    Gradients reach G through x_t and u_g; teacher v* and fake model f are frozen (their
    parameters should not require grad, so that no parameter gradients are computed).
    """
    xt, u_g = interpolate(x_g, x0, t), x_g - x0
    v, fv = field(teacher, t, xt, y, s).to(x0.dtype), field(fake, t, xt, y, s).to(x0.dtype)
    loss = alpha * (v * v - fv * fv) - 2 * beta * ((v - fv) * u_g)
    return loss.flatten(1).sum(1).mean()


def general_fake_model_loss(teacher, fake, x_g, x_d, x0, t, y=None, s=None, *, alpha, beta,
                            gamma):
    """General RealUID (Appendix A.2, delta form, delta = f - v*), minimised by f: minus

        E_gen[ -gamma |delta|^2 + 2 beta <delta, u_g> - 2 alpha <delta, v*> ]
      + E_real[ -(1 - gamma) |delta|^2 + 2 (1 - beta) <delta, u_d> - 2 (1 - alpha) <delta, v*> ].

    gamma = alpha gives RealUID: this is then RealUM(f) - RealUM(v*), fake_model_loss up to a
    constant. Needs the teacher on both batches (no gradient). x_d may be None if
    alpha = beta = gamma = 1.
    """
    u_g = x_g - x0
    real = not (alpha == 1 and beta == 1 and gamma == 1)
    xt, tt, yy, ss = interpolate(x_g, x0, t), t, y, s
    if real:
        xt = torch.cat([xt, interpolate(x_d, x0, t)])
        tt, yy, ss = t.repeat(2), _twice(y), _twice(s)
    with torch.no_grad():
        v = field(teacher, tt, xt, yy, ss).to(x0.dtype)
    delta = field(fake, tt, xt, yy, ss).to(x0.dtype) - v
    if not real:
        gain = -gamma * delta * delta + 2 * beta * delta * u_g - 2 * alpha * delta * v
        return -gain.flatten(1).sum(1).mean()
    (d_g, d_d), (v_g, v_d) = delta.chunk(2), v.chunk(2)
    gain = (-gamma * d_g * d_g + 2 * beta * d_g * u_g - 2 * alpha * d_g * v_g
            - (1 - gamma) * d_d * d_d + 2 * (1 - beta) * d_d * (x_d - x0)
            - 2 * (1 - alpha) * d_d * v_d)
    return -gain.flatten(1).sum(1).mean()


def general_generator_loss(teacher, fake, x_g, x0, t, y=None, s=None, *, alpha, beta, gamma):
    """General RealUID (Appendix A.2), generator side, minimised by G (delta = f - v*):

        E_gen[ -gamma |delta|^2 + 2 beta <delta, u_g> - 2 alpha <delta, v*> ].

    With gamma = alpha this equals generator_loss exactly.
    """
    xt, u_g = interpolate(x_g, x0, t), x_g - x0
    v = field(teacher, t, xt, y, s).to(x0.dtype)
    delta = field(fake, t, xt, y, s).to(x0.dtype) - v
    loss = -gamma * delta * delta + 2 * beta * delta * u_g - 2 * alpha * delta * v
    return loss.flatten(1).sum(1).mean()


def gan_discriminator_loss(D, x_g, x_d, x0, t_gan, y=None, s=None):
    """Optional GAN baseline (eqs. (7)-(9), Appendix D), discriminator side, minimised:
    mean softplus(D(x_t^g)) + mean softplus(-D(x_t^d)) on interpolations at t_gan (the authors
    use t_gan = 1 - 0.2 U[0, 1]). D(t, x, y[, s]) returns logits, e.g. fake.forward_head."""
    xt = torch.cat([interpolate(x_g, x0, t_gan), interpolate(x_d, x0, t_gan)])
    logits = field(D, t_gan.repeat(2), xt, _twice(y), _twice(s)).to(x0.dtype)
    logit_g, logit_d = logits.chunk(2)
    return F.softplus(logit_g).mean() + F.softplus(-logit_d).mean()


def gan_generator_loss(D, x_g, x0, t_gan, y=None, s=None):
    """Optional GAN baseline, generator side (non-saturating), minimised: mean softplus(-D)."""
    return F.softplus(-field(D, t_gan, interpolate(x_g, x0, t_gan), y, s).to(x0.dtype)).mean()


# ---------------------------------------------------------------------------------------------

def build_parser():
    p = common.Parser(description=__doc__.split("\n\n")[0])
    r = p.add_argument_group("RealUID")
    r.add_argument("--teacher", default=None,
                   help="teacher checkpoint: ours (train_teacher.py) or the authors' file "
                        "(required; restored by --resume)")
    r.add_argument("--teacher-ema", type=common.decay_or_none, default=0.999,
                   help="EMA decay of the teacher weights to distill, or 'none' for raw weights")
    r.add_argument("--alpha", type=common.unit_interval, default=1.0,
                   help="alpha in (0, 1] (eq. 17): weight of generated data in the quadratic "
                        "term; 1 - alpha goes to real data. Paper: 0.94 uncond, 0.98 cond")
    r.add_argument("--beta", type=common.unit_interval, default=1.0,
                   help="beta in (0, 1] (eq. 17): weight of generated data in the linear term. "
                        "alpha = beta = 1 is data-free; paper: 0.96, beta/alpha near 1 +- 0.02")
    r.add_argument("--gamma", type=common.unit_interval, default=None,
                   help="General RealUID (Appendix A.2): quadratic-term weight in (0, 1]; "
                        "default: alpha (plain RealUID)")
    r.add_argument("--fake-steps", type=common.positive_int, default=5,
                   help="fake-model updates per generator update (the official 5 + 1 cycle)")
    r.add_argument("--gan-gen-coef", type=common.nonnegative_float, default=0.0,
                   help="GAN baseline (eqs. 7-9): generator loss weight (paper: 0.3 uncond; "
                        "0 off)")
    r.add_argument("--gan-disc-coef", type=common.nonnegative_float, default=0.0,
                   help="GAN baseline: discriminator loss weight (paper: 1.0, ratio 3; 0 off)")
    r.add_argument("--fake-init", choices=["random", "teacher", "init-from"], default="random",
                   help="fake model f starts from a fresh network (distillation), the teacher's "
                        "weights (fine-tuning, section 4.2) or --init-from's fake model `u`")
    r.add_argument("--init-from", default=None,
                   help="start the generator from this distilled checkpoint instead of the "
                        "teacher (fine-tuning, finetune.py; or a new run from a run's weights)")
    r.add_argument("--init-ema", type=common.decay_or_none, default=0.999,
                   help="EMA decay of --init-from's generator weights, or 'none'")
    r.add_argument("--dropout", type=common.dropout_rate, default=0.0,
                   help="dropout of generator and fake model (the paper: 0)")
    r.add_argument("--cond", action="store_true",
                   help="assert the teacher is class-conditional (conditioning always follows "
                        "the teacher; labels come from the data)")
    common.add_data_args(p, image_size_default=None).title = (
        "data (--image-size defaults to the teacher's)")
    coupling.add_args(p, teacher=False)
    common.add_net_args(p).title = ("network of a teacher file without config (the authors' "
                                    "files); ours describe themselves")
    # 66,667 steps x 6 updates = the paper's 400k updates (the official script's default is
    # 800k updates, i.e. 133,333 steps).
    common.add_run_args(p, steps=66_667, batch=256, lr=3e-5, warmup_steps=500,
                        ema=[0.999, 0.9996, 0.9999], log_every=100, sample_every=5000,
                        save_every=5000, precisions=common.PRECISIONS, precision="auto")
    common.add_fid_args(p)
    return p


INIT_HINT = "--init-from {path} --init-ema none --fake-init init-from"


def parse_args(argv=None):
    return common.parse_run_args(build_parser(), argv, "distill.py", INIT_HINT)


def check_args(args):
    if not args.teacher:
        common.fail("--teacher is required: a train_teacher.py checkpoint or the authors' "
                    "teacher file")
    gamma = args.alpha if args.gamma is None else args.gamma
    if args.alpha == 1 and args.beta != 1 and gamma == 1:
        common.warn("alpha = 1 with beta != 1 leaves a real-data term linear in f (unbounded); "
                    "the paper reports this setting as unstable (Table 1, row alpha = 1)")
    elif gamma == 1 and (args.alpha, args.beta) != (1, 1):
        common.warn("gamma = 1 with (alpha, beta) != (1, 1) leaves the real-data part of "
                    "General RealUID linear in f (unbounded; Appendix A.2): lower --gamma")
    if args.fake_init == "init-from" and not args.init_from:
        common.fail("--fake-init init-from needs --init-from, the distilled checkpoint whose "
                    "fake model to start from")


def setup(args, d):
    """Everything a run needs, as one namespace: networks, players, data, noise, flags.

    Initialisation: teacher v* frozen; generator G from the teacher's weights (or from a
    distilled generator with --init-from); fake model f a fresh network (or the teacher's
    weights with --fake-init teacher); EMAs equal to G. A --resume checkpoint then overrides
    all state (weights, optimizers, schedules, RNG, data position).
    """
    device = d.device
    args.precision = common.resolve_precision(args.precision, device)  # saved resolved
    s = argparse.Namespace(d=d, device=device, alpha=args.alpha, beta=args.beta)
    s.gamma = args.alpha if args.gamma is None else args.gamma
    s.general = args.gamma is not None and args.gamma != args.alpha
    s.gan = args.gan_gen_coef > 0 or args.gan_disc_coef > 0
    s.uses_real = (s.alpha, s.beta, s.gamma) != (1, 1, 1) or s.gan

    tckpt = common.load_checkpoint(args.teacher, "teacher checkpoint")
    common.require_kind(tckpt, "teacher", args.teacher)
    t_sd = common.pick_weights(tckpt, args.teacher_ema, args.teacher)
    fallback = common.net_config_from_args(
        argparse.Namespace(**{**vars(args), "image_size": args.image_size or 32}))
    s.cfg = cfg = dict(common.net_config_from(tckpt, t_sd, fallback), dropout=args.dropout)
    s.teacher = common.build_net(cfg, t_sd, dropout=0.0,
                                 what=f"teacher weights in {args.teacher}")
    s.teacher.to(device).eval().requires_grad_(False)
    s.teacher_fingerprint = common.fingerprint(s.teacher.state_dict())
    s.cond = cfg["num_classes"] is not None
    if args.cond and not s.cond:
        common.fail(f"--cond given but the teacher {args.teacher} is unconditional")
    s.coupling = coupling.for_student(tckpt.get("config", {}).get("coupling"), args.task, None,
                                      args.teacher)
    if s.coupling and args.fid_every:
        common.fail("--fid-every scores noise-to-image models; score an image-to-image "
                    "generator with `python fid.py pairs` instead")
    g_sd, f_sd = t_sd, None
    if args.init_from:
        ickpt = common.load_checkpoint(args.init_from, "--init-from checkpoint")
        common.require_kind(ickpt, "distilled", args.init_from)
        g_sd = common.pick_weights(ickpt, args.init_ema, args.init_from)
        if args.fake_init == "init-from":
            f_sd = common.clean_state_dict(ickpt["u"])
    if args.fake_init == "teacher":
        f_sd = t_sd
    common.seed_init(args.seed)
    s.gen = common.build_net(cfg, g_sd, what="generator weights").to(device)
    s.fake = common.build_net(cfg, f_sd, gan_head=s.gan, what="fake-model weights").to(device)
    s.emas = {common.ema_key(decay): copy.deepcopy(s.gen).requires_grad_(False).eval()
              for decay in args.ema}
    common.seed_dropout(args.seed, d.rank)
    s.shape = (cfg["in_channels"], cfg["image_size"], cfg["image_size"])

    # Real data: the targets when alpha, beta < 1 (or the GAN); a coupling always reads its
    # sources, and with alpha = beta = 1 never uses the targets (IBMD's data-free setting).
    data, s.reads_data = None, s.uses_real or s.coupling is not None
    if s.reads_data:
        data = common.open_data(args.data, args.data_root, cfg["image_size"])
        common.check_data(data, cfg, s.cond, what=f"the teacher {args.teacher}")
        coupling.for_student(s.coupling, args.task, data, args.teacher)
    s.data_desc = common.describe_data(data)
    s.grid_pairs = coupling.fixed_pairs(data, s.coupling, 16, device) if s.coupling else None

    if args.channels_last:
        for net in (s.teacher, s.gen, s.fake, *s.emas.values()):
            net.to(memory_format=torch.channels_last)
    s.fake_frozen = common.frozen_alias(s.fake)  # f as the generator update sees it
    # Adam with betas (0, 0.999) for both players, linear warm-up per optimizer (Appendix D).
    s.g = common.Player(s.gen, generator_objective(s, args), args, d, args.lr, (0.0, 0.999),
                        args.warmup)
    s.f = common.Player(s.fake, fake_objective(s, args), args, d, args.lr, (0.0, 0.999),
                        args.warmup)
    s.noise_gen = common.noise_generator(device, args.seed)
    s.check = common.FiniteCheck()

    s.step, consumed, s.last_saved, s.best_fid, s.elapsed = 0, 0, None, float("inf"), 0.0
    if args.resume and args.from_authors:
        continue_authors(s, args)
    elif args.resume:
        consumed = restore(s, args)

    s.batches = common.Batches(data, args.batch_size, args.seed, d, args.workers, consumed) \
        if s.reads_data else None
    s.micro = d.split(args.batch_size, args.grad_accum)
    s.amp = common.precision_context(device, args.precision)
    s.gen.train(), s.fake.train()
    return s


def restore(s, args):
    """State of one of our checkpoints (--resume): weights, optimizers, schedules, scalers,
    RNG; returns the number of data batches consumed."""
    path = args.resume
    ckpt = common.load_checkpoint(path, "resume checkpoint")
    common.require_kind(ckpt, "distilled", path)
    saved = ckpt.get("config", {})
    if not common.same_net(saved.get("net"), s.cfg) or saved.get("gan_head") != s.gan or \
            saved.get("coupling") != s.coupling:
        common.fail(f"{path} was made with another teacher network or GAN setting; resume "
                    "with the original --teacher and GAN flags")
    common.check_same_inputs(saved, s.teacher_fingerprint, s.data_desc, path)
    common.load_state(s.gen, ckpt["gen"])
    common.load_state(s.fake, ckpt["u"])
    for k, m in s.emas.items():
        if k not in ckpt["ema_gens"]:
            common.fail(f"{path} tracks the EMAs {', '.join(ckpt['ema_gens'])}, not {k}")
        common.load_state(m, ckpt["ema_gens"][k])
    s.g.opt.load_state_dict(ckpt["optim_gen"])
    s.f.opt.load_state_dict(ckpt["optim_u"])
    s.g.sched.load_state_dict(ckpt["sched"])
    s.f.sched.load_state_dict(ckpt["sched_u"])
    s.g.scaler.load_state_dict(ckpt.get("scaler_gen", {}))
    s.f.scaler.load_state_dict(ckpt.get("scaler_u", {}))
    common.set_rng_state(ckpt["rng"], s.noise_gen, s.d)
    s.step, s.last_saved = ckpt["step"], ckpt["step"]
    s.best_fid, s.elapsed = ckpt.get("best_fid", float("inf")), ckpt.get("elapsed_s", 0.0)
    common.check_resume_step(args, s.step)
    if s.d.main:
        print(f"resumed {path} at step {s.step}")
    return ckpt["data_batches"]


def continue_authors(s, args):
    """Continue a checkpoint of the authors' train_distil.py ({gen, u, ema_gens, optim_gen,
    optim_u, sched, step}, no flags inside: they all come from the command line).

    Their fake model maximises -RealUM(f) with Adam(maximize=True), which steps along
    -grad(-RealUM) = grad RealUM: exactly the gradient our minimised fake_model_loss gives,
    with the same reduction (sum over pixels, mean over the batch). So their Adam moments are
    ours as they are, and only the `maximize` flag is turned off. Their step counter counts
    every update (a generator update when step % 6 == 5) and is saved after update `step`;
    ours counts generator updates. RNG states, the data position and their fake model's
    scheduler (never saved: they restore it from the generator's) cannot be restored.
    """
    path = args.resume
    ckpt = common.load_checkpoint(path, "resume checkpoint")
    common.require_kind(ckpt, "distilled", path)
    missing = [k for k in ("gen", "u", "ema_gens", "optim_gen", "optim_u", "sched", "step")
               if k not in ckpt]
    if missing:
        common.fail(f"{path} lacks {', '.join(missing)} of the authors' distillation layout; "
                    "to start from its generator use --init-from instead of --resume")
    head = common.HEAD
    for net, key in ((s.gen, "gen"), (s.fake, "u")):
        sd = common.clean_state_dict(ckpt[key])
        keep = {k: v for k, v in sd.items() if s.gan and net is s.fake or not k.startswith(head)}
        common.load_state(net, keep)
    for k, m in s.emas.items():
        if k not in ckpt["ema_gens"]:
            common.fail(f"{path} tracks the EMAs {', '.join(ckpt['ema_gens'])}, not {k}: pass "
                        f"--ema {' '.join(ckpt['ema_gens'])}")
        common.load_state(m, {n: v for n, v in common.clean_state_dict(
            ckpt["ema_gens"][k]).items() if not n.startswith(head)})
    common.load_authors_adam(s.g.opt, ckpt["optim_gen"], len(s.g.params), path)
    common.load_authors_adam(s.f.opt, ckpt["optim_u"], len(s.f.params), path)
    updates = int(ckpt["step"]) + 1  # they save after the update with index `step`
    s.step = updates // (args.fake_steps + 1)
    s.g.sched.load_state_dict(ckpt["sched"])
    common.set_warmup_position(s.f.sched, s.step * args.fake_steps)
    common.check_resume_step(args, s.step)
    if s.d.main:
        print(f"continuing the authors' checkpoint {path}: weights, EMAs and both Adam states "
              f"restored (fake model: maximize=True turned into our minimisation, moments "
              f"kept); their {updates} updates = step {s.step} here ({args.fake_steps} "
              f"fake-model + 1 generator updates per step); not restored: RNG states and data "
              f"position (fresh from --seed {args.seed}), the fake model's warm-up position "
              f"(their sched_u, never saved; rebuilt from the step)")
        if args.alpha == 1 and args.beta != 1:
            print("note: their losses.py drops the real-data term when alpha = 1; eq. (17), "
                  "which this code follows, keeps its linear part")


def generator_objective(s, args):
    """G's objective on one micro-batch (common.Player): eq. (18)'s generator side (+ the GAN
    generator loss). The teacher and the frozen alias of f are reached from here, outside the
    DDP wrapper of G; under --precision mixed both run in float32."""
    mixed = args.precision == "mixed"
    teacher = common.full_precision(s.teacher) if mixed else s.teacher
    fake = common.full_precision(s.fake_frozen) if mixed else s.fake_frozen

    def objective(gen, mb):
        x_g = generate(gen, mb["z"], mb["y"], mb["s"])
        if s.general:
            loss = general_generator_loss(teacher, fake, x_g, mb["x0"], mb["t"], mb["y"],
                                          mb["s"], alpha=s.alpha, beta=s.beta, gamma=s.gamma)
        else:
            loss = generator_loss(teacher, fake, x_g, mb["x0"], mb["t"], mb["y"], mb["s"],
                                  alpha=s.alpha, beta=s.beta)
        if not s.gan:
            return loss, {"loss_gen": loss}
        gan = gan_generator_loss(s.fake_frozen.forward_head, x_g, mb["x0"], mb["t_gan"],
                                 mb["y"], mb["s"])
        return loss + args.gan_gen_coef * gan, {"loss_gen": loss, "loss_gan_gen": gan}
    return objective


def fake_objective(s, args):
    """f's objective on one micro-batch (common.Player): RealUM(f) of eq. (17) (or General
    RealUID's; + the GAN discriminator loss). G runs without a graph, outside f's wrapper."""
    def objective(fake, mb):
        with torch.no_grad():
            x_g = generate(s.gen, mb["z"], mb["y"], mb["s"])
        if s.general:
            loss = general_fake_model_loss(s.teacher, fake, x_g, mb["x_d"], mb["x0"], mb["t"],
                                           mb["y"], mb["s"], alpha=s.alpha, beta=s.beta,
                                           gamma=s.gamma)
        else:
            loss = fake_model_loss(fake, x_g, mb["x_d"], mb["x0"], mb["t"], mb["y"], mb["s"],
                                   alpha=s.alpha, beta=s.beta)
        if not s.gan:
            return loss, {"loss_fake": loss}
        gan = gan_discriminator_loss(fake.forward_head, x_g, mb["x_d"], mb["x0"], mb["t_gan"],
                                     mb["y"], mb["s"])
        return loss + args.gan_disc_coef * gan, {"loss_fake": loss, "loss_gan_disc": gan}
    return objective


def draw(s, args):
    """Fresh noise for the global batch (shared generator), this process's rows, and this
    process's slice of a fresh real batch (randomly flipped).

    For a coupling the batch also holds the sources s; the generator's start z = kappa s +
    sigma eps_g and the interpolations' shared x0 = kappa s + sigma eps0 use independent
    noise (coupling.py explains why), and with alpha = beta = 1 the targets stay unread."""
    B, device, gen = args.batch_size, s.device, s.noise_gen
    g = {"z": common.randn(gen, (B, *s.shape), device),
         "x0": common.randn(gen, (B, *s.shape), device),
         "t": common.rand(gen, (B,), device)}
    if s.gan:
        g["t_gan"] = 1 - 0.2 * common.rand(gen, (B,), device)
    if s.reads_data:
        g["flip"] = common.rand(gen, (B,), device) < 0.5
    elif s.cond:  # data-free and conditional: labels uniform over the classes
        g["y"] = common.randint(gen, s.cfg["num_classes"], (B,), device)
    if s.coupling and s.coupling["task"] == "denoise":
        g["task"] = common.randn(gen, (B, *s.shape), device)
    batch = common.rank_slice(g, s.d)
    batch.setdefault("y", None)
    batch["x_d"], batch["s"] = None, None
    if s.reads_data:
        x_u8, y, src_u8 = s.batches.next()
        flip = batch.pop("flip")
        x1 = common.flip(common.from_uint8(x_u8), flip)
        batch["y"] = y if s.cond else None
        if s.uses_real:
            batch["x_d"] = x1
        if s.coupling:
            c = s.coupling
            batch["s"] = coupling.make_source(c, x1, src_u8, flip, batch.pop("task", None))
            batch["z"] = coupling.start(batch["s"], batch["z"], c["kappa"], c["sigma"])
            batch["x0"] = coupling.start(batch["s"], batch["x0"], c["kappa"], c["sigma"])
    return batch


def fake_update(s, args, batch):
    """One update of f; returns ({loss name: value}, grad norm) on the device."""
    parts, norm = s.f.update(batch, s.micro, s.amp, args.grad_clip)
    s.check.add("fake-model loss", sum(parts.values()), s.step)
    return parts, norm


def generator_update(s, args, batch):
    """One update of G, then the EMAs; returns ({loss name: value}, grad norm) on the device."""
    parts, norm = s.g.update(batch, s.micro, s.amp, args.grad_clip)
    s.check.add("generator loss", sum(parts.values()), s.step)
    for decay in args.ema:
        common.ema_update(s.emas[common.ema_key(decay)], s.gen, decay)
    return parts, norm


def save(s, args, name="latest.pt"):
    """<out>/latest.pt (or best.pt), written atomically, in the authors' layout plus our config
    and resume state."""
    ckpt = {"gen": s.gen.state_dict(), "u": s.fake.state_dict(),
            "ema_gens": {k: m.state_dict() for k, m in s.emas.items()},
            "optim_gen": s.g.opt.state_dict(), "optim_u": s.f.opt.state_dict(),
            "sched": s.g.sched.state_dict(), "sched_u": s.f.sched.state_dict(), "step": s.step,
            "config": {"kind": "distilled", "net": s.cfg, "gan_head": s.gan,
                       "coupling": s.coupling,
                       "step_unit": f"{args.fake_steps} fake-model updates + 1 generator update",
                       "teacher_fingerprint": s.teacher_fingerprint, "data": s.data_desc,
                       "args": common.json_safe(vars(args))},
            "scaler_gen": s.g.scaler.state_dict(), "scaler_u": s.f.scaler.state_dict(),
            "rng": common.rng_state(s.noise_gen, s.d),
            "data_batches": s.batches.consumed if s.batches else 0, "best_fid": s.best_fid,
            "elapsed_s": s.log.elapsed()}
    if s.d.main:
        common.save_checkpoint(ckpt, os.path.join(args.out, name))
        if name == "latest.pt" and args.snapshot_every and s.step % args.snapshot_every == 0:
            common.save_checkpoint(ckpt, common.snapshot_name(args.out, s.step))
    if name == "latest.pt":
        s.last_saved = s.step


@torch.no_grad()
def save_grids(s, args, z, y):
    """Grids of the raw and the first EMA generator from a fixed latent batch; for a coupling,
    rows source | output | target of 16 fixed data pairs."""
    os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
    if s.coupling:
        src, x1, labels = s.grid_pairs
        c, n = s.coupling, len(src)
        z, y = coupling.start(src, z[:n], c["kappa"], c["sigma"]), labels if s.cond else None
    for name, net in (("gen", s.gen), (f"ema{args.ema[0]}", s.emas[common.ema_key(args.ema[0])])):
        net.eval()
        path = os.path.join(args.out, "samples", f"{s.step:07d}_{name}.png")
        if s.coupling:
            common.save_grid(torch.cat([src, generate(net, z, y, src), x1]), path, nrow=n)
        else:
            common.save_grid(generate(net, z, y), path)
    s.gen.train()


def main(args):
    check_args(args)
    d = common.Dist(args.device)
    s = setup(args, d)
    common.configure_backends(d.device, args.precision, args.deterministic)
    fid_eval = common.InTrainingFID(args, d.device, s.shape, s.cfg["num_classes"]) \
        if args.fid_every and d.main else None
    common.start_run(args, d)
    if d.main:
        mode = "data-free UID" if not s.uses_real else \
            f"RealUID alpha={s.alpha} beta={s.beta}" + (
                f" gamma={s.gamma} (General)" if s.general else "")
        pairs = "" if not s.coupling else (
            f", image-to-image {s.coupling['task'] or 'pairs file'} on the "
            f"{s.coupling['path']} path")
        print(f"{mode}{' + GAN' if s.gan else ''}; teacher {args.teacher} "
              f"({'cond' if s.cond else 'uncond'} {'x'.join(map(str, s.shape))}{pairs}); "
              f"device {d.device}, {d.world} process(es), {args.precision}")
    grid_z = torch.randn(64, *s.shape, generator=torch.Generator().manual_seed(0)).to(d.device)
    grid_y = common.class_labels(64, s.cfg["num_classes"], device=d.device)
    if d.main and args.sample_every and s.step == 0:
        save_grids(s, args, grid_z, grid_y)  # the starting point z + v*(0, z), for comparison

    keys = ["loss_fake", "loss_gen"] + (["loss_gan_disc", "loss_gan_gen"] if s.gan else [])
    running = {k: torch.zeros((), device=d.device) for k in keys}
    s.log = log = common.RunLog(args.out, args.steps, s.step, s.elapsed, enabled=d.main)
    with common.Control(args, d, s, "distill.py") as control:
        while s.step < args.steps:
            s.step += 1
            for _ in range(args.fake_steps):
                parts_f, norm_f = fake_update(s, args, draw(s, args))
                for k, v in parts_f.items():
                    running[k] += v / args.fake_steps
            parts_g, norm_g = generator_update(s, args, draw(s, args))
            for k, v in parts_g.items():
                running[k] += v

            step = s.step
            do_log, do_save, stop = control.due(step)
            if do_log:
                s.check.check(d, args.out, s.last_saved)
                n = step - log.last_step  # steps since the last record (also after a resume)
                values = {k: d.mean(v / n) for k, v in running.items()}
                values.update(grad_norm_gen=norm_g, grad_norm_fake=norm_f,
                              lr=s.g.sched.get_last_lr()[0])
                log.step(step, values, d.device)
                for v in running.values():
                    v.zero_()
            if d.main and args.sample_every and (step % args.sample_every == 0
                                                 or step == args.steps):
                save_grids(s, args, grid_z, grid_y)
            if args.fid_every and step % args.fid_every == 0:
                s.check.check(d, args.out, s.last_saved)
                ema = s.emas[common.ema_key(args.ema[0])]
                common.evaluate_fid(s, args, fid_eval, lambda z, y: generate(ema, z, y),
                                    f"EMA {args.ema[0]}, one step", log, save)
            if do_save:
                s.check.check(d, args.out, s.last_saved)
                save(s, args)
            if stop:
                d.close()
                raise control.stopped(step)
    d.close()


if __name__ == "__main__":
    common.cli(main, parse_args)
