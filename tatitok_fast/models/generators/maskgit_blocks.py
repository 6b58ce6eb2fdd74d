"""The transformer pieces of the MaskGIT generators (TiTok's class-conditional ImageBert and
UViTBert), written without `transformers`:

- BERT (post-LN, Hugging Face `BertModel` state-dict names): `BertEmbeddings`, `BertLayer`
  with one fused QKV projection. Its state dict keeps HF's separate
  `attention.self.{query,key,value}.{weight,bias}`: split on save, concatenated on load
  (state-dict hooks), so official checkpoints load and save unchanged.
- U-ViT (pre-LN, the official `modeling/modules/blocks.py` UViTBlock names): `UViTBlock`,
  whose packed `attn.qkv` already is the official layout.

Attention goes through `layers.attention` (SDPA / FlashAttention), projections through the
`Linear` factory.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tatitok_fast.models.nn.layers import Linear, attention

_QKV = ("query", "key", "value")


def _split_heads(qkv: torch.Tensor, heads: int):
    """(B, L, 3*D) packed [q | k | v] -> q, k, v (B, H, L, D/H) each."""
    b, seq, three_d = qkv.shape
    q, k, v = qkv.view(b, seq, 3, heads, three_d // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


# ---------------------------------------------------------------------------------------
# BERT (ImageBert)

class BertEmbeddings(nn.Module):
    """word + token_type[0] + position embeddings, LayerNorm (HF BertEmbeddings, absolute
    positions, no padding id). ids (B, L) -> (B, L, D)."""

    def __init__(self, vocab_size: int, hidden: int, max_positions: int, eps: float, dropout: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden)
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.token_type_embeddings = nn.Embedding(2, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        # HF's order of the sums: (word + token_type) + position
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]
        x = x + self.position_embeddings.weight[:seq]
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """HF's `attention.self` with one fused projection `qkv` (weight (3D, D) = [query; key;
    value]). The state dict shows query/key/value, as HF's. attn_drop: dropout on the attention
    probabilities, in training mode only (SDPA's dropout_p)."""

    def __init__(self, hidden: int, heads: int, attn_drop: float = 0.0):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
        self.heads = heads
        self.attn_drop = attn_drop
        self.qkv = Linear(hidden, 3 * hidden)
        self.register_state_dict_post_hook(_split_qkv_on_save)
        self.register_load_state_dict_pre_hook(_fuse_qkv_on_load)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, L, D), before the output dense
        q, k, v = _split_heads(self.qkv(x), self.heads)
        if self.training and self.attn_drop > 0:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop).transpose(1, 2).flatten(2)
        return attention(q, k, v)


def _split_qkv_on_save(module, state_dict, prefix, local_metadata):
    for suffix in ("weight", "bias"):
        key = f"{prefix}qkv.{suffix}"
        if key in state_dict:
            # views of the fused tensor (copy_ into them updates the model, as for any state dict)
            for name, part in zip(_QKV, state_dict.pop(key).chunk(3, dim=0)):
                state_dict[f"{prefix}{name}.{suffix}"] = part


def _fuse_qkv_on_load(module, state_dict, prefix, *args):
    for suffix in ("weight", "bias"):
        keys = [f"{prefix}{name}.{suffix}" for name in _QKV]
        if all(k in state_dict for k in keys):  # else strict loading names the missing ones
            state_dict[f"{prefix}qkv.{suffix}"] = torch.cat([state_dict.pop(k) for k in keys], dim=0)


class _DenseLayerNorm(nn.Module):
    """HF BertSelfOutput / BertOutput: LayerNorm(dropout(dense(x)) + residual)."""

    def __init__(self, d_in: int, d_out: int, eps: float, dropout: float):
        super().__init__()
        self.dense = Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class _BertAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, eps: float, dropout: float, attn_drop: float):
        super().__init__()
        self.self = BertSelfAttention(hidden, heads, attn_drop)
        self.output = _DenseLayerNorm(hidden, hidden, eps, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x), x)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.dense = Linear(hidden, ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # HF "gelu": the exact erf form


class BertLayer(nn.Module):
    """One post-LN BERT layer (HF BertLayer names); hidden and attention dropout in training mode."""

    def __init__(self, hidden: int, heads: int, ffn: int, eps: float, dropout: float, attn_drop: float):
        super().__init__()
        self.attention = _BertAttention(hidden, heads, eps, dropout, attn_drop)
        self.intermediate = _Intermediate(hidden, ffn)
        self.output = _DenseLayerNorm(ffn, hidden, eps, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D)
        h = self.attention(x)
        return self.output(self.intermediate(h), h)


class _BertEncoder(nn.Module):
    def __init__(self, layers: int, hidden: int, heads: int, ffn: int, eps: float, dropout: float, attn_drop: float):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(hidden, heads, ffn, eps, dropout, attn_drop) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class BertCore(nn.Module):
    """`BertModel(add_pooling_layer=False)` plus the `lm_head` the official ImageBert attaches
    to it (so its keys are model.embeddings.*, model.encoder.layer.{i}.*, model.lm_head.*).
    forward: full ids (B, 1+N) -> hidden states (B, 1+N, D)."""

    def __init__(self, vocab_size: int, hidden: int, layers: int, heads: int, ffn: int, max_positions: int,
                 out_features: int, dropout: float, attn_drop: float, eps: float = 1e-12):
        super().__init__()
        self.embeddings = BertEmbeddings(vocab_size, hidden, max_positions, eps, dropout)
        self.encoder = _BertEncoder(layers, hidden, heads, ffn, eps, dropout, attn_drop)
        self.lm_head = Linear(hidden, out_features)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embeddings(input_ids))


# ---------------------------------------------------------------------------------------
# U-ViT (UViTBert)

class UViTAttention(nn.Module):
    """Packed `qkv` (no bias, the official qkv_bias=False) and `proj`, default SDPA scale."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden_size {dim} is not a multiple of num_attention_heads {heads}")
        self.heads = heads
        self.qkv = Linear(dim, 3 * dim, bias=False)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(attention(*_split_heads(self.qkv(x), self.heads)))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class UViTBlock(nn.Module):
    """Pre-LN block; with `skip`, skip_linear(cat[x, skip]) first (the U-ViT long skips).
    LayerNorm eps 1e-5 (nn.LayerNorm's default, as the official norm_layer)."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, skip: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = UViTAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, mlp_hidden)
        self.skip_linear = Linear(2 * dim, dim) if skip else None

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:  # (B, L, D)
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))
