"""The tensor-core VQ search's algorithm (approximate scores from TF32/bf16 products, a few
candidates per row, exact float64 re-check, exact search where the error bound cannot rule
out a dropped code), in its PyTorch twin, against the exact nearest code."""
import pytest
import torch

from tatitok_fast.ops.reference import (MMA_INPUT_UNIT, mma_score_error_bound, round_mantissa,
                                        vq_nearest_code_mma_ref, vq_nearest_code_ref)


def _exact(z, e, l2=False):
    """Nearest code by float64 distance, ties to the lowest index (argmin's first)."""
    z, e = z.double(), e.double()
    if l2:
        z, e = torch.nn.functional.normalize(z, dim=-1), torch.nn.functional.normalize(e, dim=-1)
    d = ((z[:, None] - e[None]) ** 2).sum(-1)
    idx = d.argmin(1)
    return idx, d.gather(1, idx[:, None]).squeeze(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("approx", ["tf32", "bf16"])
@pytest.mark.parametrize("m", [1, 4])
def test_equals_exact_search(dtype, l2, approx, m):
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(96, 32, generator=g) * torch.logspace(-2, 2, 96)[:, None]).to(dtype)  # mixed row scales
    e = torch.randn(700, 32, generator=g).to(dtype)
    idx, dist = vq_nearest_code_mma_ref(z, e, l2, num_candidates=m, approx=approx)
    want_idx, want_dist = _exact(z.float(), e.float(), l2)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(dist.double(), want_dist, rtol=1e-6, atol=1e-6)
    ref_idx, _ = vq_nearest_code_ref(z, e, l2)  # the fp32 reference agrees away from fp32 near-ties
    assert (idx == ref_idx).float().mean() > 0.97


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("approx", ["tf32", "bf16"])
@pytest.mark.parametrize("l2", [False, True])
def test_score_error_bound_holds(dtype, approx, l2):
    """|s~ - s| <= bound for every row and code, s = ||e||^2 - 2 z.e in float64."""
    g = torch.Generator().manual_seed(2)
    d = 48
    z = (torch.randn(64, d, generator=g) * torch.logspace(-3, 3, 64)[:, None]).to(dtype).float()
    e = (torch.randn(300, d, generator=g) * torch.logspace(-1, 1, 300)[:, None]).to(dtype).float()
    if l2:
        z, e = torch.nn.functional.normalize(z, dim=-1), torch.nn.functional.normalize(e, dim=-1)
    en = (e * e).sum(1)
    approx_s = en[None] - 2 * (round_mantissa(z, approx) @ round_mantissa(e, approx).T)
    real_s = e.double().pow(2).sum(1)[None] - 2 * (z.double() @ e.double().T)
    fits = not l2 and (dtype == torch.bfloat16 or (approx == "tf32" and dtype == torch.float16))
    u_in = 0.0 if fits else MMA_INPUT_UNIT[approx]
    bound = mma_score_error_bound(z.double().norm(dim=1), float(en.max()), d, u_in)
    err = (approx_s.double() - real_s).abs().amax(1)
    assert bool((err <= bound).all()), f"worst ratio {(err / bound).max().item():.3f}"
    assert (err / bound).max() > 0.005, "the bound should not be vacuous"


