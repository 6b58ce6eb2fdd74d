"""Text-to-image evaluation: generate one image per prompt with a TextToImage pipeline, then
FID against reference images (e.g. MJHQ-30K; statistics computable once and saved as .npz),
Inception Score, CLIP score against the prompts, and generation throughput (images/s, the
pipeline alone: text encoding + sampling + decoding, CUDA-synchronised)."""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

from tatitok_fast.evaluation.metrics import FeatureStats, InceptionScore, MeanMetric


def reference_stats(inputs: Sequence[str], features: torch.nn.Module, size: int, *, batch_size: int = 32,
                    max_images: int | None = None, progress: bool = False) -> FeatureStats:
    """Pool-feature statistics of reference images (folders or webdataset shards), each resized
    (shorter side) and centre-cropped to size x size, the generator's resolution."""
    from tqdm import tqdm

    from tatitok_fast.evaluation.data import image_batches
    from tatitok_fast.evaluation.inception import POOL_DIM

    stats = FeatureStats(POOL_DIM, getattr(features, "device", "cpu"))  # sums where the features are
    for batch in tqdm(image_batches(inputs, size, batch_size, max_images), desc="reference", unit="batch",
                      disable=not progress):
        stats.update(features(batch.images)[0])
    if stats.count < 2:
        raise ValueError(f"reference images: FID needs at least 2, found {stats.count} in {list(inputs)}")
    return stats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate_generation(pipe, prompts: Sequence[str], *, batch_size: int = 16,
                        features: torch.nn.Module | None = None,
                        reference: FeatureStats | tuple[np.ndarray, np.ndarray] | None = None,
                        clip_scorer: torch.nn.Module | None = None, keep_images: int = 0,
                        on_images: Callable[[int, list[str], torch.Tensor], None] | None = None,
                        progress: bool = False, **generate_kwargs: Any) -> dict:
    """Generate an image per prompt with `pipe` (a TextToImage) and measure them.

    features: InceptionFeatures (Inception Score; FID when `reference` is given too).
    reference: FeatureStats or (mu, sigma) of the reference images.
    clip_scorer: CLIPScorer (CLIP score). on_images(first_index, prompts, images) sees every batch.
    generate_kwargs: passed to the pipeline (steps, cfg, aesthetic, temperature, use_cuda_graph).
    Returns {"num_images", "images_per_second", "seconds", ["fid"], ["inception_score"],
    ["clip_score"], ["samples": (K, 3, H, W) first images]}.
    """
    from tqdm import tqdm

    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts: expected a non-empty list of strings")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    if reference is not None and features is None:
        raise ValueError("reference: FID needs a feature network (features=InceptionFeatures(...))")
    device = next(pipe.tokenizer.parameters()).device
    fake = iscore = None
    if features is not None:
        from tatitok_fast.evaluation.inception import NUM_CLASSES, POOL_DIM

        dev = getattr(features, "device", "cpu")
        fake, iscore = FeatureStats(POOL_DIM, dev), InceptionScore(NUM_CLASSES, dev)
    clip = MeanMetric()
    kept: list[torch.Tensor] = []
    gen_seconds = 0.0
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate", unit="batch", disable=not progress):
        batch = prompts[i:i + batch_size]
        _sync(device)
        t0 = time.perf_counter()
        images = pipe(batch, **generate_kwargs)
        _sync(device)
        gen_seconds += time.perf_counter() - t0
        images = (images.float().clamp(0, 1) * 255).round() / 255  # what a saved PNG holds
        if features is not None:
            pool, logits = features(images)
            fake.update(pool), iscore.update(logits)
        if clip_scorer is not None:
            clip.update(clip_scorer(images, batch))
        if on_images is not None:
            on_images(i, batch, images)
        if sum(k.shape[0] for k in kept) < keep_images:
            kept.append(images.cpu())
    out: dict[str, Any] = {"num_images": len(prompts), "images_per_second": len(prompts) / max(gen_seconds, 1e-9),
                           "seconds": gen_seconds}
    if features is not None:
        if reference is not None:
            if fake.count < 2:
                raise ValueError("prompts: FID needs at least 2 generated images")
            out["fid"] = fake.frechet_distance(reference)
        out["inception_score"] = iscore.compute()
    if clip_scorer is not None:
        out["clip_score"] = clip.compute()
    if keep_images > 0:
        out["samples"] = torch.cat(kept)[:keep_images]
    return out
