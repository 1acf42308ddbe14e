"""benchmarks/bench.py's suites on a CPU, and two equivalences the GPU suite relies on: a compiled
update is the eager update, and channels-last is the default memory format, gradient for
gradient.

Inductor's C++ build takes minutes on this CPU: the suite's end-to-end run replaces torch.compile
by the identity, and the equivalence test compiles with the "aot_eager" backend (Dynamo's
tracing and guards, AOTAutograd's joint graph and partitioner, where a compiled backward could
differ; only the code generation is left out).
"""
import ast
import functools
import importlib
import json
import os
import shutil
import time

import pytest
import torch

import distill
import train_teacher
from benchmarks import bench, gpu_suite, measure, precision_study, quickstart
from conftest import FAST, ROOT, TINY_NET, run

ALL_CONFIGS = {(m, B, p) for m in ("eager", "compiled") for B in (4, 2)
               for p in ("fp32", "tf32", "bf16", "mixed")}


@pytest.fixture
def one_thread():
    """Timings and gradients on one thread: the CPU is shared (two threads per process on two
    busy cores slow everything many times over)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def suite(argv):
    return bench.main(bench.parse_args(["--suite", "gpu", "--device", "cpu", "--tiny",
                                        "--batch-sizes", "4", "2", "--repeats", "1",
                                        *map(str, argv)]))


def test_gpu_suite_end_to_end_on_cpu(tmp_path, monkeypatch, capsys, one_thread):
    # The suite's compiled rows: its plumbing (flags, dynamo resets, compile times). Dynamo's
    # tracing takes about 6 s per configuration here; that a compiled update is the eager one
    # is test_same_update_as_the_default's to check.
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    out = tmp_path / "gpu.json"
    suite(["--budget-s", "300", "--out", out])
    report = json.loads(out.read_text())
    rows = {(r["mode"], r["batch"], r["precision"]): r for r in report["rows"]}
    assert set(rows) == ALL_CONFIGS and len(report["rows"]) == len(ALL_CONFIGS)
    assert [k[:2] for k in list(rows)[:4]] == [("eager", 4)] * 4  # eager, large batch first
    assert list(rows)[0] == ("eager", 4, "fp32")  # the reference first
    assert all(r["status"] == "ok" or r["status"].startswith("skipped") for r in rows.values())
    assert rows["eager", 4, "fp32"]["status"] == rows["eager", 4, "bf16"]["status"] == "ok"
    assert report["machine"]["cpu"] and report["matmul_tflop_per_second"]["bf16"] > 0

    for B, count in report["flops_counted"].items():  # the cost model: 7 passes per update
        for k in ("fake_update", "generator_update"):
            assert count[k] / count["unit_forward_pass"] == pytest.approx(7, rel=0.05), (B, k)
    for (mode, B, precision), r in rows.items():
        if r["status"] != "ok":
            continue
        sec = r["seconds"]
        assert r["projected_hours_400k_updates"] * 3600 == pytest.approx(
            sec["cycle"] * 400_000 / 6)
        assert r["images_per_second"] == pytest.approx(6 * B / sec["cycle"])
        assert r["flop_per_second"] == pytest.approx(r["flops_per_cycle"] / sec["cycle"])
        assert r["fraction_of_bf16_matmul"] == pytest.approx(
            r["flop_per_second"] / (report["matmul_tflop_per_second"]["bf16"] * 1e12))
        assert r["peak_memory_mb"] > 0 and r["finite_gradients"]
        cos = {state: c["generator"]["cosine"] for state, c in
               r["gradient_vs_eager_fp32"].items()}
        if precision in ("fp32", "tf32"):  # tf32 is fp32 on a CPU; compiled: the same update
            assert cos == pytest.approx({"f random": 1, "f near v*": 1}, abs=1e-6)
        if precision == "bf16":
            assert cos["f near v*"] < cos["f random"] < 1
        if precision == "mixed" and rows[mode, B, "bf16"]["status"] == "ok":
            bf16 = rows[mode, B, "bf16"]["gradient_vs_eager_fp32"]["f near v*"]
            assert cos["f near v*"] > bf16["generator"]["cosine"]

    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("| ")][1:]
    assert len(table) == len(ALL_CONFIGS)
    for line, r in zip(table, report["rows"]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:3] == [r["precision"], r["mode"], str(r["batch"])]
        assert cells[-1] == r["status"]


def test_gpu_suite_budget(tmp_path, monkeypatch):
    out = tmp_path / "gpu.json"
    report = suite(["--budget-s", "0", "--out", out])  # nothing runs, everything is listed
    assert json.loads(out.read_text())["rows"] == report["rows"]
    assert {(r["mode"], r["batch"], r["precision"]) for r in report["rows"]} == ALL_CONFIGS
    assert all(r["status"] == "skipped: the time budget is spent" for r in report["rows"])

    budget = gpu_suite.Budget(0.05)  # the alarm stops a configuration that overruns
    try:
        with pytest.raises(gpu_suite.OutOfTime):
            budget.run(lambda: time.sleep(5))
        assert budget.spent and budget.left() < 0
    finally:
        budget.close()

    args = gpu_suite.parse_args(["--repeats", "1"])
    ran = {"status": "ok", "mode": "eager", "batch": 4, "precision": "fp32",
           "seconds": {"setup": 1.0, "cycle": 6.0, "compile": 0.0}}
    updates = 6 * 3 + 2 + 2 * 2 * 2 + 3
    assert gpu_suite.estimate(("eager", 4, "bf16"), [], args) is None  # the first one runs
    assert gpu_suite.estimate(("eager", 4, "bf16"), [ran], args) == 1 + updates
    assert gpu_suite.estimate(("eager", 2, "bf16"), [ran], args) == 1 + updates / 2
    assert gpu_suite.estimate(("compiled", 4, "fp32"), [ran], args) == 1 + updates + 180


def tiny_run(tmp_path, *flags):
    """distill.py's arguments and state on a tiny random teacher, with a random fake model that
    computes something, and one fixed batch."""
    tmp, teacher, data = measure.scratch_files(8, cond=False, net_config=gpu_suite.TINY_NET,
                                               folder=tmp_path)
    dargs, s = measure.distill_state(["--teacher", teacher, "--data", data, "--out", tmp,
                                      "--alpha", 0.94, "--beta", 0.96, "--batch-size", 8,
                                      "--device", "cpu", "--workers", 0, *flags])
    torch.manual_seed(1)
    measure.fill_zero_layers(s.fake)
    return dargs, s, distill.draw(s, dargs)


def gradients(dargs, s, batch):
    """The generator's and the fake model's gradients of distill.py's updates on `batch`."""
    return [measure.update_gradient(update, player, s, dargs, batch)[0]
            for update, player in ((distill.generator_update, s.gen_player),
                                   (distill.fake_update, s.fake_player))]


