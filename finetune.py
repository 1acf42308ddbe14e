"""Fine-tune a distilled generator with RealUID (paper section 4.2).

The generator starts from a distilled checkpoint's EMA weights, the fake model from the teacher,
and training continues with new alpha, beta at a lower learning rate without warm-up. Everything
else is distill.py's loop (same flags, same checkpoint layout), run with these defaults:
lr 1e-5, --warmup 0, alpha 0.94, beta 1.0, 16,667 steps (100k updates in all).

    python finetune.py --teacher teacher_uncond.pt --init-from runs/uncond/best.pt \\
        --out runs/uncond_ft                  # paper: FID 2.03 uncond (1.91 cond)

The authors fine-tuned their best distilled checkpoint (EMA 0.999 uncond, 0.9999 cond: pass
--init-ema 0.9999) and released the result (FID 1.91 uncond / 1.77 cond at EMA 0.9999).
"""
import startup  # noqa: F401  (first: Ctrl-C works while torch loads)
import common
import distill


def build_parser():
    p = distill.build_parser()
    p.description = __doc__.split("\n\n")[0]
    p.set_defaults(lr=1e-5, warmup=0, alpha=0.94, beta=1.0, steps=16_667, fake_init="teacher",
                   out="runs/finetune")
    return p


def parse_args(argv=None):
    args = distill.parse_args(argv, build_parser(), "finetune.py")
    if not args.init_from and not args.resume:
        common.fail("--init-from is required: the distilled checkpoint whose generator to "
                    "fine-tune")
    return args


def main(args):
    distill.main(args)


if __name__ == "__main__":
    common.cli(main, parse_args)
