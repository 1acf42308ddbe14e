"""A diffusers folder as a teacher, end to end: distill.py (RealUID, SiD's and DMD's recipes, the
GAN head), resume, sample.py on the folder and on the generator, and the generator exported as a
diffusers folder that diffusers itself loads. Needs diffusers (optional: skipped without)."""
import numpy as np
import pytest
import torch

import distill
import networks
import sample
import teachers
from conftest import FAST, load, run

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")
from test_diffusers_teacher import save_folder, tiny_unet  # noqa: E402


@pytest.fixture()
def folder(tmp_path):
    from diffusers import DDPMScheduler
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                              prediction_type="epsilon")
    return save_folder(tmp_path / "ddpm-toy", tiny_unet(), scheduler, "pipeline")


def test_distill_resume_sample_and_export_a_diffusers_teacher(tmp_path, folder, tiny_data):
    from diffusers import UNet2DModel
    teacher = teachers.load_teacher(folder)
    assert networks.is_diffusion(teacher) and networks.t_range(teacher)[1] == pytest.approx(
        0.99010, abs=1e-5)
    common = ["--teacher", folder, "--data", tiny_data["uncond"], *FAST]
    run(distill, [*common, "--alpha", 0.94, "--beta", 0.96, "--steps", 2, "--fake-steps", 1,
                  "--out", tmp_path / "realuid"])
    ckpt = load(tmp_path / "realuid" / "latest.pt")
    saved = ckpt["config"]["args"]
    assert "diffusers" in ckpt["config"]["net"] and ckpt["config"]["t_g"] == pytest.approx(1 / 3.5)
    assert (saved["fake_t"], saved["gen_t"], saved["fake_init"]) == ("edm", "sid", "teacher")
    run(distill, ["--resume", tmp_path / "realuid", "--steps", 3])
    assert load(tmp_path / "realuid" / "latest.pt")["step"] == 3
    for recipe in ("sid", "dmd", "gan"):
        run(distill, [*common, "--recipe", recipe, "--steps", 1, "--fake-steps", 1,
                      "--out", tmp_path / recipe])
    for ckpt_path, extra in ((folder, ["--nfe", 3]), (folder, ["--nfe", 3, "--sampler", "heun"]),
                             (tmp_path / "realuid", [])):
        out = tmp_path / f"s{len(list(tmp_path.iterdir()))}.npz"
        run(sample, ["--ckpt", ckpt_path, "--n", 4, "--out", out, *extra])
        images = np.load(out)["images"]
        assert images.shape == (4, 8, 8, 3) and images.std() > 0
    # the generator as a diffusers folder: diffusers loads it, and it is the same network
    export = tmp_path / "exported"
    run(sample, ["--ckpt", tmp_path / "realuid", "--export-diffusers", export])
    unet = UNet2DModel.from_pretrained(str(export)).eval()
    gen = networks.build_network(ckpt["config"]["net"], load(
        tmp_path / "realuid" / "latest.pt")["ema_gens"]["0.999"]).eval()
    x, k = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        assert torch.equal(unet(x, k).sample, gen.unet(x, k).sample)
    with pytest.raises(Exception, match="not an empty folder"):
        run(sample, ["--ckpt", tmp_path / "realuid", "--export-diffusers", export])
