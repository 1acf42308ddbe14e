"""Image-to-image RealUID (paper Appendix C): paired data, the built-in corruptions, the two
coupling paths and the paired metrics. Used by train_teacher.py, distill.py, sample.py and
fid.py's `pairs` command; nothing here depends on the networks.

A coupling pi(s, x1) pairs a source image s (corrupted: low resolution, masked, grey, noisy)
with its clean target x1, both [C, H, W] in [-1, 1]. Pairs come from a file (an .npz with uint8
`source` and `images` [N, H, W, C], optional `labels`) or from a built-in corruption applied on
the fly, after the random flip, to any image data set the scripts read (`--task`):

    sr2, sr4   average-pool by 2 or 4, then nearest-neighbour upsampling back to H x W
    inpaint    a centred square of side H/2 (and W/2) set to 0, i.e. mid-grey
    gray       luminance 0.299 R + 0.587 G + 0.114 B copied to the three channels
    denoise    x1 + 0.2 N(0, I), a fresh draw every time the pair is used

Paths (`--path`): every network is called v(t, x, y, s) with s concatenated to x (unet.py's
cond_channels), the interpolation is section 2's x_t = t x1 + (1 - t) x0, u = x1 - x0, and the
start is x0 = kappa s + sigma_s eps, eps ~ N(0, I):

    cond-fm    kappa = 0, sigma_s = 1: noise to target, conditioned on the source
    bridge     kappa = 1, sigma_s = --source-noise: from the noised source to the target, a
               stochastic-interpolant bridge conditioned on the source (Appendix C.1; the noise
               lets one source map to many plausible targets)

The one-step generator maps its own start z = kappa s + sigma_s eps_g to x_g = z + G(0, z, y, s)
(flow.generate). eps_g is drawn independently of the interpolations' eps, exactly as the
generator's z and the interpolation's x0 are independent draws in the unconditional case: the
generated coupling (x0, x_g) then has x0 independent of x_g given s, like pi itself, so the
distillation's minimum is the generator whose outputs given s follow the data's x1 given s.
(Feeding the generator the interpolation's own x0 would make x_g a function of x0, a coupling
that cannot equal pi when x1 given s is not a point mass.)
"""
import torch
import torch.nn.functional as F

import common

TASKS = ("sr2", "sr4", "inpaint", "gray", "denoise")
PATHS = ("cond-fm", "bridge")
DENOISE_STD = 0.2  # in pixel units of [-1, 1]
LUMA = (0.299, 0.587, 0.114)


