"""plot.py: the resume rule of final_history on hand-made records, the panels that have data,
the PNG end to end through main() (size, series colours inside each panel's axes, an empty cell
where there is no panel), and the one-line errors for bad input."""
import json

import numpy as np
import pytest
from PIL import Image

import common
import plot

WIDTH = 480  # panel width in the tests; height 5/8 of it
L, R, T, B = 70, 170, 28, 42  # line_chart's margins: the axes box is [L, W - R] x [T, H - B]
GREY = (120, 120, 120)  # the dashed --grad-clip line


def status(step, attempt, grad=250.0):
    """A distillation status record of the attempt `attempt` (the key is not plotted)."""
    return {"step": step, "attempt": attempt, "loss_fake": 0.1 * attempt + 1 / step,
            "loss_gen": -0.5, "grad_norm_gen": grad, "grad_norm_fake": grad / 10,
            "lr": 2e-4 * min(1, step / 10), "sec_per_step": 0.5, "time": 1.7e9 + step,
            "elapsed_s": 0.5 * step, "peak_mem_mb": 700.0}


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


# --- the PNG -----------------------------------------------------------------------------------

def axes_pixels(img, cell, cols=2):
    """The pixels inside the axes box of the panel in grid cell `cell` ([n, 3] uint8)."""
    h = WIDTH * 5 // 8
    r, c = divmod(cell, cols)
    x, y = 6 + c * (WIDTH + 6), plot.HEADER + 6 + r * (h + 6)
    box = img.crop((x + L + 1, y + T + 1, x + WIDTH - R, y + h - B))
    return np.asarray(box).reshape(-1, 3)


def count(pixels, colour):
    return int((pixels == np.array(colour, np.uint8)).all(1).sum())


def test_main_writes_one_png_with_the_series_in_their_panels(tmp_path, capsys):
    run = write_run(tmp_path / "run", RECORDS)
    out = plot.main(plot.parse_args([str(run), "--width", str(WIDTH)]))
    assert out == str(run / "metrics.png")
    printed = capsys.readouterr().out
    assert "losses, gradient norms, learning rate, in-training FID, speed" in printed
    img = Image.open(out).convert("RGB")
    h = WIDTH * 5 // 8
    assert img.size == (2 * (WIDTH + 6) + 6, plot.HEADER + 3 * (h + 6) + 6)  # 5 panels, 2 columns
    blue, red = plot.COLORS[0], plot.COLORS[1]
    expected = {0: [blue, red],         # loss_fake, loss_gen
                1: [blue, red, GREY],   # grad_norm_gen, grad_norm_fake, clip line from args.json
                2: [blue], 3: [blue], 4: [blue]}  # lr, FID, sec_per_step
    for cell, colours in expected.items():
        pixels = axes_pixels(img, cell)
        for colour in (blue, red, GREY):
            n = count(pixels, colour)
            assert n > 50 if colour in colours else n == 0, (cell, colour, n)
    assert (axes_pixels(img, 5) == 255).all()  # the sixth cell is empty


def test_metrics_file_argument_out_and_columns(tmp_path):
    run = write_run(tmp_path / "run", RECORDS[:3])  # no FID yet: 4 panels
    assert plot.main(plot.parse_args([str(run / "metrics.jsonl")])) == str(run / "metrics.png")
    out = tmp_path / "new" / "m.png"
    plot.main(plot.parse_args([str(run), "--out", str(out), "--width", "400", "--cols", "1"]))
    assert Image.open(out).size == (400 + 12, plot.HEADER + 4 * (250 + 6) + 6)


def test_line_chart_markers_show_a_single_point():
    """A series of one point draws no line; markers make it visible (the first FID)."""
    colour = plot.COLORS[2]
    args = ([("fid", [5], [30.0], colour)], "t", "step", "FID")
    box = (L + 1, T + 1, 640 - R, 400 - B)
    plain = np.asarray(plot.line_chart(*args).crop(box)).reshape(-1, 3)
    marked = np.asarray(plot.line_chart(*args, markers=True, xlim=(0, 10)).crop(box))
    assert count(plain, colour) == 0 and count(marked.reshape(-1, 3), colour) > 5


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