@pytest.mark.parametrize("flags", [["--compile"], ["--channels-last"]],
                         ids=["compile-aot_eager", "channels-last"])
def test_same_update_as_the_default(tmp_path, monkeypatch, one_thread, flags):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    dargs, s, batch = tiny_run(tmp_path / "default")
    dargs_t, t, batch_t = tiny_run(tmp_path / "other", *flags)
    assert all(torch.equal(batch[k], batch_t[k]) for k in ("z", "x0", "t", "x_d"))
    if "--compile" in flags:
        assert isinstance(t.gen_player.forward, torch._dynamo.eval_frame.OptimizedModule)
    else:
        assert t.gen.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    for name, g, g_t in zip(("generator", "fake model"), gradients(dargs, s, batch),
                            gradients(dargs_t, t, batch_t)):
        assert g.norm() > 0
        assert measure.compare(g_t, g)["rel_err"] < 1e-5, name


def test_approach_teacher_and_float64(tmp_path, one_thread):
    _, s, batch = tiny_run(tmp_path)
    f0 = {k: v.clone() for k, v in s.fake.state_dict().items()}
    measure.approach_teacher(s.fake, s.teacher, 1e-3)
    for k, v in s.fake.state_dict().items():
        t = s.teacher.state_dict()[k]
        assert torch.allclose(v, t + 1e-3 * (f0[k] - t), atol=1e-7)
        assert torch.equal(s.fake_frozen.state_dict()[k], v)  # the alias follows
    x, t = batch["x_d"], batch["t"]
    out32 = s.teacher(t, x)
    precision_study.to_float64(s.teacher)
    out64 = s.teacher(t, x.double())
    assert out64.dtype == torch.float64
    assert (out64 - out32.double()).norm() / out64.norm() < 1e-5


