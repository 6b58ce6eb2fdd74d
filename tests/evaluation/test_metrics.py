"""The metrics on cases computed by hand: Fréchet distance (identical sets, Gaussians with
known moments), Inception Score, PSNR, SSIM (constant images; a direct per-window evaluation
of the formula), codebook usage and entropy, and their input checks."""
import math

import numpy as np
import pytest
import torch

from tatitok_fast.evaluation.metrics import (CodebookStats, FeatureStats, InceptionScore, frechet_distance, load_stats,
                                             psnr, ssim)


def test_frechet_distance_of_identical_feature_sets_is_zero():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(300, 16, generator=g) @ torch.randn(16, 16, generator=g)
    a, b = FeatureStats(16), FeatureStats(16)
    a.update(feats)
    for chunk in feats.split(7):  # batching does not matter
        b.update(chunk)
    assert abs(a.frechet_distance(b)) < 1e-8


def test_frechet_distance_of_known_gaussians():
    # D=2, diagonal: per dim (m1 - m2)^2 + s1 + s2 - 2 sqrt(s1 s2)
    # dim 0: means 0, 1; variances 1, 4 -> 1 + 1 + 4 - 4 = 2; dim 1: means 2, 2; variances 9, 1 -> 9 + 1 - 6 = 4
    d = frechet_distance(np.array([0.0, 2.0]), np.diag([1.0, 9.0]), np.array([1.0, 2.0]), np.diag([4.0, 1.0]))
    assert d == pytest.approx(6.0, abs=1e-9)
    # a rotated (non-diagonal) pair: distance is invariant under a shared rotation
    r = np.array([[math.cos(0.3), -math.sin(0.3)], [math.sin(0.3), math.cos(0.3)]])
    d_rot = frechet_distance(r @ np.array([0.0, 2.0]), r @ np.diag([1.0, 9.0]) @ r.T,
                             r @ np.array([1.0, 2.0]), r @ np.diag([4.0, 1.0]) @ r.T)
    assert d_rot == pytest.approx(6.0, abs=1e-9)


def test_feature_stats_mean_and_unbiased_covariance():
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0], [5.0, 4.0]])
    s = FeatureStats(2)
    s.update(x)
    mu, cov = s.mean_cov()
    np.testing.assert_allclose(mu, [3.0, 2.0])
    np.testing.assert_allclose(cov, [[4.0, 2.0], [2.0, 4.0]])  # sum of (x - mu)(x - mu)^T / (n - 1)


def test_stats_round_trip_through_npz(tmp_path):
    s = FeatureStats(3)
    s.update(torch.randn(10, 3))
    s.save(tmp_path / "ref.npz")
    mu, sigma = load_stats(tmp_path / "ref.npz")
    assert s.frechet_distance((mu, sigma)) == pytest.approx(0.0, abs=1e-9)
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(ValueError, match="mu.*sigma"):
        load_stats(tmp_path / "bad.npz")


def test_inception_score_hand_checked():
    # p1 = (1/2, 1/2), p2 = (1, 0): marginal (3/4, 1/4); KL1 = 1/2 ln(4/3), KL2 = ln(4/3) -> IS = (4/3)^(3/4)
    s = InceptionScore(2)
    s.update_probs(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    assert s.compute() == pytest.approx((4 / 3) ** 0.75, rel=1e-9)
    # confident and uniform over K classes -> K; identical predictions -> 1
    k = InceptionScore(5)
    k.update(torch.eye(5) * 200.0)
    assert k.compute() == pytest.approx(5.0, rel=1e-6)
    one = InceptionScore(5)
    one.update(torch.randn(1, 5).expand(8, 5))
    assert one.compute() == pytest.approx(1.0, rel=1e-9)


def test_psnr_hand_computed():
    x = torch.zeros(2, 3, 4, 4)
    y = x.clone()
    y[0] += 0.1  # mse 0.01 -> 20 dB
    y[1, 0, 0, 0] = 1.0  # mse 1/48 -> 10 log10(48)
    torch.testing.assert_close(psnr(y, x), torch.tensor([20.0, 10 * math.log10(48)]))
    assert psnr(x, x).tolist() == [100.0, 100.0]  # identical: capped


def _ssim_direct(x: np.ndarray, y: np.ndarray, win: int = 11, sigma: float = 1.5) -> float:
    """SSIM of one (H, W) channel pair, window by window, straight from the definition."""
    t = np.arange(win) - (win - 1) / 2
    g = np.exp(-t ** 2 / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    for i in range(x.shape[0] - win + 1):
        for j in range(x.shape[1] - win + 1):
            a, b = x[i:i + win, j:j + win], y[i:i + win, j:j + win]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * a * a).sum() - ma ** 2, (w * b * b).sum() - mb ** 2
            cab = (w * a * b).sum() - ma * mb
            vals.append((2 * ma * mb + c1) * (2 * cab + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_hand_computed():
    # constant images a, b: no variance, SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b = 0.2, 0.6
    x, y = torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b)
    c1 = 0.01 ** 2
    assert ssim(x, y).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 2, 14, 13, generator=g)
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    expected = [np.mean([_ssim_direct(x[i, c].double().numpy(), y[i, c].double().numpy()) for c in range(2)])
                for i in range(2)]
    torch.testing.assert_close(ssim(x, y).double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_codebook_usage_and_entropy():
    s = CodebookStats(8)
    s.update(torch.tensor([[0, 0, 1, 1]]))
    s.update(torch.tensor([2, 3]))
    assert s.usage() == pytest.approx(4 / 8)
    # frequencies 1/3, 1/3, 1/6, 1/6 -> entropy 2 * (1/3) log2 3 + 2 * (1/6) log2 6
    assert s.entropy() == pytest.approx(2 / 3 * math.log2(3) + 1 / 3 * math.log2(6), abs=1e-6)
    with pytest.raises(ValueError, match=r"ids: expected codes in \[0, 8\)"):
        s.update(torch.tensor([8]))


def test_bad_inputs():
    with pytest.raises(ValueError, match="images"):
        psnr(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))
    with pytest.raises(ValueError, match="11x11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"features: expected \(B, 4\)"):
        FeatureStats(4).update(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats(4).mean_cov()
    with pytest.raises(ValueError, match="statistics"):
        frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(3))
    with pytest.raises(ValueError, match="no samples"):
        InceptionScore(3).compute()
