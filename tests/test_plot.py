"""plot.py: the resume rules of final_history and resume_steps on hand-made records, the panels
that have data, the PNG end to end through main() (size, each series inside its panel's axes, the
resume marks at their steps, an empty cell where there is no panel; skipped without
matplotlib), the one-line error without matplotlib, and the one-line errors for bad input."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import common
import plot
from conftest import ROOT

WIDTH = 480  # panel width in the tests; height 5/8 of it
START = {1: 1.7e9, 2: 1.7e9 + 100, 3: 1.7e9 + 300}  # wall clock at the start of each attempt


def status(step, attempt, grad=250.0):
    """A distillation status record of the attempt `attempt` (the key is not plotted): half a
    second a step; `time - elapsed_s` is the attempt's start."""
    return {"step": step, "attempt": attempt, "loss_fake": 0.1 * attempt + 1 / step,
            "loss_gen": -0.5, "grad_norm_gen": grad, "grad_norm_fake": grad / 10,
            "lr": 2e-4 * min(1, step / 10), "sec_per_step": 0.5,
            "time": START[attempt] + 0.5 * step, "elapsed_s": 0.5 * step, "peak_mem_mb": 700.0}


def fid(step, attempt):
    return {"step": step, "attempt": attempt, "fid": 40.0 / attempt, "fid_samples": 1000,
            "fid_model": "EMA 0.999", "fid_mode": "tf", "fid_kind": "in-training"}


# Attempt 1 logs to step 40 and evaluates FID at 20 and 40; it is resumed from its checkpoint
# at step 20, so attempt 2 logs first at step 21 and again at 30, 40, 50 (FID at 40).
RECORDS = ([status(1, 1), status(10, 1), status(20, 1), fid(20, 1), status(30, 1),
            status(40, 1), fid(40, 1)]
           + [status(21, 2), status(30, 2), status(40, 2), fid(40, 2), status(50, 2)])


def write_run(folder, records, grad_clip=1.0):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metrics.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    (folder / "args.json").write_text(json.dumps({"grad_clip": grad_clip}))
    return folder


def kinds(records):
    return [(r["step"], "fid" if "fid" in r else "status", r["attempt"]) for r in records]


# --- records ---------------------------------------------------------------------------------

def test_final_history_drops_the_abandoned_attempt_after_a_resume():
    assert kinds(plot.final_history(RECORDS)) == [
        (1, "status", 1), (10, "status", 1), (20, "status", 1), (20, "fid", 1),
        (21, "status", 2), (30, "status", 2), (40, "status", 2), (40, "fid", 2),
        (50, "status", 2)]


@pytest.mark.parametrize("records,expected", [
    # the later record of a step wins, for status and for FID records
    ([status(1, 1), status(2, 1), status(2, 2)], [(1, "status", 1), (2, "status", 2)]),
    ([status(10, 1), fid(10, 1), fid(10, 2)], [(10, "status", 1), (10, "fid", 2)]),
    # an FID record after its status record of the same step is not a resume
    ([status(10, 1), fid(10, 1), status(11, 1)],
     [(10, "status", 1), (10, "fid", 1), (11, "status", 1)]),
    # a new run in the same folder (steps from 1 again) replaces the old one
    ([status(1, 1), status(5, 1), fid(5, 1), status(1, 2)], [(1, "status", 2)]),
])
def test_final_history_later_record_wins(records, expected):
    assert kinds(plot.final_history(records)) == expected


def test_panels_only_with_data_and_log_scale_only_positive():
    records = [{"step": s, "loss_fm": v, "grad_norm": g, "lr": 1e-3, "sec_per_step": 0.1}
               for s, v, g in [(1, 2.0, 300.0), (2, float("nan"), 0.0), (3, 1.0, 100.0)]]
    specs = plot.panels(records)
    assert [p["name"] for p in specs] == ["losses", "gradient norms", "learning rate", "speed"]
    by = {p["name"]: p for p in specs}
    assert by["losses"]["series"][0][:2] == ("loss_fm", [1, 2, 3])  # NaN kept, skipped in drawing
    assert by["gradient norms"]["series"] == [("grad_norm", [1, 3], [300.0, 100.0])]  # 0 dropped
    assert by["gradient norms"]["logy"] and not by["losses"]["logy"]
    assert by["gradient norms"]["hlines"] == []  # no args.json: no clip line
    assert plot.panels(records, grad_clip=1.0)[1]["hlines"] == [("grad clip 1", 1.0)]


