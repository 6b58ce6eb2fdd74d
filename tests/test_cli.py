"""The model commands of `tatitok-fast` end to end on tiny random checkpoints (no downloads):
reconstruct, tokenize (folders and webdataset shards), generate, and their errors."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from tatitok_fast import TATiTok
from tatitok_fast.cli import main
from tatitok_fast.models.generators.maskgen import MaskGen_KL, MaskGen_VQ
from tests.helpers import tiny_generator_config, tiny_text_encoder, tiny_tokenizer_config

CLIP_NAME = "tatitok-fast-cli-test-clip"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Checkpoint dirs for tiny tokenizers/generators, a registered tiny CLIP, some images."""
    import open_clip

    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    for name, model in {"tok_vq": TATiTok(tiny_tokenizer_config("vq")), "tok_kl": TATiTok(tiny_tokenizer_config("vae")),
                        "tok_vq32": TATiTok(tiny_tokenizer_config("vq", tokens=32)),
                        "gen_vq": MaskGen_VQ(tiny_generator_config("vq")),
                        "gen_kl": MaskGen_KL(tiny_generator_config("vae"))}.items():
        model.save_pretrained(root / name)
    enc = tiny_text_encoder()
    cfg = {"embed_dim": 64, "quick_gelu": False,
           "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}
    (root / f"{CLIP_NAME}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root / f"{CLIP_NAME}.json")
    torch.save(enc.model.state_dict(), root / "clip.pt")
    imgs = root / "images"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(imgs / "a.png")
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8), mode="L").save(imgs / "b.jpg")  # grey
    Image.fromarray(rng.integers(0, 255, (64, 48, 4), dtype=np.uint8), mode="RGBA").save(imgs / "c.png")
    (imgs / "a.txt").write_text("a noisy square")
    return root


def _clip_args(assets):
    return ["--clip-model", CLIP_NAME, "--clip-pretrained", str(assets / "clip.pt"), "--device", "cpu",
            "--no-progress"]


def test_reconstruct_writes_images_and_grid(assets, tmp_path):
    out = tmp_path / "rec"
    rc = main(["reconstruct", str(assets / "images"), "--tokenizer", str(assets / "tok_vq"), "-o", str(out),
               "--batch-size", "2", *_clip_args(assets)])
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["a_recon.png", "b_recon.png", "c_recon.png", "grid.png"]
    assert Image.open(out / "a_recon.png").size == (32, 32)
    assert Image.open(out / "grid.png").size[1] > 64  # originals over reconstructions


def _read_shards(folder, **reader):
    """Raw samples of the token shards in `folder` as the training reader sees them (bytes
    values, no decode), and with `reader` kwargs also decoded by decode_token_sample."""
    import webdataset as wds

    from tatitok_fast.token_shards import decode_token_sample

    urls = [str(p) for p in sorted(folder.glob("tokens-*.tar"))]
    raw = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    return raw, [decode_token_sample(s, **reader) for s in raw] if reader else None


def test_tokenize_folder_vq_round_trip(assets, tmp_path):
    out = tmp_path / "tok"
    (assets / "images" / "b.json").write_text(json.dumps({"aes_score": 4.75}))  # overridden by --aes-score
    rc = main(["tokenize", str(assets / "images"), "--tokenizer", str(assets / "tok_vq"), "-o", str(out),
               "--batch-size", "2", "--shard-size", "2", "--expect-mode", "vq", "--expect-num-tokens", "16",
               "--aes-score", "6.5", "--device", "cpu", "--no-progress"])
    (assets / "images" / "b.json").unlink()
    assert rc == 0
    raw, samples = _read_shards(out, mode="vq", num_tokens=16, codebook_size=64)
    assert len(samples) == 3 and len(list(out.glob("tokens-*.tar"))) == 2
    model = TATiTok.from_pretrained(assets / "tok_vq")
    want = model.tokenize([assets / "images" / n for n in ("a.png", "b.jpg", "c.png")]).reshape(3, -1)
    for s, r, w in zip(samples, raw, want):
        assert s["tokens"].dtype == torch.int64 and s["tokens"].tolist() == w.tolist()
        assert s["aes_score"] == 6.5 and s["__key__"] == r["__key__"]
        assert "token.npy" not in r and np.load(io.BytesIO(r["tokens.npy"])).dtype == np.int16
        meta = json.loads(r["json"])
        assert (meta["mode"], meta["shape"], meta["dtype"], meta["codebook_size"]) == ("vq", [16], "int16", 64)
        assert meta["tokenizer"] == str(assets / "tok_vq")
    assert [s["text"] for s in samples] == ["a noisy square", "", ""]


