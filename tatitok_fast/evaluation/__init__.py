"""Evaluation of tokenizers (reconstruction: rFID, IS, PSNR, SSIM, codebook usage) and of
text-to-image generation (FID against reference images, IS, CLIP score, throughput).

Feature networks (InceptionFeatures, CLIPScorer) are imported lazily: they need
torch-fidelity / open_clip weights (see tatitok_fast.weight_files for the offline lookup)."""
from tatitok_fast.evaluation.generation import evaluate_generation, reference_stats
from tatitok_fast.evaluation.metrics import (CodebookStats, FeatureStats, InceptionScore, frechet_distance, load_stats,
                                             psnr, ssim)
from tatitok_fast.evaluation.reconstruction import evaluate_reconstruction

__all__ = ["evaluate_reconstruction", "evaluate_generation", "reference_stats", "FeatureStats", "InceptionScore",
           "CodebookStats", "frechet_distance", "load_stats", "psnr", "ssim", "InceptionFeatures", "CLIPScorer"]


def __getattr__(name: str):
    if name == "InceptionFeatures":
        from tatitok_fast.evaluation.inception import InceptionFeatures

        return InceptionFeatures
    if name == "CLIPScorer":
        from tatitok_fast.evaluation.clip_score import CLIPScorer

        return CLIPScorer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
