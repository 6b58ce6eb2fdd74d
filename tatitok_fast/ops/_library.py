"""Loads the native library and gives every op its fake (meta) kernel and autograd.

`import tatitok_fast._C` registers the schemas of csrc/torch_bindings.cpp and the CPU
(always) and CUDA (when built) kernels. Which devices have a kernel is read once here; the
Python layer never asks how the extension was built in any other way.
"""
from __future__ import annotations

import torch

try:
    from tatitok_fast import _C  # noqa: F401  (registers torch.ops.tatitok_fast.*)
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "tatitok_fast._C, the native extension, could not be loaded "
        f"({exc}). Build it against the installed torch: "
        "pip install --no-build-isolation -e .  (see README.md)"
    ) from exc

OPS = ("vq_nearest_code", "kl_sample", "kl_sample_backward", "maskgen_unmask_step", "mask_by_order")
_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
# (op, device type) -> has a native kernel; a plain dict so torch.compile can read it.
_AVAILABLE = {
    (op, dev): torch._C._dispatch_has_kernel_for_dispatch_key(f"tatitok_fast::{op}", key)
    for op in OPS
    for dev, key in _KEYS.items()
}


def has_kernel(op: str, device: torch.device | str) -> bool:
    """True when `op` has a native kernel for tensors on `device`."""
    return _AVAILABLE.get((op, torch.device(device).type), False)


def require_kernel(op: str, device: torch.device, arg: str) -> None:
    if not _AVAILABLE.get((op, device.type), False):
        built = [d for d in _KEYS if _AVAILABLE[(op, d)]]
        raise RuntimeError(
            f"{op}: {arg} is on {device}, but tatitok_fast._C has kernels for {built} only"
            + (" (rebuild with TATITOK_FAST_TARGET=cuda and a CUDA toolkit)" if device.type == "cuda" else "")
        )


# ---------------------------------------------------------------------------------------
# Fake kernels: shapes and dtypes only, for torch.compile / meta tensors. Every native kernel
# returns fresh contiguous tensors (at::empty of the shape), so the fakes use new_empty (a
# contiguous result), never empty_like (which would copy a non-contiguous input's strides).

@torch.library.register_fake("tatitok_fast::vq_nearest_code")
def _vq_nearest_code_fake(z, codebook, l2_normalize):
    n = z.shape[0]
    return z.new_empty((n,), dtype=torch.long), z.new_empty((n,), dtype=torch.float32)


@torch.library.register_fake("tatitok_fast::kl_sample")
def _kl_sample_fake(parameters, noise, deterministic, generator):
    b, c2, h, w = parameters.shape
    shape = (b, c2 // 2, h, w)
    f32 = dict(dtype=torch.float32)
    return (parameters.new_empty(shape, **f32), parameters.new_empty(shape, **f32),
            parameters.new_empty(shape, **f32), parameters.new_empty((b, w), **f32))


@torch.library.register_fake("tatitok_fast::kl_sample_backward")
def _kl_sample_backward_fake(grad_sample, grad_mean, grad_std, grad_kl, parameters, sample, deterministic):
    return parameters.new_empty(parameters.shape)


@torch.library.register_fake("tatitok_fast::maskgen_unmask_step")
def _maskgen_unmask_step_fake(logits, uncond_logits, guidance_scale, ids, mask_token_id, mask_len_per_row,
                              mask_len, softmax_temperature, sample_temperature, confidence_temperature,
                              last_step, sample_noise, confidence_noise, generator):
    return ids.new_empty(ids.shape)


@torch.library.register_fake("tatitok_fast::mask_by_order")
def _mask_by_order_fake(orders, mask, mask_len, last_step):
    return orders.new_empty(orders.shape, dtype=torch.bool), orders.new_empty(orders.shape, dtype=torch.bool)


# ---------------------------------------------------------------------------------------
# Autograd: kl_sample is in the tokenizer's training graph (sample and kl both feed losses).

def _kl_setup_context(ctx, inputs, output):
    parameters, _noise, deterministic, _generator = inputs
    sample = output[0]
    ctx.save_for_backward(parameters, sample)
    ctx.deterministic = deterministic


def _kl_backward(ctx, grad_sample, grad_mean, grad_std, grad_kl):
    parameters, sample = ctx.saved_tensors
    grad = torch.ops.tatitok_fast.kl_sample_backward(
        grad_sample, grad_mean, grad_std, grad_kl, parameters, sample, ctx.deterministic)
    return grad, None, None, None


torch.library.register_autograd("tatitok_fast::kl_sample", _kl_backward, setup_context=_kl_setup_context)