def _image_shard(path, images, metas):
    with tarfile.open(path, "w") as tar:
        for i, (img, meta) in enumerate(zip(images, metas)):
            fields = [("png", img.read_bytes()), ("txt", f"caption {i}".encode())]
            fields += [(ext, v if isinstance(v, bytes) else json.dumps(v).encode()) for ext, v in meta.items()]
            for ext, data in fields:
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_tokenize_webdataset_shards_kl_round_trip(assets, tmp_path):
    src = tmp_path / "src-000.tar"
    images = [assets / "images" / "a.png", assets / "images" / "c.png"]
    _image_shard(src, images, [{"json": {"aes_score": 5.25}, "recap_txt": b"The image shows a square"},
                               {"json": {"aes_score": 6}}])
    out = tmp_path / "tok"
    rc = main(["tokenize", str(src), "--tokenizer", str(assets / "tok_kl"), "-o", str(out), "--device", "cpu",
               "--no-progress"])
    assert rc == 0
    raw, samples = _read_shards(out, mode="vae", num_tokens=16, token_size=4)
    model = TATiTok.from_pretrained(assets / "tok_kl")
    from tatitok_fast.images import load_images

    with torch.no_grad():
        params = model.encoder(load_images(images, 32), model.latent_tokens)  # (2, 8, 1, 16)
    for i, s in enumerate(samples):
        assert s["tokens"].dtype == torch.float32 and torch.equal(s["tokens"], params[i])  # float32: exact
        assert s["text"] == f"caption {i}"
    assert [s["aes_score"] for s in samples] == [5.25, 6.0]
    assert raw[0]["recap_txt"] == b"The image shows a square" and "recap_txt" not in raw[1]
    from tatitok_fast.token_shards import decode_token_sample

    assert decode_token_sample(raw[0], mode="vae", num_tokens=16, recap_prob=1.0)["text"] == "A square"


def test_tokenize_errors(assets, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"definitely not a png")
    args = ["tokenize", str(bad), "--tokenizer", str(assets / "tok_vq"), "-o", str(tmp_path / "o"), "--device", "cpu",
            "--no-progress", "--aes-score", "5"]
    assert main(args) == 2
    assert main(args + ["--skip-bad"]) == 0
    assert main(["tokenize", str(assets / "images"), "--tokenizer", str(assets / "tok_vq"), "-o", str(tmp_path / "p"),
                 "--expect-num-tokens", "32", "--aes-score", "5", "--device", "cpu"]) == 2
    assert main(["tokenize", str(assets / "images"), "--tokenizer", "tatitok_bl999_vq", "-o", str(tmp_path / "q"),
                 "--aes-score", "5", "--device", "cpu"]) == 2


def test_tokenize_error_messages(assets, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"definitely not a png")
    main(["tokenize", str(bad), "--tokenizer", str(assets / "tok_vq"), "-o", str(tmp_path / "o"), "--device", "cpu",
          "--aes-score", "5", "--no-progress"])
    assert "could not read image" in capsys.readouterr().err
    main(["tokenize", str(assets / "images"), "--tokenizer", str(assets / "tok_kl"), "-o", str(tmp_path / "o2"),
          "--expect-mode", "vq", "--aes-score", "5", "--device", "cpu"])
    assert "makes vae tokens, --expect-mode asks for vq" in capsys.readouterr().err


