"""When the Triton kernels run. The models use them on CUDA tensors and the PyTorch twins
elsewhere; the tests also run them on CPU tensors under TRITON_INTERPRET=1 (Triton's
interpreter), which is how CI checks them without a GPU."""
from __future__ import annotations

import contextlib
import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships with Linux torch wheels
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_enabled(x: torch.Tensor) -> bool:
    """The models' choice: Triton for CUDA tensors, unless in reference_mode()."""
    from tatitok_fast.ops.mode import fused_enabled

    return HAS_TRITON and x.is_cuda and fused_enabled()


def check_triton_runnable(x: torch.Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    if not (x.is_cuda or (INTERPRET and x.device.type == "cpu")):
        raise RuntimeError(f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {x.device}")


def lazy_triton_op(name: str, forward, backward_kernel, backward, setup_context):
    """() -> the Triton op `name` (forward), with `name`_backward (backward_kernel) and the
    autograd formula, registered once. torch.library.triton_op parses the kernels' source
    through torch._inductor (about 2 s of imports), so registration happens on first use, or at
    import where CUDA is available: there a torch.compile trace then only reads the op."""
    done = []

    def get():
        if not done:
            from torch.library import triton_op

            op = triton_op(name, mutates_args={})(forward)
            triton_op(f"{name}_backward", mutates_args={})(backward_kernel)
            op.register_autograd(backward, setup_context=setup_context)
            done.append(op)
        return done[0]

    if HAS_TRITON and torch.cuda.is_available():
        get()
    return get


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def device_guard(x: torch.Tensor):
    """Make x's GPU the current device while launching (Triton launches on the current
    device, which need not be the tensors'); a no-op for CPU tensors (interpreter)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
