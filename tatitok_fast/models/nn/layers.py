"""Building blocks shared by the model families: the projection factory (so that FP8
backends swap every projection without touching model code) and attention.

    with use_linear_factory(te_linear):   # e.g. transformer_engine.pytorch.Linear
        model = MaskGen_VQ(config)
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from tatitok_fast.ops.mode import fused_enabled

# ---------------------------------------------------------------------------------------
# Low precision on CPUs without bf16/fp16 matrix units
#
# PyTorch runs bf16/fp16 matmuls on x86 CPUs through oneDNN only when the CPU has
# AVX512-BF16/AMX (fp16: AVX512-FP16/AMX-FP16); elsewhere (AVX2 CPUs such as AMD Zen 3) they
# fall back to a generic kernel about 6x slower than fp32 sgemm (measured: (1464, 1024) x
# (1024, 4096) takes 1.34 s in bf16 vs 0.21 s in fp32 on 2 Zen 3 cores). There, projections
# and attention upcast their inputs to fp32, compute with fp32 accumulation (what the bf16
# kernels do too) and round the output back: bf16 storage, fp32 matrix speed.

_LOW_PRECISION = (torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def _cpu_has_native(dtype: torch.dtype) -> bool:
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    fn = getattr(torch.ops.mkldnn, check, None)
    try:
        return bool(fn()) if fn is not None else False
    except RuntimeError:  # an op this torch build does not register
        return False


def cpu_upcasts(x: torch.Tensor) -> bool:
    """True when `x` is a bf16/fp16 CPU tensor whose matmuls should run in fp32 here."""
    return x.dtype in _LOW_PRECISION and x.device.type == "cpu" and not _cpu_has_native(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, computed in fp32 for low-precision CPU inputs where the CPU lacks
    bf16/fp16 matrix units (output in x's dtype either way). x (..., in) -> (..., out)."""
    if cpu_upcasts(x):
        out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        return out.to(x.dtype)
    return F.linear(x, weight, bias)


def conv2d(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """conv(x), computed in fp32 for low-precision CPU inputs where the CPU lacks bf16/fp16
    units (oneDNN's bf16 3x3 conv on 3 channels: 8x the fp32 time on AVX2)."""
    if cpu_upcasts(x):
        bias = None if conv.bias is None else conv.bias.float()
        return conv._conv_forward(x.float(), conv.weight.float(), bias).to(x.dtype)
    return conv(x)


class FastLinear(nn.Linear):
    """nn.Linear (same parameters and state dict) whose forward is `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


LinearFactory = Callable[..., nn.Module]
_linear_factory: contextvars.ContextVar[LinearFactory] = contextvars.ContextVar("linear_factory",
                                                                                default=FastLinear)


def Linear(in_features: int, out_features: int, bias: bool = True) -> nn.Module:
    """Every projection of the models is made here: FastLinear (an nn.Linear) unless a
    factory is active."""
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
    if cpu_upcasts(q):  # fp32 SDPA: the low-precision CPU kernel runs its GEMMs in the slow fallback
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, lq, h * dh)
