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
from tatitok_fast.models.maskgen import MaskGen_KL, MaskGen_VQ
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


def _read_shards(folder):
    samples = []
    for shard in sorted(folder.glob("tokens-*.tar")):
        with tarfile.open(shard) as tar:
            members = {}
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
            samples += [members[k] for k in sorted(members)]
    return samples


def test_tokenize_folder_vq_matches_model(assets, tmp_path):
    out = tmp_path / "tok"
    rc = main(["tokenize", str(assets / "images"), "--tokenizer", str(assets / "tok_vq"), "-o", str(out),
               "--batch-size", "2", "--shard-size", "2", "--expect-mode", "vq", "--expect-num-tokens", "16",
               "--device", "cpu", "--no-progress"])
    assert rc == 0
    samples = _read_shards(out)
    assert len(samples) == 3 and len(list(out.glob("tokens-*.tar"))) == 2
    model = TATiTok.from_pretrained(assets / "tok_vq")
    want = model.tokenize([assets / "images" / n for n in ("a.png", "b.jpg", "c.png")]).reshape(3, -1)
    for s, w in zip(samples, want):
        ids = np.frombuffer(s["token.npy"], dtype=np.int16)
        assert ids.tolist() == w.tolist()
        meta = json.loads(s["json"])
        assert meta["quantize_mode"] == "vq" and meta["shape"] == [16] and meta["dtype"] == "int16"
    assert samples[0]["txt"].decode() == "a noisy square" and samples[1]["txt"].decode() == ""


def test_tokenize_webdataset_shards_kl(assets, tmp_path):
    src = tmp_path / "src-000.tar"
    with tarfile.open(src, "w") as tar:
        for i, name in enumerate(("a.png", "c.png")):
            for ext, data in (("png", (assets / "images" / name).read_bytes()),
                              ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "tok"
    rc = main(["tokenize", str(src), "--tokenizer", str(assets / "tok_kl"), "-o", str(out), "--device", "cpu",
               "--no-progress"])
    assert rc == 0
    samples = _read_shards(out)
    model = TATiTok.from_pretrained(assets / "tok_kl")
    from tatitok_fast.images import load_images

    with torch.no_grad():
        params = model.encoder(load_images([assets / "images" / "a.png", assets / "images" / "c.png"], 32),
                               model.latent_tokens)
    for i, s in enumerate(samples):
        arr = np.frombuffer(s["token.npy"], dtype=np.float16).reshape(8, 1, 16)
        torch.testing.assert_close(torch.from_numpy(arr.astype(np.float32)), params[i], rtol=2e-3, atol=2e-3)
        assert s["txt"].decode() == f"caption {i}"


def test_tokenize_errors(assets, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"definitely not a png")
    args = ["tokenize", str(bad), "--tokenizer", str(assets / "tok_vq"), "-o", str(tmp_path / "o"), "--device", "cpu",
            "--no-progress"]
    assert main(args) == 1
    assert main(args + ["--skip-bad"]) == 0
    assert main(["tokenize", str(assets / "images"), "--tokenizer", str(assets / "tok_vq"), "-o", str(tmp_path / "p"),
                 "--expect-num-tokens", "32", "--device", "cpu"]) == 1
    assert main(["tokenize", str(assets / "images"), "--tokenizer", "tatitok_bl999_vq", "-o", str(tmp_path / "q"),
                 "--device", "cpu"]) == 1


def test_tokenize_error_messages(assets, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"definitely not a png")
    main(["tokenize", str(bad), "--tokenizer", str(assets / "tok_vq"), "-o", str(tmp_path / "o"), "--device", "cpu",
          "--no-progress"])
    assert "could not read image" in capsys.readouterr().err
    main(["tokenize", str(assets / "images"), "--tokenizer", str(assets / "tok_kl"), "-o", str(tmp_path / "o2"),
          "--expect-mode", "vq", "--device", "cpu"])
    assert "makes vae tokens, --expect-mode asks for vq" in capsys.readouterr().err


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
    assert main(["generate", "--generator", str(assets / "gen_vq"), "--tokenizer", str(assets / "tok_vq"), *base]) == 1
    assert "at least one prompt" in capsys.readouterr().err
    assert main(["generate", "p", "--generator", str(assets / "gen_vq"), "--tokenizer", str(assets / "tok_vq32"),
                 *base]) == 1
    assert "token count: generator 16, tokenizer 32" in capsys.readouterr().err
    assert main(["generate", "p", "--generator", str(assets / "gen_vq"), "--tokenizer", str(assets / "tok_kl"),
                 *base]) == 1
    assert "generator/tokenizer mismatch" in capsys.readouterr().err
    assert main(["generate", "p", "--generator", str(assets / "gen_vq"), "--tokenizer", str(assets / "tok_vq"),
                 "--steps", "0", *base]) == 1
    assert "--steps: expected 1..1024" in capsys.readouterr().err
    assert main(["generate", "p", "--generator", str(assets / "gen_vq"), "--tokenizer", str(assets / "tok_vq"),
                 "--dtype", "fp16", *base]) == 1
    assert "--dtype fp16: not supported on CPU" in capsys.readouterr().err
    assert not (tmp_path / "x").exists(), "nothing is written before the checks pass"