# --- resumes -----------------------------------------------------------------------------------

def test_resume_steps_from_a_step_that_goes_back_or_a_wall_clock_jump():
    assert plot.resume_steps(RECORDS) == [20]  # attempt 2 logs from 21 again: resumed from 20
    # a resume after the last record: the steps follow, but time - elapsed_s jumps by 100 s
    follow = [status(1, 1), status(10, 1), status(20, 1), fid(20, 1), status(21, 2),
              status(30, 2)]
    assert plot.resume_steps(follow) == [20]
    assert plot.resume_steps(follow[:4]) == []  # one process: no mark
    # a resume from an earlier checkpoint drops the mark of the attempt it abandons
    again = RECORDS + [status(11, 3), status(20, 3)]
    assert plot.resume_steps(again) == [10]
    assert plot.resume_steps(RECORDS + [status(51, 3)]) == [20, 50]


def test_resume_steps_tolerates_rounding_and_old_records():
    a, b = status(10, 1), status(20, 1)
    b["time"] += 0.01  # time and elapsed_s are rounded to milliseconds, read at other instants
    assert plot.resume_steps([a, b]) == []
    old = [{k: v for k, v in r.items() if k not in ("time", "elapsed_s")} for r in RECORDS]
    assert plot.resume_steps(old) == [20]  # without the clock fields: the step rule alone
    assert not plot.restarted(old[0], old[1])


# --- the PNG -----------------------------------------------------------------------------------

def pixels(img, box):
    """The RGB pixels of `img` ([H, W, 3] uint8) inside a matplotlib display box (origin at the
    bottom left), one pixel in from its edges."""
    h = img.shape[0]
    return img[round(h - box.y1) + 2:round(h - box.y0) - 1, round(box.x0) + 2:round(box.x1) - 1]


def near(region, colour, tol=60):
    """How many pixels of `region` are within `tol` of `colour` (antialiased lines blend)."""
    rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(region.astype(int) - rgb).sum(-1) < tol).sum())


BLUE, ORANGE = "#1f77b4", "#ff7f0e"  # matplotlib's first two colours
GREY = "#737373"  # the dashed --grad-clip line (grey 0.45)


def drawn(tmp_path, records, cols=2):
    """The figure of a run's records, as main() builds it, saved: (PNG as an array, the axes,
    whose pixel boxes are those of the PNG)."""
    pytest.importorskip("matplotlib")
    fig = plot.figure(plot.panels(plot.final_history(records), 1.0), "a title",
                      plot.resume_steps(records), WIDTH, cols)
    fig.savefig(tmp_path / "figure.png")
    return np.asarray(Image.open(tmp_path / "figure.png").convert("RGB")), fig.axes


def test_main_writes_one_png_with_the_series_in_their_panels(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path / "run", RECORDS)
    out = plot.main(plot.parse_args([str(run), "--width", str(WIDTH)]))
    assert out == str(run / "metrics.png")
    printed = capsys.readouterr().out
    assert "losses, gradient norms, learning rate, in-training FID, speed" in printed
    assert "resumed from step 20" in printed
    png = np.asarray(Image.open(out).convert("RGB"))
    h = WIDTH * 5 // 8
    assert png.shape == (3 * h + plot.HEADER, 2 * WIDTH, 3)  # 5 panels in 2 columns
    assert (png[-h + 10:-10, WIDTH + 10:-10] == 255).all()  # the sixth cell is empty

    img, axes = drawn(tmp_path, RECORDS)
    assert img.shape == png.shape and len(axes) == 5
    expected = {0: [BLUE, ORANGE],        # loss_fake, loss_gen
                1: [BLUE, ORANGE, GREY],  # grad_norm_gen, grad_norm_fake, clip line of args.json
                2: [BLUE], 3: [BLUE], 4: [BLUE]}  # lr, FID, sec_per_step
    for n, colours in expected.items():
        region = pixels(img, axes[n].get_window_extent())
        for colour in (BLUE, ORANGE):
            count = near(region, colour, tol=30)
            assert count > 20 if colour in colours else count == 0, (n, colour, count)
        # the dashed clip line: one row of grey dashes (the resume line is black and vertical)
        dashes = max(near(row[None], GREY, tol=30) for row in region)
        assert dashes > region.shape[1] / 4 if GREY in colours else dashes < 5, (n, dashes)


