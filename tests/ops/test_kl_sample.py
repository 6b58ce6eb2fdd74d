import pytest
import torch
from scipy import stats

from tatitok_fast import ops
from tatitok_fast.ops.reference import kl_sample_ref
from tests.helpers import devices_for, poison_allocator

DEVICES = devices_for("kl_sample")
SHAPES = [(1, 2, 1, 1), (2, 32, 1, 32), (3, 32, 1, 128), (5, 6, 3, 7), (64, 32, 1, 32)]
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6}  # inputs upcast exactly


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_with_explicit_noise(device, dtype, shape):
    b, c2, h, w = shape
    params = (torch.randn(shape, device=device) * 3).to(dtype)
    params[:, c2 // 2:].clamp_(-40, 25)  # exercise the logvar clamp on both sides
    params.view(-1)[-1] = 40.0
    noise = torch.randn(b, c2 // 2, h, w, device=device)
    poison_allocator(device)
    out = ops.kl_sample(params, noise)
    ref = kl_sample_ref(params, noise)
    for name, got, want in zip(("sample", "mean", "std", "kl"), out, ref):
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_mode(device):
    params = torch.randn(2, 8, 1, 5, device=device)
    sample, mean, std, kl = ops.kl_sample(params, deterministic=True)
    torch.testing.assert_close(sample, params[:, :4])
    torch.testing.assert_close(mean, params[:, :4])
    assert bool((std == 0).all()) and bool((kl == 0).all()) and kl.shape == (2, 5)


@pytest.mark.parametrize("device", DEVICES)
def test_in_kernel_noise_is_standard_normal_and_seeded(device):
    params = torch.randn(64, 32, 1, 128, device=device)
    torch.manual_seed(7)
    s1, mean, std, _ = ops.kl_sample(params)
    eps = ((s1 - mean) / std).flatten().double().cpu()
    # Kolmogorov-Smirnov against N(0, 1) over 131072 draws
    assert stats.kstest(eps.numpy(), "norm").pvalue > 1e-3
    assert abs(eps.mean().item()) < 0.02 and abs(eps.std().item() - 1) < 0.02
    torch.manual_seed(7)
    s2 = ops.kl_sample(params)[0]
    assert torch.equal(s1, s2), "the same seed must give the same sample"
    s3 = ops.kl_sample(params)[0]
    assert not torch.equal(s2, s3), "consecutive calls must draw fresh noise"
    g = torch.Generator(device=device).manual_seed(3)
    s4 = ops.kl_sample(params, generator=g)[0]
    g.manual_seed(3)
    assert torch.equal(s4, ops.kl_sample(params, generator=g)[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_gradients_match_reference(device, deterministic):
    params = (torch.randn(3, 8, 1, 6, device=device) * 2)
    params[0, 4, 0, 0] = -35.0  # clamped: no gradient through logvar there
    params[1, 5, 0, 1] = 25.0
    noise = torch.randn(3, 4, 1, 6, device=device)
    p1 = params.clone().requires_grad_()
    p2 = params.clone().requires_grad_()
    outs = ops.kl_sample(p1, noise, deterministic=deterministic)
    refs = kl_sample_ref(p2, noise, deterministic=deterministic)
    weights = [torch.randn_like(o) for o in outs]
    loss1 = sum((o * wt).sum() for o, wt in zip(outs, weights))
    loss2 = sum((o * wt).sum() for o, wt in zip(refs, weights) if o.requires_grad)
    (g1,) = torch.autograd.grad(loss1, p1)
    (g2,) = torch.autograd.grad(loss2, p2)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)
    assert g1[0, 4, 0, 0].item() == 0.0 and g1[1, 5, 0, 1].item() == 0.0


def test_gradient_dtype_follows_parameters():
    p = torch.randn(2, 4, 1, 3, dtype=torch.bfloat16, requires_grad=True)
    sample, _, _, kl = ops.kl_sample(p)
    (sample.sum() + kl.sum()).backward()
    assert p.grad.dtype == torch.bfloat16


def test_opcheck():
    p = torch.randn(2, 8, 1, 5, requires_grad=True)
    noise = torch.randn(2, 4, 1, 5)
    torch.library.opcheck(torch.ops.tatitok_fast.kl_sample, (p, noise, False, None))
    torch.library.opcheck(torch.ops.tatitok_fast.kl_sample, (p, None, True, None))
    torch.library.opcheck(torch.ops.tatitok_fast.kl_sample_backward,
                          (torch.randn(2, 4, 1, 5), None, None, torch.randn(2, 5), p.detach(), torch.randn(2, 4, 1, 5), False))


@pytest.mark.parametrize(
    "params, noise, match",
    [
        (torch.randn(2, 8, 5), None, "parameters: expected a 4-D tensor"),
        (torch.randn(2, 7, 1, 5), None, "parameters: expected an even"),
        (torch.randn(2, 0, 1, 5), None, "parameters: expected an even"),
        (torch.randn(2, 8, 1, 5).double(), None, "parameters: expected dtype"),
        (torch.randn(2, 8, 1, 5), torch.randn(2, 8, 1, 5), r"noise: expected shape \(2, 4, 1, 5\)"),
        (torch.randn(2, 8, 1, 5), torch.randn(2, 4, 1, 5).half(), "noise: expected dtype"),
        (torch.randn(2, 8, 1, 5), torch.randn(2, 4, 1, 5, device="meta"), "noise: expected a tensor on cpu"),
    ],
)
def test_bad_inputs(params, noise, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ops.kl_sample(params, noise)
