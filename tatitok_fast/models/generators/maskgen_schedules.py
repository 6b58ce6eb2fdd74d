"""MaskGen sampling schedules and micro-condition codes: masking ratios, the aesthetic-score
sinusoid codes of both generators, the per-step host-side constants (VQStep, KLStep) and the
argument checks shared by both sampling loops."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

GUIDANCE_DECAYS = ("linear", "cosine", "none", "flippedcosine")
MASK_SCHEDULES = ("root", "square", "cosine", "arccos", "linear")


# ---------------------------------------------------------------------------------------
# Schedules and embeddings

def get_masking_ratio(progress, mode: str = "arccos") -> torch.Tensor:
    """Fraction of tokens still masked at `progress` in [0, 1]."""
    r = progress if isinstance(progress, torch.Tensor) else torch.tensor(progress)
    if mode == "root":
        return 1 - r ** 0.5
    if mode == "square":
        return 1 - r ** 2
    if mode == "cosine":
        return torch.cos(r * math.pi * 0.5)
    if mode == "arccos":
        return torch.acos(r) / (math.pi * 0.5)
    if mode == "linear":
        return 1 - r
    raise ValueError(f"mask schedule: expected one of {MASK_SCHEDULES}, got {mode!r}")


def sinusoid_halves(t: torch.Tensor, dim: int, max_period: float = 1000.0) -> torch.Tensor:
    """MaskGen-VQ micro-condition code: [sin | cos] halves. t (B,) -> (B, dim) fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def sinusoid_interleaved(t: torch.Tensor, dim: int) -> torch.Tensor:
    """MaskGen-KL micro-condition code: sin/cos interleaved, base 10000. t (B,) -> (B, dim) fp32."""
    wavelengths = torch.pow(10000, -torch.arange(0, dim, 2, dtype=torch.float, device=t.device) / dim)
    arg = t.unsqueeze(-1) * wavelengths
    enc = torch.zeros(t.shape[0], dim, device=t.device)
    enc[:, 0::2] = torch.sin(arg)
    enc[:, 1::2] = torch.cos(arg)
    return enc


@dataclass(frozen=True)
class VQStep:
    """One host-side step of the MaskGen-VQ schedule."""
    guidance_scale: float  # 0 -> conditional logits only
    softmax_temperature: float
    gumbel_temperature: float
    confidence_temperature: float
    mask_len: int  # tokens re-masked after this step when no confidences tie: max(1, min(masked - 1, cap))
    last: bool
    cap: int  # floor(L * masking ratio); with ties the reference takes min(row 0's masked - 1, cap)


@dataclass(frozen=True)
class KLStep:
    mask_len: int  # tokens still masked after this step
    revealed: tuple[int, int]  # this step predicts order positions [start, stop)
    cfg: float
    last: bool


def _check_sampling_args(*, num_sample_steps, guidance_scale, randomize_temperature, steps_name="num_sample_steps",
                         cfg_name="guidance_scale", temperature_name="randomize_temperature") -> None:
    if not isinstance(num_sample_steps, int) or not 1 <= num_sample_steps <= 1024:
        raise ValueError(f"{steps_name}: expected an int in [1, 1024], got {num_sample_steps!r}")
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"{cfg_name}: expected a finite number >= 0, got {guidance_scale!r}")
    if not isinstance(randomize_temperature, (int, float)) or not math.isfinite(randomize_temperature) \
            or randomize_temperature < 0:
        raise ValueError(f"{temperature_name}: expected a finite number >= 0, got {randomize_temperature!r}")
