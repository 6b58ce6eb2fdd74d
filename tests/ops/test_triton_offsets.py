"""The Triton kernels address rows with 64-bit offsets (rows x D may pass 2^31 elements) and
launch on their tensors' GPU.

A tensor past 2^31 elements does not fit a CPU test under the interpreter (which also
computes with numpy's wrapping int32), so the offsets are checked where the overflow would
happen: in the kernels compiled for a CUDA target (compilation needs no GPU), every pointer
offset computed from a program id must be i64, with the width arguments specialised to i32
as Triton does for small values.

The compile runs in a fresh process (this file run as a script) with TRITON_INTERPRET=0 and
an empty TRITON_CACHE_DIR: the test process has TRITON_INTERPRET=1 (tests/conftest.py) from
before triton's import, and compiling there fails whenever the cache is cold (triton's
gluon import asserts that triton.language's functions are JIT functions; issue 21)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tatitok_fast.ops.triton._common import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")

# scalar pointer + offset: `tt.addptr %X, %off : !tt.ptr<f32>, i32`
SCALAR_ADDPTR = re.compile(r"tt\.addptr %[\w.#]+, %[\w.#]+ : !tt\.ptr<\w+>, (i\d+)")
CONSTEXPRS = {"BLOCK_D": 128, "ROWS": 16}
KERNELS = {"gated_residual.fwd": ("gated_residual", "_fwd_kernel"),
           "gated_residual.bwd": ("gated_residual", "_bwd_kernel"),
           "layernorm_modulate.fwd": ("layernorm_modulate", "_fwd_kernel"),
           "layernorm_modulate.bwd": ("layernorm_modulate", "_bwd_kernel")}
CONTROL = "control.row_offsets_32_bit"  # a kernel of this file whose row offsets are i32
NO_BACKEND_RC = 3  # the script's exit status when this triton cannot compile for CUDA

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _row_offsets_32_bit_kernel(X, OUT, T, D, BLOCK_D: tl.constexpr):
        """gated_residual's forward row addressing without the .to(tl.int64): the control
        that the check must flag."""
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        m = cols < D
        x = tl.load(X + row * D + cols, mask=m, other=0.0)
        tl.store(OUT + row * D + cols, x * 2.0, mask=m)


def row_offset_widths(ttir: str) -> list[str]:
    """Integer widths of the scalar pointer offsets (`tt.addptr` on a scalar pointer) in `ttir`."""
    return SCALAR_ADDPTR.findall(ttir)


def _signature(kernel) -> dict:
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
    return sig


def _compile_all() -> dict:
    """{kernel name: TTIR} compiled for an sm_80 CUDA target; run only in a process whose
    triton was imported with TRITON_INTERPRET=0."""
    import importlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernels = {name: getattr(importlib.import_module(f"tatitok_fast.ops.triton.{mod}"), fn)
               for name, (mod, fn) in KERNELS.items()}
    kernels[CONTROL] = _row_offsets_32_bit_kernel
    out = {}
    for name, kernel in kernels.items():
        src = ASTSource(kernel, _signature(kernel),
                        constexprs={k: v for k, v in CONSTEXPRS.items() if k in kernel.arg_names})
        out[name] = triton.compile(src, target=GPUTarget("cuda", 80, 32)).asm["ttir"]
    return out


@pytest.fixture(scope="module")
def ttir(tmp_path_factory) -> dict:
    """The kernels' TTIR, compiled by this file run as a script in a clean process."""
    tmp = tmp_path_factory.mktemp("ttir")
    cache = tmp / "triton-cache"
    cache.mkdir()
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(cache)}
    out = tmp / "ttir.json"
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == NO_BACKEND_RC:
        pytest.skip(f"cannot compile for a CUDA target with this triton: {proc.stderr.strip()[-400:]}")
    assert proc.returncode == 0, f"compiling the kernels to TTIR failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_row_offsets_are_64_bit(ttir, name):
    widths = row_offset_widths(ttir[name])
    assert widths, "expected scalar row-base pointer arithmetic in the kernel"
    assert set(widths) == {"i64"}, f"{name}: 32-bit row offsets would wrap past 2^31 elements: {widths}"


def test_the_check_flags_32_bit_row_offsets(ttir):
    """The same check on a kernel that computes row * D in i32 finds the i32 offsets."""
    assert set(row_offset_widths(ttir[CONTROL])) == {"i32"}


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


if __name__ == "__main__":  # the compile step of the `ttir` fixture: python test_triton_offsets.py OUT.json
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("TRITON_INTERPRET must be 0 here: the kernels are compiled, not interpreted")
    from triton.backends import backends

    if "nvidia" not in backends:  # a triton build without the NVIDIA backend
        print(f"triton {triton.__version__} has backends {sorted(backends)}, not nvidia", file=sys.stderr)
        sys.exit(NO_BACKEND_RC)
    Path(sys.argv[1]).write_text(json.dumps(_compile_all()))