def corrupt(x, task, noise=None):
    """The source s of the built-in task for clean images x [B, C, H, W] in [-1, 1].

    denoise needs `noise`, a standard normal tensor like x (the caller draws it, so that every
    process and micro-batch sees the draws of the global batch)."""
    if task in ("sr2", "sr4"):
        k = int(task[2])
        return F.interpolate(F.avg_pool2d(x, k), scale_factor=k, mode="nearest")
    if task == "inpaint":
        h, w = x.shape[-2:]
        top, left = (h - h // 2) // 2, (w - w // 2) // 2
        s = x.clone()
        s[..., top:top + h // 2, left:left + w // 2] = 0
        return s
    if task == "gray":
        luma = sum(c * x[:, i:i + 1] for i, c in enumerate(LUMA))
        return luma.expand_as(x).contiguous()
    if task == "denoise":
        return x + DENOISE_STD * noise
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def check_task(task, shape):
    """The reason a task does not fit images of `shape` = (C, H, W), or None if it does."""
    c, h, w = shape
    if task in ("sr2", "sr4") and (h % int(task[2]) or w % int(task[2])):
        return f"--task {task} needs image sides divisible by {task[2]}, got {h}x{w}"
    if task == "gray" and c != 3:
        return f"--task gray needs RGB images, got {c} channel(s)"
    return None


def path_coefficients(path, source_noise):
    """(kappa, sigma_s) of a named path: the start is x0 = kappa s + sigma_s eps."""
    if path == "cond-fm":
        return 0.0, 1.0
    if path == "bridge":
        return 1.0, float(source_noise)
    raise ValueError(f"unknown path {path!r}; choose one of {', '.join(PATHS)}")


def start(s, eps, kappa, sigma):
    """The path's start x0 = kappa s + sigma_s eps (the generator's start z likewise, with its
    own eps). kappa = 0 returns sigma * eps exactly, so cond-fm adds no rounding."""
    return sigma * eps if kappa == 0 else kappa * s + sigma * eps


def describe(task, path, source_noise):
    """The coupling entry of a checkpoint's config (None: the unconditional case)."""
    kappa, sigma = path_coefficients(path, source_noise)
    return {"task": task, "path": path, "kappa": kappa, "sigma": sigma}


def psnr(x, target):
    """PSNR in dB of a set of uint8 images x against their uint8 targets: 10 log10(255^2 / MSE)
    with the MSE over all pixels of all images (a mean of per-image PSNRs would be infinite as
    soon as one output equals its target, as small synthetic images allow)."""
    mse = (x.double() - target.double()).pow(2).mean()
    return float(10 * torch.log10(255.0 ** 2 / mse))


# ---------------------------------------------------------------------------------------------
# Which coupling a run uses, from its flags, its data and (after the teacher) its teacher

def add_args(p, teacher):
    """--task (all stages); --path and --source-noise (the teacher's; later stages read them
    from the teacher's checkpoint)."""
    g = p.add_argument_group("image-to-image (Appendix C): paired data")
    g.add_argument("--task", choices=TASKS, default=None,
                   help="built-in corruption that makes the source of each --data image "
                        "(sr2, sr4: downsample; inpaint: centre square; gray: colourisation; "
                        "denoise: +0.2 N(0, I)); or give a pairs .npz with `source` and "
                        "`images` as --data. " + ("" if teacher else "Default: the teacher's"))
    if teacher:
        g.add_argument("--path", choices=PATHS, default="bridge",
                       help="cond-fm: noise to target given the source; bridge: from the "
                            "noised source kappa s + sigma_s eps to the target (kappa = 1)")
        g.add_argument("--source-noise", type=common.positive_float, default=0.25,
                       help="sigma_s of the bridge path, in pixel units of [-1, 1]")
    return g


def for_teacher(task, path, source_noise, data, data_name):
    """The coupling a teacher run trains on (None: noise to image), from --task (a built-in
    corruption, or None) / a pairs file (`data` holds sources), on the given path."""
    if task and data.has_sources:
        common.fail(f"--data {data_name} holds pairs (a `source` array) and --task {task} "
                    "makes sources too: drop one of them")
    if not task and not data.has_sources:
        return None
    if task:
        problem = check_task(task, data.shape)
        if problem:
            common.fail(problem)
    return describe(task, path, source_noise)


def for_student(teacher_coupling, task, data, teacher_path):
    """The coupling a distillation / sampling run uses: the teacher's; --task may only repeat
    the teacher's task; the data must provide what the teacher was trained on."""
    if teacher_coupling is None:
        if task:
            common.fail(f"--task {task} given, but the teacher {teacher_path} was trained "
                        "without one (noise to image); drop --task or train an image-to-image "
                        "teacher with train_teacher.py --task")
        return None
    if task and task != teacher_coupling["task"]:
        common.fail(f"--task {task} differs from the teacher's "
                    f"{teacher_coupling['task'] or 'pairs file'}; drop --task (it is read "
                    "from the teacher)")
    if data is not None:
        if teacher_coupling["task"] is None and not data.has_sources:
            common.fail(f"the teacher {teacher_path} was trained on a pairs file: pass pairs "
                        "(an .npz with `source` and `images`) as --data")
        if teacher_coupling["task"] is not None and data.has_sources:
            common.fail(f"the teacher {teacher_path} makes its sources with --task "
                        f"{teacher_coupling['task']}: pass clean images as --data, not pairs")
    return teacher_coupling


def make_source(coupling_cfg, x1, src_u8, flip, noise):
    """The sources of a batch: the pairs file's own (uint8, flipped like their targets x1) or
    the built-in corruption of the flipped clean images x1 in [-1, 1]."""
    if src_u8 is not None:
        return common.flip(common.from_uint8(src_u8), flip)
    return corrupt(x1, coupling_cfg["task"], noise)


@torch.no_grad()
def fixed_pairs(data, coupling_cfg, n, device):
    """(sources, targets, labels or None) of the first n images of `data`, for sample grids
    comparable across steps (denoise noise from a fixed seed)."""
    x_u8, y, src_u8 = data.get(list(range(min(n, len(data)))))
    x1 = common.from_uint8(x_u8)
    noise = torch.randn(x1.shape, generator=torch.Generator().manual_seed(0))
    src = common.from_uint8(src_u8) if src_u8 is not None else corrupt(x1, coupling_cfg["task"],
                                                                        noise)
    return src.to(device), x1.to(device), None if y is None else y.to(device)
