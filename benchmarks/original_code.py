"""What check_edm.py and check_edm2.py share: comparing this repository's networks with the
original code's (NVlabs/edm, NVlabs/edm2) in a second, fresh interpreter that cannot import that
code, with a pickle that would run a command beside the cases. Imports no benchmark.
"""
import importlib.util
import json
import os
import pickle
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _System:
    """Unpickling this runs a shell command (the attack the safe loader must refuse)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def relative_error(ours, theirs):
    """max |ours - theirs| / max |theirs|, in float32 at least (float16 outputs included)."""
    return float((ours.float() - theirs.float()).abs().max()
                 / theirs.float().abs().max().clamp_min(1e-30))


def refuse_importable(whose, modules):
    """Stop the comparing process if one of the original code's packages can be imported in it
    (e.g. a module of this repository named like one of theirs): it must read the pickles
    without their code."""
    for module in modules:
        spec = importlib.util.find_spec(module.split(".")[0])
        if spec is not None:
            raise SystemExit(f"{whose} {module} is importable in the comparing process "
                             f"(from {spec.origin}); rename or remove it")


def compare_in_fresh_process(script, work, manifest):
    """Parent side: write the cases' manifest and work/evil.pkl (a pickle whose loading would
    create work/pwned), run `script --compare work` in an interpreter whose path holds this
    repository only (not the original code's checkout), and return the result.json it wrote;
    None if it failed (its error is printed above)."""
    with open(os.path.join(work, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    with open(os.path.join(work, "evil.pkl"), "wb") as f:
        pickle.dump({"ema": _System(f"touch {os.path.join(work, 'pwned')}")}, f)
    env = dict(os.environ, PYTHONPATH=ROOT)
    if subprocess.run([sys.executable, os.path.abspath(script), "--compare", work], env=env,
                      cwd=ROOT).returncode:
        print("the comparing process failed (its error is above)")
        return None
    with open(os.path.join(work, "result.json")) as f:
        return json.load(f)
