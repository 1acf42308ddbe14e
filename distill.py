"""RealUID: distill a flow-matching teacher into a one-step generator, with real data, no GAN.

Paper settings, CIFAR-10 (Kornilov et al., ICLR 2026; FIDs are the paper's, 50k samples,
best checkpoint, EMA 0.999; about 4.5 days on one 65 GB accelerator):

    python distill.py --teacher teacher_uncond.pt --alpha 0.94 --beta 0.96 --out runs/uncond  # 2.28
    python distill.py --teacher teacher_cond.pt   --alpha 0.98 --beta 0.96 --out runs/cond    # 2.02
    python distill.py --teacher teacher_uncond.pt --recipe uid --out runs/datafree  # 2.58
    python distill.py --teacher teacher_uncond.pt --recipe gan --out runs/gan       # 2.29
    python distill.py --teacher teacher_uncond.pt --alpha 0.94 --beta 0.96 --gamma 0.92   # General

(arXiv v1's numbers.) Other objectives of Appendix A and of its peers run on the same loop as
named recipes (recipes.py): --recipe sid, sid-real, dmd, dmd-real, normalized.

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
import startup  # noqa: F401  (first: Ctrl-C works while torch loads)
import argparse
import copy
import math
import os
import sys

import torch

import authors
import checkpoints
import common
import coupling
import image_data
import inception
import latents
import networks
import players
import recipes
import runs
import teachers
from flow import generate
from losses import (beta_delta_fake_loss, beta_delta_generator_loss, dmd_generator_loss,
                    edm_weight, fake_model_loss, gan_discriminator_loss, gan_generator_loss,
                    gan_levels, general_fake_model_loss, general_generator_loss, generator_loss,
                    noise_levels, normalized_fake_loss, normalized_generator_loss,
                    sid_generator_weight)


SCRIPT = "distill.py"  # named in resume hints


def build_parser():
    p = common.Parser(description=__doc__.split("\n\n")[0])
    r = p.add_argument_group("RealUID")
    r.add_argument("--recipe", choices=list(recipes.RECIPES), default="realuid",
                   help="a named set of the flags below (flags given explicitly override it; "
                        "saved resolved in the run): " + recipes.describe())
    r.add_argument("--objective", choices=["realuid", "normalized", "dmd"], default="realuid",
                   help="the pair of losses: RealUID's eqs. 17-18 (General RealUID and SiD "
                        "included), Normalized RealUID (Appendix A.4) or DMD's KL gradient "
                        "(Appendix A.5; its fake model minimises eq. 17 at alpha = beta)")
    r.add_argument("--teacher", required=True,
                   help="teacher checkpoint: ours (train_teacher.py) or the authors' file "
                        "(restored by --resume)")
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
    r.add_argument("--param-delta", choices=["f", "beta"], default="f",
                   help="the fake model's parameterisation: f itself, or delta = beta (v* - f) "
                        "(the ICLR version's Appendix A.2; the authors' parametrization='beta')")
    r.add_argument("--dmd-normalize", choices=["dmd2", "none"], default="dmd2",
                   help="--objective dmd: divide each sample's KL gradient by mean |x_g - D*| "
                        "(DMD2) or follow the exact gradient t^2/(1-t) (f - v*)")
    r.add_argument("--norm-eps", type=common.positive_float, default=1e-6,
                   help="--objective normalized: floor on |v* - f| in n = (v* - f)/|v* - f|")
    r.add_argument("--fake-steps", type=common.positive_int, default=5,
                   help="fake-model updates per generator update (the official 5 + 1 cycle)")
    r.add_argument("--gan-gen-coef", type=common.nonnegative_float, default=0.0,
                   help="GAN baseline (eqs. 7-9): generator loss weight (paper: 0.3 uncond; "
                        "0 off)")
    r.add_argument("--gan-disc-coef", type=common.nonnegative_float, default=0.0,
                   help="GAN baseline: discriminator loss weight (paper: 1.0, ratio 3; 0 off)")
    r.add_argument("--fake-init", choices=["random", "teacher", "init-from"], default=None,
                   help="fake model f starts from a fresh network (distillation), the teacher's "
                        "weights (fine-tuning, section 4.2; SiD) or --init-from's fake model "
                        "`u` (default: random for a flow-matching teacher, teacher for a "
                        "diffusion teacher)")
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
    sid = p.add_argument_group(
        "diffusion teachers (EDM pickles) and SiD (Appendix A.3); defaults: plain RealUID")
    sid.add_argument("--sigma-init", type=common.positive_float, default=None,
                     help="generator start: x = D_G(sigma_init z; sigma_init), i.e. one step "
                          "from t_g = 1 / (1 + sigma_init) (default: 2.5, SiD's, for a "
                          "diffusion teacher; none, i.e. x = z + G(0, z), for flow matching)")
    sid.add_argument("--gen-gamma", type=common.positive_float, default=None,
                     help="the generator's coefficient of |f - v*|^2 (General RealUID's gamma on "
                          "the generator side only; SiD's alpha = 1.2 is 2.4; default: gamma)")
    sid.add_argument("--fake-t", choices=["uniform", "edm"], default=None,
                     help="law of t in the fake-model update: uniform (on the teacher's range) or "
                          "EDM's ln sigma ~ N(-1.2, 1.2^2) (default: uniform for flow matching, "
                          "edm for a diffusion teacher, as SiD)")
    sid.add_argument("--gen-t", choices=["uniform", "sid"], default=None,
                     help="law of t in the generator update: uniform or SiD's (sigma on EDM's "
                          "rho = 7 grid, position uniform on [0, 0.8]) (default: uniform for "
                          "flow matching, sid for a diffusion teacher)")
    sid.add_argument("--fake-weight", choices=["none", "edm"], default=None,
                     help="per-sample weight of the fake-model loss: none or EDM's denoising "
                          "weight (sigma^2 + 0.25) / (0.5 sigma)^2 (1 - t)^2 (default: none for "
                          "flow matching, edm for a diffusion teacher, as SiD)")
    sid.add_argument("--gen-weight", choices=["none", "sid"], default=None,
                     help="per-sample weight of the generator loss: none or SiD's (1 - t)^2 / 2 "
                          "divided by mean |x_g - D*| (default: none for flow matching, sid for "
                          "a diffusion teacher)")
    sid.add_argument("--ema-halflife", type=common.positive_float, default=None,
                     help="one EMA of the generator with this half-life in millions of images "
                          "(SiD's and EDM's --ema; SiD 0.5) instead of the fixed --ema decays; "
                          "kept under the key of its decay after the ramp-up")
    sid.add_argument("--ema-rampup", type=common.positive_float, default=None,
                     help="with --ema-halflife: the half-life is at most this fraction of the "
                          "images seen so far (SiD 0.05; default: no ramp-up)")
    sid.add_argument("--nonfinite", choices=["stop", "sid"], default="stop",
                     help="a NaN/inf loss stops the run without saving (stop), or, as SiD does, "
                          "NaN gradient entries become 0 and inf ones +-1e5 and the run goes on")
    data = common.add_data_args(p, image_size_default=None)
    data.title = "data (--image-size defaults to the teacher's)"
    data.add_argument("--vae", default=None, metavar="FOLDER",
                      help="a latent teacher's VAE (EDM2 img512: a local diffusers "
                           "AutoencoderKL folder such as stabilityai/sd-vae-ft-mse): encodes the "
                           "real images (--alpha / --beta < 1, the GAN) and decodes grids and "
                           "in-training FID samples; a data-free run needs none (latents.py)")
    coupling.add_args(p, teacher=False)
    common.add_net_args(p).title = ("network of a teacher file without config (the authors' "
                                    "files); ours describe themselves")
    # 66,667 steps x 6 updates = the paper's 400k updates (the official script's default is
    # 800k updates, i.e. 133,333 steps).
    runs.add_run_args(p, steps=66_667, batch=256, lr=3e-5, warmup_steps=500,
                        ema=[0.999, 0.9996, 0.9999], log_every=100, sample_every=5000,
                        save_every=5000, precisions=common.PRECISIONS, precision="auto")
    runs.add_fid_args(p)
    return p


INIT_HINT = "--init-from {path} --init-ema none --fake-init init-from"


def parse_args(argv=None, parser=None, script=SCRIPT):
    """The flags, with the recipe's values for those not on the command line (a resumed run
    keeps its own resolved flags instead; the authors' files carry none, so theirs get it).
    finetune.py passes its own parser (other defaults) and name."""
    parser = parser or build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = runs.parse_run_args(parser, argv, script, INIT_HINT, "distilled")
    if args.resume is None or args.from_authors:
        given = common.given_flags(parser, argv)
        vars(args).update(recipes.recipe_settings(args.recipe, given))
        if args.ema_halflife is not None:  # one EMA, keyed by its decay after the ramp-up
            if "ema" in given:
                common.fail("--ema-halflife replaces --ema's fixed decays: pass one of them")
            args.ema = [round(players.halflife_decay(math.inf, args.batch_size,
                                                     args.ema_halflife, None), 6)]
    return args


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


def check_objective(args):
    """The objective's flags, once the recipe and the teacher's kind have resolved them."""
    if args.objective == "dmd" and args.alpha != args.beta:
        common.fail(f"--objective dmd needs alpha = beta (got {args.alpha}, {args.beta}): DMD's "
                    "KL loss is linear in p_g, so a separate beta only relabels alpha, and "
                    "with alpha != beta the generator collapses (Appendix A.5)")
    special = [f for f, on in (("--objective " + args.objective, args.objective != "realuid"),
                               ("--param-delta beta", args.param_delta == "beta")) if on]
    if len(special) > 1:
        common.fail(f"{' and '.join(special)} are two different objectives: pass one")
    if special:
        others = [f for f, on in (("--gamma", args.gamma not in (None, args.alpha)),
                                  ("--gen-gamma", args.gen_gamma is not None),
                                  ("--gen-weight sid", args.gen_weight == "sid"),
                                  ("--fake-weight edm", args.fake_weight == "edm"
                                   and args.objective != "dmd")) if on]
        if others:
            common.fail(f"{special[0]} has no {', '.join(others)} (General RealUID's and SiD's "
                        f"terms): drop {'it' if len(others) == 1 else 'them'} or pass "
                        f"--gen-weight none / --fake-weight none")


def setup(args, proc):
    """Everything a run needs, as one namespace `state`: networks, players, data, noise, flags.

    Initialisation: teacher v* frozen; generator G from the teacher's weights (or from a
    distilled generator with --init-from); fake model f a fresh network (or the teacher's
    weights with --fake-init teacher); EMAs equal to G. A --resume checkpoint then overrides
    all state (weights, optimizers, schedules, RNG, data position); `state.run` knows where the
    run stands (step, elapsed time, best in-training FID).
    """
    device = proc.device
    args.precision = common.resolve_precision(args.precision, device)  # saved resolved
    common.configure_backends(device, args.precision, args.deterministic)
    state = argparse.Namespace(proc=proc, device=device, alpha=args.alpha, beta=args.beta)
    state.gamma = args.alpha if args.gamma is None else args.gamma
    state.general = args.gamma is not None and args.gamma != args.alpha
    state.gen_gamma = state.gamma if args.gen_gamma is None else args.gen_gamma
    state.gan = args.gan_gen_coef > 0 or args.gan_disc_coef > 0
    state.uses_real = (state.alpha, state.beta, state.gamma) != (1, 1, 1) or state.gan

    fallback = common.net_config_from_args(
        argparse.Namespace(**{**vars(args), "image_size": args.image_size or 32}))
    state.teacher = teachers.load_teacher(
        args.teacher, "raw" if args.teacher_ema is None else args.teacher_ema, device, fallback)
    state.teacher_fingerprint = checkpoints.fingerprint(state.teacher.state_dict())
    state.diffusion = networks.is_diffusion(state.teacher)
    # The students' network: the teacher's architecture, with the students' dropout.
    state.cfg = cfg = networks.student_config(state.teacher, args.dropout)
    state.num_classes = networks.num_classes(state.teacher)
    state.cond = state.num_classes is not None
    if args.cond and not state.cond:
        common.fail(f"--cond given but the teacher {args.teacher} is unconditional")
    state.coupling = coupling.for_student(state.teacher.coupling, args.task, None, args.teacher)
    if state.coupling and args.fid_every:
        common.fail("--fid-every scores noise-to-image models; score an image-to-image "
                    "generator with `python eval_pairs.py` instead")
    # Where the teacher is defined (a denoiser: sigma in [sigma_min, sigma_max]), and where the
    # generator starts: x = z + G(0, z) for flow matching, SiD's sigma_init for a denoiser.
    state.t_range = networks.t_range(state.teacher)
    ickpt = None
    if args.init_from:  # its generator keeps the start it was trained with (its t_g)
        ickpt = checkpoints.load_checkpoint(args.init_from, "--init-from checkpoint")
        checkpoints.require_kind(ickpt, "distilled", args.init_from)
        init_t_g = float(ickpt.get("config", {}).get("t_g", 0.0))
        if args.sigma_init is None and init_t_g > 0:
            args.sigma_init = (1 - init_t_g) / init_t_g
    # The flags the recipe and the command line left open, from the teacher's kind (recipes.py
    # says why a diffusion teacher changes them); saved resolved with the run.
    vars(args).update(recipes.teacher_settings(vars(args), state.diffusion))
    check_objective(args)
    state.t_g = 0.0 if args.sigma_init is None else 1 / (1 + args.sigma_init)
    if ickpt is not None:
        if abs(state.t_g - init_t_g) > 1e-9:
            common.fail(f"--init-from {args.init_from} was trained to start at t_g = "
                        f"{init_t_g:.6g}, this run at {state.t_g:.6g} (--sigma-init "
                        f"{args.sigma_init}); drop --sigma-init to keep the checkpoint's start")
        state.t_g = init_t_g
    if args.fake_init == "init-from" and not args.init_from:
        common.fail("--fake-init init-from needs --init-from, the distilled checkpoint whose "
                    "fake model to start from")
    t_sd = state.teacher.state_dict()
    gen_sd, fake_sd = t_sd, None
    if ickpt is not None:
        gen_sd = checkpoints.pick_weights(ickpt, args.init_ema, args.init_from)
        if args.fake_init == "init-from":
            fake_sd = checkpoints.clean_state_dict(ickpt["u"])
    if args.fake_init == "teacher":
        fake_sd = t_sd
    players.seed_init(args.seed)
    state.gen = networks.build_network(cfg, gen_sd, what="generator weights").to(device)
    state.fake = networks.build_network(cfg, fake_sd, gan_head=state.gan,
                                what="fake-model weights").to(device)
    for net in (state.gen, state.fake):  # EDM2's uncertainty head is no part of the field
        networks.freeze_unused(net)
    for net in (state.teacher, state.gen, state.fake):  # an fp16 pickle: float16 only if asked
        if isinstance(net, networks.DenoiserField):
            net.set_fp16(args.precision == "fp16")
    state.emas = {checkpoints.ema_key(decay): copy.deepcopy(state.gen).requires_grad_(False).eval()
                  for decay in args.ema}
    players.seed_dropout(args.seed, proc.rank)
    state.shape = networks.image_shape(state.teacher)

    # Real data: the targets when alpha, beta < 1 (or the GAN); a coupling always reads its
    # sources, and with alpha = beta = 1 never uses the targets (IBMD's data-free setting).
    # A latent teacher (EDM2 img512) reads images and encodes them with --vae (latents.py).
    state.latents = networks.latent_settings(state.teacher)
    state.codec = latents.open_codec(state.latents, args.vae, state.shape, device,
                                     f"the teacher {args.teacher}")
    if state.latents and state.codec is None and (state.uses_real or args.fid_every):
        latents.needs_vae(state.latents, "real data (--alpha, --beta < 1, the GAN)"
                          if state.uses_real else "--fid-every")
    data, state.reads_data = None, state.uses_real or state.coupling is not None
    if state.reads_data:
        data_cfg = networks.data_config(state.teacher)
        if state.codec:  # images of the VAE's size, encoded when drawn
            data_cfg = dict(data_cfg, in_channels=state.codec.pixel_shape[0],
                            image_size=state.codec.pixel_shape[1])
        data = image_data.open_data(args.data, args.data_root, data_cfg["image_size"])
        image_data.check_data(data, data_cfg, state.cond, what=f"the teacher {args.teacher}")
        coupling.for_student(state.coupling, args.task, data, args.teacher)
    elif args.data != "cifar10" and proc.main:
        print(f"note: --data {args.data} is not read: alpha = beta = 1 is data-free")
    state.data_desc = runs.describe_data(data)
    if state.codec and data is not None:  # a resumed run must encode with the same VAE
        state.data_desc["vae"] = checkpoints.fingerprint(state.codec.vae.state_dict())
    state.grid_pairs = coupling.fixed_pairs(data, state.coupling, 16, device) \
        if state.coupling else None

    if args.channels_last:
        for net in (state.teacher, state.gen, state.fake, *state.emas.values()):
            net.to(memory_format=torch.channels_last)
    # Each player as the other one sees it: on the same weights, frozen, in eval mode.
    state.gen_frozen = players.frozen_alias(state.gen)
    state.fake_frozen = players.frozen_alias(state.fake)
    # Adam with betas (0, 0.999) for both players, linear warm-up per optimizer (Appendix D).
    compile_mode = args.compile_mode if args.compile else None
    state.gen_player, state.fake_player = (
        players.Player(net, args.lr, (0.0, 0.999), args.warmup, proc, compile_mode,
                       fp16=args.precision == "fp16", after_step=networks.forced_weight_norm(net))
        for net in (state.gen, state.fake))
    state.noise = players.noise_generator(device, args.seed)

    state.run = runs.Run(SCRIPT, proc, args.out, args.steps, runs.Intervals.of(args))
    consumed = 0
    if args.resume and args.from_authors:
        step, updates = authors.continue_authors(
            args.resume, state.gen, state.fake, state.emas, state.gen_player, state.fake_player,
            lr=args.lr, fake_steps=args.fake_steps, gan=state.gan)
        state.run.resumed_at(step, 0.0, math.inf, saved=False)
        runs.check_resume_step(args.resume, step, args.steps)
        if proc.main:
            print(f"continuing the authors' checkpoint {args.resume}: weights, EMAs and both "
                  f"Adam states restored (fake model: maximize=True turned into our "
                  f"minimisation, moments kept); their {updates} updates = step {step} here "
                  f"({args.fake_steps} fake-model + 1 generator updates per step); lr {args.lr} "
                  f"for both players; not restored: RNG states and data position (fresh from "
                  f"--seed {args.seed}), the fake model's warm-up position (their sched_u, "
                  f"never saved; rebuilt from the step)")
            if args.alpha == 1 and args.beta != 1:
                print("note: their losses.py drops the real-data term when alpha = 1; "
                      "eq. (17), which this code follows, keeps its linear part")
    elif args.resume:
        consumed = restore(state, args)

    state.batches = players.Batches(data, args.batch_size, args.seed, proc, args.workers,
                                 consumed) if state.reads_data else None
    state.micro = proc.split(args.batch_size, args.grad_accum)
    state.amp = common.precision_context(device, args.precision)
    state.gen.train(), state.fake.train()
    return state


def restore(state, args):
    """State of one of our checkpoints (--resume): weights, optimizers, schedules, scalers,
    RNG, where the run stands; returns the number of data batches consumed."""
    path = args.resume
    ckpt = checkpoints.load_checkpoint(path, "resume checkpoint")
    checkpoints.require_kind(ckpt, "distilled", path)
    saved = ckpt.get("config", {})
    if not networks.same_net(saved.get("net"), state.cfg) or saved.get("gan_head") != state.gan \
            or saved.get("coupling") != state.coupling:
        common.fail(f"{path} was made with another teacher network or GAN setting; resume "
                    "with the original --teacher and GAN flags")
    runs.check_same_inputs(saved, state.teacher_fingerprint, state.data_desc, path)
    networks.load_state(state.gen, ckpt["gen"])
    networks.load_state(state.fake, ckpt["u"])
    for k, m in state.emas.items():
        if k not in ckpt["ema_gens"]:
            common.fail(f"{path} tracks the EMAs {', '.join(ckpt['ema_gens'])}, not {k}")
        networks.load_state(m, ckpt["ema_gens"][k])
    gen_player, fake_player = state.gen_player, state.fake_player
    gen_player.opt.load_state_dict(ckpt["optim_gen"])
    fake_player.opt.load_state_dict(ckpt["optim_u"])
    gen_player.sched.load_state_dict(ckpt["sched"])
    fake_player.sched.load_state_dict(ckpt["sched_u"])
    gen_player.scaler.load_state_dict(ckpt.get("scaler_gen", {}))
    fake_player.scaler.load_state_dict(ckpt.get("scaler_u", {}))
    players.set_rng_state(ckpt["rng"], state.noise, state.proc, path)
    state.run.resumed_at(ckpt["step"], ckpt.get("elapsed_s", 0.0),
                         ckpt.get("best_fid", math.inf))
    runs.check_resume_step(path, ckpt["step"], args.steps)
    if state.proc.main:
        print(f"resumed {path} at step {ckpt['step']}")
    return ckpt["data_batches"]


def draw(state, args, law="uniform", targets=True):
    """Fresh noise for the global batch (one shared generator; this process takes its rows)
    and this process's slice of a fresh real batch (randomly flipped).

    For a coupling the batch also holds the sources s; the generator's start z = kappa s +
    sigma eps_g and the interpolations' shared x0 = kappa s + sigma eps0 use independent
    noise (coupling.py explains why), and with alpha = beta = 1 the targets stay unread.
    `law` is the law of t (losses.noise_levels). targets=False: the update reads no x_d (the
    generator's), so a latent teacher's batch is not encoded; the data and the noise are drawn
    all the same, so that the streams do not depend on it."""
    B, device, rng = args.batch_size, state.device, state.noise
    z = players.randn(rng, (B, *state.shape), device)
    x0 = players.randn(rng, (B, *state.shape), device)
    r = (players.randn if law == "edm" else players.rand)(rng, (B,), device)  # t's randomness
    noise = {"z": z, "x0": x0, "t": noise_levels(law, r, state.t_range)}
    if state.gan:
        # inside the teacher's range of t (a denoiser's ends at t_max < 1)
        noise["t_gan"] = gan_levels(players.rand(rng, (B,), device)).clamp(*state.t_range)
    if state.reads_data:
        noise["flip"] = players.rand(rng, (B,), device) < 0.5
        if state.codec:  # the VAE posterior's noise (latents.LatentCodec.encode)
            noise["vae_eps"] = players.randn(rng, (B, *state.shape), device)
    elif state.cond:  # data-free and conditional: labels uniform over the classes
        noise["y"] = players.randint(rng, state.num_classes, (B,), device)
    if state.coupling and state.coupling["task"] == "denoise":
        noise["task"] = players.randn(rng, (B, *state.shape), device)
    batch = players.rank_slice(noise, state.proc)
    batch.setdefault("y", None)
    batch["x_d"], batch["s"] = None, None
    if state.reads_data:
        x_u8, y, src_u8 = state.batches.next()
        flip = batch.pop("flip")
        if state.codec:  # flipped as pixels, then encoded (EDM2's latents)
            eps = batch.pop("vae_eps")
            x1 = state.codec.encode(common.flip(x_u8, flip), eps) if targets else None
        else:
            x1 = common.flip(common.from_uint8(x_u8), flip)
        batch["y"] = y if state.cond else None
        if state.uses_real and targets:
            batch["x_d"] = x1
        if state.coupling:
            c = state.coupling
            batch["s"] = coupling.make_source(c, x1, src_u8, flip, batch.pop("task", None))
            batch["z"] = coupling.start(batch["s"], batch["z"], c["kappa"], c["sigma"])
            batch["x0"] = coupling.start(batch["s"], batch["x0"], c["kappa"], c["sigma"])
    return batch


# ---------------------------------------------------------------------------------------------
# The two updates. Each is written out: for each micro-batch (gradient accumulation; all of the
# batch by default) the loss and its backward pass, then gradient clipping and the optimizer
# step. `player.forward` is the network being trained (inside DDP with several processes);
# the other player is seen frozen, in eval mode. Returned: the loss terms (for the log) and the
# pre-clip gradient norm, on the device.

def fake_update(state, args, batch):
    """One update of the fake model f: the inner max_f of eq. (18), i.e. minimise RealUM(f) of
    eq. (17) (General RealUID: Appendix A.2; DMD's fake model is eq. 17 at alpha = beta), or its
    counterpart of --objective normalized (A.4) / --param-delta beta, plus the GAN
    discriminator loss if asked."""
    player, mb_terms, terms = state.fake_player, {}, {}
    for mb, n, ddp_sync in player.micro_batches(batch, state.micro):
        z, x_d, x0, t, y, s = mb["z"], mb["x_d"], mb["x0"], mb["t"], mb["y"], mb["s"]
        with ddp_sync:
            with state.amp:
                with torch.no_grad():
                    x_g = generate(state.gen_frozen, z, y, s, state.t_g)  # no graph
                weight = edm_weight(t) if args.fake_weight == "edm" else None
                if args.objective == "normalized":  # Appendix A.4
                    loss = normalized_fake_loss(state.teacher, player.forward, x_g, x_d, x0, t,
                                                y, s, alpha=state.alpha, beta=state.beta,
                                                eps=args.norm_eps)
                elif args.param_delta == "beta":  # delta = beta (v* - f), ICLR A.2
                    loss = beta_delta_fake_loss(state.teacher, player.forward, x_g, x_d, x0, t,
                                                y, s, alpha=state.alpha, beta=state.beta)
                elif state.general:  # Appendix A.2
                    loss = general_fake_model_loss(state.teacher, player.forward, x_g, x_d, x0,
                                                   t, y, s, alpha=state.alpha, beta=state.beta,
                                                   gamma=state.gamma, weight=weight)
                else:  # eq. (17); DMD's fake model too (alpha = beta)
                    loss = fake_model_loss(player.forward, x_g, x_d, x0, t, y, s,
                                           alpha=state.alpha, beta=state.beta, weight=weight)
                mb_terms["loss_fake"] = loss
                if state.gan:  # eqs. (7)-(9): the discriminator head on f's encoder
                    gan = gan_discriminator_loss(state.fake.forward_head, x_g, x_d, x0,
                                                 mb["t_gan"], y, s)
                    mb_terms["loss_gan_disc"] = gan
                    loss = loss + args.gan_disc_coef * gan
            player.backward(loss / n)
        players.add_terms(terms, mb_terms, n)
    if args.nonfinite == "sid":
        player.nan_to_num_grads()
    norm = player.clip(args.grad_clip)
    player.step()
    if args.nonfinite == "stop":
        state.run.check.add("fake-model loss", sum(terms.values()), state.run.step)
    return terms, norm


def generator_update(state, args, batch):
    """One update of the generator G: the outer min_G of eq. (18) on its own batch (the
    real-data terms do not depend on G; SiD's and General RealUID's generator side, Normalized
    RealUID's, DMD's KL gradient or the beta parameterisation's as the flags say), plus the
    non-saturating GAN loss if asked; then the
    EMAs of G. Teacher and fake model are frozen; under --precision mixed both run in float32
    (their difference is the gradient: see common.full_precision)."""
    player, mb_terms, terms = state.gen_player, {}, {}
    teacher, fake = state.teacher, state.fake_frozen
    disc = state.fake_frozen.forward_head if state.gan else None  # the GAN discriminator
    if args.precision == "mixed":
        teacher, fake, disc = (common.full_precision(m) if m is not None else None
                               for m in (teacher, fake, disc))
    for mb, n, ddp_sync in player.micro_batches(batch, state.micro):
        z, x0, t, y, s = mb["z"], mb["x0"], mb["t"], mb["y"], mb["s"]
        with ddp_sync:
            with state.amp:
                x_g = generate(player.forward, z, y, s, state.t_g)  # with its graph
                sid = args.gen_weight == "sid"  # (1 - t)^2 / 2 / mean |x_g - D*|: SiD's
                if args.objective == "normalized":  # Appendix A.4
                    loss = normalized_generator_loss(teacher, fake, x_g, x0, t, y, s,
                                                     alpha=state.alpha, beta=state.beta,
                                                     eps=args.norm_eps)
                elif args.objective == "dmd":  # DMD / DMD2; with real data Appendix A.5
                    loss = dmd_generator_loss(teacher, fake, x_g, x0, t, y, s, alpha=state.alpha,
                                              normalize=args.dmd_normalize == "dmd2")
                elif args.param_delta == "beta":
                    loss = beta_delta_generator_loss(teacher, fake, x_g, x0, t, y, s,
                                                     alpha=state.alpha, beta=state.beta)
                elif state.gen_gamma != state.alpha or sid:  # General RealUID's generator side
                    loss = general_generator_loss(teacher, fake, x_g, x0, t, y, s,
                                                  alpha=state.alpha, beta=state.beta,
                                                  gamma=state.gen_gamma,
                                                  weight=sid_generator_weight(t) if sid else None,
                                                  normalize=sid)
                else:
                    loss = generator_loss(teacher, fake, x_g, x0, t, y, s,
                                          alpha=state.alpha, beta=state.beta)
                mb_terms["loss_gen"] = loss
                if state.gan:
                    gan = gan_generator_loss(disc, x_g, x0, mb["t_gan"], y, s)
                    mb_terms["loss_gan_gen"] = gan
                    loss = loss + args.gan_gen_coef * gan
            player.backward(loss / n)
        players.add_terms(terms, mb_terms, n)
    if args.nonfinite == "sid":
        player.nan_to_num_grads()
    norm = player.clip(args.grad_clip)
    player.step()
    if args.nonfinite == "stop":
        state.run.check.add("generator loss", sum(terms.values()), state.run.step)
    for key in args.ema:
        decay = key if args.ema_halflife is None else players.halflife_decay(
            (state.run.step - 1) * args.batch_size, args.batch_size, args.ema_halflife,
            args.ema_rampup)  # SiD's EMA: its decay grows with the images seen
        players.ema_update(state.emas[checkpoints.ema_key(key)], state.gen, decay)
    return terms, norm


def save(state, args, name="latest.pt"):
    """<out>/latest.pt (or best.pt), written atomically, in the authors' layout plus our config
    and resume state."""
    run, gen_player, fake_player = state.run, state.gen_player, state.fake_player
    ckpt = {"gen": state.gen.state_dict(), "u": state.fake.state_dict(),
            "ema_gens": {k: m.state_dict() for k, m in state.emas.items()},
            "optim_gen": gen_player.opt.state_dict(), "optim_u": fake_player.opt.state_dict(),
            "sched": gen_player.sched.state_dict(), "sched_u": fake_player.sched.state_dict(),
            "step": run.step,
            "config": {"kind": "distilled", "net": state.cfg, "gan_head": state.gan,
                       "coupling": state.coupling, "t_g": state.t_g,
                       "step_unit": f"{args.fake_steps} fake-model updates + 1 generator update",
                       "teacher_fingerprint": state.teacher_fingerprint,
                       "data": state.data_desc, "args": common.json_safe(vars(args))},
            "scaler_gen": gen_player.scaler.state_dict(),
            "scaler_u": fake_player.scaler.state_dict(),
            "rng": players.rng_state(state.noise, state.proc),
            "data_batches": state.batches.consumed if state.batches else 0,
            "best_fid": run.best_fid, "elapsed_s": run.log.elapsed()}
    if state.proc.main:
        runs.save_run_checkpoint(ckpt, args.out, name, run.step, args.snapshot_every)


@torch.no_grad()
def save_grids(state, args, z, y):
    """Grids of the raw and the first EMA generator from a fixed latent batch; for a coupling,
    rows source | output | target of 16 fixed data pairs."""
    os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
    if state.coupling:
        src, x1, labels = state.grid_pairs
        c, n = state.coupling, len(src)
        z, y = coupling.start(src, z[:n], c["kappa"], c["sigma"]), labels if state.cond else None
    ema = state.emas[checkpoints.ema_key(args.ema[0])]
    if state.latents and state.codec is None:
        return  # latents are not images: grids need --vae
    for name, net in (("gen", state.gen_frozen), (f"ema{args.ema[0]}", ema)):
        path = os.path.join(args.out, "samples", f"{state.run.step:07d}_{name}.png")
        if state.coupling:
            common.save_grid(torch.cat([src, generate(net, z, y, src, state.t_g), x1]), path,
                             nrow=n)
        else:
            common.save_grid(images(state, generate(net, z, y, t_g=state.t_g)), path)


def images(state, x):
    """The generator's outputs as images in [-1, 1]: themselves, or a latent teacher's decoded."""
    return state.codec.decode_signed(x) if state.codec else x


def main(args):
    check_args(args)
    proc = players.Process(args.device)
    state = setup(args, proc)
    fid_eval = inception.InTrainingFID(args.fid_ref, args.fid_weights, args.fid_mode, proc.device,
                                 state.shape, state.num_classes, args.fid_n,
                                 args.fid_batch) if args.fid_every and proc.main else None
    runs.start_run(args.out, vars(args), proc, fresh=not args.resume)
    if proc.main:
        mode = "data-free UID" if not state.uses_real else \
            f"RealUID alpha={state.alpha} beta={state.beta}" + (
                f" gamma={state.gamma} (General)" if state.general else "")
        pairs = "" if not state.coupling else (
            f", image-to-image {state.coupling['task'] or 'pairs file'} on the "
            f"{state.coupling['path']} path")
        print(f"{mode}{' + GAN' if state.gan else ''}; teacher {args.teacher} "
              f"({'cond' if state.cond else 'uncond'} {'x'.join(map(str, state.shape))}{pairs});"
              f" device {proc.device}, {proc.world} process(es), {args.precision}")
        if state.latents and state.codec is None and args.sample_every:
            print("note: no sample grids: the teacher works on VAE latents; pass --vae to see "
                  "them as images")
    grid_z, grid_y = players.grid_latents(state.shape, state.num_classes, proc.device)
    run = state.run
    if proc.main and args.sample_every and run.step == 0:
        save_grids(state, args, grid_z, grid_y)  # the starting point z + v*(0, z), to compare
    ema = state.emas[checkpoints.ema_key(args.ema[0])]
    in_training_fid = (fid_eval, lambda z, y: images(state, generate(ema, z, y, t_g=state.t_g)),
                       f"EMA {args.ema[0]}, one step")
    keys = ["loss_fake", "loss_gen"] + (["loss_gan_disc", "loss_gan_gen"] if state.gan else [])
    running = {k: torch.zeros((), device=proc.device) for k in keys}

    # The RealUID loop (Appendix D, the official schedule): per step, --fake-steps (5) updates
    # of f on the inner max of eq. (18), then 1 update of G on the outer min; each update
    # draws fresh z, x0, t and a fresh real batch.
    with run:
        while run.step < args.steps:
            run.step += 1
            for _ in range(args.fake_steps):
                terms, norm_fake = fake_update(state, args, draw(state, args, args.fake_t))
                for k, v in terms.items():
                    running[k] += v / args.fake_steps
            batch = draw(state, args, args.gen_t, targets=False)  # G's loss reads no x_d
            terms, norm_gen = generator_update(state, args, batch)
            for k, v in terms.items():
                running[k] += v
            run.end_step(running, {"grad_norm_gen": norm_gen, "grad_norm_fake": norm_fake,
                                   "lr": state.gen_player.sched.get_last_lr()[0]},
                         grids=lambda: save_grids(state, args, grid_z, grid_y),
                         save=lambda name: save(state, args, name), fid=in_training_fid)
    proc.close()


if __name__ == "__main__":
    common.cli(main, parse_args)
