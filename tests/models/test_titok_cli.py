"""`tatitok-fast reconstruct` and `tokenize` with TiTok tokenizers and the MaskGIT-VQGAN (tiny
random checkpoints, no downloads): the right class is picked for every kind of name, the
written images / tokens are what the Python API gives, and errors are one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tatitok_fast import MaskGITVQGAN, TATiTok, TiTok
from tatitok_fast.cli import main
from tatitok_fast.images import load_images, to_pil
from tatitok_fast.models.tokenizers.loading import tokenizer_class
from tatitok_fast.presets import MASKGIT_VQGAN_FILE, TITOK_TOKENIZERS, tiny_titok_config


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("titok_cli")
    torch.manual_seed(0)
    TiTok(tiny_titok_config("vq")).save_pretrained(root / "titok_vq")
    TiTok(tiny_titok_config("vae")).save_pretrained(root / "titok_vae")
    imgs = root / "images"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(imgs / "a.png")
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(imgs / "b.png")
    return root


@pytest.fixture(scope="module")
def vqgan_file(tmp_path_factory):
    """Random MaskGIT-VQGAN weights under the official file name (bf16 on disk to keep it small)."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("vqgan") / MASKGIT_VQGAN_FILE
    torch.save({k: v.to(torch.bfloat16) for k, v in MaskGITVQGAN().state_dict().items()}, path)
    return path


def test_tokenizer_class_for_every_kind_of_name(assets, vqgan_file):
    for preset in TITOK_TOKENIZERS:
        assert tokenizer_class(preset) is TiTok
        assert tokenizer_class(f"yucornetto/tokenizer_{preset}_imagenet") is TiTok
    assert tokenizer_class("tokenizer_titok_l32.bin") is TiTok  # the raw fun-research/TiTok file names
    assert tokenizer_class("tatitok_bl32_vq") is TATiTok
    assert tokenizer_class("turkeyju/tokenizer_tatitok_bl64_vae") is TATiTok
    for name in ("maskgit_vqgan", "fun-research/TiTok", str(vqgan_file), str(vqgan_file.parent)):
        assert tokenizer_class(name) is MaskGITVQGAN
    assert tokenizer_class(assets / "titok_vq") is TiTok  # a folder: no text_guidance_proj in its weights


def _expected_recon(model, path):
    x = load_images([str(path)], model.image_size)
    return np.asarray(to_pil(model.detokenize(model.tokenize(x)))[0])


@pytest.mark.parametrize("name", ["titok_vq", "titok_vae"])
def test_reconstruct_titok(assets, tmp_path, name):
    out = tmp_path / "rec"
    assert main(["reconstruct", str(assets / "images"), "--tokenizer", str(assets / name), "-o", str(out),
                 "--device", "cpu", "--no-progress"]) == 0  # no captions, no text encoder needed
    assert sorted(p.name for p in out.iterdir()) == ["a_recon.png", "b_recon.png", "grid.png"]
    model = TiTok.from_pretrained(assets / name)
    for stem in ("a", "b"):
        got = np.asarray(Image.open(out / f"{stem}_recon.png"))
        assert got.shape == (32, 32, 3)
        assert np.abs(got.astype(int) - _expected_recon(model, assets / "images" / f"{stem}.png")).max() <= 1


def test_reconstruct_and_tokenize_maskgit_vqgan(assets, vqgan_file, tmp_path):
    from tatitok_fast.token_shards import decode_token_sample
    import webdataset as wds

    image = assets / "images" / "b.png"
    model = MaskGITVQGAN(vqgan_file)
    codes = model.tokenize([str(image)])  # (1, 256) at the default 256 x 256
    want = np.asarray(to_pil(model.detokenize(codes))[0])
    out = tmp_path / "rec"
    assert main(["reconstruct", str(image), "--tokenizer", str(vqgan_file), "-o", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    got = np.asarray(Image.open(out / "b_recon.png"))
    assert got.shape == (256, 256, 3) and np.abs(got.astype(int) - want).max() <= 1

    tok = tmp_path / "tok"
    assert main(["tokenize", str(image), "--tokenizer", str(vqgan_file), "-o", str(tok), "--aes-score", "5",
                 "--expect-num-tokens", "256", "--expect-codebook-size", "1024", "--device", "cpu",
                 "--no-progress"]) == 0
    raw = list(wds.WebDataset([str(p) for p in sorted(tok.glob("tokens-*.tar"))], shardshuffle=False,
                              empty_check=False))
    sample = decode_token_sample(raw[0], mode="vq", num_tokens=256, codebook_size=1024)
    assert sample["tokens"].tolist() == codes.reshape(-1).tolist()


def test_tokenize_titok_vq(assets, tmp_path):
    from tatitok_fast.token_shards import decode_token_sample
    import webdataset as wds

    out = tmp_path / "tok"
    assert main(["tokenize", str(assets / "images"), "--tokenizer", str(assets / "titok_vq"), "-o", str(out),
                 "--aes-score", "6", "--expect-mode", "vq", "--expect-num-tokens", "8", "--device", "cpu",
                 "--no-progress"]) == 0
    raw = list(wds.WebDataset([str(p) for p in sorted(out.glob("tokens-*.tar"))], shardshuffle=False,
                              empty_check=False))
    samples = [decode_token_sample(s, mode="vq", num_tokens=8, codebook_size=64) for s in raw]
    model = TiTok.from_pretrained(assets / "titok_vq")
    want = model.tokenize([str(assets / "images" / n) for n in ("a.png", "b.png")]).reshape(2, -1)
    assert [s["tokens"].tolist() for s in samples] == want.tolist()
    assert json.loads(raw[0]["json"])["codebook_size"] == 64


def test_cli_errors_are_one_line(assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("TATITOK_MASKGIT_VQGAN", raising=False)
    base = ["-o", str(tmp_path / "o"), "--device", "cpu", "--no-progress", "--local-files-only"]
    assert main(["reconstruct", str(assets / "images"), "--tokenizer", "maskgit_vqgan", *base]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --tokenizer maskgit_vqgan:") and "Traceback" not in err
    assert MASKGIT_VQGAN_FILE in err and "fun-research/TiTok" in err
    assert main(["reconstruct", str(assets / "images"), "--tokenizer", "titok_l32", *base]) == 2
    err = capsys.readouterr().err
    assert "--tokenizer titok_l32:" in err and "yucornetto/tokenizer_titok_l32_imagenet" in err
