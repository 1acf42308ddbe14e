"""Latent teachers (EDM2's img512 pickles) with a VAE folder the user supplies (latents.py): the
latent scale and bias of the pickle's encoder, the VAE read safely from a diffusers folder,
EDM2's encode / decode conventions, and distill.py / sample.py end to end on a tiny latent
EDM2 network with a tiny AutoencoderKL built and saved by diffusers itself. Needs diffusers
(optional: skipped without)."""
import os
import pickle

import numpy as np
import pytest
import torch

import distill
import latents
import networks
import sample
import teachers
from common import RealUIDError
from conftest import FAST, load, run, shapes_dataset
from test_edm2 import TINY, set_weights, write_edm2_pickle

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

LATENT = dict(TINY, img_channels=4, label_dim=0)  # 4x8x8 latents; the VAE's images are 16x16
RAW_MEAN, RAW_STD = [5.81, 3.25, 0.12, -2.15], [4.17, 4.62, 3.71, 3.28]  # EDM2's defaults


def tiny_vae(seed=0, levels=2):
    """A random AutoencoderKL of Stable Diffusion's kind, small: 4 latent channels, one halving
    per extra level (16x16 images -> 8x8 latents with 2 levels)."""
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels,
                         block_out_channels=(8, 16, 16)[:levels], norm_num_groups=4,
                         sample_size=16).eval()


@pytest.fixture()
def vae_dir(tmp_path):
    path = tmp_path / "sd-vae-toy"
    tiny_vae().save_pretrained(path)  # config.json + diffusion_pytorch_model.safetensors
    return path


@pytest.fixture()
def latent_pickle(tmp_path):
    import edm2
    torch.manual_seed(0)
    path = tmp_path / "edm2-img512-toy.pkl"
    net = set_weights(edm2.Precond(**LATENT)).eval()  # nonzero gains: EDM2 starts them at 0
    write_edm2_pickle(path, net, LATENT, dtype=torch.float16, latent=True)
    return path


@pytest.fixture()
def images16(tmp_path):
    path = tmp_path / "images16.npz"
    np.savez(path, images=shapes_dataset(32, size=16)[0])
    return path


