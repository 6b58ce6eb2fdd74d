"""Class-to-image sample batches scored as the ADM evaluator (guided-diffusion
evaluations/evaluator.py) scores them: FID, sFID, Inception Score, precision and recall of a
sample .npz (`arr_0`, uint8 N x H x W x 3) against a reference batch such as
VIRTUAL_imagenet256_labeled.npz, through torch-fidelity's InceptionV3 (inception.py).

- FID: pool features (2048); sFID: ADM's spatial features (inception.SPATIAL_MODULE, 2023).
  Mean and unbiased covariance; a reference .npz with precomputed `mu`, `sigma` (and `mu_s`,
  `sigma_s`) uses those, as ADM does, else statistics of its `arr_0`.
- Inception Score: mean over splits of 5000 samples of exp(E KL(p(y|x) || p(y))), softmax of
  the bias-free 1008 logits (ADM's split size and logits).
- Precision / recall (Kynkäänniemi et al. 2019, ADM's settings): k = 3 nearest-neighbour
  balls of squared pool-feature distances, over the reference `arr_0` (skipped without it).
  Distances in fp32 (ADM: fp16 when finite), so these may differ from ADM's in the 3rd digit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tatitok_fast.evaluation.metrics import FeatureStats, InceptionScore, frechet_distance
from tatitok_fast.evaluation.npz import NpzArray, npz_keys

IS_SPLIT_SIZE = 5000
PR_NEIGHBOURS = 3
PR_BLOCK = 4096  # rows per distance block: 4096 x N fp32


@dataclass
class BatchFeatures:
    """Inception features of one image batch (.npz): pool/spatial statistics, Inception Score
    per split, and the pool features themselves (for precision / recall)."""
    pool: FeatureStats
    spatial: FeatureStats
    inception_score: float
    features: torch.Tensor  # (N, 2048) fp32
    count: int


def _check_images(batch: np.ndarray, path: str) -> None:
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 must be uint8 N x H x W x 3 images (the ADM format), got "
                         f"{batch.dtype} with rows of {batch.shape[1:]}")


@torch.no_grad()
def npz_features(path: str, features, *, batch_size: int = 64, progress: bool = False,
                 split_size: int = IS_SPLIT_SIZE) -> BatchFeatures:
    """Stream `arr_0` of `path` through `features` (an InceptionFeatures)."""
    from tqdm import tqdm

    device = getattr(features, "device", "cpu")
    pool = spatial = split = None  # sized by the first batch's features
    scores: list[float] = []
    kept: list[torch.Tensor] = []
    with NpzArray(path, "arr_0") as arr:
        if len(arr.shape) != 4:
            raise ValueError(f"{path}: arr_0 must be uint8 N x H x W x 3 images, got shape {arr.shape}")
        bar = tqdm(total=len(arr), desc=f"inception {path}", unit="img", disable=not progress)
        for batch in arr.batches(batch_size):
            _check_images(batch, path)
            x = torch.from_numpy(batch.copy()).permute(0, 3, 1, 2)
            p, logits, s = features.with_spatial(x)
            if pool is None:
                pool, spatial = FeatureStats(p.shape[1], device), FeatureStats(s.shape[1], device)
                split = InceptionScore(logits.shape[1], device)
            pool.update(p), spatial.update(s)
            kept.append(p.cpu())
            start = 0
            while start < len(logits):  # fill the current split, then start the next one
                take = min(len(logits) - start, split_size - int(split.n))
                split.update(logits[start:start + take])
                start += take
                if int(split.n) == split_size:
                    scores.append(split.compute())
                    split = InceptionScore(logits.shape[1], device)
            bar.update(len(batch))
        bar.close()
    if pool is None or pool.count < 2:
        raise ValueError(f"{path}: FID needs at least 2 images, found {0 if pool is None else pool.count}")
    if int(split.n):
        scores.append(split.compute())
    return BatchFeatures(pool, spatial, float(np.mean(scores)), torch.cat(kept), pool.count)


def _stat(stats: "FeatureStats | tuple[np.ndarray, np.ndarray]") -> tuple[np.ndarray, np.ndarray]:
    return stats.mean_cov() if isinstance(stats, FeatureStats) else stats


def reference_stats(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Precomputed statistics of a reference .npz: {"pool": (mu, sigma)[, "spatial": (mu_s,
    sigma_s)]}, or {} when it holds none."""
    keys = npz_keys(path)
    if "mu" not in keys:
        return {}
    if "sigma" not in keys:
        raise ValueError(f"{path}: holds 'mu' but not 'sigma'")
    out = {}
    with np.load(path) as f:
        out["pool"] = (np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64))
        if "mu_s" in keys and "sigma_s" in keys:
            out["spatial"] = (np.asarray(f["mu_s"], np.float64), np.asarray(f["sigma_s"], np.float64))
    return out


