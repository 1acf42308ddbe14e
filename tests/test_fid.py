"""Tests of fid.py: the Frechet distance against closed forms, the TF1 resize against a hand
computation, the Inception features end to end on random weights written here (the real file
cannot be downloaded in CI), weights-hash handling, statistics files and the command line.
When pytorch-fid / torch-fidelity are importable (PYTHONPATH=/opt/ref), the features and the
distance are also compared with theirs on the same random weights."""

import hashlib
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fid  # noqa: E402
import inception  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The random test weights are not the standard file: fid.py warns about it on every load.
pytestmark = pytest.mark.filterwarnings("ignore:.*not comparable with published FIDs")


def random_images(n, size=32, seed=0):
    """uint8 [n, 3, size, size]: half smooth (like natural images), half pixel noise."""
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=(size, size),
                                             mode="bilinear", align_corners=False)
    noise = torch.rand(n, 3, size, size, generator=g)
    x = torch.where(torch.arange(n)[:, None, None, None] % 2 == 0, smooth, noise)
    return (x * 255).round().to(torch.uint8)


@pytest.fixture(scope="session")
def extractor(weights):
    return inception.InceptionFeatures(weights, mode="tf", device="cpu")


def random_covariance(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / (rank or d)


# ---------------------------------------------------------------------------------------------
# Frechet distance

def test_frechet_equal_covariances_give_squared_mean_distance():
    rng = np.random.default_rng(0)
    for rank in (None, 5):  # full rank and singular (fewer samples than dimensions)
        sigma = random_covariance(rng, 32, rank)
        mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
        expected = np.sum((mu1 - mu2) ** 2)
        assert (inception.frechet_distance(mu1, sigma, mu2, sigma)
                == pytest.approx(expected, rel=1e-9, abs=1e-9))
        assert abs(inception.frechet_distance(mu1, sigma, mu1, sigma)) < 1e-9


def test_frechet_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3, 50), rng.uniform(0.1, 3, 50)
    mu1, mu2 = rng.standard_normal(50), rng.standard_normal(50)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert (inception.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
            == pytest.approx(expected, rel=1e-12))
    # scalar (1-d) inputs
    assert inception.frechet_distance(1.0, 4.0, 0.0, 1.0) == pytest.approx(1 + (2 - 1) ** 2, rel=1e-12)


def test_frechet_matches_sqrtm_formula_and_is_symmetric():
    rng = np.random.default_rng(2)
    s1, s2 = random_covariance(rng, 64), random_covariance(rng, 64)
    mu1, mu2 = rng.standard_normal(64), rng.standard_normal(64)
    independent = (np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2)
                   - 2 * np.trace(linalg.sqrtm(s1 @ s2)).real)
    ours = inception.frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(independent, rel=1e-9)
    assert inception.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ours, rel=1e-9)


def test_frechet_singular_covariances_exact():
    """n < d samples: tr (S1 S2)^(1/2) is the nuclear norm of Xc Yc^T / (n - 1) (centred data),
    an n x n problem; scipy's sqrtm is inaccurate here (about 1e-7 relative)."""
    rng = np.random.default_rng(8)
    x, y = rng.standard_normal((8, 512)) * 3, rng.standard_normal((8, 512)) + 0.5
    xc, yc = x - x.mean(0), y - y.mean(0)
    nuclear = np.linalg.svd(xc @ yc.T, compute_uv=False).sum()
    exact = (np.sum((x.mean(0) - y.mean(0)) ** 2)
             + (np.sum(xc ** 2) + np.sum(yc ** 2) - 2 * nuclear) / 7)
    ours = inception.frechet_distance(x.mean(0), np.cov(x, rowvar=False),
                                y.mean(0), np.cov(y, rowvar=False))
    assert ours == pytest.approx(exact, rel=1e-10)


def test_frechet_guards():
    rng = np.random.default_rng(3)
    s = random_covariance(rng, 8)
    with pytest.raises(inception.FIDError, match="shape mismatch"):
        inception.frechet_distance(np.zeros(8), s, np.zeros(4), s[:4, :4])
    bad = s.copy()
    bad[0, 0] = np.nan
    with pytest.raises(inception.FIDError, match="NaN"):
        inception.frechet_distance(np.zeros(8), bad, np.zeros(8), s)


# ---------------------------------------------------------------------------------------------
# Preprocessing

