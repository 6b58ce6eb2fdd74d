"""The MaskGIT-VQGAN (MaskGITVQGAN / PretrainedTokenizer) against the official
titok.PretrainedTokenizer on the same full-size random weights (54.5M params, built once per
module; fp32 CPU at 64x64), the official state-dict layout, and the offline weight lookup."""
from __future__ import annotations

import contextlib
import io
import json
import warnings

import pytest
import torch

from tatitok_fast import MaskGITVQGAN, PretrainedTokenizer
from tatitok_fast.weight_files import WeightsFileError
from tests.helpers import REPO
from tests.models.official_losses import import_official

SHARED = next((p for p in (REPO.parent / "shared", REPO / "shared") if (p / "reference").is_dir()),
              REPO.parent / "shared")
LAYOUT = SHARED / "reference" / "titok_layout.json"


def _rel_err(got, want):
    return ((got - want).norm() / want.norm()).item()


@pytest.fixture(scope="module")
def official():
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return import_official("modeling.titok", deps=("omegaconf", "einops", "huggingface_hub"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A .bin in the official layout: random init plus noise on every tensor, a unit-scale codebook."""
    torch.manual_seed(0)
    sd = MaskGITVQGAN().state_dict()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for k, v in sd.items():
            v.add_(0.05 * torch.randn(v.shape, generator=g))
        sd["quantize.embedding.weight"].normal_(generator=g)
    path = tmp_path_factory.mktemp("vqgan") / "maskgit-vqgan-imagenet-f16-256.bin"
    torch.save(sd, path)
    return path


@pytest.fixture(scope="module")
def pair(official, weights):
    return PretrainedTokenizer(weights), official.PretrainedTokenizer(str(weights))


def test_layout_matches_official():
    if not LAYOUT.is_file():
        pytest.skip(f"reference layout not found at {LAYOUT}")
    entry = json.loads(LAYOUT.read_text())["_maskgit_vqgan"]
    with torch.device("meta"):
        model = MaskGITVQGAN()
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == entry["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == entry["num_params"]


def test_encode_decode_match_official(pair):
    ours, theirs = pair
    assert MaskGITVQGAN is PretrainedTokenizer and not ours.training
    assert not any(p.requires_grad for p in ours.parameters())  # frozen, as the official
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    codes, codes_o = ours.encode(x), theirs.encode(x)
    assert codes.shape == (2, 16) and codes.dtype == torch.int64
    assert torch.equal(codes, codes_o)
    assert _rel_err(ours.encoder(x), theirs.encoder(x)) <= 1e-5
    img, img_o = ours.decode(codes_o), theirs.decode(codes_o)
    assert img.shape == (2, 3, 64, 64) and img.min() >= 0 and img.max() <= 1
    assert _rel_err(img, img_o) <= 1e-5
    # (B, h, w) ids too, and decode_tokens = decode
    assert torch.equal(ours.decode_tokens(codes_o.view(2, 4, 4)), img)


def test_two_stage_pixel_modules_are_these(pair):
    """TiTok's pixel_decoder / pixel_quantize are the VQGAN's decoder / quantize (same classes
    and keys), so a TiTok state dict embeds the VQGAN's as in utils/train_utils.py."""
    from tatitok_fast import TiTok
    from tatitok_fast.presets import tiny_titok_config

    ours, _ = pair
    with torch.device("meta"):
        titok = TiTok(tiny_titok_config(two_stage=True))
    assert type(titok.pixel_decoder) is type(ours.decoder) and type(titok.pixel_quantize) is type(ours.quantize)
    want = {f"pixel_decoder.{k}": tuple(v.shape) for k, v in ours.decoder.state_dict().items()}
    want.update({f"pixel_quantize.{k}": tuple(v.shape) for k, v in ours.quantize.state_dict().items()})
    got = {k: tuple(v.shape) for k, v in titok.state_dict().items() if k.startswith("pixel_")}
    assert got == want


def test_bad_inputs(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match=r"x: the MaskGIT-VQGAN takes images whose sides are multiples of 16"):
        ours.encode(torch.rand(1, 3, 40, 40))
    with pytest.raises(ValueError, match=r"codes: expected ids in \[0, 1024\)"):
        ours.decode(torch.full((1, 16), 1024))
    with pytest.raises(ValueError, match="codes: .* need a square N"):
        ours.decode(torch.zeros(1, 15, dtype=torch.long))


def test_offline_missing_weights_name_file_and_repo(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("TATITOK_MASKGIT_VQGAN", raising=False)
    with pytest.raises(WeightsFileError, match=r"fun-research/TiTok.*maskgit-vqgan-imagenet-f16-256\.bin"):
        MaskGITVQGAN.from_pretrained(cache_dir=str(tmp_path / "hf"))
    with pytest.raises(WeightsFileError, match=r"maskgit-vqgan-imagenet-f16-256\.bin"):
        MaskGITVQGAN.from_pretrained(tmp_path / "nowhere.bin")


def test_from_pretrained_finds_the_file(weights, monkeypatch):
    monkeypatch.setenv("TATITOK_MASKGIT_VQGAN", str(weights))
    model = MaskGITVQGAN.from_pretrained("fun-research/TiTok", local_files_only=True)
    want = torch.load(weights, weights_only=True)
    assert torch.equal(model.quantize.embedding.weight, want["quantize.embedding.weight"])
    folder = MaskGITVQGAN.from_pretrained(weights.parent)  # a folder holding the file
    assert torch.equal(folder.decoder.conv_out.weight, want["decoder.conv_out.weight"])
