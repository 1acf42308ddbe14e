"""Our distillation update beside the authors' training loop, on the same machine, networks
and batch.

    python benchmarks/bench_authors_loop.py --device cpu --batch-size 8 --threads 1

The authors' loop (David-cripto/RealUID, train_distil.py) is rebuilt here from its structure,
on the same weights. Its networks are torchcfm 1.0.7's UNetModelWrapper, as in the authors' code,
when torchcfm is importable (`pip install --no-deps torchcfm==1.0.7`, not a dependency; the state
dicts are identical), else our U-Net (`--authors-net ours`: then only the loop differs).
Per update it
- calls gc.collect() and, on CUDA, runs with cudnn.deterministic=True, benchmark=False;
- fake update: builds the generator's graph and detaches its output, runs the fake model on
  the generated and the real batch in two forward passes, Adam(maximize=True) on -RealUM;
- generator update: the fake model's parameters keep requires_grad, so backward computes their
  gradients (thrown away by the next zero_grad);
- torch.optim.Adam with its default implementation choice (per-tensor loop on CPU) and an EMA
  that walks the state dict key by key, for three decays.
Ours is distill.fake_update / distill.generator_update as distill.py runs them.

Reports the mean update time over 5 + 1 cycles for both, and checks that both compute the same
gradients from the same weights and batch (the authors' fake gradient is minus ours: they
maximise -RealUM). Writes JSON to --out.
"""
import copy
import gc
import json
import os
import statistics
import sys
import time

import importlib.util
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import distill  # noqa: E402
import flow  # noqa: E402
import losses  # noqa: E402
import players  # noqa: E402
from benchmarks import measure  # noqa: E402


def authors_fake_objective(u, t, x0, x_g, x_d, y, alpha, beta):
    """-RealUM(u) in the authors' form: squared distances to rescaled targets, two forwards."""
    t_ = t.view(-1, 1, 1, 1)
    u_g = u(t, t_ * x_g + (1 - t_) * x0, y)
    u_d = u(t, t_ * x_d + (1 - t_) * x0, y)
    loss = -alpha * ((u_g - beta / alpha * (x_g - x0)) ** 2).sum()
    loss = loss - (1 - alpha) * ((u_d - (1 - beta) / (1 - alpha) * (x_d - x0)) ** 2).sum()
    return loss / len(x0)


def authors_generator_loss(u, teacher, t, x0, x_g, y, alpha, beta):
    t_ = t.view(-1, 1, 1, 1)
    xt, target = t_ * x_g + (1 - t_) * x0, beta / alpha * (x_g - x0)
    loss = (alpha * ((teacher(t, xt, y) - target) ** 2).sum()
            - alpha * ((u(t, xt, y) - target) ** 2).sum())
    return loss / len(x0)


def state_dict_ema(source, target, decay):
    src, dst = source.state_dict(), target.state_dict()
    for k in src:
        dst[k].data.copy_(dst[k].data * decay + src[k].data * (1 - decay))


def torchcfm_copy(net):
    """The same weights in torchcfm's UNetModelWrapper (the authors' network class)."""
    if "ot" not in sys.modules and importlib.util.find_spec("ot") is None:  # torchcfm imports POT
        sys.modules.setdefault("ot", types.ModuleType("ot"))
    from torchcfm.models.unet.unet import UNetModelWrapper
    c = net.config
    ref = UNetModelWrapper(
        dim=(c["in_channels"], c["image_size"], c["image_size"]), num_channels=c["num_channels"],
        num_res_blocks=c["num_res_blocks"], channel_mult=list(c["channel_mult"]),
        attention_resolutions=",".join(str(r) for r in c["attention_resolutions"]),
        num_heads=c["num_heads"], num_head_channels=c["num_head_channels"], dropout=c["dropout"],
        class_cond=c["num_classes"] is not None, num_classes=c["num_classes"] or 1000)
    ref.load_state_dict(net.state_dict(), strict=True)
    p = next(net.parameters())
    return ref.to(p.device).train(net.training).requires_grad_(p.requires_grad)


