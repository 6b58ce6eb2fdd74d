"""Pure-PyTorch twins of the native ops, written as the reference implementation
(bytedance/1d-tokenizer) computes them. Tests compare every kernel against these; the models
fall back to them where no kernel exists."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def vq_nearest_code_ref(z: torch.Tensor, codebook: torch.Tensor, l2_normalize: bool = False):
    """(N, D), (K, D) -> indices (N,) int64, squared distances (N,) fp32, via the full (N, K)
    matrix exactly as the reference VectorQuantizer does."""
    z = z.float()
    e = codebook.float()
    if l2_normalize:
        z = F.normalize(z, dim=-1)
        e = F.normalize(e, dim=-1)
    d = torch.sum(z**2, dim=1, keepdim=True) + torch.sum(e**2, dim=1) - 2 * torch.einsum("bd,dn->bn", z, e.T)
    idx = torch.argmin(d, dim=1)
    dist = ((z - e[idx]) ** 2).sum(dim=1)
    return idx, dist


def kl_sample_ref(parameters: torch.Tensor, noise: torch.Tensor | None = None, deterministic: bool = False):
    """(B, 2C, H, W) -> sample, mean, std (B, C, H, W) and kl (B, W), as the reference
    DiagonalGaussianDistribution (sample(), .mean, .std, kl())."""
    mean, logvar = torch.chunk(parameters.float(), 2, dim=1)
    logvar = torch.clamp(logvar, -30.0, 20.0)
    if deterministic:
        zeros = torch.zeros_like(mean)
        return mean, mean, zeros, mean.new_zeros(mean.shape[0], mean.shape[3])
    std = torch.exp(0.5 * logvar)
    var = torch.exp(logvar)
    if noise is None:
        noise = torch.randn(mean.shape, device=mean.device)
    sample = mean + std * noise
    kl = 0.5 * torch.sum(torch.pow(mean, 2) + var - 1.0 - logvar, dim=[1, 2])
    return sample, mean, std, kl


def maskgen_unmask_step_ref(
    logits: torch.Tensor,
    ids: torch.Tensor,
    mask_token_id: int,
    mask_len,
    *,
    softmax_temperature: float,
    sample_temperature: float,
    confidence_temperature: float,
    last_step: bool,
    sample_noise: torch.Tensor,
    confidence_noise: torch.Tensor,
    uncond_logits: torch.Tensor | None = None,
    guidance_scale: float = 0.0,
) -> torch.Tensor:
    """The reference MaskGen_VQ.generate step, with its Gumbel noise passed in explicitly.
    mask_len: int or (B,) int64 (the reference uses one value for every row)."""
    if uncond_logits is not None:
        logits = logits + (logits - uncond_logits) * guidance_scale
    logits = logits / softmax_temperature
    is_mask = ids == mask_token_id
    sampled_ids = (logits + sample_temperature * sample_noise).argmax(dim=-1)
    sampled_logits = torch.gather(logits, -1, sampled_ids.unsqueeze(-1)).squeeze(-1)
    sampled_ids = torch.where(is_mask, sampled_ids, ids)
    sampled_logits = torch.where(is_mask, sampled_logits, torch.inf).float()
    confidence = sampled_logits + confidence_temperature * confidence_noise
    if last_step:
        return sampled_ids
    mask_len = torch.as_tensor(mask_len, device=ids.device).expand(ids.shape[0]).long()
    sorted_confidence, _ = torch.sort(confidence, dim=-1)
    # cut_off = sorted[:, mask_len - 1]; a row with mask_len = 0 re-masks nothing
    cut_off = sorted_confidence.gather(1, (mask_len - 1).clamp(min=0).unsqueeze(1))
    masking = (confidence <= cut_off) & (mask_len > 0).unsqueeze(1)
    return torch.where(masking, mask_token_id, sampled_ids)


def mask_by_order_ref(orders: torch.Tensor, mask: torch.Tensor, mask_len: int, last_step: bool):
    """MaskGen_KL.sample_tokens' mask_by_order and mask_to_pred, for one step."""
    bsz, seq_len = orders.shape
    mask_next = torch.zeros(bsz, seq_len, device=orders.device)
    mask_next = torch.scatter(mask_next, -1, orders[:, :mask_len], torch.ones(bsz, seq_len, device=orders.device))
    mask_next = mask_next.bool()
    mask = mask.bool()
    to_pred = mask if last_step else torch.logical_xor(mask, mask_next)
    return mask_next, to_pred


