"""Plot a training run's metrics.jsonl as one PNG: losses, gradient norms, learning rate,
in-training FID and speed against the step, one panel each (only those with data). Pillow only.

    python plot.py runs/toy_distill        # writes runs/toy_distill/metrics.png, in seconds
    python plot.py runs/teacher_uncond/metrics.jsonl --out teacher.png --width 800 --cols 1

What the panels show (the records of common.RunLog.step and common.evaluate_fid):
- losses: every `loss_*` term, the mean over the steps since the previous record: `loss_fm`
  (teacher v*, flow matching), `loss_fake` (fake model f), `loss_gen` (generator G), and with
  the GAN terms `loss_gan_disc`, `loss_gan_gen`;
- gradient norms (log scale): every `grad_norm*`, measured *before* clipping, so values far above
  the dashed --grad-clip line (read from the run's args.json) mean that clipping is active;
- learning rate `lr` (warm-up, then constant);
- in-training FID (log scale), if the run had --fid-every: cheap (--fid-n samples, one EMA
  model), one series per sample count / preprocessing; the final numbers come from fid.py;
- speed (log scale): `sec_per_step`, averaged since the previous record; the first record
  includes start-up, records after an FID evaluation or a checkpoint include that.

A resumed run appends to the same file and logs first at its checkpoint's step + 1, so a status
record whose step is not after the previous status record's starts a new attempt: the records
of the abandoned attempt from that step on are left out (`final_history`), and the later record
of a step wins.

The chart primitives (`line_chart`, `mosaic`, `COLORS`, `FONT`) are shared with ablation.py.
"""
import argparse
import json
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import common

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (127, 127, 127)]
FONT = ImageFont.load_default()
HEADER = 20  # pixels of the figure's title line above the panels


# ---------------------------------------------------------------------------------------------
# Chart primitives (also ablation.py's figures).

