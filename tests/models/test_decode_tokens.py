"""TATiTok.decode_tokens refuses VQ ids outside the codebook with an error naming `tokens`:
eagerly on CPU, as an asynchronous device-side assert (no host sync) on CUDA."""
import pytest
import torch

from tatitok_fast.models.tokenizers.tatitok import TATiTok
from tatitok_fast.presets import tiny_tokenizer_config


@pytest.fixture(scope="module")
def tiny_vq():
    torch.manual_seed(0)
    return TATiTok(tiny_tokenizer_config("vq")).eval()


@pytest.mark.parametrize("bad", [-1, "K", "K+5"])
@pytest.mark.parametrize("shape", ["flat", "b1n"])
def test_out_of_range_ids_are_refused_on_cpu(tiny_vq, bad, shape):
    k, n = tiny_vq.codebook_size, tiny_vq.num_latent_tokens
    value = {-1: -1, "K": k, "K+5": k + 5}[bad]
    ids = torch.randint(0, k, (2, n))
    ids[1, 3] = value
    ids = ids if shape == "flat" else ids.unsqueeze(1)
    guidance = torch.randn(2, 77, 64)
    with pytest.raises(ValueError, match=rf"tokens: expected ids in \[0, {k}\) \(the codebook\), got 1 outside it, "
                                         rf"e.g. {value}"):
        tiny_vq.decode_tokens(ids, guidance)
    ids = ids.clone()
    ids[ids == value] = k - 1  # the largest valid id decodes
    with torch.no_grad():
        assert tiny_vq.decode_tokens(ids, guidance).shape == (2, 3, 32, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_check_does_not_sync(tiny_vq):
    import copy

    model = copy.deepcopy(tiny_vq).cuda()
    ids = torch.randint(0, model.codebook_size, (2, model.num_latent_tokens), device="cuda")
    guidance = torch.randn(2, 77, 64, device="cuda")
    with torch.no_grad():
        model.decode_tokens(ids, guidance)  # warm-up
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = model.decode_tokens(ids, guidance)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert out.shape[0] == 2
