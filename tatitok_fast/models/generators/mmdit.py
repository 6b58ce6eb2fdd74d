"""MM-DiT joint transformer block (Stable Diffusion 3), written here with the parameter names
of diffusers' JointTransformerBlock so the official MaskGen checkpoints load unchanged.

Per block, for image tokens x (B, T, D) and text tokens c (B, S, D), conditioned on a
pooled embedding y (B, D):
    adaLN-Zero of each stream (shift/scale/gate for attention and MLP, LayerNorm eps 1e-6
    without affine), one joint attention over [x; c] with per-stream q/k/v and output
    projections, gated residuals, GELU-tanh FFN per stream.
The last block is "context pre-only": c only feeds keys and values (continuous adaLN,
[scale, shift] order), so its text queries, text output and text FFN are never computed.
LayerNorm + modulation and the gated residuals run as fused Triton kernels on CUDA.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tatitok_fast.models.nn.layers import Linear, attention
from tatitok_fast.ops import gated_residual, layernorm_modulate


class AdaLayerNormZero(nn.Module):
    """y -> 6 modulation vectors; returns the modulated norm for attention and the rest."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, emb: torch.Tensor):
        e = self.linear(F.silu(emb))  # (B, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = e.chunk(6, dim=1)
        return layernorm_modulate(x, shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormContinuous(nn.Module):
    """LayerNorm (no affine, eps 1e-6) modulated by y, with the [scale, shift] chunk order."""

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.linear = Linear(cond_dim, 2 * dim)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(emb).to(x.dtype)).chunk(2, dim=1)
        return layernorm_modulate(x, shift, scale)


class GELUTanhProj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """net.0 = GELU-tanh projection D -> 4D, net.1 = dropout (p=0), net.2 = 4D -> D."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GELUTanhProj(dim, mult * dim), nn.Dropout(0.0), Linear(mult * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class JointAttention(nn.Module):
    def __init__(self, dim: int, heads: int, context_pre_only: bool):
        super().__init__()
        self.heads = heads
        self.context_pre_only = context_pre_only
        self.to_q, self.to_k, self.to_v = Linear(dim, dim), Linear(dim, dim), Linear(dim, dim)
        self.add_q_proj, self.add_k_proj, self.add_v_proj = Linear(dim, dim), Linear(dim, dim), Linear(dim, dim)
        self.to_out = nn.ModuleList([Linear(dim, dim), nn.Dropout(0.0)])
        if not context_pre_only:
            self.to_add_out = Linear(dim, dim)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, d = t.shape
        return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # (B, H, N, Dh)

    def forward(self, x: torch.Tensor, c: torch.Tensor):
        """x (B, T, D), c (B, S, D) -> x_out (B, T, D), c_out (B, S, D) or None."""
        t = x.shape[1]
        k = self._heads(torch.cat([self.to_k(x), self.add_k_proj(c)], dim=1))  # (B, H, T+S, Dh)
        v = self._heads(torch.cat([self.to_v(x), self.add_v_proj(c)], dim=1))
        if self.context_pre_only:  # text outputs are discarded: image queries only
            out = attention(self._heads(self.to_q(x)), k, v)  # (B, T, D)
            return self.to_out[0](out), None
        q = self._heads(torch.cat([self.to_q(x), self.add_q_proj(c)], dim=1))
        out = attention(q, k, v)  # (B, T+S, D)
        return self.to_out[0](out[:, :t]), self.to_add_out(out[:, t:])


class JointTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_pre_only: bool = False):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.norm1 = AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormContinuous(dim, dim) if context_pre_only else AdaLayerNormZero(dim)
        self.attn = JointAttention(dim, heads, context_pre_only)
        self.ff = FeedForward(dim)
        if not context_pre_only:
            self.ff_context = FeedForward(dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, temb: torch.Tensor):
        """x (B, T, D) image tokens, c (B, S, D) text tokens, temb (B, D) -> (c_out or None, x_out)."""
        nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, temb)
        if self.context_pre_only:
            nc = self.norm1_context(c, temb)
        else:
            nc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(c, temb)
        attn_x, attn_c = self.attn(nx, nc)
        x = gated_residual(x, gate_msa, attn_x)
        x = gated_residual(x, gate_mlp, self.ff(layernorm_modulate(x, shift_mlp, scale_mlp)))
        if self.context_pre_only:
            return None, x
        c = gated_residual(c, c_gate_msa, attn_c)
        c = gated_residual(c, c_gate_mlp, self.ff_context(layernorm_modulate(c, c_shift_mlp, c_scale_mlp)))
        return c, x


class MMDiT(nn.ModuleList):
    """`depth` joint blocks, the last one context pre-only; optional activation checkpointing."""

    def __init__(self, dim: int, depth: int, heads: int):
        super().__init__([JointTransformerBlock(dim, heads, context_pre_only=d == depth - 1) for d in range(depth)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, c: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for block in self:
            if self.grad_checkpointing and torch.is_grad_enabled():
                c, x = torch.utils.checkpoint.checkpoint(block, x, c, temb, use_reentrant=False)
            else:
                c, x = block(x, c, temb)
        return x