def test_tokenize_aes_score_errors(assets, tmp_path, capsys):
    # folders without a score: refused before the tokenizer is even looked up
    assert main(["tokenize", str(assets / "images"), "--tokenizer", "no_such_tokenizer", "-o", str(tmp_path / "o"),
                 "--device", "cpu"]) == 2
    assert "has no same-name .json with an aes_score: pass --aes-score FLOAT" in capsys.readouterr().err
    assert main(["tokenize", str(assets / "images"), "--tokenizer", str(assets / "tok_vq"), "-o", str(tmp_path / "o"),
                 "--aes-score", "nan", "--device", "cpu"]) == 2
    assert "--aes-score: expected a finite number" in capsys.readouterr().err
    src = tmp_path / "src-000.tar"
    _image_shard(src, [assets / "images" / "a.png"] * 3,
                 [{"json": {"aes_score": 5}}, {"json": {"caption": "no score"}}, {"json": {"aes_score": "x"}}])
    base = ["tokenize", str(src), "--tokenizer", str(assets / "tok_vq"), "-o", str(tmp_path / "s"), "--device", "cpu",
            "--no-progress"]
    assert main(base) == 2
    assert "src-000.tar:0001.png has no aes_score in its json: pass --aes-score FLOAT" in capsys.readouterr().err
    assert main(base + ["--skip-bad"]) == 2  # a malformed score is an error even with --skip-bad
    assert "0002.png: aes_score: expected a finite number, got 'x'" in capsys.readouterr().err
    _image_shard(src, [assets / "images" / "a.png"] * 2, [{"json": {"aes_score": 5}}, {}])
    assert main(base + ["--skip-bad", "-o", str(tmp_path / "t")]) == 0
    assert "wrote 1 samples to" in (out := capsys.readouterr().out) and "skipped 1 without aes_score" in out


@pytest.mark.parametrize("gen, tok", [("gen_vq", "tok_vq"), ("gen_kl", "tok_kl")])
def test_generate_writes_images_and_is_seeded(assets, tmp_path, gen, tok):
    common = ["generate", "a red cube", "a blue ball", "--generator", str(assets / gen), "--tokenizer",
              str(assets / tok), "--steps", "3", "--seed", "7", *_clip_args(assets)]
    assert main(common + ["-o", str(tmp_path / "a")]) == 0
    assert main(common + ["-o", str(tmp_path / "b")]) == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["00000_a_red_cube.png", "00001_a_blue_ball.png", "grid.png"]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_generate_errors(assets, tmp_path, capsys):
    base = ["-o", str(tmp_path / "x"), *_clip_args(assets)]
    assert main(["generate", "--generator", str(assets / "gen_vq"), "--tokenizer", str(assets / "tok_vq"), *base]) == 2
    assert "at least one prompt" in capsys.readouterr().err
    assert main(["generate", "p", "--generator", str(assets / "gen_vq"), "--tokenizer", str(assets / "tok_vq32"),
                 *base]) == 2
    assert "token count: generator 16, tokenizer 32" in capsys.readouterr().err
    assert main(["generate", "p", "--generator", str(assets / "gen_vq"), "--tokenizer", str(assets / "tok_kl"),
                 *base]) == 2
    assert "generator/tokenizer mismatch" in capsys.readouterr().err
    assert main(["generate", "p", "--generator", str(assets / "gen_vq"), "--tokenizer", str(assets / "tok_vq"),
                 "--steps", "0", *base]) == 2
    assert "--steps: expected 1..1024" in capsys.readouterr().err
    assert main(["generate", "p", "--generator", str(assets / "gen_vq"), "--tokenizer", str(assets / "tok_vq"),
                 "--dtype", "fp16", *base]) == 2
    assert "--dtype fp16: not supported on CPU" in capsys.readouterr().err
    assert not (tmp_path / "x").exists(), "nothing is written before the checks pass"
