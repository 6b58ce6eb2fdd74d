"""The fake (meta) kernels give the strides of the real outputs, which are always fresh
contiguous tensors, also for non-contiguous inputs (torch.compile plans its buffers from the
fakes): torch.library.opcheck with non-contiguous inputs, and the fake outputs' strides
compared with the real ones directly, on every device with a kernel."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from tatitok_fast.ops.reference import gumbel_noise
from tests.helpers import devices_for


def _t(x: torch.Tensor) -> torch.Tensor:
    """x laid out transposed in memory (same values, not contiguous)."""
    out = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert not out.is_contiguous() and torch.equal(out, x)
    return out


def _cases(device: str):
    g = torch.Generator().manual_seed(0)
    orders = torch.stack([torch.randperm(10, generator=g) for _ in range(3)]).to(device)
    logits = torch.randn(2, 8, 20, generator=g).to(device)
    ids = torch.full((2, 8), 20, device=device)
    ids[:, :3] = torch.randint(0, 20, (2, 3), generator=g).to(device)
    params = torch.randn(2, 8, 3, 5, generator=g).to(device)
    sample = torch.randn(2, 4, 3, 5, generator=g).to(device)
    noise_g, noise_g2 = gumbel_noise((2, 8, 20)).to(device), gumbel_noise((2, 8)).to(device)
    ops = torch.ops.tatitok_fast
    return {
        "mask_by_order": (ops.mask_by_order, (_t(orders), _t(torch.ones(3, 10, device=device)), 4, False)),
        "maskgen_unmask_step": (ops.maskgen_unmask_step,
                                (_t(logits), None, 0.0, _t(ids), 20, None, 3, 1.0, 1.0, 1.0, False, noise_g, noise_g2,
                                 None)),
        "kl_sample": (ops.kl_sample, (_t(params), _t(torch.randn(2, 4, 3, 5, device=device)), False, None)),
        "kl_sample_backward": (ops.kl_sample_backward,
                               (_t(sample), None, None, torch.randn(2, 5, device=device), _t(params), _t(sample), False)),
        "vq_nearest_code": (ops.vq_nearest_code, (_t(torch.randn(17, 16, device=device)),
                                                  _t(torch.randn(40, 16, device=device)), False)),
    }


def _strides(out):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [(tuple(o.shape), o.stride(), o.dtype) for o in outs]


@pytest.mark.parametrize("name", ["mask_by_order", "maskgen_unmask_step", "kl_sample", "kl_sample_backward",
                                  "vq_nearest_code"])
@pytest.mark.parametrize("device", devices_for("mask_by_order"))
def test_fake_outputs_are_contiguous_like_the_real_ones(name, device):
    op, args = _cases(device)[name]
    real = op(*args)
    mode = FakeTensorMode()
    fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode:
        fake = op(*fake_args)
    assert _strides(fake) == _strides(real)
    assert all(o.is_contiguous() for o in (real if isinstance(real, tuple) else (real,)))
    torch.library.opcheck(op, args)
