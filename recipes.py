"""The named recipes of distill.py (--recipe NAME) and what a diffusion teacher changes, as data.

A flag's value is, first match wins: the command line; the recipe's value (RECIPES); the
teacher's kind (TEACHER_DEFAULTS, only for the flags left open: None); the default of
`distill.py --help`. The resolved values are saved with the run (args.json and the checkpoint's
config), so a resumed run continues with them whatever this table says later.

Each recipe names its source and, in `differs`, what it does not reproduce of that source.
"""

RECIPES = {
    "realuid": dict(
        source="RealUID, Algorithm 1 (Kornilov et al., ICLR 2026): eqs. 17-18 with real data; "
               "pass --alpha/--beta (paper, CIFAR-10: 0.94/0.96 uncond, 0.98/0.96 cond)",
        settings={}, differs=""),
    "uid": dict(
        source="data-free UID (alpha = beta = 1; FGM, Huang et al. 2024, for flow matching)",
        settings=dict(alpha=1.0, beta=1.0), differs=""),
    "gan": dict(
        source="the paper's GAN baseline, eqs. 7-9, Appendix D (lambda_G 0.3, lambda_D 1)",
        settings=dict(alpha=1.0, beta=1.0, gan_gen_coef=0.3, gan_disc_coef=1.0), differs=""),
    "sid": dict(
        source="SiD's CIFAR-10 run (Zhou et al., ICML 2024; mingyuanzhou/SiD run_sid.sh): "
               "alpha_SiD 1.2, init sigma 2.5, tmax 800, lr 1e-5, 1 + 1 updates, no clipping, "
               "dropout 0.13, EMA half-life 0.5 Mimg with ramp-up 0.05, fp32 without TF32, "
               "non-finite gradient entries zeroed",
        settings=dict(alpha=1.0, beta=1.0, gen_gamma=2.4, sigma_init=2.5, fake_init="teacher",
                      fake_t="edm", gen_t="sid", fake_weight="edm", gen_weight="sid",
                      fake_steps=1, lr=1e-5, warmup=0, grad_clip=0.0, dropout=0.13,
                      ema_halflife=0.5, ema_rampup=0.05, precision="fp32", nonfinite="sid"),
        differs="no augmentation of the fake model's input (SiD: AugmentPipe p = 0.12)"),
    "sid-real": dict(
        source="SiD with real data (Appendix A.3): the fake model minimises eq. 17, the "
               "generator keeps SiD's quadratic coefficient; everything else as `sid`",
        settings=None, differs="as `sid`; alpha/beta 0.94/0.96 are RealUID's CIFAR-10 values "
                               "(the paper reports no run of this recipe)"),
    "dmd": dict(
        source="DMD (Yin et al., CVPR 2024) with DMD2's normalisation (Yin et al., NeurIPS "
               "2024): the generator follows the gradient of E_t KL(p_g || p_d); the fake model "
               "is the generator's field (eq. 17 at alpha = beta = 1), from the teacher",
        settings=dict(objective="dmd", alpha=1.0, beta=1.0, dmd_normalize="dmd2",
                      fake_init="teacher", gen_weight="none"),
        differs="no regression loss (DMD) and no GAN term (DMD2); the paper's 5 + 1 schedule "
                "(DMD2: 5 fake updates per generator update as well)"),
    "dmd-real": dict(
        source="DMD with real data (Appendix A.5, Lemma 5 of the ICLR version, Lemma 4 of "
               "arXiv v1): the fake model learns the field of alpha p_g + (1 - alpha) p_d "
               "(eq. 17 at alpha = beta), the KL gradient is scaled by alpha",
        settings=dict(objective="dmd", alpha=0.94, beta=0.94, dmd_normalize="dmd2",
                      fake_init="teacher", gen_weight="none"),
        differs="alpha = 0.94 is RealUID's value; the paper reports no run of this recipe"),
    "normalized": dict(
        source="Normalized RealUID (Appendix A.4; eqs. 35-36 and Definition 4 of the ICLR "
               "version, eqs. 24-25 of arXiv v1)",
        settings=dict(objective="normalized", alpha=0.94, beta=0.96, fake_weight="none",
                      gen_weight="none"),
        differs="the paper has no algorithm or experiment for it: alpha/beta are RealUID's "
                "CIFAR-10 values, the floor eps on |v* - f| is ours"),
}
RECIPES["sid-real"]["settings"] = dict(RECIPES["sid"]["settings"], alpha=0.94, beta=0.96)

# What the teacher's kind sets when neither the command line nor the recipe does. A denoiser's
# field is (D - x) / (1 - t), whose errors grow like 1 / (1 - t) near the data, so with a
# diffusion teacher both players use SiD's laws of t and weights in the denoiser's units, the
# fake model starts from the teacher and the generator at SiD's sigma_init (with plain uniform t
# the toy diffusion quick start diverged: docs/diffusion.md). Flow matching keeps the paper's.
TEACHER_DEFAULTS = {
    "flow": dict(fake_init="random", fake_t="uniform", gen_t="uniform", fake_weight="none",
                 gen_weight="none", sigma_init=None),
    "diffusion": dict(fake_init="teacher", fake_t="edm", gen_t="sid", fake_weight="edm",
                      gen_weight="sid", sigma_init=2.5),
}


def recipe_settings(name, given):
    """The flag values recipe `name` sets, less those in `given` (flags on the command line)."""
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; one of {', '.join(RECIPES)}")
    return {k: v for k, v in RECIPES[name]["settings"].items() if k not in given}


def teacher_settings(values, diffusion):
    """The TEACHER_DEFAULTS entries for the flags still open (None) in `values` (a dict)."""
    table = TEACHER_DEFAULTS["diffusion" if diffusion else "flow"]
    return {k: v for k, v in table.items() if values.get(k) is None}


def describe():
    """The recipe table for --help: name, source, what it does not reproduce (one paragraph:
    argparse rewraps help text, so the recipes are separated by " | ")."""
    lines = []
    for name, r in RECIPES.items():
        settings = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in r["settings"].items())
        lines.append(f"{name}: {r['source']}" + (f" [{settings}]" if settings else "")
                     + (f"; differs: {r['differs']}" if r["differs"] else ""))
    return " | ".join(lines)
