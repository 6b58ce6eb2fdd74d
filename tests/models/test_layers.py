"""Shared layers: the projection class, low-precision CPU compute, the patch embedding GEMM."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tatitok_fast.models.nn.layers import FastLinear, Linear, conv2d, cpu_upcasts, linear
from tatitok_fast.models.tokenizers.vit import _patch_embed


def _err(got, want):
    return (got.double() - want.double()).abs().max().item()


def test_default_projection_is_an_nn_linear_with_its_state_dict():
    m = Linear(8, 4)
    assert isinstance(m, FastLinear) and isinstance(m, nn.Linear)
    assert list(m.state_dict()) == ["weight", "bias"]
    x = torch.randn(3, 8)
    torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias), rtol=0, atol=0)  # fp32: plain F.linear


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_linear_is_as_accurate_as_the_native_kernel(dtype):
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g) for s in ((64, 256), (96, 256), (96,)))
    ref = F.linear(x.double(), w.double(), b.double())  # (64, 96)
    got = linear(x.to(dtype), w.to(dtype), b.to(dtype))
    assert got.dtype == dtype and got.shape == (64, 96)
    native = F.linear(x.to(dtype), w.to(dtype), b.to(dtype))
    assert _err(got, ref) <= 2 * _err(native, ref) + 1e-6
    if cpu_upcasts(x.to(dtype)):  # fp32 accumulation, one rounding at the end
        assert torch.equal(got, F.linear(x.to(dtype).float(), w.to(dtype).float(), b.to(dtype).float()).to(dtype))


def test_conv2d_helper_matches_the_module():
    conv = nn.Conv2d(3, 3, 3, padding=1)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(conv2d(x, conv), conv(x), rtol=0, atol=0)
    low = conv2d(x.bfloat16(), conv.bfloat16())
    assert low.dtype == torch.bfloat16
    assert _err(low, conv.double()(x.double())) <= 2 * _err(conv.bfloat16()(x.bfloat16()), conv.double()(x.double())) + 1e-3


def test_patch_embedding_gemm_equals_the_strided_convolution():
    conv = nn.Conv2d(3, 32, kernel_size=8, stride=8)
    x = torch.randn(2, 3, 32, 48)
    want = conv(x).flatten(2).transpose(1, 2)  # (B, Gh*Gw, D), row-major grid
    torch.testing.assert_close(_patch_embed(x, conv), want, rtol=1e-5, atol=1e-5)