def line_chart(series, title, xlabel, ylabel, hlines=(), size=(640, 400), logy=False,
               xlim=None, xfmt=".4g", markers=False):
    """A line chart: series [(label, xs, ys, colour)], dashed horizontal references
    [(label, y, colour)]; xlim (x0, x1) fixes the x range (default: the data's), xfmt formats
    the x tick values, markers draws a dot at every point (a series of one point shows).
    Non-finite y values are skipped. Returns a PIL image."""
    W, H = size
    L, R, T, B = 70, 170, 28, 42
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    ys = [y for _, _, yy, _ in series for y in yy if np.isfinite(y)] + [y for _, y, _ in hlines]
    xs = [x for _, xx, _, _ in series for x in xx] or [0, 1]
    f = (lambda v: math.log10(max(v, 1e-12))) if logy else (lambda v: v)
    lo, hi = (min(map(f, ys)), max(map(f, ys))) if ys else (0, 1)
    lo, hi = (lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    if xlim is not None:
        x0, x1 = xlim

    def px(x, y):
        return (L + (x - x0) / (x1 - x0) * (W - L - R), T + (hi - f(y)) / (hi - lo) * (H - T - B))
    d.rectangle([L, T, W - R, H - B], outline="black")
    for i in range(5):
        v = lo + i * (hi - lo) / 4
        yv = 10 ** v if logy else v
        _, yp = px(x0, yv)
        d.line([L - 4, yp, L, yp], fill="black")
        d.text((4, yp - 6), f"{yv:.3g}", fill="black", font=FONT)
        xv = x0 + i * (x1 - x0) / 4
        xp, _ = px(xv, yv)
        d.line([xp, H - B, xp, H - B + 4], fill="black")
        d.text((xp - 12, H - B + 6), f"{xv:{xfmt}}", fill="black", font=FONT)
    d.text((L, 6), title, fill="black", font=FONT)
    d.text(((W - R + L) // 2 - 40, H - 16), xlabel, fill="black", font=FONT)
    d.text((4, T - 24), ylabel, fill="black", font=FONT)
    items = []
    for label, y, c in hlines:
        _, yp = px(x0, y)
        for xa in range(L, W - R, 10):
            d.line([xa, yp, min(xa + 5, W - R), yp], fill=c)
        items.append((label + " (dashed)", c))
    for label, xx, yy, c in series:
        pts = [px(x, y) for x, y in zip(xx, yy) if np.isfinite(y)]
        if len(pts) > 1:
            d.line(pts, fill=c, width=2)
        if markers:
            for xp, yp in pts:
                d.ellipse([xp - 2, yp - 2, xp + 2, yp + 2], fill=c)
        items.append((label, c))
    for i, (label, c) in enumerate(items):
        d.rectangle([W - R + 8, T + 4 + 16 * i, W - R + 18, T + 12 + 16 * i], fill=c)
        d.text((W - R + 22, T + 2 + 16 * i), label, fill="black", font=FONT)
    return img


def mosaic(images, cols, pad=6):
    """Images in a grid of `cols` columns, each cell the size of the largest, on white."""
    w, h = max(i.width for i in images), max(i.height for i in images)
    rows = math.ceil(len(images) / cols)
    out = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), "white")
    for n, im in enumerate(images):
        r, c = divmod(n, cols)
        out.paste(im, (pad + c * (w + pad), pad + r * (h + pad)))
    return out


# ---------------------------------------------------------------------------------------------
# Records -> panels -> figure.

def metrics_path(run):
    """The metrics file of a run folder, or `run` itself when it is a file."""
    if not os.path.exists(run):
        common.fail(f"{run} does not exist; give a training run's --out folder or its "
                    "metrics.jsonl")
    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        common.fail(f"{run} has no metrics.jsonl; give the --out folder of a train_teacher.py "
                    "or distill.py run (it writes metrics.jsonl from its first status line)")
    return path


def read_records(path):
    """The JSON records of a metrics.jsonl in file order (blank lines skipped); each must be an
    object with an integer `step`."""
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                common.fail(f"{path} line {n} is not JSON ({e.msg}): a hand edit or a write cut "
                            "short; repair or delete that line")
            if not isinstance(r, dict) or not isinstance(r.get("step"), int):
                common.fail(f"{path} line {n} is not a metrics record (a JSON object with an "
                            "integer 'step'); is this a training run's metrics.jsonl?")
            records.append(r)
    if not records:
        common.fail(f"{path} is empty: the run has logged nothing yet; plot it after its first "
                    "status line")
    return records


def final_history(records):
    """The records of the run's final history, sorted by step (stable).

    Status records (those without `fid`): one whose step is not after the previous status
    record's starts a resumed attempt, and every earlier record (of either kind) at that step
    or later belongs to the abandoned attempt and is dropped. FID records: one drops earlier
    FID records at its step or later. So the later record of a step always wins."""
    kept, last = [], {False: -math.inf, True: -math.inf}  # last step kept, by "is an FID record"
    for r in records:
        s, is_fid = r["step"], "fid" in r
        if s <= last[is_fid]:
            kept = [k for k in kept if k["step"] < s or (is_fid and "fid" not in k)]
            last = {kind: max((k["step"] for k in kept if ("fid" in k) == kind),
                              default=-math.inf) for kind in (False, True)}
        kept.append(r)
        last[is_fid] = s
    return sorted(kept, key=lambda r: r["step"])


def number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def series(records, key, positive=False):
    """(steps, values) of the records holding a number under `key` (positive=True: values > 0
    only, for a log scale)."""
    pts = [(r["step"], float(r[key])) for r in records if number(r.get(key))
           and (not positive or r[key] > 0)]
    return [s for s, _ in pts], [v for _, v in pts]


def keys_with(records, prefix):
    """The keys starting with `prefix`, in order of first appearance."""
    return list(dict.fromkeys(k for r in records if "fid" not in r for k in r
                              if k.startswith(prefix)))


def fid_protocol(r):
    """(sample count, preprocessing) of an FID record: one FID series per protocol."""
    return r.get("fid_samples"), r.get("fid_mode")


def panels(records, grad_clip=None):
    """The panels with data: dicts of name, title, ylabel, logy, markers, hlines [(label, y)]
    and series [(label, xs, ys)]."""
    status = [r for r in records if "fid" not in r]
    out = []

    def add(name, title, ylabel, logy, lines, hlines=(), markers=False):
        lines = [(label, xs, ys) for label, (xs, ys) in lines if xs]
        if lines:
            out.append(dict(name=name, title=title, ylabel=ylabel, logy=logy, markers=markers,
                            series=lines, hlines=list(hlines)))
    add("losses", "losses (mean since the previous record)", "loss", False,
        [(k, series(status, k)) for k in keys_with(records, "loss")])
    clip = [(f"grad clip {grad_clip:g}", grad_clip)] if grad_clip else []
    add("gradient norms", "gradient norms before clipping", "norm (log)", True,
        [(k, series(status, k, positive=True)) for k in keys_with(records, "grad_norm")], clip)
    add("learning rate", "learning rate", "lr", False, [("lr", series(status, "lr"))])
    fids = [r for r in records if "fid" in r]
    model = fids[-1].get("fid_model", "?") if fids else None
    add("in-training FID", f"in-training FID of {model} (cheap; final numbers: fid.py)",
        "FID (log)", True,
        [(f"n={n}, {mode}", series([r for r in fids if fid_protocol(r) == (n, mode)], "fid",
                                   positive=True))
         for n, mode in dict.fromkeys(map(fid_protocol, fids))], markers=True)
    add("speed", "speed (mean since the previous record)", "sec/step (log)", True,
        [("sec/step", series(status, "sec_per_step", positive=True))])
    return out


def figure(specs, title, width=640, cols=2):
    """The panels as one image: a title line, then a grid of `cols` columns of line charts of
    width x (5/8 width) pixels; the x axis of every panel runs from step 0 to the last step."""
    last = max(max(xs) for p in specs for _, xs, _ in p["series"])
    x1 = max(last, 1)
    xfmt = ",.0f" if x1 >= 100 else ".3g"
    charts = []
    for p in specs:
        lines = [(label, xs, ys, COLORS[i % len(COLORS)])
                 for i, (label, xs, ys) in enumerate(p["series"])]
        hlines = [(label, y, (120, 120, 120)) for label, y in p["hlines"]]
        few = max(len(xs) for _, xs, _ in p["series"]) <= 30
        charts.append(line_chart(lines, p["title"], "step", p["ylabel"], hlines,
                                 size=(width, width * 5 // 8), logy=p["logy"], xlim=(0, x1),
                                 xfmt=xfmt, markers=few or p["markers"]))
    grid = mosaic(charts, min(cols, len(charts)))
    out = Image.new("RGB", (grid.width, grid.height + HEADER), "white")
    out.paste(grid, (0, HEADER))
    ImageDraw.Draw(out).text((6, 5), title, fill="black", font=FONT)
    return out


def run_grad_clip(path):
    """--grad-clip from the args.json next to the metrics file (None if there is none)."""
    try:
        with open(os.path.join(os.path.dirname(path), "args.json")) as f:
            clip = json.load(f).get("grad_clip")
    except (OSError, ValueError, AttributeError):
        return None
    return float(clip) if number(clip) and 0 < clip < math.inf else None


# ---------------------------------------------------------------------------------------------

def panel_width(text):
    value = common.positive_int(text)
    if value < 400:
        raise argparse.ArgumentTypeError(f"{text} is below 400 (the axes and the legend "
                                         "take 240 pixels)")
    return value


def build_parser():
    p = common.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a training run's --out folder, or its metrics.jsonl")
    p.add_argument("--out", default=None,
                   help="PNG to write (default: metrics.png next to the metrics file)")
    p.add_argument("--width", type=panel_width, default=640,
                   help="width of one panel in pixels (height 5/8 of it), >= 400")
    p.add_argument("--cols", type=common.positive_int, default=2, help="panels per row")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(args):
    path = metrics_path(args.run)
    out = args.out or os.path.splitext(path)[0] + ".png"
    if not out.lower().endswith(".png"):
        common.fail(f"--out {out}: use a .png file name")
    records = read_records(path)
    history = final_history(records)
    specs = panels(history, run_grad_clip(path))
    if not specs:
        common.fail(f"{path} has nothing to plot (no loss_*, grad_norm*, lr, fid or "
                    "sec_per_step values); is it a train_teacher.py or distill.py metrics.jsonl?")
    steps = [r["step"] for r in history]
    dropped = len(records) - len(history)
    title = (f"{path}: steps {min(steps)}-{max(steps)}, {len(history)} records"
             + (f" ({dropped} of abandoned attempts before resumes left out)" if dropped else ""))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    figure(specs, title, args.width, args.cols).save(out)
    print(f"wrote {out}: {', '.join(p['name'] for p in specs)}; "
          f"steps {min(steps)}-{max(steps)}")
    return out


if __name__ == "__main__":
    common.cli(main, parse_args)
