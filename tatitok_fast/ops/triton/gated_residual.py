"""Gated residual of adaLN-Zero blocks, forward and backward, in Triton.

    out = x + gate[b] * y        x, y (B, T, D); gate (B, D) (strided rows allowed)

Backward: dx = dout, dy = dout * gate[b], dgate[b] = sum_t dout * y (per-chunk partials,
reduced over T chunks afterwards).
"""
from __future__ import annotations

import torch

from tatitok_fast.ops.triton._common import (HAS_TRITON, check_triton_runnable, device_guard, lazy_triton_op,
                                             next_pow2, triton_enabled)

if HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import wrap_triton


def gated_residual_ref(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch twin: x + gate.unsqueeze(1) * y."""
    return x + gate.unsqueeze(1) * y


if HAS_TRITON:

    @triton.jit
    def _fwd_kernel(X, GATE, Y, OUT, T, D, stride_gate, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: rows x D may pass 2^31
        b = row // T
        cols = tl.arange(0, BLOCK_D)
        m = cols < D
        x = tl.load(X + row * D + cols, mask=m, other=0.0).to(tl.float32)
        y = tl.load(Y + row * D + cols, mask=m, other=0.0).to(tl.float32)
        g = tl.load(GATE + b * stride_gate + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(OUT + row * D + cols, (x + g * y).to(OUT.dtype.element_ty), mask=m)

    @triton.jit
    def _bwd_kernel(DOUT, GATE, Y, DY, DGATE_P, T, D, stride_gate, n_chunks, ROWS: tl.constexpr,
                    BLOCK_D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: rows x D may pass 2^31
        chunk = tl.program_id(1)
        cols = tl.arange(0, BLOCK_D)
        m = cols < D
        g = tl.load(GATE + b * stride_gate + cols, mask=m, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for i in range(ROWS):
            t = chunk * ROWS + i
            if t < T:
                row = b * T + t
                do = tl.load(DOUT + row * D + cols, mask=m, other=0.0).to(tl.float32)
                y = tl.load(Y + row * D + cols, mask=m, other=0.0).to(tl.float32)
                acc += do * y
                tl.store(DY + row * D + cols, (do * g).to(DY.dtype.element_ty), mask=m)
        tl.store(DGATE_P + (b * n_chunks + chunk) * D + cols, acc, mask=m)

    _ROWS = 16

    def _gated_residual_fwd(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        x = x.contiguous()
        y = y.contiguous()
        out = torch.empty_like(x)
        if b * t:
            with device_guard(x):
                wrap_triton(_fwd_kernel)[(b * t,)](x, gate, y, out, t, d, gate.stride(0), BLOCK_D=next_pow2(d))
        return out

    def _gated_residual_bwd(dout: torch.Tensor, gate: torch.Tensor,
                            y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, d = y.shape
        dout = dout.contiguous()
        y = y.contiguous()
        dy = torch.empty_like(y)
        n_chunks = triton.cdiv(t, _ROWS) if t else 1
        dgate_p = torch.zeros((b, n_chunks, d), device=y.device, dtype=torch.float32)
        if b * t:
            with device_guard(y):
                wrap_triton(_bwd_kernel)[(b, n_chunks)](dout, gate, y, dy, dgate_p, t, d, gate.stride(0),
                                                        n_chunks, ROWS=_ROWS, BLOCK_D=next_pow2(d))
        return dy, dgate_p.sum(1).to(gate.dtype)

    def _setup_context(ctx, inputs, output):
        x, gate, y = inputs
        ctx.save_for_backward(gate, y)
        ctx.x_dtype = x.dtype

    def _backward(ctx, dout):
        gate, y = ctx.saved_tensors
        dy, dgate = torch.ops.tatitok_fast.gated_residual_backward(dout, gate, y)
        return dout.to(ctx.x_dtype), dgate, dy

    _gated_residual_op = lazy_triton_op("tatitok_fast::gated_residual", _gated_residual_fwd, _gated_residual_bwd, _backward, _setup_context)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """x + gate[:, None] * y (differentiable), the residual update of adaLN-Zero blocks.

    Args: x, y (B, T, D) of one dtype; gate (B, D) (strided rows allowed).
        backend: "auto" (Triton for CUDA tensors, else the PyTorch twin), "triton", "torch".
    Returns: (B, T, D) in x.dtype.
    """
    if x.dim() != 3 or y.shape != x.shape:
        raise ValueError(f"y: expected the shape of x (B, T, D) = {tuple(x.shape)}, got {tuple(y.shape)}")
    if gate.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"gate: expected shape {(x.shape[0], x.shape[2])}, got {tuple(gate.shape)}")
    if gate.device != x.device or y.device != x.device:
        raise ValueError(f"gate, y: expected tensors on {x.device} (that of x), got {gate.device} and {y.device}")
    if backend == "auto":
        backend = "triton" if triton_enabled(x) and gate.stride(1) == 1 and y.dtype == x.dtype else "torch"
    if backend == "torch":
        return gated_residual_ref(x, gate, y)
    if backend != "triton":
        raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {backend!r}")
    check_triton_runnable(x)
    if y.dtype != x.dtype:
        raise TypeError(f"y: expected dtype {x.dtype} (that of x), got {y.dtype}")
    return _gated_residual_op()(x, gate if gate.stride(1) == 1 else gate.contiguous(), y)