def gumbel_noise(shape, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gumbel noise drawn as the reference does: -log(-log(u)), u ~ U[0, 1)."""
    u = torch.rand(shape, device=device, generator=generator)
    return -torch.log((-torch.log(u.clamp(min=1e-20))).clamp(min=1e-20))


# ---------------------------------------------------------------------------------------
# vq_nearest_code as the CUDA tensor-core kernel computes it: approximate scores from
# low-precision products, a few candidates per row, an exact re-check, and an exact search
# for the rows where the approximation cannot rule out a code it dropped.

# Input rounding of the approximate products: TF32 (the CUDA kernel's wmma path; 2^-10
# covers round-to-nearest and truncation of fp32 inputs) or bfloat16 (to test larger errors).
MMA_INPUT_UNIT = {"tf32": 2.0 ** -10, "bf16": 2.0 ** -8}


def round_mantissa(x: torch.Tensor, approx: str) -> torch.Tensor:
    """fp32 -> the values a tensor-core product sees: TF32 (10 mantissa bits, nearest, ties
    away as cvt.rna.tf32.f32) or bfloat16 (nearest even), returned as fp32."""
    if approx == "bf16":
        return x.bfloat16().float()
    if approx != "tf32":
        raise ValueError(f"approx: expected 'tf32' or 'bf16', got {approx!r}")
    bits = x.float().contiguous().view(torch.int32)
    finite = torch.isfinite(x)
    rounded = ((bits + 0x1000) & ~0x1FFF).view(torch.float32)  # add half an ulp of tf32, drop 13 bits
    return torch.where(finite, rounded, x.float())


def mma_score_error_bound(z_norm: torch.Tensor, e_norm_max_sq: float, d: int, u_in: float) -> torch.Tensor:
    """Per row, a bound on |approximate score - real score| where score_k = ||e_k||^2 - 2 z.e_k
    and the approximate one is fl(en_k - 2 * acc) with en_k the fp32 sum of squares and acc
    the low-precision dot product accumulated in fp32 in any order:
      |en_k - ||e_k||^2|   <= g32 * ||e||^2                          (fp32 sum of D squares)
      |acc - z.e_k|        <= (u_in (2 + u_in) + g_acc (1 + u_in)^2) ||z|| ||e_k||
                              (inputs rounded with unit u_in; products accumulated with unit
                              2^-21, four times fp32's, as tensor cores may truncate)
      subtraction          <= 2^-24 (||e||^2 + 2 (1 + u_in)^2 ||z|| ||e||)
    with sum |z_i e_i| <= ||z|| ||e|| and ||e_k|| <= max_k ||e_k||; times 1.25 for slack.
    The CUDA kernel computes the same expression (csrc/cuda/vq_nearest_code_kernels.cu)."""
    u32 = 2.0 ** -24
    g32 = d * u32 / (1 - d * u32)
    g_acc = d * 2.0 ** -21 / (1 - d * 2.0 ** -21)
    e_max = e_norm_max_sq ** 0.5
    zn = z_norm.double()
    dot_err = (u_in * (2 + u_in) + g_acc * (1 + u_in) ** 2) * zn * e_max
    sub_err = u32 * (e_norm_max_sq + 2 * (1 + u_in) ** 2 * zn * e_max)
    return 1.25 * (g32 * e_norm_max_sq + 2 * dot_err + sub_err)


def vq_nearest_code_mma_ref(z: torch.Tensor, codebook: torch.Tensor, l2_normalize: bool = False,
                            num_candidates: int = 4, approx: str = "tf32", return_fallback: bool = False):
    """The tensor-core kernel's algorithm in PyTorch: (N, D), (K, D) -> indices (N,) int64
    (the nearest code, ties to the lowest index), distances (N,) fp32.

    1. approximate scores s~ = en - 2 * (round(z) @ round(e)^T) in fp32, en = ||e||^2 (fp32);
    2. the `num_candidates` smallest s~ per row (ties to the lower index) are re-checked
       exactly: ||z - e_c||^2 in float64; the best wins, ties to the lower index;
    3. T = the smallest s~ of the codes left out. A left-out code k has real distance
       ||z||^2 + s_k >= ||z||^2 + T - bound (mma_score_error_bound), so when that exceeds
       the best candidate's distance no left-out code can win or tie and the row is done;
       otherwise the row is searched exactly over all K codes (float64).
    The result is the exact nearest code by float64 distance whatever the rounding.
    return_fallback: also return the (N,) bool mask of rows that needed the exact search."""
    if num_candidates < 1:
        raise ValueError(f"num_candidates: expected >= 1, got {num_candidates}")
    z = z.float()
    e = codebook.float()
    if l2_normalize:
        z = F.normalize(z, dim=-1)
        e = F.normalize(e, dim=-1)
    n, d = z.shape
    k = e.shape[0]
    if approx not in MMA_INPUT_UNIT:
        raise ValueError(f"approx: expected 'tf32' or 'bf16', got {approx!r}")
    # inputs the rounding keeps exactly (bf16 in both, fp16 in tf32) add no input error
    fits = not l2_normalize and (codebook.dtype == torch.bfloat16 or (approx == "tf32" and codebook.dtype == torch.float16))
    u_in = 0.0 if fits else MMA_INPUT_UNIT[approx]
    en = (e * e).sum(1)  # (K,) fp32
    approx_scores = en[None] - 2 * (round_mantissa(z, approx) @ round_mantissa(e, approx).T)  # (N, K)
    m = min(num_candidates, k)
    order = torch.sort(approx_scores, dim=1, stable=True).indices  # ties: lower index first
    cand = order[:, :m].sort(dim=1).values  # (N, m), increasing index: argmin's first = lowest
    left_out = (approx_scores.gather(1, order[:, m:m + 1]).squeeze(1) if k > m
                else torch.full((n,), float("inf")))  # (N,) the smallest s~ left out
    z64, e64 = z.double(), e.double()
    cand_dist = ((z64[:, None, :] - e64[cand]) ** 2).sum(-1)  # (N, m)
    best_pos = cand_dist.argmin(dim=1)
    best_dist = cand_dist.gather(1, best_pos[:, None]).squeeze(1)
    idx = cand.gather(1, best_pos[:, None]).squeeze(1)
    zz = (z64 ** 2).sum(1)
    bound = mma_score_error_bound(zz.sqrt(), float(en.max()), d, u_in)
    lhs = left_out.double() + zz - bound
    # no code left out (K <= candidates), or none of them can reach the best candidate
    safe = (lhs > best_dist + 1e-12 * (zz + left_out.double().abs() + best_dist)) | (k <= m)
    unsafe = ~safe  # includes NaN rows
    if bool(unsafe.any()):
        full = ((z64[unsafe][:, None, :] - e64[None]) ** 2).sum(-1)  # (n_unsafe, K)
        idx = idx.clone()
        idx[unsafe] = full.argmin(dim=1)
        best_dist = best_dist.clone()
        best_dist[unsafe] = full.gather(1, idx[unsafe][:, None]).squeeze(1)
    out = (idx, best_dist.float())
    return out + (unsafe,) if return_fallback else out