def test_resize_tf1_hand_computed():
    x = torch.tensor([[0.0, 10.0], [20.0, 30.0]])[None, None]
    # 2 -> 3: source coordinates 0, 2/3, 4/3 (no half-pixel offset); the last clamps to pixel 1
    expected = torch.tensor([[0.0, 20 / 3, 10.0], [40 / 3, 20.0, 70 / 3], [20.0, 80 / 3, 30.0]])
    torch.testing.assert_close(inception.resize_bilinear_tf1(x, 3)[0, 0], expected, rtol=0, atol=1e-5)
    # 4 -> 3 (downsampling): source coordinates 0, 4/3, 8/3 along each axis
    row = torch.tensor([0.0, 3.0, 6.0, 9.0])
    y = inception.resize_bilinear_tf1((row[None, :] + 100 * row[:, None] / 3)[None, None], 3)[0, 0]
    sampled = torch.tensor([0.0, 4.0, 8.0])  # row value at coordinate c is 3c (linear, no clamping)
    torch.testing.assert_close(y, sampled[None, :] + 100 * sampled[:, None] / 3, rtol=0, atol=1e-4)
    # same size is the identity
    z = torch.rand(2, 3, 5, 5)
    torch.testing.assert_close(inception.resize_bilinear_tf1(z, 5), z, rtol=0, atol=0)


def test_resize_tf1_matches_torch_fidelity():
    tf_interp = pytest.importorskip("torch_fidelity.interpolate_compat_tensorflow")
    x = random_images(3).float()
    theirs = tf_interp.interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299),
                                                                 align_corners=False)
    torch.testing.assert_close(inception.resize_bilinear_tf1(x, 299), theirs, rtol=0, atol=1e-4)


def test_preprocess_modes_range_and_difference():
    x = random_images(2)
    a, b = inception.preprocess(x, "tf"), inception.preprocess(x, "pytorch-fid")
    assert a.shape == b.shape == (2, 3, 299, 299)
    assert a.min() >= -1 and a.max() <= 1 and b.min() >= -1 and b.max() <= 1
    assert (a - b).abs().max() > 0.1  # half-pixel offset and scaling differ
    with pytest.raises(inception.FIDError, match="unknown FID mode"):
        inception.preprocess(x, "clean")


# ---------------------------------------------------------------------------------------------
# Features end to end (random weights)

def test_features_shape_determinism_batch_independence(extractor):
    x = random_images(3, seed=1)
    f = extractor(x)
    assert f.shape == (3, 2048) and f.dtype == torch.float32 and not f.requires_grad
    assert torch.isfinite(f).all() and f.std() > 0
    torch.testing.assert_close(extractor(x), f, rtol=0, atol=0)
    split = torch.cat([extractor(x[:1]), extractor(x[1:])])
    torch.testing.assert_close(split, f, rtol=0, atol=1e-5 * f.abs().max().item())
    # e.g. called from a mixed-precision training loop
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(extractor(x), f, rtol=0, atol=0)
    # other input sizes are resized to 299 too
    assert extractor(random_images(1, size=64)).shape == (1, 2048)


def test_features_reject_bad_input(extractor):
    with pytest.raises(inception.FIDError, match="uint8"):
        extractor(torch.rand(1, 3, 32, 32))
    with pytest.raises(inception.FIDError, match="uint8"):
        extractor(torch.zeros(1, 32, 32, 3, dtype=torch.uint8))


def test_extractor_stays_in_eval_mode(extractor):
    extractor.train()
    assert not extractor.training and not any(m.training for m in extractor.modules())


def test_weights_file_with_wrong_keys_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(inception.FIDError, match="not an FID Inception state dict"):
        inception.InceptionFeatures(str(path))
    path.write_bytes(b"not a torch file")
    with pytest.raises(inception.FIDError, match="not an FID Inception state dict"):
        inception.InceptionFeatures(str(path))


# ---------------------------------------------------------------------------------------------
# Statistics

class FlatFeatures(torch.nn.Module):
    """Stand-in extractor: flattened pixels plus a large offset (tests the shifted float64 sums)."""

    def forward(self, images):
        return images.flatten(1).float() + 1e4


def test_feature_stats_equals_numpy_mean_cov(capsys):
    images = random_images(7, size=4)
    batches = [images[:3], images[3:5], images[5:]]
    mu, sigma, n = inception.feature_stats(batches, FlatFeatures(), progress=True, total=7)
    feats = images.flatten(1).double().numpy() + 1e4
    assert n == 7 and mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-9)
    assert "7/7 images (100%)" in capsys.readouterr().err


def test_feature_stats_needs_two_images():
    with pytest.raises(inception.FIDError, match="at least 2"):
        inception.feature_stats([random_images(1, size=4)], FlatFeatures())


