"""Helpers shared by the tests."""
import torch

from tatitok_fast.ops import has_kernel

HAS_CUDA = torch.cuda.is_available()


def devices_for(op: str):
    """CPU always; CUDA when a GPU and the op's CUDA kernel are both present."""
    out = ["cpu"]
    if HAS_CUDA and has_kernel(op, "cuda"):
        out.append("cuda")
    return out


def poison_allocator(device: str, nbytes: int = 1 << 22) -> None:
    """Fill a block with 0xFF bytes (NaN as float, -1 as int) and free it, so that outputs
    allocated next on `device` start as garbage rather than zeros: an element a kernel
    forgets to write then shows up (reliably with CUDA's caching allocator)."""
    t = torch.full((nbytes,), 255, dtype=torch.uint8, device=device)
    del t
