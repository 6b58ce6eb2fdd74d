import pytest
import torch

from tatitok_fast import ops
from tatitok_fast.ops.reference import vq_nearest_code_ref
from tests.helpers import devices_for, poison_allocator

DEVICES = devices_for("vq_nearest_code")
SHAPES = [(1, 1, 16), (7, 13, 16), (33, 1000, 64), (1, 8192, 64), (257, 16384, 64), (129, 8193, 16), (100, 77, 5)]


def _distances_fp64(z, e, l2):
    z, e = z.double(), e.double()
    if l2:
        z = torch.nn.functional.normalize(z, dim=-1)
        e = torch.nn.functional.normalize(e, dim=-1)
    return torch.cdist(z, e) ** 2


def _assert_nearest(z, e, idx, dist, l2):
    """idx is a nearest code up to fp32 rounding of the distance, and dist is its distance."""
    n, k = z.shape[0], e.shape[0]
    assert idx.dtype == torch.int64 and idx.shape == (n,)
    assert dist.dtype == torch.float32 and dist.shape == (n,)
    assert bool(((idx >= 0) & (idx < k)).all())
    d64 = _distances_fp64(z.float(), e.float(), l2)
    chosen = d64.gather(1, idx.cpu().view(-1, 1)).squeeze(1)
    best = d64.min(dim=1).values
    scale = (z.float().double().pow(2).sum(1) + e.float().double().pow(2).sum(1).max()) if not l2 else torch.full_like(best, 4.0)
    assert bool((chosen - best <= 1e-5 * scale + 1e-6).all()), "a row picked a code that is not (nearly) the nearest"
    torch.testing.assert_close(dist.double().cpu(), chosen, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("l2", [False, True])
def test_matches_reference(device, dtype, shape, l2):
    n, k, d = shape
    z = torch.randn(n, d, device=device).to(dtype)
    e = torch.randn(k, d, device=device).to(dtype)
    poison_allocator(device)
    idx, dist = ops.vq_nearest_code(z, e, l2_normalize=l2)
    _assert_nearest(z.cpu(), e.cpu(), idx, dist, l2)
    ref_idx, ref_dist = vq_nearest_code_ref(z, e, l2)
    # the same winner as the reference except at fp32 near-ties
    assert (idx == ref_idx).float().mean().item() > 0.99
    torch.testing.assert_close(dist[idx == ref_idx], ref_dist[idx == ref_idx], rtol=1e-4, atol=1e-4)


# the zoo's codebooks (TiTok 4096x12, TA-TiTok vq8k 8192x64, MaskGIT-VQGAN 1024x256) at small N,
# and shapes that exercise the CPU kernel's BLAS path edges: several code tiles with a 1-code
# tail, row blocks of 64 with a 1-row tail, K below one tile and not a multiple of 16
ZOO_SHAPES = [(64, 4096, 12), (64, 8192, 64), (64, 1024, 256), (65, 2049, 64), (3, 50, 33), (130, 1030, 256)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", ZOO_SHAPES)
@pytest.mark.parametrize("l2", [False, True])
def test_zoo_codebooks_match_reference(device, shape, l2):
    n, k, d = shape
    gen = torch.Generator().manual_seed(n + k + d)
    z, e = torch.randn(n, d, generator=gen).to(device), torch.randn(k, d, generator=gen).to(device)
    idx, dist = ops.vq_nearest_code(z, e, l2_normalize=l2)
    _assert_nearest(z.cpu(), e.cpu(), idx, dist, l2)
    ref_idx, ref_dist = vq_nearest_code_ref(z, e, l2)
    # rows whose pick differs from the matmul+argmin twin: only where the two codes are
    # within fp32 rounding of each other in the exact (fp64) distance
    diff = (idx != ref_idx).nonzero().flatten().cpu()
    d64 = _distances_fp64(z.cpu(), e.cpu(), l2)
    gap = (d64[diff].gather(1, idx.cpu()[diff, None]) - d64[diff].gather(1, ref_idx.cpu()[diff, None])).abs()
    assert bool((gap <= 1e-5 * (d64[diff].min(1, keepdim=True).values + 1)).all())
    assert diff.numel() <= max(1, n // 50)
    same = idx == ref_idx
    torch.testing.assert_close(dist[same], ref_dist[same], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [12, 64, 256])
def test_ties_at_zoo_widths_go_to_lowest_index(device, d):
    # duplicates in different code tiles and lanes, and an all-equal codebook, at every zoo width
    k = 2100
    e = torch.randn(k, d, device=device)
    e[2090] = e[1500] = e[7]
    z = torch.stack([e[2090], e[1500] + 1e-3, e[7] - 1e-3])
    idx, _ = ops.vq_nearest_code(z, e)
    assert idx.tolist() == [7, 7, 7]
    idx, _ = ops.vq_nearest_code(torch.randn(70, d, device=device), torch.ones(300, d, device=device))
    assert idx.tolist() == [0] * 70


@pytest.mark.parametrize("device", DEVICES)
def test_exact_on_well_separated_codes(device):
    # codes on a coarse grid and queries right next to them: one answer, no rounding doubt
    e = torch.randint(-20, 20, (5000, 16), device=device).float()
    target = torch.randint(0, 5000, (3000,), device=device)
    z = e[target] + 0.01 * torch.randn(3000, 16, device=device)
    e_unique, inverse = torch.unique(e, dim=0, return_inverse=True)
    idx, _ = ops.vq_nearest_code(z, e_unique)
    assert torch.equal(idx, inverse[target])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [50, 16384])
def test_ties_go_to_lowest_index(device, k):
    e = torch.randn(k, 64, device=device)
    dup_lo, dup_hi = 10, k - 3
    e[dup_hi] = e[dup_lo]
    z = torch.stack([e[dup_hi], e[dup_lo], e[dup_hi] + 1e-3])
    idx, dist = ops.vq_nearest_code(z, e)
    assert idx.tolist() == [dup_lo, dup_lo, dup_lo]
    assert dist[0].item() == 0.0
    # an all-equal codebook: every row takes code 0, as torch.argmin
    same = torch.ones(37, 16, device=device)
    idx, _ = ops.vq_nearest_code(torch.randn(9, 16, device=device), same)
    assert idx.tolist() == [0] * 9


@pytest.mark.parametrize("device", DEVICES)
def test_empty_rows_and_noncontiguous(device):
    e = torch.randn(10, 8, device=device)
    idx, dist = ops.vq_nearest_code(torch.empty(0, 8, device=device), e)
    assert idx.shape == (0,) and dist.shape == (0,)
    z = torch.randn(8, 10, device=device).t()  # (10, 8), non-contiguous
    assert not z.is_contiguous()
    idx, dist = ops.vq_nearest_code(z, e)
    ref_idx, _ = vq_nearest_code_ref(z, e)
    assert torch.equal(idx, ref_idx)


@pytest.mark.parametrize("grad", [False, True])
def test_parameters_on_many_threads(grad):
    """Clustering VQ searches with the codebook Parameter itself as the rows (roles swapped),
    under no_grad: the BLAS path's worker threads (grad mode on there) must not refuse it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        z = torch.nn.Parameter(torch.randn(8192, 64))  # 128 row blocks of the sgemm path
        e = torch.nn.Parameter(torch.randn(300, 64))
        with torch.set_grad_enabled(grad):
            idx, _ = ops.vq_nearest_code(z, e)
        assert torch.equal(idx, vq_nearest_code_ref(z.detach(), e.detach())[0])
    finally:
        torch.set_num_threads(threads)


def test_opcheck():
    z, e = torch.randn(17, 16), torch.randn(40, 16)
    torch.library.opcheck(torch.ops.tatitok_fast.vq_nearest_code, (z, e, False))
    torch.library.opcheck(torch.ops.tatitok_fast.vq_nearest_code, (z.bfloat16(), e.bfloat16(), True))


@pytest.mark.parametrize(
    "z, codebook, match",
    [
        (torch.randn(4, 8, 1), torch.randn(5, 8), "z: expected a 2-D tensor"),
        (torch.randn(4, 8), torch.randn(5, 7), r"codebook: expected shape \(K, D=8\)"),
        (torch.randn(4, 8), torch.randn(0, 8), "codebook: expected at least one code"),
        (torch.randn(4, 8).double(), torch.randn(5, 8).double(), "z: expected dtype"),
        (torch.randn(4, 8), torch.randn(5, 8).half(), "codebook: expected dtype"),
        (torch.randint(0, 3, (4, 8)), torch.randn(5, 8), "z: expected dtype"),
        ([[1.0]], torch.randn(5, 8), "z: expected a torch.Tensor"),
    ],
)
def test_bad_inputs(z, codebook, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ops.vq_nearest_code(z, codebook)


def test_device_mismatch_is_named():
    z = torch.randn(4, 8)
    e = torch.randn(5, 8, device="meta")
    with pytest.raises(ValueError, match="codebook: expected a tensor on cpu"):
        ops.vq_nearest_code(z, e)


def test_native_check_guards_direct_calls():
    with pytest.raises(RuntimeError, match="codebook is empty"):
        torch.ops.tatitok_fast.vq_nearest_code(torch.randn(3, 4), torch.randn(0, 4), False)
