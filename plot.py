"""Plot a training run's metrics.jsonl as one PNG: losses, gradient norms, learning rate,
in-training FID and speed against the step, one panel each (only those with data), and a dotted
line at every step the run was resumed from. Needs matplotlib (`pip install matplotlib`; optional:
training and sampling never import it).

    python plot.py runs/toy_distill        # writes runs/toy_distill/metrics.png, in seconds
    python plot.py runs/teacher_uncond/metrics.jsonl --out teacher.png --width 800 --cols 1

What the panels show (the records of runs.RunLog.step and runs.Run.evaluate_fid):
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
of a step wins. A resume shows as well when the step does follow: `elapsed_s` (the run's
training time) continues from the checkpoint while the wall clock `time` went on, so `time -
elapsed_s`, constant within one process, jumps by the time between the save and the restart
(`resume_steps`; a machine that was suspended during a run shows such a jump too).

`new_figure` gives the benchmarks' figures (benchmarks/ablation.py, coupling_evidence.py) the same
lazily imported matplotlib, drawn by Agg.
"""
import argparse
import json
import math
import os

import common

DPI = 100  # pixels per inch of the PNG files: sizes are given in pixels
HEADER = 30  # pixels of the figure's title line above the panels
RESTART_GAP_S = 0.5  # a jump of `time - elapsed_s` above this between two records: a restart


def new_figure(width, height):
    """An empty matplotlib Figure of width x height pixels with constrained layout, drawn by
    the Agg backend (no pyplot, no window, no global state). matplotlib is imported here, so
    that only the scripts that draw need it; without it this fails in one line."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        common.fail("drawing figures needs matplotlib, which is not installed: "
                    "pip install matplotlib")
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


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


def resume_steps(records):
    """The checkpoint steps from which the final history was resumed, ascending. A status record
    starts a new process when its step is not after the previous status record's, or when
    `time - elapsed_s` grew by more than RESTART_GAP_S since that record (see the module
    docstring); a new process logs first after its first step, so it resumed from the step
    before. A later resume from an earlier step drops the marks it abandons."""
    marks, prev = [], None
    for r in records:
        if "fid" in r:
            continue
        if prev is not None and (r["step"] <= prev["step"] or restarted(prev, r)):
            marks = [m for m in marks if m < r["step"] - 1] + [r["step"] - 1]
        prev = r
    return [m for m in marks if m > 0]


def restarted(prev, r):
    """Whether the wall clock ran on between two records more than the run's training time did
    (both need `time` and `elapsed_s`)."""
    if not all(number(x.get(k)) for x in (prev, r) for k in ("time", "elapsed_s")):
        return False
    return (r["time"] - r["elapsed_s"]) - (prev["time"] - prev["elapsed_s"]) > RESTART_GAP_S


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


def figure(specs, title, resumes=(), width=640, cols=2):
    """The panels as one matplotlib Figure: a title line, then a grid of `cols` columns of
    width x (5/8 width) pixels, one panel each, legends to the right of the axes; the x axis of
    every panel runs from step 0 to the last step; a dotted black line at every step in
    `resumes` (the title names them)."""
    rows, cols = math.ceil(len(specs) / cols), min(cols, len(specs))
    fig = new_figure(cols * width, rows * (width * 5 // 8) + HEADER)
    from matplotlib import ticker  # there: new_figure has imported matplotlib
    fig.suptitle(title, fontsize="medium", wrap=True)
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    last = max(max(xs) for p in specs for _, xs, _ in p["series"])
    for ax, p in zip(axes, specs):
        few = max(len(xs) for _, xs, _ in p["series"]) <= 30
        for label, xs, ys in p["series"]:
            ax.plot(xs, ys, label=label, linewidth=1.5,
                    marker="o" if few or p["markers"] else None, markersize=3)
        for label, y in p["hlines"]:
            ax.axhline(y, color="0.45", linestyle="--", linewidth=1, label=label)
        for step in resumes:
            ax.axvline(step, color="black", linestyle=":", linewidth=1.2)
        ax.set_title(p["title"], fontsize="medium")
        ax.set_xlabel("step")
        ax.set_ylabel(p["ylabel"])
        ax.set_xlim(0, max(last, 1))
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
        ax.xaxis.set_major_formatter(ticker.StrMethodFormatter("{x:,.0f}"))
        if p["logy"]:  # plain numbers (100, 0.5): the decades, and within one decade 2..9 x
            ax.set_yscale("log")
            plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
            low, high = ax.get_ylim()
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain if high < 10 * low else ticker.NullFormatter())
        else:  # 0.5 1.0 1.5 with the power of ten once above the axis
            formatter = ticker.ScalarFormatter(useMathText=True)
            formatter.set_powerlimits((-3, 4))
            ax.yaxis.set_major_formatter(formatter)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small", frameon=False)
    for ax in axes[len(specs):]:
        ax.remove()
    return fig


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
        raise argparse.ArgumentTypeError(f"{text} is below 400 (the axis labels and the "
                                         "legend beside the axes need the room)")
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
    resumes = resume_steps(records)
    resumed = (f"; resumed from step {', '.join(map(str, resumes))} (dotted)" if resumes
               else "")
    title = (f"{path}: steps {min(steps)}-{max(steps)}, {len(history)} records"
             + (f" ({dropped} of abandoned attempts before resumes left out)" if dropped else "")
             + resumed)
    fig = figure(specs, title, resumes, args.width, args.cols)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out)
    print(f"wrote {out}: {', '.join(p['name'] for p in specs)}; "
          f"steps {min(steps)}-{max(steps)}{resumed}")
    return out


if __name__ == "__main__":
    common.cli(main, parse_args)
