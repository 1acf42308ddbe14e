"""An EDM2 pickle as a teacher, end to end: distill.py (RealUID, the GAN baseline, a recipe),
resume, sample.py (Euler and EDM's Heun) on the pickle and on the distilled generator; the
students keep EDM2's forced weight normalisation (EDM2 paper Eq. 66)."""
import numpy as np
import pytest
import torch

import distill
import edm2
import networks
import sample
import teachers
from conftest import FAST, load, run
from test_edm2 import CASES, build, write_edm2_pickle


@pytest.fixture()
def edm2_pickle(tmp_path):
    path = tmp_path / "edm2-img8-toy.pkl"
    write_edm2_pickle(path, build("pixel uncond"), CASES["pixel uncond"], dtype=torch.float16)
    return path


def test_distill_resume_and_sample_an_edm2_teacher(tmp_path, edm2_pickle, tiny_data):
    teacher = teachers.load_teacher(edm2_pickle)
    assert isinstance(teacher.denoiser, edm2.Precond) and networks.is_diffusion(teacher)
    assert next(teacher.parameters()).dtype == torch.float32  # fp16 in the file, fp32 here
    common = ["--teacher", edm2_pickle, "--data", tiny_data["uncond"], *FAST]
    run(distill, [*common, "--alpha", 0.94, "--beta", 0.96, "--steps", 2, "--fake-steps", 2,
                  "--lr", 1e-3, "--out", tmp_path / "realuid"])
    ckpt = load(tmp_path / "realuid" / "latest.pt")
    assert ckpt["config"]["net"]["edm"] == "Precond"
    # the students' weights stay normalised after every step (forced weight normalisation)
    gen = networks.build_network(ckpt["config"]["net"], ckpt["gen"])
    for m in gen.modules():
        if isinstance(m, edm2.MPConv):
            assert torch.allclose(m.weight, edm2.normalize(m.weight), atol=1e-5)
    run(distill, ["--resume", tmp_path / "realuid", "--steps", 3])
    assert load(tmp_path / "realuid" / "latest.pt")["step"] == 3
    # the GAN head needs a second pass of the fake model before its backward pass
    run(distill, [*common, "--recipe", "gan", "--steps", 1, "--fake-steps", 1,
                  "--out", tmp_path / "gan"])
    run(distill, [*common, "--recipe", "sid", "--steps", 1, "--out", tmp_path / "sid"])
    for ckpt_path, extra in ((edm2_pickle, ["--nfe", 3]),
                             (edm2_pickle, ["--nfe", 4, "--sampler", "heun"]),
                             (tmp_path / "realuid", [])):
        out = tmp_path / f"s{len(list(tmp_path.iterdir()))}.npz"
        run(sample, ["--ckpt", ckpt_path, "--n", 4, "--out", out, *extra])
        images = np.load(out)["images"]
        assert images.shape == (4, 8, 8, 3) and images.std() > 0


def test_forced_weight_norm_is_edm2s_training_pass():
    """networks.forced_weight_norm (normalise once per step, outside forward) gives the numbers
    of EDM2's own training-mode pass (the rewrite inside forward), output and gradient."""
    torch.manual_seed(0)
    ref = edm2.Precond(**CASES["pixel uncond"]).train()
    ours = edm2.Precond(**CASES["pixel uncond"]).train()
    ours.load_state_dict(ref.state_dict())
    with torch.no_grad():  # weights far from normalised, as after an optimizer step
        for a, b in zip(ref.parameters(), ours.parameters()):
            a.mul_(3.0), b.mul_(3.0)
    after_step = networks.forced_weight_norm(ours)
    assert after_step is not None and networks.forced_weight_norm(torch.nn.Linear(2, 2)) is None
    x, sigma = torch.randn(2, 3, 8, 8), torch.full((2,), 1.5)
    torch.manual_seed(1)
    out_ref = ref(x, sigma)
    torch.manual_seed(1)
    out_ours = ours(x, sigma)
    assert torch.allclose(out_ref, out_ours, rtol=1e-5, atol=1e-6)
    out_ref.square().sum().backward()
    out_ours.square().sum().backward()
    for a, b in zip(ref.parameters(), ours.parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-7)