def _sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, D), (m, D) -> (n, m) squared Euclidean distances, >= 0 (ADM's formula)."""
    return ((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None]).clamp_min_(0)


def manifold_radii(x: torch.Tensor, k: int = PR_NEIGHBOURS, block: int = PR_BLOCK) -> torch.Tensor:
    """(N, D) -> (N,) squared distance of each point to its k-th nearest neighbour in x
    (the point itself counted as the 0th)."""
    if len(x) <= k:
        raise ValueError(f"precision/recall: need more than k={k} points, got {len(x)}")
    return torch.cat([torch.kthvalue(_sq_distances(x[i:i + block], x), k + 1, dim=1).values
                      for i in range(0, len(x), block)])


def precision_recall(reference: torch.Tensor, samples: torch.Tensor, k: int = PR_NEIGHBOURS,
                     block: int = PR_BLOCK) -> tuple[float, float]:
    """Improved precision (fraction of samples inside some reference point's k-NN ball) and
    recall (fraction of reference points inside some sample's ball); features (N, D)."""
    ref, smp = reference.float(), samples.float().to(reference.device)
    r_ref, r_smp = manifold_radii(ref, k, block), manifold_radii(smp, k, block)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)
    smp_in = torch.zeros(len(smp), dtype=torch.bool, device=ref.device)
    for i in range(0, len(ref), block):
        for j in range(0, len(smp), block):
            d = _sq_distances(ref[i:i + block], smp[j:j + block])
            ref_in[i:i + block] |= (d <= r_smp[None, j:j + block]).any(1)
            smp_in[j:j + block] |= (d <= r_ref[i:i + block, None]).any(0)
    return smp_in.double().mean().item(), ref_in.double().mean().item()


def fid_from_features(a, b) -> float:
    """Fréchet distance between the mean / unbiased covariance of two (N, D) feature sets."""
    stats = []
    for x in (a, b):
        x = torch.as_tensor(np.asarray(x, np.float64))
        if x.dim() == 1:
            x = x[:, None]
        s = FeatureStats(x.shape[1])
        s.update(x)
        stats.append(s)
    return stats[0].frechet_distance(stats[1])


def evaluate_sample_batch(samples: str, reference: str, features, *, batch_size: int = 64,
                          progress: bool = False) -> dict[str, Any]:
    """The ADM evaluator's numbers for `samples` against `reference` (see the module doc).
    Returns {"fid", "sfid", "inception_score", "precision", "recall", "num_samples",
    "num_reference", "reference_statistics": "precomputed" | "computed", "notes": [...]}."""
    notes = []
    ref_stats = reference_stats(reference)
    ref_feats = npz_features(reference, features, batch_size=batch_size, progress=progress) \
        if "arr_0" in npz_keys(reference) else None
    if ref_feats is None and not ref_stats:
        raise ValueError(f"{reference}: expected a reference batch with 'arr_0' images and/or precomputed "
                         f"'mu'/'sigma' statistics, found {npz_keys(reference)}")
    smp = npz_features(samples, features, batch_size=batch_size, progress=progress)
    pool_ref = ref_stats.get("pool") or ref_feats.pool
    spatial_ref = ref_stats.get("spatial") or (ref_feats.spatial if ref_feats is not None else None)
    out: dict[str, Any] = {"num_samples": smp.count,
                           "num_reference": ref_feats.count if ref_feats is not None else None,
                           "reference_statistics": "precomputed" if ref_stats else "computed"}
    mu, sigma = _stat(pool_ref)
    out["fid"] = frechet_distance(*smp.pool.mean_cov(), mu, sigma)
    if spatial_ref is not None and _stat(spatial_ref)[0].shape == (smp.spatial.sum.numel(),):
        out["sfid"] = frechet_distance(*smp.spatial.mean_cov(), *_stat(spatial_ref))
    else:
        out["sfid"] = None
        notes.append("sFID skipped: the reference has no spatial statistics of this size")
    out["inception_score"] = smp.inception_score
    if ref_feats is not None:
        dev = getattr(features, "device", "cpu")
        out["precision"], out["recall"] = precision_recall(ref_feats.features.to(dev), smp.features.to(dev))
    else:
        out["precision"] = out["recall"] = None
        notes.append("precision/recall skipped: the reference holds statistics only, no arr_0 images")
    out["notes"] = notes
    return out