class AuthorsLoop:
    """The authors' per-update work on copies of our run's networks (same weights)."""

    def __init__(self, s, args, net="ours"):
        self.args, self.device = args, s.device
        clone = torchcfm_copy if net == "torchcfm" else copy.deepcopy
        self.teacher = clone(s.teacher)
        self.gen, self.u = clone(s.gen), clone(s.fake)
        self.emas = [copy.deepcopy(self.gen).requires_grad_(False) for _ in args.ema]
        self.opt_g = torch.optim.Adam(self.gen.parameters(), betas=(0.0, 0.999), lr=args.lr)
        self.opt_u = torch.optim.Adam(self.u.parameters(), betas=(0.0, 0.999), lr=args.lr,
                                      maximize=True)
        B, shape = args.batch_size, s.shape
        g = torch.Generator().manual_seed(0)
        self.data = torch.rand(4 * B, *shape, generator=g).mul(2).sub(1).to(s.device)
        self.B, self.shape = B, shape

    def batch(self):
        i = torch.randint(len(self.data), (self.B,), device=self.device)
        x_d = self.data[i]
        return x_d, torch.randn_like(x_d), torch.rand(self.B, device=self.device), \
            torch.randn_like(x_d)

    def fake_update(self):
        gc.collect()
        x_d, x0, t, z = self.batch()
        self.gen.eval()
        self.opt_u.zero_grad()
        x_g = flow.generate(self.gen, z).detach()  # graph built, then dropped
        loss = authors_fake_objective(self.u, t, x0, x_g, x_d, None, self.args.alpha,
                                      self.args.beta)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.u.parameters(), self.args.grad_clip)
        self.opt_u.step()
        self.gen.train()

    def generator_update(self):
        gc.collect()
        _, x0, t, z = self.batch()
        self.u.eval()
        self.opt_g.zero_grad()
        x_g = flow.generate(self.gen, z)
        loss = authors_generator_loss(self.u, self.teacher, t, x0, x_g, None, self.args.alpha,
                                      self.args.beta)
        loss.backward()  # also fills u's parameter gradients
        torch.nn.utils.clip_grad_norm_(self.gen.parameters(), self.args.grad_clip)
        self.opt_g.step()
        self.u.train()
        for ema, decay in zip(self.emas, self.args.ema):
            state_dict_ema(self.gen, ema, decay)


def gradients_agree(s, args):
    """Max relative difference of our and the authors' gradients on one batch, same weights."""
    batch = distill.draw(s, args)
    z, x0, t, x_d = batch["z"], batch["x0"], batch["t"], batch["x_d"]
    with torch.no_grad():
        x_g = flow.generate(s.gen, z)

    def grads(net, loss):
        net.zero_grad(set_to_none=True)
        loss.backward()
        out = torch.cat([p.grad.flatten() for p in net.parameters()])
        net.zero_grad(set_to_none=True)
        return out

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    ours_f = grads(s.fake, losses.fake_model_loss(s.fake, x_g, x_d, x0, t, alpha=args.alpha,
                                                   beta=args.beta))
    theirs_f = grads(s.fake, authors_fake_objective(s.fake, t, x0, x_g, x_d, None, args.alpha,
                                                    args.beta))
    s.fake.requires_grad_(False)
    ours_g = grads(s.gen, losses.generator_loss(s.teacher, s.fake, flow.generate(s.gen, z),
                                                 x0, t, alpha=args.alpha, beta=args.beta))
    theirs_g = grads(s.gen, authors_generator_loss(s.fake, s.teacher, t, x0,
                                                   flow.generate(s.gen, z), None, args.alpha,
                                                   args.beta))
    s.fake.requires_grad_(True)
    return {"fake_model": rel(-theirs_f, ours_f), "generator": rel(theirs_g, ours_g)}


