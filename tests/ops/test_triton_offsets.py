"""The Triton kernels address rows with 64-bit offsets (rows x D may pass 2^31 elements) and
launch on their tensors' GPU.

A tensor past 2^31 elements does not fit a CPU test under the interpreter (which also
computes with numpy's wrapping int32), so the offsets are checked where the overflow would
happen: in the kernels compiled for a CUDA target (compilation needs no GPU), every pointer
offset computed from a program id must be i64, with the width arguments specialised to i32
as Triton does for small values."""
import re

import pytest
import torch

from tatitok_fast.ops.triton._common import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")

# scalar pointer + offset: `tt.addptr %X, %off : !tt.ptr<f32>, i32`
SCALAR_ADDPTR = re.compile(r"tt\.addptr %[\w.#]+, %[\w.#]+ : !tt\.ptr<\w+>, (i\d+)")
CONSTEXPRS = {"BLOCK_D": 128, "ROWS": 16}


def _kernels():
    import importlib

    gr = importlib.import_module("tatitok_fast.ops.triton.gated_residual")
    ln = importlib.import_module("tatitok_fast.ops.triton.layernorm_modulate")

    return {"gated_residual.fwd": gr._fwd_kernel, "gated_residual.bwd": gr._bwd_kernel,
            "layernorm_modulate.fwd": ln._fwd_kernel, "layernorm_modulate.bwd": ln._bwd_kernel}


def _ttir(kernel) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    if not isinstance(kernel, JITFunction):  # under TRITON_INTERPRET=1: the Python function it wraps
        kernel = JITFunction(kernel.fn)
    sig = {}
    for name in kernel.arg_names:
        if name in CONSTEXPRS:
            sig[name] = "constexpr"
        elif name == "eps":
            sig[name] = "fp32"
        elif name.isupper() and name not in ("T", "D"):  # tensors
            sig[name] = "*fp32"
        else:  # T, D, strides, chunk counts: i32, as Triton specialises ints below 2^31
            sig[name] = "i32"
    src = ASTSource(kernel, sig, constexprs={k: v for k, v in CONSTEXPRS.items() if k in kernel.arg_names})
    try:
        with pytest.MonkeyPatch.context() as mp:  # compile for real even when the tests interpret
            mp.setenv("TRITON_INTERPRET", "0")
            return triton.compile(src, target=GPUTarget("cuda", 80, 32)).asm["ttir"]
    except (RuntimeError, ImportError) as e:  # no NVIDIA backend in this triton build
        pytest.skip(f"cannot compile for a CUDA target here: {e}")


@pytest.mark.parametrize("name", sorted(_kernels()) if HAS_TRITON else [])
def test_row_offsets_are_64_bit(name):
    widths = SCALAR_ADDPTR.findall(_ttir(_kernels()[name]))
    assert widths, "expected scalar row-base pointer arithmetic in the kernel"
    assert set(widths) == {"i64"}, f"{name}: 32-bit row offsets would wrap past 2^31 elements: {widths}"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launches_on_the_tensors_gpu():
    from tatitok_fast.ops.triton import gated_residual, gated_residual_ref, layernorm_modulate, layernorm_modulate_ref

    x, y = torch.randn(2, 5, 64, device="cuda:1"), torch.randn(2, 5, 64, device="cuda:1")
    mod = torch.randn(2, 3 * 64, device="cuda:1")
    shift, scale, gate = mod[:, :64], mod[:, 64:128], mod[:, 128:]
    with torch.cuda.device(0):
        out = gated_residual(x, gate, y, backend="triton")
        ln = layernorm_modulate(x, shift, scale, backend="triton")
    torch.testing.assert_close(out, gated_residual_ref(x, gate, y))
    torch.testing.assert_close(ln, layernorm_modulate_ref(x, shift, scale), rtol=2e-5, atol=2e-5)
