"""The Triton adaLN kernels (LayerNorm + modulation, gated residual), forward and backward,
against their PyTorch twins: compiled on CUDA, under TRITON_INTERPRET=1 on CPU."""
import pytest
import torch

from tatitok_fast.ops.triton import gated_residual, gated_residual_ref, layernorm_modulate, layernorm_modulate_ref
from tatitok_fast.ops.triton._common import HAS_TRITON, INTERPRET

DEVICES = ["cuda"] if torch.cuda.is_available() else (["cpu"] if INTERPRET else [])
pytestmark = pytest.mark.skipif(not HAS_TRITON or not DEVICES, reason="needs triton on CUDA or TRITON_INTERPRET=1")
SHAPES = [(1, 1, 8), (2, 5, 40), (3, 77, 96), (2, 129, 130)]
# tolerance per dtype: about twice what the same-precision PyTorch twin errs against fp32
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2), torch.float16: (4e-3, 4e-3)}


def _modulation(b, d, device, dtype):
    # strided (B, D) views, as chunks of an adaLN projection are
    emb = torch.randn(b, 6 * d, device=device, dtype=dtype) * 0.5
    return emb[:, :d], emb[:, d:2 * d], emb[:, 2 * d:3 * d]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_layernorm_modulate(device, dtype, shape):
    b, t, d = shape
    x = (torch.randn(shape, device=device) * 2 + 0.5).to(dtype)
    shift, scale, _ = _modulation(b, d, device, dtype)
    leaves = [v.detach().clone().requires_grad_() for v in (x, shift, scale)]
    ref_leaves = [v.detach().float().clone().requires_grad_() for v in (x, shift, scale)]
    y = layernorm_modulate(*leaves, backend="triton")
    y_ref = layernorm_modulate_ref(*ref_leaves)
    rtol, atol = TOL[dtype]
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), y_ref, rtol=rtol, atol=atol)
    dy = torch.randn_like(y_ref)
    grads = torch.autograd.grad(y, leaves, dy.to(dtype))
    grads_ref = torch.autograd.grad(y_ref, ref_leaves, dy)
    for name, g, gr in zip(("x", "shift", "scale"), grads, grads_ref):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g.float(), gr, rtol=rtol * 4, atol=atol * 4 * max(1, t ** 0.5), msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_gated_residual(device, dtype, shape):
    b, t, d = shape
    x = torch.randn(shape, device=device, dtype=dtype)
    y = torch.randn(shape, device=device, dtype=dtype)
    _, _, gate = _modulation(b, d, device, dtype)
    leaves = [v.detach().clone().requires_grad_() for v in (x, gate, y)]
    ref_leaves = [v.detach().float().clone().requires_grad_() for v in (x, gate, y)]
    out = gated_residual(*leaves, backend="triton")
    out_ref = gated_residual_ref(*ref_leaves)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.float(), out_ref, rtol=rtol, atol=atol)
    dout = torch.randn_like(out_ref)
    grads = torch.autograd.grad(out, leaves, dout.to(dtype))
    grads_ref = torch.autograd.grad(out_ref, ref_leaves, dout)
    for name, g, gr in zip(("x", "gate", "y"), grads, grads_ref):
        torch.testing.assert_close(g.float(), gr, rtol=rtol * 4, atol=atol * 4 * max(1, t ** 0.5), msg=name)


def test_bad_inputs():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"shift: expected shape \(2, 8\)"):
        layernorm_modulate(x, torch.randn(2, 7), torch.randn(2, 8))
    with pytest.raises(ValueError, match="x: expected"):
        layernorm_modulate(x[0], torch.randn(2, 8), torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"gate: expected shape \(2, 8\)"):
        gated_residual(x, torch.randn(8), x)
    with pytest.raises(ValueError, match="backend: expected"):
        gated_residual(x, torch.randn(2, 8), x, backend="cuda")
