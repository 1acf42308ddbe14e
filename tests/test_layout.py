"""The repository's layout: names that shadow nothing, no import circle, no stage script importing
another, losses.py copyable with flow.py alone, module sizes, no reference to files users lack.
"""
import ast
import os
import re
import shutil
import subprocess
import sys
import textwrap

from test_bench import import_cycles, import_graph

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The stage scripts (one per paper stage) and the commands beside them.
STAGES = {"train_teacher", "distill", "finetune", "sample", "fid", "eval_pairs", "plot",
          "toy_data"}
ALLOWED_STAGE_IMPORTS = {("finetune", "distill")}  # finetune.py is distill.py with other defaults
# Top-level packages that users of EDM, EDM2, SiD, DMD2, diffusers and the usual ML stacks have
# on their path: a module of ours with one of these names shadows theirs (or theirs ours).
NEIGHBOURS = {"training", "torch_utils", "dnnlib", "metrics", "utils", "models", "diffusers",
              "networks_edm2", "generate", "dataset", "datasets", "loss", "main", "train",
              "config", "configs", "data", "model", "util", "tools", "scripts", "evaluation",
              "transformers", "accelerate", "safetensors", "torch", "torchvision", "numpy",
              "scipy", "PIL", "pytest", "test", "src", "lib", "sid", "third_party", "legacy"}
MAX_LINES = 760  # the rule is 800; a module near it should have been split by responsibility


def top_level_modules():
    return sorted(n[:-3] for n in os.listdir(ROOT) if n.endswith(".py"))


def test_no_module_shadows_a_neighbouring_package():
    shadowing = sorted(set(top_level_modules()) & NEIGHBOURS)
    folders = sorted(n for n in os.listdir(ROOT) if os.path.isdir(os.path.join(ROOT, n))
                     and os.path.exists(os.path.join(ROOT, n, "__init__.py")) and n in NEIGHBOURS)
    assert shadowing == [] and folders == [], (
        f"{shadowing + folders} would shadow (or be shadowed by) a package users have beside "
        "this repository; rename it")


def test_the_shadow_check_finds_a_shadowing_module(tmp_path):
    """The comparing process of benchmarks/check_edm.py refuses to run when EDM's packages are
    importable; a product module named like one of them is exactly that case."""
    (tmp_path / "training.py").write_text("")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    code = "import importlib.util; print(importlib.util.find_spec('training').origin)"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(tmp_path / "training.py")
    # and in this repository, with only its own folder on the path, none of them is found
    code = ("import importlib.util, sys; "
            "print([m for m in ('training', 'torch_utils', 'dnnlib') "
            "if importlib.util.find_spec(m) is not None])")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=ROOT),
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_no_import_circle_and_no_stage_imports_a_stage():
    graph = import_graph(ROOT)
    product = {m: {t for t in deps if "." not in t} for m, deps in graph.items() if "." not in m}
    assert import_cycles(product) == []
    stage_to_stage = sorted((m, t) for m, deps in product.items() if m in STAGES
                            for t in deps if t in STAGES and (m, t) not in ALLOWED_STAGE_IMPORTS)
    assert stage_to_stage == []
    # the library modules import no stage script at all
    upward = sorted((m, t) for m, deps in product.items() if m not in STAGES and m != "startup"
                    for t in deps if t in STAGES)
    assert upward == []


def test_losses_import_only_torch_and_flow():
    for name, allowed in (("losses", {"torch", "flow"}), ("flow", {"torch"})):
        tree = ast.parse(open(os.path.join(ROOT, f"{name}.py")).read())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add(node.module.split(".")[0])
        assert imported <= allowed, f"{name}.py imports {sorted(imported - allowed)}"


def test_losses_and_flow_copied_alone_give_a_closed_form(tmp_path):
    """Copy losses.py and flow.py into an empty folder: eq. (18)'s generator loss with the
    exact fields of Gaussian data N(mu_d, I) and generator N(mu_g, I) is
    E_t[alpha |v* - v_g|^2] - E[alpha |f - (beta/alpha) u_g|^2 - ...] = (pi/4) |mu_d - mu_g|^2
    at alpha = beta = 1 with f = v_g (Lemma 1: the UID loss is the squared distance of fields,
    and v* - v_g = (mu_d - mu_g)(1 - t)/s^2 integrates to pi/4 over t)."""
    for name in ("losses.py", "flow.py"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    script = textwrap.dedent("""
        import math, torch
        from losses import generator_loss
        torch.manual_seed(0)
        D, B = 3, 400_000
        mu_d = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
        mu_g = torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64)
        def gaussian_field(mu):
            def v(t, x, y=None):
                t_ = t.view(-1, 1); s2 = t_ ** 2 + (1 - t_) ** 2
                return mu + (2 * t_ - 1) / s2 * (x - t_ * mu)
            return v
        x_g = mu_g + torch.randn(B, D, dtype=torch.float64)
        x0 = torch.randn(B, D, dtype=torch.float64)
        t = torch.rand(B, dtype=torch.float64)
        value = generator_loss(gaussian_field(mu_d), gaussian_field(mu_g), x_g, x0, t,
                               alpha=1.0, beta=1.0).item()
        print(value, math.pi / 4 * float(((mu_d - mu_g) ** 2).sum()))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    value, closed_form = map(float, out.stdout.split())
    assert abs(value - closed_form) < 0.02 * closed_form  # Monte Carlo error about 0.5%


def test_module_sizes():
    sizes = {n: sum(1 for _ in open(os.path.join(ROOT, n))) for n in os.listdir(ROOT)
             if n.endswith(".py")}
    assert {n: s for n, s in sizes.items() if s > MAX_LINES} == {}


def test_no_reference_to_files_outside_the_repository():
    """Code and docs cite the papers; no file users do not have (a specification kept beside the
    repository, an absolute path of a developer's machine)."""
    # the name of the specification file, spelled apart so that this test does not find itself
    pattern = re.compile(r"\b" + "SP" + r"EC\b|\.\./shared|/work/")
    found = []
    for folder, _, names in os.walk(ROOT):
        if any(part.startswith(".") for part in os.path.relpath(folder, ROOT).split(os.sep)
               if part != "."):
            continue
        for name in names:
            if name.endswith((".py", ".md", ".txt", ".toml", ".cfg")):
                path = os.path.join(folder, name)
                recorded = os.path.join("benchmarks", "results") in path  # printed output
                for i, line in enumerate(open(path, encoding="utf-8", errors="replace"), 1):
                    hit = pattern.search(line)
                    if hit and not (recorded and hit.group() == "/work/") and \
                            os.path.abspath(path) != os.path.abspath(__file__):
                        found.append(f"{os.path.relpath(path, ROOT)}:{i}")
    assert found == []
