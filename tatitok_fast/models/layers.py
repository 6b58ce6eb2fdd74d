"""Building blocks shared by the model families: the projection factory (so that FP8
backends swap every projection without touching model code) and attention.

    with use_linear_factory(te_linear):   # e.g. transformer_engine.pytorch.Linear
        model = MaskGen_VQ(config)
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from tatitok_fast.ops.mode import fused_enabled

LinearFactory = Callable[..., nn.Module]
_linear_factory: contextvars.ContextVar[LinearFactory] = contextvars.ContextVar("linear_factory", default=nn.Linear)


def Linear(in_features: int, out_features: int, bias: bool = True) -> nn.Module:
    """Every projection of the models is made here: nn.Linear unless a factory is active."""
    return _linear_factory.get()(in_features, out_features, bias=bias)


@contextlib.contextmanager
def use_linear_factory(factory: LinearFactory):
    """Build models whose projections come from `factory(in, out, bias=...)`."""
    token = _linear_factory.set(factory)
    try:
        yield
    finally:
        _linear_factory.reset(token)


# ---------------------------------------------------------------------------------------
# Attention

try:  # FlashAttention 2/3, when installed (not a hard dependency)
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:  # pragma: no cover - depends on the environment
    _flash_attn_func = None


def has_flash_attn() -> bool:
    return _flash_attn_func is not None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal multi-head attention without mask.

    q: (B, H, Lq, Dh); k, v: (B, H, Lk, Dh) -> (B, Lq, H * Dh).
    FlashAttention on CUDA in fp16/bf16 when installed, else torch's SDPA (which itself
    picks FlashAttention-2 / cuDNN / memory-efficient kernels on GPUs); in reference_mode()
    the textbook softmax(q k^T / sqrt(d)) v.
    """
    b, h, lq, dh = q.shape
    if not fused_enabled():
        w = torch.softmax((q @ k.transpose(-2, -1)) * dh ** -0.5, dim=-1)
        return (w @ v).transpose(1, 2).reshape(b, lq, h * dh)
    if (_flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and dh <= 256 and not torch.jit.is_scripting()):
        out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, L, H, Dh)
        return out.reshape(b, lq, h * dh)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, lq, h * dh)