def _near_tie_rows(n=200, d=64, gap=1e-3, seed=3):
    """Each row's two nearest codes (2r, 2r+1 or 2r+1, 2r) are `gap` apart in squared
    distance, far below the bf16 product error: bf16 scores often rank them wrongly."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g)
    z = base + 0.3 * torch.randn(n, d, generator=g)
    w = torch.randn(n, d, generator=g)
    w = w - (w * (base - z)).sum(1, keepdim=True) / (base - z).pow(2).sum(1, keepdim=True) * (base - z)  # w _|_ (e-z)
    w = w / w.norm(dim=1, keepdim=True)
    # partner = base + a*(z - base)/|z-base| * s + b*w: pick it at distance^2 = d_base^2 - gap (closer by gap)
    r = (base - z).norm(dim=1, keepdim=True)
    partner = z + (base - z) / r * torch.sqrt(r ** 2 - gap) * torch.cos(torch.tensor(0.01)) \
        + w * torch.sqrt(r ** 2 - gap) * torch.sin(torch.tensor(0.01))
    e = torch.empty(2 * n, d)
    flip = torch.rand(n, generator=g) < 0.5  # the closer one at the lower or the higher index
    e[0::2] = torch.where(flip[:, None], partner, base)
    e[1::2] = torch.where(flip[:, None], base, partner)
    return z, e


def test_adversarial_near_ties_where_bf16_flips_the_order():
    z, e = _near_tie_rows()
    want, _ = _exact(z, e)
    approx_s = (e * e).sum(1)[None] - 2 * (round_mantissa(z, "bf16") @ round_mantissa(e, "bf16").T)
    naive = approx_s.argmin(1)
    assert int((naive != want).sum()) >= 10, "the case must contain rows that bf16 scores rank wrongly"
    # one candidate: the flipped rows cannot be proved safe and are searched exactly
    idx1, _, fallback1 = vq_nearest_code_mma_ref(z, e, num_candidates=1, approx="bf16", return_fallback=True)
    assert torch.equal(idx1, want)
    assert bool(fallback1[naive != want].all())
    # two candidates hold both near-tied codes: the exact re-check decides, no exact search
    idx2, _, fallback2 = vq_nearest_code_mma_ref(z, e, num_candidates=2, approx="bf16", return_fallback=True)
    assert torch.equal(idx2, want) and not bool(fallback2.any())
    # TF32 rounding is 8x finer, the same logic holds
    assert torch.equal(vq_nearest_code_mma_ref(z, e, num_candidates=1, approx="tf32")[0], want)


@pytest.mark.parametrize("m", [1, 2, 8])
def test_duplicate_codes_go_to_the_lowest_index(m):
    g = torch.Generator().manual_seed(4)
    e = torch.randn(300, 16, generator=g)
    e[250] = e[17]
    e[251] = e[17]
    z = torch.stack([e[250], e[17] + 1e-3, e[5]])
    idx, dist = vq_nearest_code_mma_ref(z, e, num_candidates=m, approx="bf16")
    assert idx.tolist() == [17, 17, 5] and dist[0].item() == 0.0
    same = torch.ones(40, 8)
    assert vq_nearest_code_mma_ref(torch.randn(5, 8, generator=g), same, num_candidates=m)[0].tolist() == [0] * 5


def test_small_codebooks_and_bad_arguments():
    z, e = torch.randn(6, 4), torch.randn(3, 4)
    idx, _, fallback = vq_nearest_code_mma_ref(z, e, num_candidates=4, return_fallback=True)  # K <= candidates
    assert torch.equal(idx, _exact(z, e)[0]) and not bool(fallback.any())
    with pytest.raises(ValueError, match="num_candidates: expected >= 1"):
        vq_nearest_code_mma_ref(z, e, num_candidates=0)
    with pytest.raises(ValueError, match="approx: expected 'tf32' or 'bf16'"):
        vq_nearest_code_mma_ref(z, e, approx="fp8")


# ---------------------------------------------------------------------------------------
# The CUDA kernel (tensor cores on sm_80+) against the exact search

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_kernel_is_exact_on_near_ties(dtype):
    from tatitok_fast import ops

    z, e = _near_tie_rows(n=500, d=64, gap=1e-4)
    z, e = z.to(dtype), e.to(dtype)
    extra = torch.randn(9000, 64).to(dtype)  # more codes than one range, far from the rows
    e = torch.cat([e, extra * 3 + 20])
    want, want_dist = _exact(z.float(), e.float())
    idx, dist = ops.vq_nearest_code(z.cuda(), e.cuda())
    assert torch.equal(idx.cpu(), want)
    torch.testing.assert_close(dist.cpu().double(), want_dist, rtol=1e-5, atol=1e-6)
    twin, _ = vq_nearest_code_mma_ref(z, e)
    assert torch.equal(twin, want)
