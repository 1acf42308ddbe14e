"""Continuing a run of the authors' code (David-cripto/RealUID, train_distil.py) as ours.

Their checkpoint has our `gen`, `u`, `ema_gens` layout but no flags and a different step count;
its Adam states are read into our optimizers (distill.py --resume FILE --from-authors).
"""
import warnings

import checkpoints
import networks
from common import fail


def continue_authors(path, gen, fake, emas, gen_player, fake_player, *, lr, fake_steps,
                     gan):
    """Continue a checkpoint of the authors' train_distil.py ({gen, u, ema_gens, optim_gen,
    optim_u, sched, step}, no flags inside: they all come from the command line).

    Their fake model maximises -RealUM(f) with Adam(maximize=True), which steps along
    -grad(-RealUM) = grad RealUM: exactly the gradient our minimised fake_model_loss gives,
    with the same reduction (sum over pixels, mean over the batch). So their Adam moments are
    ours as they are, and only the `maximize` flag is turned off. Their step counter counts
    every update (a generator update when step % 6 == 5) and is saved after update `step`;
    ours counts generator updates. Both players run the learning rate of the command line
    (--lr), at their warm-up positions. RNG states, the data position and their fake model's
    scheduler (never saved: they restore it from the generator's) cannot be restored. The
    run then saves our own layout: a later --resume of it continues it as ours.

    gen, fake: the two networks (fake with its GAN head if `gan`); emas: {key: EMA network};
    the players hold their optimizers and schedulers. Returns (step, updates): where the run
    continues in our steps, and their update count.
    """
    ckpt = checkpoints.load_checkpoint(path, "resume checkpoint")
    checkpoints.require_kind(ckpt, "distilled", path)
    missing = [k for k in ("gen", "u", "ema_gens", "optim_gen", "optim_u", "sched", "step")
               if k not in ckpt]
    if missing:
        fail(f"{path} lacks {', '.join(missing)} of the authors' distillation layout; "
                    "to start from its generator use --init-from instead of --resume")
    for net, key in ((gen, "gen"), (fake, "u")):
        sd = checkpoints.clean_state_dict(ckpt[key])
        keep = {k: v for k, v in sd.items()
                if gan and net is fake or not k.startswith(networks.GAN_HEAD)}
        networks.load_state(net, keep)
    for k, m in emas.items():
        if k not in ckpt["ema_gens"]:
            fail(f"{path} tracks the EMAs {', '.join(ckpt['ema_gens'])}, not {k}: pass "
                        f"--ema {' '.join(ckpt['ema_gens'])}")
        networks.load_state(m, {n: v for n, v in checkpoints.clean_state_dict(
            ckpt["ema_gens"][k]).items() if not n.startswith(networks.GAN_HEAD)})
    load_authors_adam(gen_player.opt, ckpt["optim_gen"], len(gen_player.params), path)
    load_authors_adam(fake_player.opt, ckpt["optim_u"], len(fake_player.params), path)
    updates = int(ckpt["step"]) + 1  # they save after the update with index `step`
    step = updates // (fake_steps + 1)
    # Their generator's warm-up goes on where it was, at the lr of the command line: their
    # `sched` also holds their base lr, which would otherwise replace --lr.
    their_base = ckpt["sched"].get("base_lrs", [lr])[0]
    factor = gen_player.opt.param_groups[0]["lr"] / their_base if their_base else 1.0
    gen_player.sched.load_state_dict(ckpt["sched"])
    gen_player.sched.base_lrs = [lr]
    gen_player.sched._last_lr = [lr * factor]
    for group in gen_player.opt.param_groups:
        group["lr"], group["initial_lr"] = lr * factor, lr
    for group in fake_player.opt.param_groups:
        group["initial_lr"] = lr
    set_warmup_position(fake_player.sched, step * fake_steps)
    return step, updates


def load_authors_adam(opt, adam_state, n_params, path):
    """An Adam state of the authors' code into our optimizer of `n_params` parameters: their
    networks always carry the GAN head, registered last, so its entries (absent from our
    networks without GAN) are dropped; `maximize` is turned off (see continue_authors)
    and our kernel choice (foreach / fused) is kept."""
    if len(adam_state.get("param_groups", [])) != 1:
        fail(f"{path}: expected one Adam parameter group, found "
             f"{len(adam_state.get('param_groups', []))}")
    group = adam_state["param_groups"][0]
    if len(group["params"]) < n_params:
        fail(f"{path}: its optimizer has {len(group['params'])} parameters, the network "
             f"{n_params}; pass the network flags of the authors' run")
    ours = opt.state_dict()["param_groups"][0]
    kept = {k: ours[k] for k in ("foreach", "fused", "capturable", "differentiable")
            if k in ours}
    index = group["params"][:n_params]
    opt.load_state_dict({
        "state": {i: adam_state["state"][p] for i, p in enumerate(index)
                  if p in adam_state["state"]},
        "param_groups": [dict(group, **kept, params=list(range(n_params)), maximize=False)]})


def set_warmup_position(sched, updates):
    """Put a warm-up scheduler (players.warmup) at `updates` updates done."""
    sched.last_epoch = updates - 1
    with warnings.catch_warnings():  # "step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        sched.step()