def test_resume_mark_is_drawn_at_its_step(tmp_path):
    """A dotted black line at step 20 in every panel, nothing black elsewhere in the axes; no
    line without a resume."""
    img, axes = drawn(tmp_path, RECORDS)
    for ax in axes:
        box = ax.get_window_extent()
        region = pixels(img, box)
        dark = (region < 90).all(-1).sum(0)  # black pixels per column (the lines are coloured)
        x = ax.transData.transform((20, 1))[0] - round(box.x0) - 2
        assert abs(int(np.argmax(dark)) - x) <= 2, (ax.get_title(), np.argmax(dark), x)
        assert dark.max() > region.shape[0] / 6  # dotted: a sixth of the height at least
        far = np.abs(np.arange(len(dark)) - x) > 3
        assert dark[far].max() == 0
    (tmp_path / "one").mkdir()
    img, axes = drawn(tmp_path / "one", RECORDS[:7])  # attempt 1 alone
    assert all((pixels(img, ax.get_window_extent()) < 90).all(-1).sum() == 0 for ax in axes)


def test_metrics_file_argument_out_and_columns(tmp_path):
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path / "run", RECORDS[:3])  # no FID yet: 4 panels
    assert plot.main(plot.parse_args([str(run / "metrics.jsonl")])) == str(run / "metrics.png")
    out = tmp_path / "new" / "m.png"
    plot.main(plot.parse_args([str(run), "--out", str(out), "--width", "400", "--cols", "1"]))
    assert Image.open(out).size == (400, 4 * 250 + plot.HEADER)


def test_without_matplotlib_one_line_error(tmp_path, monkeypatch):
    for name in ["matplotlib", *(m for m in sys.modules if m.startswith("matplotlib."))]:
        monkeypatch.setitem(sys.modules, name, None)  # importing any of them fails
    run = write_run(tmp_path / "run", RECORDS)
    with pytest.raises(common.RealUIDError, match="pip install matplotlib") as e:
        plot.main(plot.parse_args([str(run)]))
    assert "\n" not in str(e.value) and not (run / "metrics.png").exists()


def test_training_and_sampling_do_not_import_matplotlib():
    code = ("import sys; import distill, eval_pairs, finetune, plot, sample, train_teacher; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# --- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("content,match", [
    (None, "does not exist"),
    ("folder", "has no metrics.jsonl"),
    ("", "is empty"),
    ('{"step": 1, "loss_fm": 1.0}\n{"step": 2, "loss_fm": \n', "line 2 is not JSON"),
    ('[1, 2]\n', "line 1 is not a metrics record"),
    ('{"loss_fm": 1.0}\n', "line 1 is not a metrics record"),
    ('{"step": 1, "time": 1.7e9, "elapsed_s": 1.0}\n', "has nothing to plot"),
])
def test_bad_input_is_one_line_error(tmp_path, content, match):
    run = tmp_path / "run"
    if content is not None:
        run.mkdir()
        if content != "folder":
            (run / "metrics.jsonl").write_text(content)
    with pytest.raises(common.RealUIDError, match=match) as e:
        plot.main(plot.parse_args([str(run)]))
    assert "\n" not in str(e.value)


def test_command_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        common.cli(plot.main, lambda: plot.parse_args([str(tmp_path / "missing")]))
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1
    run = write_run(tmp_path / "run", RECORDS)
    with pytest.raises(common.RealUIDError, match="use a .png"):
        plot.main(plot.parse_args([str(run), "--out", str(tmp_path / "m.jpg")]))
    with pytest.raises(SystemExit) as e:
        plot.parse_args([str(run), "--width", "100"])
    assert e.value.code == 2 and "--width: 100 is below 400" in capsys.readouterr().err