def test_precision_suite_on_a_tiny_run(tmp_path, tiny_data, one_thread):
    """The precision suite on a run folder it reuses (a tiny teacher and 2 RealUID steps made
    here instead of its own few-minute run): fp32 agrees with float64 to its rounding, bf16
    loses digits as f approaches v*, and mixed keeps them."""
    work = tmp_path / "run"
    (work / "teacher").mkdir(parents=True)
    shutil.copy(tiny_data["uncond"], work / "toy.npz")
    run(train_teacher, ["--data", work / "toy.npz", "--out", work / "teacher", "--steps", 3,
                        "--lr", 1e-3, "--warmup", 0, "--ema", 0.995, *TINY_NET, *FAST])
    run(distill, ["--teacher", work / "teacher" / "latest.pt", "--teacher-ema", 0.995,
                  "--data", work / "toy.npz", "--out", work / "distill", "--alpha", 0.94,
                  "--beta", 0.96, "--steps", 2, "--lr", 1e-3, "--warmup", 0, *FAST])
    out = tmp_path / "precision.json"
    bench.main(bench.parse_args(["--suite", "precision", "--workdir", str(work),
                                 "--batch-size", "8", "--eps", "1e-3", "--out", str(out)]))
    report = json.loads(out.read_text())
    assert report["reused_run"] and report["autocast_fp16_on_device"]
    rows = {(r["eps"], r["precision"]): r for r in report["rows"]}
    assert set(rows) == {(e, p) for e in (None, 1e-3) for p in ("fp32", "bf16", "mixed")}
    for eps in (None, 1e-3):
        assert rows[eps, "fp32"]["reference"] == "fp64"
        assert rows[eps, "fp32"]["generator"]["rel_err"] < 1e-4
        assert rows[eps, "bf16"]["generator"]["rel_err"] > 1e-4
        assert rows[eps, "mixed"]["fake"] == rows[eps, "bf16"]["fake"]  # one fake update
    near, trained = rows[1e-3, "bf16"]["generator"], rows[None, "bf16"]["generator"]
    assert near["rel_err"] > 5 * trained["rel_err"]
    assert rows[1e-3, "mixed"]["generator"]["rel_err"] < near["rel_err"] / 5


# --- imports -------------------------------------------------------------------------------------

def import_graph(root):
    """The repository's modules (top-level scripts `name`, benchmarks `benchmarks.name`, tests
    `tests.name`) and, for each, the repository modules it imports anywhere in its code:
    `import x`, `from x import y`, `from benchmarks import y` (a module when benchmarks/y.py
    exists) and importlib.import_module / __import__ of a string literal; a file that calls
    them with a computed name imports every module that a string literal names. A benchmark's
    bare `import y` may also mean benchmarks/y.py (its folder is sys.path[0] when it runs)."""
    files = {}
    for folder, prefix in (("", ""), ("benchmarks", "benchmarks."), ("tests", "tests.")):
        for name in sorted(os.listdir(os.path.join(root, folder) or root)):
            if name.endswith(".py"):
                files[prefix + name[:-3]] = os.path.join(root, folder, name)
    top = {m for m in files if "." not in m} | {"conftest"}

    def resolve(name, importer):
        if name in files:
            return name
        head = name.split(".")[0]
        if head in top:
            return "tests.conftest" if head == "conftest" else head
        if importer.startswith("benchmarks.") and "benchmarks." + head in files:
            return "benchmarks." + head
        return None

    graph = {}
    for module, path in files.items():
        names, strings, computed = [], [], False
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
            if isinstance(node, ast.Import):
                names += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names += [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Call) and node.args and getattr(
                    node.func, "attr", getattr(node.func, "id", None)) in ("import_module",
                                                                          "__import__"):
                if isinstance(node.args[0], ast.Constant):
                    names.append(node.args[0].value)
                else:
                    computed = True
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                strings.append(node.value)
        names += [n for n in strings if n in files] if computed else []
        graph[module] = {t for t in (resolve(n, module) for n in names) if t and t != module}
    return graph


def import_cycles(graph):
    """The strongly connected components with more than one module (Tarjan's algorithm): every
    set of modules that import each other, directly or through others."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_import_cycles_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e2"}, "e2": set()}
    assert import_cycles(graph) == [["a", "b", "c"]]


def test_no_benchmark_or_plot_in_an_import_cycle():
    """benchmarks/*.py share benchmarks/measure.py, which imports no benchmark; bench.py imports
    its suites, which do not import it back; plot.py imports no benchmark."""
    graph = import_graph(ROOT)
    assert "benchmarks.measure" in graph["benchmarks.gpu_suite"]
    assert "benchmarks.gpu_suite" in graph["benchmarks.bench"]
    assert not any(m.startswith("benchmarks.") for m in graph["benchmarks.measure"])
    ours = [c for c in import_cycles(graph)
            if any(m.startswith("benchmarks.") or m == "plot" for m in c)]
    assert ours == []


# --- the quick-start benchmarks --------------------------------------------------------------

@pytest.mark.parametrize("script", ["quickstart", "quickstart_pairs"])
def test_quick_start_benchmarks_write_only_below_their_own_folder(script):
    """The README's commands (tests/test_pipeline.py compares them with the README) run with
    every runs/ path moved below the benchmark's own runs/bench_* folder, nothing else
    changed: the README's own runs/toy_teacher, runs/toy_distill, ... are never touched."""
    module = importlib.import_module(f"benchmarks.{script}")
    assert module.WORK.startswith("runs/bench_")
    for command in module.COMMANDS:
        moved = quickstart.here(command, module.WORK)
        paths = [w for w in moved.split() if "runs/" in w]
        assert paths and all(w.startswith(module.WORK + "/") for w in paths), moved
        assert moved.replace(module.WORK + "/", "runs/") == command
    with pytest.raises(ValueError, match="not a benchmark's own folder"):
        quickstart.fresh("runs")