def test_stats_round_trip_and_mode_checks(tmp_path):
    rng = np.random.default_rng(4)
    mu, sigma = rng.standard_normal(16), random_covariance(rng, 16)
    path = str(tmp_path / "stats.npz")
    inception.save_stats(path, mu, sigma, "tf", 123, weights="ab" * 32)
    assert os.listdir(tmp_path) == ["stats.npz"]  # the temporary file was renamed, not left behind
    stats = inception.load_stats(path)
    np.testing.assert_array_equal(stats["mu"], mu)
    np.testing.assert_array_equal(stats["sigma"], sigma)
    assert (stats["mode"], stats["n"], stats["weights"]) == ("tf", 123, "ab" * 32)
    inception.check_compatible(stats, path, "tf", "ab" * 32)
    with pytest.raises(inception.FIDError, match="--mode tf"):
        inception.check_compatible(stats, path, "pytorch-fid")
    with pytest.raises(inception.FIDError, match="weights"):
        inception.check_compatible(stats, path, "tf", "cd" * 32)
    # pytorch-fid / clean-fid files hold only mu and sigma: accepted with a warning
    foreign = str(tmp_path / "cifar10_legacy_tensorflow_train_32.npz")
    np.savez(foreign, mu=mu.astype(np.float32), sigma=sigma)
    stats = inception.load_stats(foreign)
    assert stats["mode"] is None and stats["n"] is None
    with pytest.warns(UserWarning, match="assuming --mode tf"):
        inception.check_compatible(stats, foreign, "tf")
    np.savez(str(tmp_path / "images.npz"), images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(inception.FIDError, match="'mu' and 'sigma'"):
        inception.load_stats(str(tmp_path / "images.npz"))


# ---------------------------------------------------------------------------------------------
# Weights resolution and hashes

@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints" / inception.WEIGHTS_NAME


def test_user_weights_with_other_hash_warn(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"not the standard file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert inception.resolve_weights(str(path)) == str(path)
    assert any("not comparable with published FIDs" in str(w.message) for w in caught)
    with pytest.raises(inception.FIDError, match="not found"):
        inception.resolve_weights(str(tmp_path / "missing.pth"))


def test_download_with_wrong_hash_refused(hub, monkeypatch):
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda url, dst, progress=True: Path(dst).write_bytes(b"tampered"))
    with pytest.raises(inception.FIDError, match="refusing"):
        inception.resolve_weights(None)
    assert os.listdir(hub.parent) == []  # nothing left in the cache


def test_download_with_right_hash_cached(hub, monkeypatch):
    content = b"pretend weights"
    monkeypatch.setattr(inception, "WEIGHTS_SHA256_PREFIX", hashlib.sha256(content).hexdigest()[:8])
    calls = []

    def fake_download(url, dst, progress=True):
        calls.append(url)
        Path(dst).write_bytes(content)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    assert inception.resolve_weights(None) == str(hub)
    assert inception.resolve_weights(None) == str(hub)  # second call: from the cache, no download
    assert calls == [inception.WEIGHTS_URL] and hub.read_bytes() == content


def test_cached_file_with_wrong_hash_and_offline_download_refused(hub, monkeypatch):
    def offline(url, dst, progress=True):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(inception.FIDError, match="could not download"):
        inception.resolve_weights(None)
    hub.write_bytes(b"corrupt")
    with pytest.raises(inception.FIDError, match="delete it"):
        inception.resolve_weights(None)


# ---------------------------------------------------------------------------------------------
# Command line

def run_cli(argv, capsys):
    fid.main(fid.parse_args(argv))
    return capsys.readouterr().out


def test_cli_ref_and_calc_on_npz_and_folder(tmp_path, weights, capsys):
    images = random_images(4, seed=2).permute(0, 2, 3, 1).numpy()  # NHWC, as sample.py writes
    others = random_images(4, seed=3).permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "ref.npz", images=images, labels=np.arange(4))
    np.savez(tmp_path / "samples.npz", arr_0=others)
    (tmp_path / "folder").mkdir()
    for i, im in enumerate(others):
        Image.fromarray(im).save(tmp_path / "folder" / f"{i:03d}.png")
    common = ["--weights", weights, "--device", "cpu", "--batch-size", "3"]
    ref = str(tmp_path / "ref_stats.npz")
    assert "n=4, mode=tf" in run_cli(["ref", "--data", str(tmp_path / "ref.npz"), "--out", ref]
                                     + common, capsys)
    sets = [str(tmp_path / "samples.npz"), str(tmp_path / "folder"), str(tmp_path / "ref.npz")]
    out = run_cli(["calc", *sets, "--ref", ref] + common, capsys)
    scores = [float(line.split("FID ")[1].split()[0]) for line in out.splitlines()
              if ": FID " in line]
    assert len(scores) == 3 and scores[0] > 0
    assert scores[1] == pytest.approx(scores[0], rel=1e-9)  # png round trip is lossless
    assert abs(scores[2]) < 1e-6 * scores[0]  # the reference set against its own statistics
    mean = float(out.split("mean FID ")[1].split()[0])
    assert mean == pytest.approx(np.mean(scores), abs=1e-4) and "std over 3 sets" in out
    # mixing modes is refused; bad inputs end with one line naming the fix
    with pytest.raises(inception.FIDError, match=".*--mode tf"):
        run_cli(["calc", sets[0], "--ref", ref, "--mode", "pytorch-fid"] + common, capsys)
    np.savez(tmp_path / "float.npz", images=others.astype(np.float32))
    with pytest.raises(inception.FIDError, match=".*expected uint8 images"):
        run_cli(["calc", str(tmp_path / "float.npz"), "--ref", ref] + common, capsys)
    with pytest.raises(inception.FIDError, match=".*statistics file .* not found"):
        run_cli(["calc", sets[0], "--ref", str(tmp_path / "none.npz")] + common, capsys)


