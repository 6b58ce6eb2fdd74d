"""Fused ops of tatitok_fast: typed wrappers that validate their inputs (naming the argument
at fault) and call the native kernels in torch.ops.tatitok_fast. Pure-PyTorch twins are in
tatitok_fast.ops.reference; the Triton kernels in tatitok_fast.ops.triton."""
from __future__ import annotations

from typing import Sequence

import torch

from tatitok_fast.ops._library import has_kernel, require_kernel
from tatitok_fast.ops.mode import fused_enabled, reference_mode
from tatitok_fast.ops.triton import gated_residual, layernorm_modulate

__all__ = [
    "vq_nearest_code",
    "kl_sample",
    "maskgen_unmask_step",
    "mask_by_order",
    "layernorm_modulate",
    "gated_residual",
    "has_kernel",
    "use_fused",
    "reference_mode",
]


def use_fused(op: str, device: torch.device | str) -> bool:
    """Whether models should call `op`'s native kernel on `device` (it exists, and we are not
    in reference_mode())."""
    return fused_enabled() and has_kernel(op, device)

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes: Sequence[torch.dtype] | None = None,
                 device: torch.device | None = None, like: str = "") -> None:
    """Raise a TypeError/ValueError naming `name` when `t` is not a tensor of the expected
    rank, dtype or device. `like` names the argument whose device `device` is."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of {like}), got {t.device}")


def vq_nearest_code(z: torch.Tensor, codebook: torch.Tensor, l2_normalize: bool = False):
    """Nearest codebook entry of every row of `z`, fused (no (N, K) distance matrix).

    Args:
        z: (N, D) float32/bfloat16/float16.
        codebook: (K, D), same dtype and device as z, K >= 1.
        l2_normalize: normalise both sides first (the reference quantizer's use_l2_norm).
    Returns:
        indices (N,) int64 (lowest index on ties, as torch.argmin) and distances (N,) float32,
        the squared L2 distance to the chosen code (of the normalised vectors if l2_normalize).
    CUDA on sm_80+: tensor-core (TF32) candidates re-checked in fp64, so the nearest code by
    fp64 distance (twin: ops.reference.vq_nearest_code_mma_ref); CPU and older GPUs: fp32 scores.
    """
    check_tensor("z", z, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("codebook", codebook, ndim=2, dtypes=(z.dtype,), device=z.device, like="z")
    if codebook.shape[0] == 0:
        raise ValueError("codebook: expected at least one code (K >= 1), got an empty codebook")
    if codebook.shape[1] != z.shape[1] or z.shape[1] == 0:
        raise ValueError(f"codebook: expected shape (K, D={z.shape[1]}) to match z (N, D), got {tuple(codebook.shape)}")
    require_kernel("vq_nearest_code", z.device, "z")
    return torch.ops.tatitok_fast.vq_nearest_code(z, codebook, bool(l2_normalize))


def kl_sample(parameters: torch.Tensor, noise: torch.Tensor | None = None, deterministic: bool = False,
              generator: torch.Generator | None = None):
    """Diagonal-Gaussian posterior of the KL tokenizer in one pass (differentiable).

    Args:
        parameters: (B, 2C, H, W), mean then logvar on dim 1 (the encoder output).
        noise: optional (B, C, H, W) float32 standard-normal noise. When omitted it is drawn
            from `generator` (or torch's default generator): in-kernel Philox on CUDA (CUDA-graph
            safe), torch's vectorised normal sampler on CPU.
        deterministic: sample = mean, std = 0, kl = 0 (the reference's deterministic mode).
    Returns:
        sample, mean, std: (B, C, H, W) float32; kl: (B, W) float32 =
        0.5 * sum over C and H of (mean^2 + var - 1 - logvar), logvar clamped to [-30, 20].
    """
    check_tensor("parameters", parameters, ndim=4, dtypes=FLOAT_DTYPES)
    if parameters.shape[1] == 0 or parameters.shape[1] % 2:
        raise ValueError(f"parameters: expected an even, non-zero dim 1 (2C: mean and logvar), got {tuple(parameters.shape)}")
    if noise is not None:
        check_tensor("noise", noise, ndim=4, dtypes=(torch.float32,), device=parameters.device, like="parameters")
        b, c2, h, w = parameters.shape
        if tuple(noise.shape) != (b, c2 // 2, h, w):
            raise ValueError(f"noise: expected shape {(b, c2 // 2, h, w)}, got {tuple(noise.shape)}")
    require_kernel("kl_sample", parameters.device, "parameters")
    return torch.ops.tatitok_fast.kl_sample(parameters, noise, bool(deterministic), generator)


def maskgen_unmask_step(
    logits: torch.Tensor,
    ids: torch.Tensor,
    mask_token_id: int,
    mask_len: int | torch.Tensor,
    *,
    softmax_temperature: float = 1.0,
    sample_temperature: float = 0.0,
    confidence_temperature: float | None = None,
    last_step: bool = False,
    uncond_logits: torch.Tensor | None = None,
    guidance_scale: float = 0.0,
    sample_noise: torch.Tensor | None = None,
    confidence_noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One fused MaskGen-VQ sampling step (the reference's per-step sequence in one op).

    logits (B, L, K) [+ uncond_logits for CFG: logits + (logits - uncond) * guidance_scale]
    are divided by `softmax_temperature`; masked positions (ids == mask_token_id) take
    argmax(logits + sample_temperature * Gumbel); decoded ones keep their id. The confidence
    of a new id is its logit + confidence_temperature * Gumbel (+inf for decoded positions);
    unless `last_step`, each row re-masks its positions with confidence <= the
    mask_len-th smallest. Noise is drawn in-kernel unless given (sample_noise (B, L, K),
    confidence_noise (B, L), float32 Gumbel samples). No softmax, no sort, no host sync.

    Args:
        ids: (B, L) int64. mask_len: int in [0, L], or an int64 (B,) tensor (one per row).
    Returns: the next ids, (B, L) int64.
    """
    check_tensor("logits", logits, ndim=3, dtypes=FLOAT_DTYPES)
    b, seq_len, k = logits.shape
    if seq_len == 0 or k == 0:
        raise ValueError(f"logits: expected (B, L, K) with L, K >= 1, got {tuple(logits.shape)}")
    check_tensor("ids", ids, ndim=2, dtypes=(torch.int64,), device=logits.device, like="logits")
    if tuple(ids.shape) != (b, seq_len):
        raise ValueError(f"ids: expected shape {(b, seq_len)} to match logits (B, L, K), got {tuple(ids.shape)}")
    if uncond_logits is not None:
        check_tensor("uncond_logits", uncond_logits, ndim=3, dtypes=(logits.dtype,), device=logits.device, like="logits")
        if uncond_logits.shape != logits.shape:
            raise ValueError(f"uncond_logits: expected shape {tuple(logits.shape)}, got {tuple(uncond_logits.shape)}")
    if not softmax_temperature > 0:
        raise ValueError(f"softmax_temperature: expected > 0, got {softmax_temperature}")
    if int(mask_token_id) < 0:
        raise ValueError(f"mask_token_id: expected >= 0, got {mask_token_id}")
    mask_len_rows = None
    if isinstance(mask_len, torch.Tensor):
        check_tensor("mask_len", mask_len, ndim=1, dtypes=(torch.int64,), device=logits.device, like="logits")
        if mask_len.shape[0] != b:
            raise ValueError(f"mask_len: expected shape ({b},), got {tuple(mask_len.shape)}")
        mask_len_rows, mask_len = mask_len, 0
    elif not 0 <= int(mask_len) <= seq_len:
        raise ValueError(f"mask_len: expected an int in [0, L={seq_len}], got {mask_len}")
    if sample_noise is not None:
        check_tensor("sample_noise", sample_noise, ndim=3, dtypes=(torch.float32,), device=logits.device, like="logits")
        if sample_noise.shape != logits.shape:
            raise ValueError(f"sample_noise: expected shape {tuple(logits.shape)}, got {tuple(sample_noise.shape)}")
    if confidence_noise is not None:
        check_tensor("confidence_noise", confidence_noise, ndim=2, dtypes=(torch.float32,), device=logits.device,
                     like="logits")
        if tuple(confidence_noise.shape) != (b, seq_len):
            raise ValueError(f"confidence_noise: expected shape {(b, seq_len)}, got {tuple(confidence_noise.shape)}")
    require_kernel("maskgen_unmask_step", logits.device, "logits")
    if confidence_temperature is None:
        confidence_temperature = sample_temperature
    return torch.ops.tatitok_fast.maskgen_unmask_step(
        logits, uncond_logits, float(guidance_scale), ids, int(mask_token_id), mask_len_rows, int(mask_len),
        float(softmax_temperature), float(sample_temperature), float(confidence_temperature), bool(last_step),
        sample_noise, confidence_noise, generator)


def mask_by_order(orders: torch.Tensor, mask: torch.Tensor, mask_len: int, last_step: bool = False):
    """MaskGen-KL step masks: the first `mask_len` positions of each row's random order stay
    masked next step; the positions to predict now are mask xor mask_next (all of mask on the
    last step).

    Args: orders (B, L) int64 permutations of range(L); mask (B, L) bool/float current mask.
    Returns: (mask_next, mask_to_pred), both (B, L) bool.
    """
    check_tensor("orders", orders, ndim=2, dtypes=(torch.int64,))
    check_tensor("mask", mask, ndim=2, device=orders.device, like="orders")
    if mask.shape != orders.shape:
        raise ValueError(f"mask: expected shape {tuple(orders.shape)} (that of orders), got {tuple(mask.shape)}")
    if not 0 <= int(mask_len) <= orders.shape[1]:
        raise ValueError(f"mask_len: expected an int in [0, L={orders.shape[1]}], got {mask_len}")
    require_kernel("mask_by_order", orders.device, "orders")
    return torch.ops.tatitok_fast.mask_by_order(orders, mask, int(mask_len), bool(last_step))