def parse_args(argv=None):
    p = common.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda, npu, mps or cpu (default: the best)")
    p.add_argument("--batch-size", type=int, default=8, help="batch B of one update")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--cycles", type=int, default=3,
                   help="timed 5 + 1 cycles per loop (after one warm-up cycle each)")
    p.add_argument("--authors-net", choices=["auto", "torchcfm", "ours"], default="auto",
                   help="network class of the authors' loop: torchcfm's UNetModelWrapper (as in "
                        "their code; auto = when importable) or our U-Net")
    p.add_argument("--out", default="benchmarks/results/bench_authors_loop.json",
                   help="JSON output")
    return p.parse_args(argv)


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp, teacher_path, data_path = measure.scratch_files(args.batch_size, cond=False)
    flags = ["--teacher", teacher_path, "--data", data_path, "--out", tmp, "--alpha", 0.94,
             "--beta", 0.96, "--batch-size", args.batch_size, "--warmup", 0, "--workers", 0]
    dargs = distill.parse_args([str(a) for a in flags + (["--device", args.device]
                                                          if args.device else [])])
    s = distill.setup(dargs, players.Process(dargs.device))
    with torch.no_grad():  # a fresh fake model outputs zeros (zero-initialised last layers)
        for p in s.fake.parameters():
            if p.dim() > 1 and p.abs().max() == 0:
                p.normal_(0, 0.02)
    grad_diff = gradients_agree(s, dargs)
    net = args.authors_net
    if net == "auto":
        net = "torchcfm" if importlib.util.find_spec("torchcfm") else "ours"
    authors = AuthorsLoop(s, dargs, net)
    device = s.device

    ours_cycle = [lambda: distill.fake_update(s, dargs, distill.draw(s, dargs))] * 5 + \
        [lambda: distill.generator_update(s, dargs, distill.draw(s, dargs))]
    theirs_cycle = [authors.fake_update] * 5 + [authors.generator_update]

    def time_cycle(cycle, setup_backends):
        setup_backends()
        per_update = {"fake": [], "generator": []}
        for rep in range(args.cycles + 1):
            for i, fn in enumerate(cycle):
                measure.sync(device)
                start = time.perf_counter()
                fn()
                measure.sync(device)
                if rep:  # the first cycle warms up
                    per_update["generator" if i == 5 else "fake"].append(
                        time.perf_counter() - start)
        return per_update

    def authors_backends():
        if device.type == "cuda":
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

    def our_backends():
        torch.backends.cudnn.deterministic = False
        common.configure_backends(device)

    # Interleave the two loops so that drift of a shared machine hits both alike.
    times = {"authors": {"fake": [], "generator": []}, "ours": {"fake": [], "generator": []}}
    for _ in range(2):
        for name, cycle, be in (("authors", theirs_cycle, authors_backends),
                                ("ours", ours_cycle, our_backends)):
            for k, v in time_cycle(cycle, be).items():
                times[name][k] += v
    report = {"machine": measure.machine(), "device": str(device), "batch": args.batch_size,
              "cycles": 2 * args.cycles, "authors_net": net, "gradient_max_rel_diff": grad_diff}
    for name, t in times.items():
        fake, gen = statistics.median(t["fake"]), statistics.median(t["generator"])
        report[name] = {"fake_update_s": fake, "generator_update_s": gen,
                        "mean_update_s": (5 * fake + gen) / 6}
    report["ours_over_authors"] = (report["ours"]["mean_update_s"]
                                   / report["authors"]["mean_update_s"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"{measure.host(report['machine'])} | {device} | batch {args.batch_size} | authors' "
          f"network: {net}")
    print(f"{'':10s}{'fake s':>9s}{'gen s':>9s}{'mean update s':>15s}")
    for name in ("authors", "ours"):
        r = report[name]
        print(f"{name:10s}{r['fake_update_s']:9.3f}{r['generator_update_s']:9.3f}"
              f"{r['mean_update_s']:15.3f}")
    print(f"ours / authors: {report['ours_over_authors']:.3f}; gradient max rel diff: "
          f"fake {grad_diff['fake_model']:.1e}, generator {grad_diff['generator']:.1e}")
    return report


if __name__ == "__main__":
    main(parse_args())