def test_cli_ref_cifar10_from_fake_batches(tmp_path, weights, capsys, monkeypatch):
    """torchvision's CIFAR10 reader on a tiny fake cifar-10-batches-py folder (MD5 checks off)."""
    import torchvision.datasets.cifar
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(5)
    for i in range(1, 6):
        batch = {"data": rng.integers(0, 256, (1, 3072), dtype=np.uint8), "labels": [i]}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(
        pickle.dumps({"label_names": [str(c) for c in range(10)]}))
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    out_path = str(tmp_path / "cifar.npz")
    out = run_cli(["ref", "--data", "cifar10", "--data-root", str(tmp_path / "data"),
                   "--out", out_path, "--weights", weights, "--device", "cpu"], capsys)
    assert "n=5" in out and inception.load_stats(out_path)["n"] == 5


def test_cli_entry_point_on_stats_files(tmp_path):
    """`python fid.py calc` as a subprocess (statistics inputs only, so no network is built)."""
    rng = np.random.default_rng(6)
    sigma = random_covariance(rng, 8)
    inception.save_stats(str(tmp_path / "a.npz"), np.zeros(8), sigma, "tf", 10)
    inception.save_stats(str(tmp_path / "b.npz"), np.ones(8), sigma, "tf", 10)
    run = subprocess.run([sys.executable, os.path.join(ROOT, "fid.py"), "calc",
                          str(tmp_path / "b.npz"), "--ref", str(tmp_path / "a.npz")],
                         capture_output=True, text=True)
    assert run.returncode == 0 and "FID 8.0000" in run.stdout, run.stderr


# ---------------------------------------------------------------------------------------------
# Reference implementations on the same random weights (skipped without them)

def max_differences(ours, theirs):
    diff = (ours - theirs).abs().max().item()
    return diff, diff / theirs.abs().max().item()


def test_pytorch_fid_mode_matches_pytorch_fid(weights, hub, capsys):
    inception = pytest.importorskip("pytorch_fid.inception")
    hub.parent.mkdir(parents=True)
    os.symlink(weights, hub)  # pytorch-fid loads the hub cache without checking the hash
    theirs_net = inception.InceptionV3([3]).eval()
    x = random_images(4, seed=4)
    with torch.no_grad():
        theirs = theirs_net(x.float() / 255)[0].flatten(1)  # what ToTensor() + get_activations do
    ours = inception.InceptionFeatures(weights, mode="pytorch-fid")(x)
    abs_diff, rel_diff = max_differences(ours, theirs)
    print(f"pytorch-fid features: max abs diff {abs_diff:.3g}, relative {rel_diff:.3g}")
    assert rel_diff < 1e-5


def test_tf_mode_matches_torch_fidelity(weights, extractor):
    tfe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    theirs_net = tfe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                 feature_extractor_weights_path=weights)
    x = random_images(4, seed=5)
    with torch.no_grad():
        theirs = theirs_net(x)[0]
    abs_diff, rel_diff = max_differences(extractor(x), theirs)
    print(f"torch-fidelity features: max abs diff {abs_diff:.3g}, relative {rel_diff:.3g}")
    assert rel_diff < 1e-5


def test_frechet_distance_matches_pytorch_fid():
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((600, 256)) @ rng.standard_normal((256, 256)) / 16
    y = rng.standard_normal((600, 256)) @ rng.standard_normal((256, 256)) / 16 + 0.1
    stats = (x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sqrtm's deprecated `disp` argument
        theirs = fid_score.calculate_frechet_distance(*stats)
    assert inception.frechet_distance(*stats) == pytest.approx(theirs, rel=1e-6)
