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


def _probe_cpu_native(dtype: torch.dtype) -> bool:
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    fn = getattr(torch.ops.mkldnn, check, None)
    try:
        return bool(fn()) if fn is not None else False
    except RuntimeError:  # an op this torch build does not register
        return False


# probed once at import: a plain dict is a constant to torch.compile (no graph break per layer),
# and needs no torch._dynamo import (about 2 s) as torch.compiler.assume_constant_result would
_CPU_NATIVE = {dtype: _probe_cpu_native(dtype) for dtype in _LOW_PRECISION}


def _cpu_has_native(dtype: torch.dtype) -> bool:
    return _CPU_NATIVE[dtype]


def _cpu_low_precision(x: torch.Tensor) -> tuple[torch.dtype | None, bool]:
    """(dtype, by_autocast): the bf16/fp16 dtype an op on CPU tensor `x` would compute in
    here without matrix units for it (None: compute as asked) — x's own dtype, or, for an fp32
    x, the dtype torch.autocast("cpu") would cast it to (by_autocast True)."""
    if x.device.type != "cpu":
        return None, False
    dtype, by_autocast = x.dtype, False
    if dtype == torch.float32 and torch.is_autocast_enabled("cpu"):
        dtype, by_autocast = torch.get_autocast_dtype("cpu"), True
    if dtype in _LOW_PRECISION and not _cpu_has_native(dtype):
        return dtype, by_autocast
    return None, False


def cpu_upcasts(x: torch.Tensor) -> bool:
    """True when matmuls on `x` (a bf16/fp16 CPU tensor, or an fp32 one under a bf16/fp16
    CPU autocast) should run in fp32 here."""
    return _cpu_low_precision(x)[0] is not None


def _upcast(dtype: torch.dtype, by_autocast: bool):
    """Inputs -> fp32. Under autocast they are first rounded to its dtype, as autocast would
    round them: the numbers of the native low-precision kernel (fp32 accumulation)."""
    if by_autocast:
        return lambda t: None if t is None else t.to(dtype).float()
    return lambda t: None if t is None else t.float()


def host_checkable(t: torch.Tensor) -> bool:
    """Value checks that read the tensor on the host: CPU tensors outside torch.compile (a CUDA
    tensor would cost a device sync per call, so it gets torch._assert_async instead)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, computed in fp32 for low-precision CPU inputs (or under a low-precision CPU
    autocast) where the CPU lacks bf16/fp16 matrix units; the output in the low-precision
    dtype either way. Autocast is off around the fp32 call, or it would cast the inputs back
    and run the slow kernel. x (..., in) -> (..., out)."""
    dtype, by_autocast = _cpu_low_precision(x)
    if dtype is not None:
        up = _upcast(dtype, by_autocast)
        with torch.autocast("cpu", enabled=False):
            return F.linear(up(x), up(weight), up(bias)).to(dtype)
    return F.linear(x, weight, bias)


def conv2d(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """conv(x), computed in fp32 for low-precision CPU inputs (or autocast) where the CPU
    lacks bf16/fp16 units (oneDNN's bf16 3x3 conv on 3 channels: 8x the fp32 time on AVX2)."""
    dtype, by_autocast = _cpu_low_precision(x)
    if dtype is not None:
        up = _upcast(dtype, by_autocast)
        with torch.autocast("cpu", enabled=False):
            return conv._conv_forward(up(x), up(conv.weight), up(conv.bias)).to(dtype)
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
    dtype, by_autocast = _cpu_low_precision(q)
    if dtype is not None:  # fp32 SDPA: the low-precision CPU kernel runs its GEMMs in the slow fallback
        up = _upcast(dtype, by_autocast)
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(up(q), up(k), up(v)).to(dtype)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, lq, h * dh)
