"""Quantizers of the TiTok family: nearest-code VQ (optionally l2-normalised, with the
clustering-VQ refresh) and the KL posterior (DiagonalGaussianDistribution)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from tatitok_fast import ops
from tatitok_fast.ops.reference import kl_sample_ref, vq_nearest_code_ref

class VectorQuantizer(nn.Module):
    """Nearest-code VQ in fp32 with a straight-through estimator, commitment + codebook
    losses, and the "clustering VQ" codebook refresh (training, gathered across ranks)."""

    def __init__(self, codebook_size: int, token_size: int, commitment_cost: float = 0.25,
                 use_l2_norm: bool = False, clustering_vq: bool = False):
        super().__init__()
        self.codebook_size = codebook_size
        self.token_size = token_size
        self.commitment_cost = commitment_cost
        self.use_l2_norm = use_l2_norm
        self.embedding = nn.Embedding(codebook_size, token_size)
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        self.clustering_vq = clustering_vq
        if clustering_vq:
            self.decay = 0.99
            self.register_buffer("embed_prob", torch.zeros(codebook_size))
        # Under FSDP2 a forward sees the unsharded all-gather copy of the codebook, which is
        # thrown away at reshard: the training engine sets defer_updates, the refresh is kept
        # in _pending and apply_deferred_updates() writes it into the sharded parameter
        # (after backward, before the optimizer step: the official order).
        self.defer_updates = False
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def nearest(self, flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        if ops.use_fused("vq_nearest_code", flat.device):
            return ops.vq_nearest_code(flat, codebook, self.use_l2_norm)[0]
        return vq_nearest_code_ref(flat, codebook, self.use_l2_norm)[0]

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(self, z: torch.Tensor):
        """z (B, C, H, W) -> z_quantized (B, C, H, W) fp32, result dict."""
        z = z.float().permute(0, 2, 3, 1)  # (B, H, W, C)
        flat = z.reshape(-1, self.token_size)
        codebook = self.embedding.weight.float()
        indices = self.nearest(flat.detach(), codebook.detach())  # (B*H*W,)
        z_q = self.get_codebook_entry(indices).view(z.shape)
        if self.use_l2_norm:
            z = F.normalize(z, dim=-1)
        commitment_loss = self.commitment_cost * torch.mean((z_q.detach() - z) ** 2)
        codebook_loss = torch.mean((z_q - z.detach()) ** 2)
        if self.clustering_vq and self.training:
            self._refresh_codebook(indices, flat.detach())
        z_q = z + (z_q - z).detach()  # straight-through
        z_q = z_q.permute(0, 3, 1, 2).contiguous()
        return z_q, dict(quantizer_loss=commitment_loss + codebook_loss, commitment_loss=commitment_loss,
                         codebook_loss=codebook_loss, min_encoding_indices=indices.view(z_q.shape[0], *z_q.shape[2:]))

    def get_codebook_entry(self, indices: torch.Tensor) -> torch.Tensor:
        if indices.dim() == 1:
            z_q = self.embedding(indices)
        elif indices.dim() == 2:  # soft assignments (N, K) @ (K, C)
            z_q = indices @ self.embedding.weight
        else:
            raise ValueError(f"indices: expected (N,) ids or (N, K) weights, got shape {tuple(indices.shape)}")
        return F.normalize(z_q, dim=-1) if self.use_l2_norm else z_q

    @torch.no_grad()
    def _refresh_codebook(self, indices: torch.Tensor, flat: torch.Tensor) -> None:
        """Clustering VQ: EMA of code usage; rarely used codes move toward the batch feature
        closest to them (over all ranks)."""
        all_idx, all_feat = _gather(indices), _gather(flat)
        usage = torch.bincount(all_idx, minlength=self.codebook_size).float() / all_idx.numel()
        self.embed_prob.mul_(self.decay).add_(usage, alpha=1 - self.decay)
        # nearest feature of every code: the same fused search with the roles swapped
        closest = self.nearest(self.embedding.weight.float(), all_feat)  # (K,)
        decay = torch.exp(-(self.embed_prob * self.codebook_size * 10) / (1 - self.decay) - 1e-3).unsqueeze(1)
        if self.defer_updates:
            self._pending = (all_feat[closest], decay)  # (K, C), (K, 1): the same on every rank
        else:
            self.embedding.weight.data.mul_(1 - decay).add_(all_feat[closest] * decay)

    @torch.no_grad()
    def apply_deferred_updates(self) -> None:
        """The pending codebook refresh, applied to the (sharded) parameter: each rank blends
        its own rows, from the (K, C) targets every rank computed alike."""
        if self._pending is None:
            return
        target, decay = self._pending
        self._pending = None
        from torch.distributed.tensor import DTensor, distribute_tensor

        weight = self.embedding.weight
        if isinstance(weight, DTensor):  # an FSDP2 shard: the rows this rank holds
            def local(t):
                return distribute_tensor(t.to(weight.dtype), weight.device_mesh, weight.placements,
                                         src_data_rank=None).to_local()  # no communication

            target, decay, weight = local(target), local(decay.expand_as(target).contiguous()), weight.to_local()
        weight.mul_(1 - decay).add_(target * decay)


def _gather(t: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    out = t.new_empty((dist.get_world_size() * t.shape[0], *t.shape[1:]))
    dist.all_gather_into_tensor(out, t.contiguous())
    return out


class DiagonalGaussianDistribution:
    """The KL tokenizer's posterior, with the reference class's surface (mean, std, var,
    logvar, sample(), mode(), kl()), computed by the fused kl_sample op in one pass.

    parameters: (B, 2C, H, W). `first_sample` is drawn with the posterior and is what
    encode() returns; sample() draws fresh noise each call, as the reference does.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False, noise: torch.Tensor | None = None):
        """noise: optional (B, C, H, W) standard-normal noise of `first_sample` (else drawn)."""
        self.parameters = parameters
        self.deterministic = deterministic
        self.first_sample, self.mean, self.std, self._kl = _kl_sample(parameters, deterministic, noise=noise)

    @property
    def logvar(self) -> torch.Tensor:
        return torch.clamp(self.parameters.float().chunk(2, dim=1)[1], -30.0, 20.0)

    @property
    def var(self) -> torch.Tensor:
        return self.std * self.std if self.deterministic else torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return _kl_sample(self.parameters, self.deterministic, generator)[0]

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """(B, W): 0.5 * sum over C and H of (mean^2 + var - 1 - logvar)."""
        return self._kl


def _kl_sample(parameters, deterministic, generator=None, noise=None):
    if ops.use_fused("kl_sample", parameters.device):
        return ops.kl_sample(parameters, noise, deterministic, generator)
    return kl_sample_ref(parameters, noise, deterministic)
