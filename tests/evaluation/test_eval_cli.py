"""`evaluate_reconstruction` and `tatitok-fast eval reconstruct|generate` end to end on tiny
random models and random-weight feature networks (no downloads), and their input errors."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from tatitok_fast import TATiTok
from tatitok_fast.cli import main
from tatitok_fast.evaluation import evaluate_reconstruction, psnr, ssim
from tatitok_fast.models.generators.maskgen import MaskGen_VQ
from tests.helpers import tiny_generator_config, tiny_text_encoder, tiny_tokenizer_config

CLIP_NAME = "tatitok-fast-eval-test-clip"
TINY_TEXT = {"name": "tiny", "seed": 0}


def _with_tiny_text(cfg):
    cfg["model"]["text_encoder"] = dict(TINY_TEXT)  # the CLI builds this text encoder, offline
    return cfg


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    import open_clip

    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    TATiTok(_with_tiny_text(tiny_tokenizer_config("vq"))).save_pretrained(root / "tok_vq")
    TATiTok(_with_tiny_text(tiny_tokenizer_config("vae"))).save_pretrained(root / "tok_kl")
    MaskGen_VQ(_with_tiny_text(tiny_generator_config("vq"))).save_pretrained(root / "gen_vq")
    clip_cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1,
                                                "head_width": 16},
                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (root / f"{CLIP_NAME}.json").write_text(json.dumps(clip_cfg))
    open_clip.add_model_config(root / f"{CLIP_NAME}.json")
    rng = np.random.default_rng(0)
    imgs, refs = root / "images", root / "refs"
    imgs.mkdir(), refs.mkdir()
    shard = tarfile.open(root / "val-0000.tar", "w")
    for i, shape in enumerate([(40, 50, 3), (32, 32, 3), (48, 36, 3)]):
        arr = rng.integers(0, 255, shape, dtype=np.uint8)
        Image.fromarray(arr).save(imgs / f"{i}.png")
        (imgs / f"{i}.txt").write_text(f"caption {i}")
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="png")
        for ext, data in (("png", buf.getvalue()), ("txt", f"caption {i}".encode())):
            info = tarfile.TarInfo(f"{i:04d}.{ext}")
            info.size = len(data)
            shard.addfile(info, io.BytesIO(data))
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(refs / f"r{i}.png")
    shard.close()
    (root / "prompts.txt").write_text("a red cube\n\na blue ball\n")
    return root


def _run(*argv):
    return main(["eval", *map(str, argv), "--device", "cpu", "--no-progress"])


# ---- the library function ----------------------------------------------------------------

def test_evaluate_reconstruction_matches_direct_computation():
    torch.manual_seed(0)
    cfg = tiny_tokenizer_config("vq")
    cfg["model"]["vq_model"]["clustering_vq"] = True
    tok = TATiTok(cfg).train()
    enc = tiny_text_encoder()
    x = torch.rand(5, 3, 32, 32)
    captions = [f"c{i}" for i in range(5)]
    codebook = tok.quantize.embedding.weight.clone()
    batches = [(x[:3], captions[:3]), {"image": x[3:], "caption": captions[3:]}]
    out = evaluate_reconstruction(tok, batches, enc, keep_images=4)
    assert tok.training and torch.equal(tok.quantize.embedding.weight, codebook)  # eval mode inside, restored
    tok.eval()
    with torch.no_grad():
        recon, result = tok(x, enc(captions).guidance)
    recon = (recon.clamp(0, 1) * 255).round() / 255
    assert out["num_images"] == 5
    assert out["psnr"] == pytest.approx(psnr(recon, x).mean().item(), rel=1e-5)
    assert out["ssim"] == pytest.approx(ssim(recon, x).mean().item(), rel=1e-5)
    ids = result["min_encoding_indices"].flatten()
    assert out["codebook_usage"] == pytest.approx(ids.unique().numel() / 64)
    assert "rfid" not in out and "inception_score" not in out
    assert out["samples"]["reconstructions"].shape == (4, 3, 32, 32)
    torch.testing.assert_close(out["samples"]["reconstructions"], recon[:4])
    assert evaluate_reconstruction(tok, batches, enc, max_images=2)["num_images"] == 2


def test_evaluate_reconstruction_bad_batches():
    tok, enc = TATiTok(tiny_tokenizer_config("vae")), tiny_text_encoder()
    with pytest.raises(ValueError, match="one caption per image"):
        evaluate_reconstruction(tok, [(torch.rand(2, 3, 32, 32), ["only one"])], enc)
    with pytest.raises(TypeError, match="batches"):
        evaluate_reconstruction(tok, [torch.rand(2, 3, 32, 32)], enc)
    with pytest.raises(ValueError, match="no images"):
        evaluate_reconstruction(tok, [], enc)


# ---- eval reconstruct --------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("rec") / "vq.json"
    rc = _run("reconstruct", assets / "images", "--tokenizer", assets / "tok_vq", "-o", out,
              "--inception-weights", "random", "--batch-size", "2")
    assert rc == 0
    return out


def test_reconstruct_cli_writes_metrics_and_grid(folder_run):
    report = json.loads(folder_run.read_text())
    m = report["metrics"]
    assert m["num_images"] == 3 and report["inception_weights"] == "random"
    for key in ("rfid", "inception_score", "psnr", "ssim", "codebook_usage", "codebook_entropy"):
        assert np.isfinite(m[key]), key
    assert m["inception_score"] >= 1.0 - 1e-6 and 0 < m["codebook_usage"] <= 1
    grid = Image.open(folder_run.with_suffix(".png"))
    assert grid.size[1] > 2 * 32  # originals over reconstructions


def test_reconstruct_cli_shards_give_the_folder_numbers(assets, folder_run, tmp_path):
    out = tmp_path / "shards.json"
    assert _run("reconstruct", assets / "val-{0000..0000}.tar", "--tokenizer", assets / "tok_vq", "-o", out,
                "--no-inception", "--grid-size", "0") == 0
    m, ref = json.loads(out.read_text())["metrics"], json.loads(folder_run.read_text())["metrics"]
    for key in ("num_images", "psnr", "ssim", "codebook_usage", "codebook_entropy"):
        assert m[key] == pytest.approx(ref[key], rel=1e-6), key
    assert "rfid" not in m and not out.with_suffix(".png").exists()


def test_reconstruct_cli_kl(assets, tmp_path):
    out = tmp_path / "kl.json"
    assert _run("reconstruct", assets / "images", "--tokenizer", assets / "tok_kl", "-o", out, "--no-inception",
                "--max-images", "2", "--grid", tmp_path / "g.png") == 0
    m = json.loads(out.read_text())["metrics"]
    assert m["num_images"] == 2 and "codebook_usage" not in m
    assert (tmp_path / "g.png").is_file()


def test_reconstruct_cli_errors(assets, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.delenv("TATITOK_FAST_INCEPTION_WEIGHTS", raising=False)
    tok = ["--tokenizer", assets / "tok_vq"]
    cases = [
        (["reconstruct", tmp_path / "missing", *tok, "-o", tmp_path / "o.json"], "no such image file or folder"),
        (["reconstruct", assets / "images", *tok, "-o", tmp_path], "is a folder"),
        (["reconstruct", assets / "images", *tok, "-o", tmp_path / "o.json", "--max-images", "0"], "--max-images"),
        (["reconstruct", assets / "images", *tok, "-o", tmp_path / "o.json", "--local-files-only"],
         "weights-inception-2015-12-05-6726825d.pth.*TATITOK_FAST_INCEPTION_WEIGHTS"),
        (["reconstruct", assets / "images", "--tokenizer", tmp_path / "nothing", "-o", tmp_path / "o.json",
          "--no-inception"], "--tokenizer"),
    ]
    for argv, message in cases:
        assert _run(*argv) == 2, argv
        err = capsys.readouterr().err
        assert __import__("re").search(message, err), (message, err)


# ---- eval generate -----------------------------------------------------------------------

def test_generate_cli_fid_clip_score_and_saved_reference(assets, tmp_path):
    out, stats = tmp_path / "gen.json", tmp_path / "ref.npz"
    common = ["--prompts-file", assets / "prompts.txt", "--generator", assets / "gen_vq", "--tokenizer",
              assets / "tok_vq", "--inception-weights", "random", "--seed", "3"]
    assert _run("generate", *common, "-o", out, "--reference-images", assets / "refs", "--save-reference-stats", stats,
                "--clip-score-model", CLIP_NAME, "--clip-score-pretrained", "random",
                "--images-dir", tmp_path / "imgs") == 0
    report = json.loads(out.read_text())
    m = report["metrics"]
    assert m["num_images"] == 2 and m["images_per_second"] > 0
    assert np.isfinite(m["fid"]) and m["fid"] > 0 and np.isfinite(m["inception_score"])
    assert 0 <= m["clip_score"] <= 100
    assert len(list((tmp_path / "imgs").glob("*.png"))) == 2 and out.with_suffix(".png").is_file()
    # the saved reference statistics and the same seed give the same FID
    out2 = tmp_path / "gen2.json"
    assert _run("generate", *common, "-o", out2, "--reference-images", stats, "--no-clip-score") == 0
    m2 = json.loads(out2.read_text())["metrics"]
    assert m2["fid"] == pytest.approx(m["fid"], rel=1e-6) and "clip_score" not in m2


def test_generate_cli_errors(assets, tmp_path, capsys):
    base = ["--generator", assets / "gen_vq", "--tokenizer", assets / "tok_vq", "-o", tmp_path / "o.json"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    bad_json = tmp_path / "p.json"
    bad_json.write_text('{"a": {"category": "x"}}')
    cases = [
        (["generate", "--prompts-file", empty, *base, "--no-inception", "--no-clip-score"], "no prompts"),
        (["generate", "--prompts-file", bad_json, *base, "--no-inception"], "'prompt' string"),
        (["generate", "--prompts-file", assets / "prompts.txt", *base, "--reference-images", assets / "refs",
          "--no-inception"], "drop --no-inception"),
        (["generate", "--prompts-file", assets / "prompts.txt", *base, "--no-inception", "--reference-images",
          tmp_path / "nope"], "--reference-images"),
        (["generate", "--prompts-file", assets / "prompts.txt", *base, "--no-inception", "--clip-score-model",
          CLIP_NAME, "--clip-score-pretrained", "not-a-tag"], "--clip-score-pretrained"),
        (["generate", "--prompts-file", assets / "prompts.txt", *base, "--no-inception", "--no-clip-score",
          "--steps", "0"], "--steps"),
    ]
    for argv, message in cases:
        assert _run(*argv) == 2, argv
        assert message in capsys.readouterr().err, message


def test_reconstruct_cli_titok_needs_no_text_tower(assets, tmp_path, monkeypatch):
    """TiTok decodes without captions: eval reconstruct loads no CLIP (offline, no weights) and
    its PSNR is that of detokenize(tokenize(images)) on the same batches."""
    from tatitok_fast import TiTok
    from tatitok_fast.evaluation.data import image_batches
    from tatitok_fast.presets import tiny_titok_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    tok = TiTok(tiny_titok_config("vq")).eval()
    tok.save_pretrained(tmp_path / "titok")
    out = tmp_path / "titok.json"
    assert _run("reconstruct", assets / "images", "--tokenizer", tmp_path / "titok", "-o", out, "--no-inception",
                "--grid-size", "0") == 0
    m = json.loads(out.read_text())["metrics"]
    with torch.no_grad():
        values = []
        for b in image_batches([str(assets / "images")], tok.image_size, 8, None):
            x = b.images.float().clamp(0, 1)
            recon = (tok.detokenize(tok.tokenize(x)) * 255).round() / 255
            values.append(psnr(recon, x))
    expected = torch.cat([v.reshape(-1) for v in values]).mean().item()
    assert m["num_images"] == 3 and m["psnr"] == pytest.approx(expected, rel=1e-5)
    assert 0 < m["codebook_usage"] <= 1
