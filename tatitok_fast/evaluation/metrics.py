"""Image metrics as streaming accumulators (add batches, read the result; sums in float64,
additive across ranks so `all_reduce()` merges distributed evaluations):

    FeatureStats      mean / covariance of features -> Fréchet distance (FID, rFID)
    InceptionScore    exp(E_x KL(p(y|x) || p(y))), one split, as the official VQGANEvaluator
    PSNR / SSIM       per image on [0, 1] images, averaged over images
    CodebookStats     VQ code usage (fraction of codes used) and entropy (bits)
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F


def _all_reduce(*tensors: torch.Tensor) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t)


def _check_batch(name: str, x: torch.Tensor, ndim: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != ndim:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got {got}")


# ---------------------------------------------------------------------------------------
# Fréchet distance

def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), by torch-fidelity's implementation."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.ndim != 1 or mu1.shape != mu2.shape or sigma1.shape != (mu1.size, mu1.size) or sigma2.shape != sigma1.shape:
        raise ValueError(f"statistics: expected means (D,) and covariances (D, D) of one size D, got "
                         f"{mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}")
    return fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2},
                                    verbose=False)[KEY_METRIC_FID]


class FeatureStats:
    """Running mean and covariance of (B, D) feature batches (float64 sums)."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.n = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor) -> None:
        _check_batch("features", features, 2)
        if features.shape[1] != self.sum.numel():
            raise ValueError(f"features: expected (B, {self.sum.numel()}), got {tuple(features.shape)}")
        f = features.to(self.sum.device, torch.float64)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def all_reduce(self) -> None:
        _all_reduce(self.n, self.sum, self.outer)

    @property
    def count(self) -> int:
        return int(self.n.item())

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(D,) mean and (D, D) unbiased covariance, as numpy float64."""
        n = self.count
        if n < 2:
            raise ValueError(f"features: a covariance needs at least 2 samples, got {n}")
        mu = self.sum / n
        cov = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), cov.cpu().numpy()

    def save(self, path) -> None:
        mu, sigma = self.mean_cov()
        np.savez(path, mu=mu, sigma=sigma, n=self.count)

    def frechet_distance(self, other: "FeatureStats | tuple[np.ndarray, np.ndarray]") -> float:
        mu2, sigma2 = other.mean_cov() if isinstance(other, FeatureStats) else other
        return frechet_distance(*self.mean_cov(), mu2, sigma2)


def load_stats(path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from an .npz with 'mu' and 'sigma' (FeatureStats.save, pytorch-fid's files)."""
    try:
        with np.load(path) as f:
            return np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path}: expected an .npz file with 'mu' and 'sigma' arrays ({exc})") from None


# ---------------------------------------------------------------------------------------
# Inception Score

class InceptionScore:
    """exp(mean_x sum_y p(y|x) (log p(y|x) - log p(y))) from (B, C) logits; one split, eps 1e-16
    inside the logs, as the official VQGANEvaluator."""

    EPS = 1e-16

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.n = torch.zeros((), dtype=torch.float64, device=device)
        self.prob_sum = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.plogp_sum = torch.zeros(num_classes, dtype=torch.float64, device=device)

    def update_probs(self, probs: torch.Tensor) -> None:
        _check_batch("probs", probs, 2)
        p = probs.to(self.prob_sum.device, torch.float64)
        self.n += p.shape[0]
        self.prob_sum += p.sum(0)
        self.plogp_sum += (p * torch.log(p + self.EPS)).sum(0)

    def update(self, logits: torch.Tensor) -> None:
        _check_batch("logits", logits, 2)
        self.update_probs(F.softmax(logits.double(), dim=-1))

    def all_reduce(self) -> None:
        _all_reduce(self.n, self.prob_sum, self.plogp_sum)

    def compute(self) -> float:
        n = self.n.item()
        if n < 1:
            raise ValueError("InceptionScore: no samples")
        log_mean = torch.log(self.prob_sum / n + self.EPS)
        return math.exp(((self.plogp_sum - self.prob_sum * log_mean).sum() / n).item())


# ---------------------------------------------------------------------------------------
# PSNR / SSIM

def psnr(x: torch.Tensor, y: torch.Tensor, max_db: float = 100.0) -> torch.Tensor:
    """(B, C, H, W) images in [0, 1] -> (B,) PSNR in dB (10 log10(1 / MSE)), capped at max_db
    for identical images."""
    _check_pair(x, y)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return (-10.0 * torch.log10(mse.clamp_min(10 ** (-max_db / 10)))).float()


def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    t = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-t.pow(2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03) -> torch.Tensor:
    """(B, C, H, W) images in [0, 1] -> (B,) SSIM (Wang et al. 2004): Gaussian window 11,
    sigma 1.5, data range 1, valid windows only (no padding), mean over pixels and channels."""
    _check_pair(x, y)
    if min(x.shape[-2:]) < window:
        raise ValueError(f"images: SSIM needs at least {window}x{window} pixels, got {tuple(x.shape[-2:])}")
    x, y = x.double(), y.double()
    b, c = x.shape[:2]
    g = _gaussian_window(window, sigma, x.device, x.dtype)
    gh = g.view(1, 1, 1, -1).expand(c, 1, 1, window)
    gv = g.view(1, 1, -1, 1).expand(c, 1, window, 1)

    def blur(t):  # separable Gaussian, valid region: (B, C, H-w+1, W-w+1)
        return F.conv2d(F.conv2d(t, gh, groups=c), gv, groups=c)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = k1 ** 2, k2 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).float()


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    _check_batch("images", x, 4)
    if not isinstance(y, torch.Tensor) or x.shape != y.shape:
        raise ValueError(f"images: expected two batches of one shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")


class MeanMetric:
    """Sum and count of per-image values."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum, count)

    def update(self, values: torch.Tensor) -> None:
        v = values.detach().to(self.total.device, torch.float64).flatten()
        self.total += torch.stack([v.sum(), v.new_tensor(float(v.numel()))])

    def all_reduce(self) -> None:
        _all_reduce(self.total)

    def compute(self) -> float:
        if self.total[1] == 0:
            raise ValueError("no samples")
        return (self.total[0] / self.total[1]).item()


# ---------------------------------------------------------------------------------------
# Codebook usage

class CodebookStats:
    """Counts of VQ ids: usage = fraction of the K codes used at least once; entropy in bits
    of the id frequencies (eps 1e-8 inside log2, as the official evaluator)."""

    def __init__(self, codebook_size: int, device: torch.device | str = "cpu"):
        if codebook_size < 1:
            raise ValueError(f"codebook_size: expected >= 1, got {codebook_size}")
        self.counts = torch.zeros(codebook_size, dtype=torch.float64, device=device)

    def update(self, ids: torch.Tensor) -> None:
        ids = ids.detach().reshape(-1).long().to(self.counts.device)
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.counts.numel()):
            raise ValueError(f"ids: expected codes in [0, {self.counts.numel()}), got [{ids.min()}, {ids.max()}]")
        self.counts += torch.bincount(ids, minlength=self.counts.numel()).double()

    def all_reduce(self) -> None:
        _all_reduce(self.counts)

    def usage(self) -> float:
        return (self.counts > 0).double().mean().item()

    def entropy(self) -> float:
        p = self.counts / self.counts.sum().clamp_min(1)
        return (-(p * torch.log2(p + 1e-8)).sum()).item()
