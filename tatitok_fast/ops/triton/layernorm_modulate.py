"""LayerNorm (no affine) fused with adaLN modulation, forward and backward, in Triton.

    y = (x - mean) / sqrt(var + eps) * (1 + scale[b]) + shift[b]

x (B, T, D); shift, scale (B, D), may be strided views (e.g. chunks of an adaLN
projection). Statistics in fp32. The backward writes per-chunk partial sums of
d(shift), d(scale) that are reduced over T chunks afterwards.
"""
from __future__ import annotations

import torch

from tatitok_fast.ops.triton._common import (HAS_TRITON, check_triton_runnable, device_guard, lazy_triton_op,
                                             next_pow2, triton_enabled)

if HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import wrap_triton


def layernorm_modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6):
    """Pure-PyTorch twin: F.layer_norm without affine, then x * (1 + scale) + shift."""
    y = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return (y * (1 + scale.float()[:, None]) + shift.float()[:, None]).to(x.dtype)


if HAS_TRITON:

    @triton.jit
    def _fwd_kernel(X, SHIFT, SCALE, Y, MEAN, RSTD, T, D, stride_shift, stride_scale, eps, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: rows x D may pass 2^31
        b = row // T
        cols = tl.arange(0, BLOCK_D)
        m = cols < D
        x = tl.load(X + row * D + cols, mask=m, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / D
        xc = tl.where(m, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
        sh = tl.load(SHIFT + b * stride_shift + cols, mask=m, other=0.0).to(tl.float32)
        sc = tl.load(SCALE + b * stride_scale + cols, mask=m, other=0.0).to(tl.float32)
        y = xc * rstd * (1.0 + sc) + sh
        tl.store(Y + row * D + cols, y.to(Y.dtype.element_ty), mask=m)
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _bwd_kernel(X, DY, SCALE, MEAN, RSTD, DX, DSHIFT_P, DSCALE_P, T, D, stride_scale, n_chunks,
                    ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: rows x D may pass 2^31
        chunk = tl.program_id(1)
        cols = tl.arange(0, BLOCK_D)
        m = cols < D
        w = 1.0 + tl.load(SCALE + b * stride_scale + cols, mask=m, other=0.0).to(tl.float32)
        acc_shift = tl.zeros((BLOCK_D,), dtype=tl.float32)
        acc_scale = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for i in range(ROWS):
            t = chunk * ROWS + i
            if t < T:
                row = b * T + t
                x = tl.load(X + row * D + cols, mask=m, other=0.0).to(tl.float32)
                dy = tl.load(DY + row * D + cols, mask=m, other=0.0).to(tl.float32)
                xhat = tl.where(m, (x - tl.load(MEAN + row)) * tl.load(RSTD + row), 0.0)
                acc_shift += dy
                acc_scale += dy * xhat
                wdy = dy * w
                c1 = tl.sum(xhat * wdy, axis=0) / D
                c2 = tl.sum(wdy, axis=0) / D
                dx = (wdy - (xhat * c1 + c2)) * tl.load(RSTD + row)
                tl.store(DX + row * D + cols, dx.to(DX.dtype.element_ty), mask=m)
        base = (b * n_chunks + chunk) * D
        tl.store(DSHIFT_P + base + cols, acc_shift, mask=m)
        tl.store(DSCALE_P + base + cols, acc_scale, mask=m)

    _ROWS = 16

    def _layernorm_modulate_fwd(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                               eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, d = x.shape
        x = x.contiguous()
        y = torch.empty_like(x)
        mean = torch.empty(b * t, device=x.device, dtype=torch.float32)
        rstd = torch.empty(b * t, device=x.device, dtype=torch.float32)
        if b * t:
            with device_guard(x):
                wrap_triton(_fwd_kernel)[(b * t,)](x, shift, scale, y, mean, rstd, t, d, shift.stride(0),
                                                   scale.stride(0), eps, BLOCK_D=next_pow2(d))
        return y, mean, rstd

    def _layernorm_modulate_bwd(dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
                                rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, d = x.shape
        x = x.contiguous()
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        n_chunks = triton.cdiv(t, _ROWS) if t else 1
        dshift_p = torch.zeros((b, n_chunks, d), device=x.device, dtype=torch.float32)
        dscale_p = torch.zeros((b, n_chunks, d), device=x.device, dtype=torch.float32)
        if b * t:
            with device_guard(x):
                wrap_triton(_bwd_kernel)[(b, n_chunks)](x, dy, scale, mean, rstd, dx, dshift_p, dscale_p, t, d,
                                                        scale.stride(0), n_chunks, ROWS=_ROWS, BLOCK_D=next_pow2(d))
        return dx, dshift_p.sum(1).to(scale.dtype), dscale_p.sum(1).to(scale.dtype)

    def _setup_context(ctx, inputs, output):
        x, shift, scale, _eps = inputs
        _y, mean, rstd = output
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.shift_dtype = shift.dtype

    def _backward(ctx, dy, _dmean, _drstd):
        x, scale, mean, rstd = ctx.saved_tensors
        dx, dshift, dscale = torch.ops.tatitok_fast.layernorm_modulate_backward(dy, x, scale, mean, rstd)
        return dx, dshift.to(ctx.shift_dtype), dscale, None

    _layernorm_modulate_op = lazy_triton_op("tatitok_fast::layernorm_modulate", _layernorm_modulate_fwd, _layernorm_modulate_bwd, _backward, _setup_context)


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                       backend: str = "auto") -> torch.Tensor:
    """adaLN: LayerNorm(x) without affine, then * (1 + scale) + shift (differentiable).

    Args: x (B, T, D); shift, scale (B, D) (strided rows allowed, unit stride along D).
        backend: "auto" (Triton for CUDA tensors, else the PyTorch twin), "triton", "torch".
    Returns: (B, T, D) in x.dtype.
    """
    if x.dim() != 3:
        raise ValueError(f"x: expected (B, T, D), got shape {tuple(x.shape)}")
    for name, v in (("shift", shift), ("scale", scale)):
        if v.shape != (x.shape[0], x.shape[2]):
            raise ValueError(f"{name}: expected shape {(x.shape[0], x.shape[2])}, got {tuple(v.shape)}")
        if v.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} (that of x), got {v.device}")
    if backend == "auto":
        backend = "triton" if triton_enabled(x) and shift.stride(1) == 1 and scale.stride(1) == 1 else "torch"
    if backend == "torch":
        return layernorm_modulate_ref(x, shift, scale, eps)
    if backend != "triton":
        raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {backend!r}")
    check_triton_runnable(x)
    return _layernorm_modulate_op()(x, shift.contiguous() if shift.stride(1) != 1 else shift,
                                  scale.contiguous() if scale.stride(1) != 1 else scale, float(eps))[0]
