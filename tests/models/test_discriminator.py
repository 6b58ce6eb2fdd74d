"""NLayerDiscriminator against the official one: official state dicts load strictly, and the
logits and input gradients match on even and odd image sizes."""
import pytest
import torch

from tatitok_fast.losses.discriminator import BlurBlock, NLayerDiscriminator
from tests.models.official_losses import import_official


@pytest.fixture(scope="module")
def pair():
    official = import_official("modeling.modules.discriminator").NLayerDiscriminator()
    with torch.no_grad():  # GroupNorm affine params start at 1/0: perturb them too
        for p in official.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = NLayerDiscriminator()
    ours.load_state_dict(official.state_dict(), strict=True)
    return official, ours


def test_state_dict_layout_matches_official(pair):
    official, ours = pair
    theirs = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mine == theirs
    assert "blocks.0.1.kernel" in mine  # the blur kernel buffer is part of official checkpoints


@pytest.mark.parametrize("size", [32, 37, 64])
def test_logits_and_input_grad_match_official(pair, size):
    official, ours = pair
    x = torch.rand(2, 3, size, size, requires_grad=True)
    ref = official(x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    out = ours(x)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    assert out.shape == (2, 1, 16, 16)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7)


def test_blur_block_downsamples_like_official():
    official = import_official("modeling.modules.discriminator").BlurBlock((1, 3, 3, 1))
    ours = BlurBlock((1, 3, 3, 1))
    for shape in [(1, 4, 8, 8), (2, 3, 9, 6)]:
        x = torch.randn(shape)
        torch.testing.assert_close(ours(x), official(x), rtol=0, atol=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_stages"):
        NLayerDiscriminator(num_stages=0)
    with pytest.raises(ValueError, match="blur_kernel_size"):
        NLayerDiscriminator(blur_kernel_size=7)
    with pytest.raises(ValueError, match="hidden_channels"):
        NLayerDiscriminator(hidden_channels=48)
