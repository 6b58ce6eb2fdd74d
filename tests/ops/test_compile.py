"""torch.compile(fullgraph=True) traces through every native op (fake kernels registered)
and gives the eager results."""
import pytest
import torch

from tatitok_fast import ops
from tatitok_fast.ops.reference import gumbel_noise


def _all_ops(z, codebook, params, noise, logits, ids, g, g2, orders, mask):
    idx, dist = ops.vq_nearest_code(z, codebook)
    sample, mean, std, kl = ops.kl_sample(params, noise)
    new_ids = ops.maskgen_unmask_step(logits, ids, logits.shape[-1], 3, softmax_temperature=0.9,
                                      sample_temperature=1.0, sample_noise=g, confidence_noise=g2)
    nxt, to_pred = ops.mask_by_order(orders, mask, 2)
    return idx, dist * 2, sample + 1, kl.sum(), new_ids, nxt, to_pred


@pytest.mark.parametrize("backend", ["aot_eager",  # the fake kernels and functionalization, in seconds
                                     pytest.param("inductor", marks=pytest.mark.slow)])  # + codegen: 25 s
def test_fullgraph_compile_matches_eager(backend):
    torch._dynamo.reset()
    args = (torch.randn(10, 16), torch.randn(30, 16), torch.randn(2, 8, 1, 4), torch.randn(2, 4, 1, 4),
            torch.randn(2, 6, 12), torch.full((2, 6), 12), gumbel_noise((2, 6, 12)), gumbel_noise((2, 6)),
            torch.stack([torch.randperm(5) for _ in range(2)]), torch.ones(2, 5))
    compiled = torch.compile(_all_ops, fullgraph=True, backend=backend)
    for got, want in zip(compiled(*args), _all_ops(*args)):
        torch.testing.assert_close(got, want)
