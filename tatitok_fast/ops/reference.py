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
