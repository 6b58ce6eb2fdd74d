"""Reconstruction quality of a TA-TiTok tokenizer: rFID and Inception Score (with a feature
network), PSNR / SSIM, and for VQ tokenizers codebook usage and entropy, as the official
training-time evaluation (VQGANEvaluator) measures them:

  - the tokenizer runs its forward (KL: a posterior sample, as the official eval does), in
    eval mode, without gradients; reconstructions are clamped to [0, 1] and rounded to uint8
    levels before every metric; inputs are clamped to [0, 1];
  - IS uses one split; FID the float64 mean / covariance of the 2048-d pool features.

Callable from a training loop every N steps (`evaluate_reconstruction`); with several
processes the sums are all-reduced, so every rank gets the metrics of all ranks' images.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Mapping

import torch

from tatitok_fast.evaluation.metrics import CodebookStats, FeatureStats, InceptionScore, MeanMetric, psnr, ssim


def _unwrap_batch(batch: Any) -> tuple[torch.Tensor, list[str]]:
    """(images, captions) from a tuple/list, a dict ({"image"/"images", "caption"/"captions"/"txt"/
    "text"}) or an ImageBatch."""
    if isinstance(batch, Mapping):
        images = batch.get("image", batch.get("images"))
        captions = next((batch[k] for k in ("caption", "captions", "txt", "text") if k in batch), None)
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        images, captions = batch[0], batch[1]
    else:
        raise TypeError(f"batches: expected (images, captions) pairs or dicts with 'image' and 'caption', "
                        f"got {type(batch).__name__}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"batches: images must be float (B, 3, H, W) in [0, 1], got {got}")
    if isinstance(captions, str) or captions is None or len(captions) != images.shape[0]:
        raise ValueError(f"batches: expected one caption per image ({images.shape[0]}), got {captions!r}"[:200])
    return images, [str(c) for c in captions]


def _guidance(text_encoder: Callable, captions: list[str]) -> torch.Tensor:
    out = text_encoder(captions)
    out = getattr(out, "guidance", out)  # CLIPTextEncoder -> TextEncoding.guidance
    if not isinstance(out, torch.Tensor) or out.dim() != 3:
        raise TypeError("text_encoder: expected a callable giving text guidance (B, 77, D) or a TextEncoding, "
                        f"got {type(out).__name__}")
    return out


@torch.no_grad()
def evaluate_reconstruction(tokenizer: torch.nn.Module, batches: Iterable, text_encoder: Callable, *,
                            features: torch.nn.Module | None = None, max_images: int | None = None,
                            keep_images: int = 0, all_reduce: bool = True,
                            autocast_dtype: torch.dtype | None = None) -> dict:
    """Reconstruct `batches` through `tokenizer` and measure the result.

    tokenizer: a TATiTok (or a wrapper with its forward(images, text_guidance) and attributes),
        or, with text_encoder=None, a tokenizer without a text path (TiTok, MaskGITVQGAN):
        reconstructed as detokenize(tokenize(images)) (KL: the posterior mean).
    batches: iterable of (images (B, 3, H, W) in [0, 1], captions) pairs or dicts.
    text_encoder: CLIPTextEncoder (or a callable captions -> (B, 77, D) guidance); None for
        tokenizers that decode without captions.
    features: an InceptionFeatures (rFID, InceptionScore); None: PSNR / SSIM / codebook only.
    keep_images: return the first N originals and reconstructions under "samples".
    autocast_dtype: run the tokenizer under autocast in this dtype (None: its own dtype).
    Returns {"num_images", "psnr", "ssim", ["rfid", "inception_score"], ["codebook_usage",
    "codebook_entropy"], "seconds", ["samples": {"originals", "reconstructions"}]}.
    """
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images: expected >= 1 or None, got {max_images}")
    param = next(tokenizer.parameters())
    device, dtype = param.device, param.dtype
    mode = getattr(tokenizer, "quantize_mode", "vq")
    stats_dev = device
    psnr_m, ssim_m = MeanMetric(stats_dev), MeanMetric(stats_dev)
    codebook = CodebookStats(tokenizer.codebook_size, stats_dev) if mode == "vq" else None
    real = fake = iscore = None
    if features is not None:
        from tatitok_fast.evaluation.inception import NUM_CLASSES, POOL_DIM

        real, fake, iscore = FeatureStats(POOL_DIM, stats_dev), FeatureStats(POOL_DIM, stats_dev), \
            InceptionScore(NUM_CLASSES, stats_dev)
    kept_o, kept_r = [], []
    was_training = tokenizer.training
    tokenizer.eval()
    start, seen = time.perf_counter(), 0
    try:
        for batch in batches:
            images, captions = _unwrap_batch(batch)
            if max_images is not None:
                images, captions = images[:max_images - seen], captions[:max_images - seen]
            x = images.to(device).float().clamp(0, 1)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                if text_encoder is None:  # no text path: tokens -> images
                    tokens = tokenizer.tokenize(x.to(dtype))
                    recon, result = tokenizer.detokenize(tokens), {"min_encoding_indices": tokens}
                else:
                    guidance = _guidance(text_encoder, captions).to(device)
                    recon, result = tokenizer(x.to(dtype), guidance.to(dtype))
            recon = (recon.float().clamp(0, 1) * 255).round() / 255  # uint8 levels
            psnr_m.update(psnr(recon, x))
            ssim_m.update(ssim(recon, x))
            if codebook is not None:
                codebook.update(result["min_encoding_indices"])
            if features is not None:
                pool_r, _ = features(x)
                pool_f, logits_f = features(recon)
                real.update(pool_r), fake.update(pool_f), iscore.update(logits_f)
            if sum(t.shape[0] for t in kept_o) < keep_images:
                kept_o.append(x.cpu()), kept_r.append(recon.cpu())
            seen += x.shape[0]
            if max_images is not None and seen >= max_images:
                break
    finally:
        tokenizer.train(was_training)
    accumulators = [m for m in (psnr_m, ssim_m, codebook, real, fake, iscore) if m is not None]
    if all_reduce:
        for m in accumulators:
            m.all_reduce()
    total = int(psnr_m.total[1].item())
    if total == 0:
        raise ValueError("batches: no images to evaluate")
    out: dict[str, Any] = {"num_images": total, "psnr": psnr_m.compute(), "ssim": ssim_m.compute()}
    if features is not None:
        if total >= 2:
            out["rfid"] = real.frechet_distance(fake)
        out["inception_score"] = iscore.compute()
    if codebook is not None:
        out["codebook_usage"] = codebook.usage()
        out["codebook_entropy"] = codebook.entropy()
    out["seconds"] = time.perf_counter() - start
    if keep_images > 0:
        out["samples"] = {"originals": torch.cat(kept_o)[:keep_images],
                          "reconstructions": torch.cat(kept_r)[:keep_images]}
    return out
