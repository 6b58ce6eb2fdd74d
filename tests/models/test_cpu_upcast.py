"""On a CPU without bf16/fp16 matrix units, the projections, attention and convolutions
compute in fp32 under torch.autocast("cpu", bfloat16) too (autocast used to cast the
upcast inputs back to bf16: the slow fallback kernel the upcast exists to avoid).

This machine may have AVX512-BF16/AMX; the CPU's answer (layers._cpu_has_native, what
PyTorch's oneDNN reports) is replaced by "no units" so that the upcast path runs. The matmuls'
dtypes are read at the ATen level (a dispatch mode sees the ops after autocast's casts)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from tatitok_fast.models.nn import layers

MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "convolution", "_scaled_dot_product_flash_attention_for_cpu",
           "_scaled_dot_product_attention_math", "_scaled_dot_product_flash_attention", "linear"}


class MatmulDtypes(TorchDispatchMode):
    """Records (op name, input dtypes) of every matrix op that runs."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in MATMULS:
            self.seen.append((name, tuple(a.dtype for a in args if isinstance(a, torch.Tensor))))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def no_bf16_units(monkeypatch):
    monkeypatch.setattr(layers, "_cpu_has_native", lambda dtype: False)


def _ops(fn):
    with MatmulDtypes() as mode:
        out = fn()
    assert mode.seen, "no matrix op ran"
    return out, mode.seen


def test_projection_attention_conv_compute_in_fp32_under_autocast(no_bf16_units):
    g = torch.Generator().manual_seed(0)
    lin = layers.FastLinear(64, 32)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(4, 10, 64, generator=g)
    q, k, v = (torch.randn(2, 4, 10, 16, generator=g) for _ in range(3))
    img = torch.randn(2, 3, 8, 8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for name, fn in {"linear": lambda: lin(x), "attention": lambda: layers.attention(q, k, v),
                         "attention (bf16 inputs)": lambda: layers.attention(q.bfloat16(), k.bfloat16(), v.bfloat16()),
                         "conv2d": lambda: layers.conv2d(img, conv)}.items():
            out, seen = _ops(fn)
            assert out.dtype == torch.bfloat16, name  # what autocast gives, in either path
            assert all(set(dt) == {torch.float32} for _, dt in seen), (name, seen)
        assert layers.cpu_upcasts(x)
    # the numbers: those of the bf16 kernel (inputs rounded to bf16, fp32 accumulation)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lin(x)
    want = torch.nn.functional.linear(x.bfloat16().float(), lin.weight.bfloat16().float(),
                                      lin.bias.bfloat16().float()).bfloat16()
    assert torch.equal(got, want)


def test_a_tokenizer_forward_under_autocast_runs_its_matmuls_in_fp32(no_bf16_units):
    """Every matrix op of a TA-TiTok forward (encoder, quantizer, text-aware decoder) under
    bf16 autocast takes fp32 inputs."""
    from tatitok_fast import TATiTok
    from tatitok_fast.presets import tiny_tokenizer_config

    torch.manual_seed(0)
    model = TATiTok(tiny_tokenizer_config("vq")).eval()
    x = torch.rand(2, 3, model.image_size, model.image_size)
    guidance = torch.randn(2, 77, model.decoder.text_guidance_proj.in_features)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, seen = _ops(lambda: model(x, guidance))
    low = [(name, dt) for name, dt in seen if set(dt) != {torch.float32}]
    assert not low, low


def test_without_autocast_fp32_stays_plain(no_bf16_units):
    lin = layers.FastLinear(16, 8)
    x = torch.randn(3, 16)
    assert not layers.cpu_upcasts(x)
    torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias), rtol=0, atol=0)