def one_line(exc_info):
    message = str(exc_info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# ---------------------------------------------------------------------------------------------
# The encoder's scale and bias

def test_latent_settings_are_edm2s_float32_scale_and_bias():
    want_scale = np.float32(0.5) / np.float32(RAW_STD)
    want_bias = np.float32(0) - np.float32(RAW_MEAN) * want_scale
    # from EDM2's constructor defaults (a pickle whose state held no arrays) ...
    got = latents.latent_settings({"class_name": "StabilityVAEEncoder", "init_args": (),
                                   "init_kwargs": {}})
    assert got["vae"] == "stabilityai/sd-vae-ft-mse"
    assert got["scale"] == [float(v) for v in want_scale]  # exactly, float32 arithmetic
    assert got["bias"] == [float(v) for v in want_bias]
    assert got["scale"][0] == pytest.approx(0.5 / 4.17, rel=1e-6)
    # ... from other arguments, and from the stored state first (the values EDM2 used)
    got = latents.latent_settings({"class_name": "StabilityVAEEncoder", "init_kwargs": {
        "final_std": 1.0, "raw_mean": [0.0] * 4, "raw_std": [2.0] * 4}})
    assert got["scale"] == [0.5] * 4 and got["bias"] == [0.0] * 4
    state = {"vae_name": "mine", "scale": np.float32([1, 2, 3, 4]), "bias": np.float32([0] * 4)}
    got = latents.latent_settings({"class_name": "StabilityVAEEncoder", "init_kwargs": {},
                                   "state": state})
    assert got == {"vae": "mine", "scale": [1.0, 2.0, 3.0, 4.0], "bias": [0.0] * 4}
    # pixel encoders (EDM2's img64) and EDM's pickles (no encoder): no latents
    assert latents.latent_settings({"class_name": "StandardRGBEncoder"}) is None
    assert latents.latent_settings(None) is None
    for bad, words in (({"class_name": "MyEncoder"}, "only EDM2's"),
                       ({"class_name": "StabilityVAEEncoder",
                         "state": {"scale": np.float32([0, 1, 1, 1]), "bias": [0] * 4}}, "zero"),
                       ({"class_name": "StabilityVAEEncoder",
                         "state": {"scale": [1.0] * 4, "bias": [0.0] * 3}}, "channels")):
        with pytest.raises(RealUIDError) as caught:
            latents.latent_settings(bad, "x.pkl")
        assert words in one_line(caught)


def test_a_latent_pickle_becomes_a_field_that_carries_its_settings(latent_pickle):
    teacher = teachers.load_teacher(latent_pickle)
    settings = networks.latent_settings(teacher)
    scale = np.float32(0.5) / np.float32(RAW_STD)
    assert settings["scale"] == [float(v) for v in scale]  # the pickle's stored float32 arrays
    assert networks.image_shape(teacher) == (4, 8, 8)
    # students are built from the teacher's config and keep the settings; pixel fields have none
    student = networks.build_network(networks.student_config(teacher, 0.0))
    assert networks.latent_settings(student) == settings
    assert networks.latent_settings(networks.DenoiserField(teacher.denoiser)) is None


# ---------------------------------------------------------------------------------------------
# The VAE folder and EDM2's conventions

def test_codec_follows_edm2s_encode_and_decode(vae_dir):
    """EDM2's StabilityVAEEncoder, written out with diffusers' own calls: pixels / 255 into the
    VAE, the posterior mean + std * eps, then * scale + bias; decoding undoes the affine map,
    runs the decoder and truncates clamp(0, 1) * 255. Chunking (the VAE's memory) changes
    nothing."""
    vae = latents.load_vae(vae_dir)
    settings = latents.latent_settings({"class_name": "StabilityVAEEncoder"})
    codec = latents.LatentCodec(vae, settings, (4, 8, 8), batch=3)
    assert codec.pixel_shape == (3, 16, 16)
    g = torch.Generator().manual_seed(0)
    x_u8 = torch.randint(0, 256, (5, 3, 16, 16), generator=g, dtype=torch.uint8)
    eps = torch.randn(5, 4, 8, 8, generator=g)
    scale = torch.tensor(settings["scale"]).view(1, 4, 1, 1)
    bias = torch.tensor(settings["bias"]).view(1, 4, 1, 1)
    with torch.no_grad():
        d = tiny_vae().encode(x_u8.float() / 255).latent_dist
        want = (d.mean + d.std * eps) * scale + bias
        z = codec.encode(x_u8, eps)
        assert torch.allclose(z, want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(codec.encode(x_u8, torch.zeros_like(eps)), z)  # eps is used
        raw = tiny_vae().decode((z - bias) / scale).sample
        want_u8 = (raw.clamp(0, 1) * 255).to(torch.uint8)
    got = codec.decode(z)
    assert got.dtype == torch.uint8 and got.shape == (5, 3, 16, 16)
    assert (got.int() - want_u8.int()).abs().max() <= 1  # a float-rounding step at most
    assert (got == want_u8).float().mean() > 0.99
    # decode_signed is the same bytes through this repository's [-1, 1] convention
    import common
    assert torch.equal(common.to_uint8(codec.decode_signed(z)), got)
    # a codec must fit the teacher: channels and scales
    with pytest.raises(RealUIDError) as caught:
        latents.LatentCodec(vae, settings, (3, 8, 8))
    assert "4-channel latents" in one_line(caught)


class Boom:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_vae_folders_are_read_safely(tmp_path, vae_dir):
    want = tiny_vae().state_dict()
    # the flat layout and a pipeline folder's vae/
    for path in (vae_dir, tmp_path):
        (tmp_path / "vae").exists() or os.symlink(vae_dir, tmp_path / "vae")
        got = latents.load_vae(path).state_dict()
        assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    # the 2022 VAEs' attention names (query, key, value, proj_attn) are read as diffusers does
    import safetensors.torch
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((vae_dir / "config.json").read_text())
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in want.items():
        for new, before in names.items():
            if ".attentions.0." in k and f".{new}." in k:
                k = k.replace(f".{new}.", f".{before}.")
        renamed[k] = v.contiguous()
    assert any(".query." in k for k in renamed)
    safetensors.torch.save_file(renamed, old / "diffusion_pytorch_model.safetensors")
    got = latents.load_vae(old).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # a folder whose only weights are a pickle that runs a command: refused, never run
    bad = tmp_path / "bin"
    bad.mkdir()
    (bad / "config.json").write_text((vae_dir / "config.json").read_text())
    witness = tmp_path / "ran"
    with open(bad / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump(Boom(witness), f)
    with pytest.raises(RealUIDError) as caught:
        latents.load_vae(bad)
    assert "pickle" in one_line(caught) and not witness.exists()
    # not a VAE, missing, weights that do not fit
    (bad / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(RealUIDError) as caught:
        latents.load_vae(bad)
    assert "not a AutoencoderKL" in one_line(caught)
    with pytest.raises(RealUIDError) as caught:
        latents.load_vae(tmp_path / "nowhere")
    assert "not a folder" in one_line(caught)
    small = tmp_path / "small"
    tiny_vae(levels=1).save_pretrained(small)
    (small / "config.json").write_text((vae_dir / "config.json").read_text())
    with pytest.raises(RealUIDError) as caught:
        latents.load_vae(small)
    assert "do not fit its config" in one_line(caught)


# ---------------------------------------------------------------------------------------------
# distill.py and sample.py on a latent teacher

def test_distill_resume_and_sample_a_latent_teacher(tmp_path, latent_pickle, vae_dir, images16,
                                                    monkeypatch):
    common = ["--teacher", latent_pickle, "--data", images16, *FAST]
    realuid = [*common, "--alpha", 0.94, "--beta", 0.96, "--steps", 2, "--fake-steps", 1]
    # real data needs the VAE, in one line naming the flag
    with pytest.raises(RealUIDError) as caught:
        run(distill, [*realuid, "--out", tmp_path / "novae"])
    assert "--vae" in one_line(caught)
    # the real batches go through the codec: pixels of the VAE's size in, latents out
    seen = []
    encode = latents.LatentCodec.encode

    def spy(self, x_u8, eps):
        seen.append((x_u8.dtype, tuple(x_u8.shape), tuple(eps.shape)))
        return encode(self, x_u8, eps)
    monkeypatch.setattr(latents.LatentCodec, "encode", spy)
    run(distill, [*realuid, "--vae", vae_dir, "--sample-every", 1, "--out", tmp_path / "run"])
    assert set(seen) == {(torch.uint8, (8, 3, 16, 16), (8, 4, 8, 8))}
    assert len(seen) == 2  # once per fake-model update; the generator's loss reads no x_d
    ckpt = load(tmp_path / "run" / "latest.pt")
    assert ckpt["config"]["net"]["latents"]["vae"] == "stabilityai/sd-vae-ft-mse"
    assert "vae" in ckpt["config"]["data"]
    from PIL import Image
    grids = sorted(os.listdir(tmp_path / "run" / "samples"))
    assert grids and Image.open(tmp_path / "run" / "samples" / grids[-1]).size == (
        8 * 18 + 2, 8 * 18 + 2)  # 64 decoded 16x16 images, 8 per row, 2-pixel borders
    # resume: the same VAE goes on; another VAE is refused
    run(distill, ["--resume", tmp_path / "run", "--steps", 3])
    assert load(tmp_path / "run" / "latest.pt")["step"] == 3
    other = tmp_path / "other-vae"
    tiny_vae(seed=1).save_pretrained(other)
    with pytest.raises(RealUIDError) as caught:
        run(distill, ["--resume", tmp_path / "run", "--steps", 4, "--vae", other])
    assert "not the VAE" in one_line(caught)
    # data-free needs no VAE; the GAN head works on latents
    run(distill, [*common, "--recipe", "uid", "--steps", 1, "--out", tmp_path / "uid"])
    run(distill, [*common, "--recipe", "gan", "--steps", 1, "--fake-steps", 1, "--vae", vae_dir,
                  "--out", tmp_path / "gan"])
    # samples: decoded images of the VAE's size, from the teacher and from the generator
    for ckpt_path, extra in ((latent_pickle, ["--nfe", 3]),
                             (latent_pickle, ["--nfe", 3, "--sampler", "heun"]),
                             (tmp_path / "run", []), (tmp_path / "uid", [])):
        out = tmp_path / f"s{len(list(tmp_path.iterdir()))}.npz"
        run(sample, ["--ckpt", ckpt_path, "--n", 4, "--vae", vae_dir, "--out", out, *extra])
        images = np.load(out)["images"]
        assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8 and images.std() > 0
    with pytest.raises(RealUIDError) as caught:
        run(sample, ["--ckpt", tmp_path / "run", "--n", 4, "--out", tmp_path / "x.npz"])
    assert "--vae" in one_line(caught)


def test_a_vae_given_to_a_pixel_teacher_is_refused(tmp_path, teachers, tiny_data, vae_dir):
    with pytest.raises(RealUIDError) as caught:
        run(distill, ["--teacher", teachers["uncond"], "--data", tiny_data["uncond"], *FAST,
                      "--vae", vae_dir, "--steps", 1, "--out", tmp_path / "r"])
    assert "drop --vae" in one_line(caught)
    with pytest.raises(RealUIDError) as caught:
        run(sample, ["--ckpt", teachers["uncond"], "--vae", vae_dir, "--n", 2, "--nfe", 2,
                     "--out", tmp_path / "x.png"])
    assert "drop --vae" in one_line(caught)


def test_two_processes_encode_their_slices_as_one_process(tmp_path, latent_pickle, vae_dir,
                                                           images16):
    """torchrun with 2 processes (gloo): each encodes its half of the real batch with its rows
    of the VAE noise, and two updates of each player give one process's gradients (Adam's
    exp_avg, beta1 = 0: the last gradient, at a negligible learning rate, as in
    tests/test_scale.py). It also failed before EDM2's uncertainty head was frozen in the
    students (networks.freeze_unused): the generator's first gradient came out partly
    un-averaged, and the second update stopped in DistributedDataParallel."""
    from test_scale import grads, rel_diff, torchrun
    argv = ["--teacher", latent_pickle, "--data", images16, "--vae", vae_dir, "--alpha", 0.94,
            "--beta", 0.96, "--fake-init", "random", "--steps", 2, "--fake-steps", 1,
            "--lr", 1e-9, "--warmup", 0, *FAST]
    run(distill, [*argv, "--out", tmp_path / "one"])
    torchrun("distill.py", *argv, "--out", tmp_path / "two")
    a, b = load(tmp_path / "one" / "latest.pt"), load(tmp_path / "two" / "latest.pt")
    for opt in ("optim_u", "optim_gen"):
        ga, gb = grads(a, opt), grads(b, opt)
        assert ga.norm() > 0 and rel_diff(ga, gb) < 1e-4, opt


def test_in_training_fid_of_a_latent_teacher_scores_decoded_images(tmp_path, latent_pickle,
                                                                   vae_dir, images16, weights):
    """--fid-every on a latent teacher scores the VAE's decoded images (random Inception
    weights, 4 samples): the logged FID is that of the EMA generator's latents decoded by the
    codec, computed here again; without --vae the run stops in one line."""
    import inception
    extractor = inception.InceptionFeatures(weights, mode="tf", device="cpu")
    with np.load(images16) as f:
        real = torch.from_numpy(f["images"][:8]).permute(0, 3, 1, 2)
    mu, sigma, n = inception.feature_stats([real[:4], real[4:]], extractor)
    ref = tmp_path / "ref.npz"
    inception.save_stats(ref, mu, sigma, "tf", n, extractor.weights_sha256)
    flags = ["--teacher", latent_pickle, "--recipe", "uid", "--steps", 1, *FAST,
             "--fid-every", 1, "--fid-n", 4, "--fid-batch", 4, "--fid-ref", ref,
             "--fid-weights", weights]
    with pytest.raises(RealUIDError) as caught:
        run(distill, [*flags, "--out", tmp_path / "novae"])
    assert "--fid-every" in one_line(caught) and "--vae" in one_line(caught)
    run(distill, [*flags, "--vae", vae_dir, "--out", tmp_path / "run"])
    import json
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        fid = [json.loads(line)["fid"] for line in f if '"fid"' in line]
    ckpt = load(tmp_path / "run" / "latest.pt")
    ema = networks.build_network(ckpt["config"]["net"], ckpt["ema_gens"]["0.999"]).eval()
    codec = latents.LatentCodec(latents.load_vae(vae_dir), networks.latent_settings(ema),
                                (4, 8, 8))
    z = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():
        x = codec.decode(distill.generate(ema, z, t_g=ckpt["config"]["t_g"]))
    mu2, sigma2, _ = inception.feature_stats([x], extractor)
    assert len(fid) == 1 and fid[0] == pytest.approx(
        inception.frechet_distance(mu2, sigma2, mu, sigma), rel=1e-5)
