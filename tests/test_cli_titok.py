"""The class-to-image commands end to end on tiny random TiTok / ImageBert checkpoints (no
downloads): `generate --class`, `sample-imagenet` (one and two ranks, resume) and `eval fid`,
and their bad inputs (`error: ...`, exit 2, no traceback, nothing written)."""
from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tatitok_fast.cli import main
from tatitok_fast.models.generators.maskgit import ImageBert
from tatitok_fast.models.tokenizers.titok import TiTok
from tatitok_fast.pipeline import ClassToImage

SIZE, CLASSES = 32, 10


def titok_config(tokens: int = 16, codebook: int = 64, mode: str = "vq") -> dict:
    vq = {"vit_enc_model_size": "small", "vit_dec_model_size": "small", "vit_enc_patch_size": 16,
          "vit_dec_patch_size": 16, "num_latent_tokens": tokens, "finetune_decoder": False, "is_legacy": False}
    if mode == "vq":
        vq.update(quantize_mode="vq", codebook_size=codebook, token_size=8, use_l2_norm=False, commitment_cost=0.25)
    else:
        vq.update(quantize_mode="vae", token_size=4)
    generator = {"model_type": "ViT", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                 "intermediate_size": 64, "dropout": 0.1, "attn_drop": 0.1, "image_seq_len": tokens,
                 "condition_num_classes": CLASSES, "num_steps": 3, "randomize_temperature": 2.0,
                 "guidance_scale": 2.5, "guidance_decay": "linear"}
    return {"model": {"vq_model": vq, "generator": generator}, "dataset": {"preprocessing": {"crop_size": SIZE}}}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("titok_cli")
    torch.manual_seed(0)
    for name, model in {"gen": ImageBert(titok_config()), "tok": TiTok(titok_config()),
                        "tok32": TiTok(titok_config(tokens=32)), "tok_k128": TiTok(titok_config(codebook=128)),
                        "tok_vae": TiTok(titok_config(mode="vae"))}.items():
        model.save_pretrained(root / name)
    return root


def _models(assets, *names):
    return ["--generator", str(assets / "gen"), "--tokenizer", str(assets / names[0] if names else assets / "tok"),
            "--device", "cpu", "--no-progress"]


def test_generate_classes_writes_images_and_grid(assets, tmp_path):
    args = ["generate", "--class", "1", "--class", "Tench", *_models(assets), "--seed", "5"]
    assert main(args + ["-o", str(tmp_path / "a")]) == 0
    assert main(args + ["-o", str(tmp_path / "b")]) == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["00000_1_goldfish.png", "00001_0_tench.png", "grid.png"]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # the effect: the pipeline's images for labels [1, 0] after the seed (config sampling defaults)
    pipe = ClassToImage(ImageBert.from_pretrained(assets / "gen"), TiTok.from_pretrained(assets / "tok"))
    torch.manual_seed(5)
    want = (pipe([1, 0]) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    got = np.stack([np.asarray(Image.open(tmp_path / "a" / f)) for f in files[:2]])
    np.testing.assert_array_equal(got, want)
    assert Image.open(tmp_path / "a" / "grid.png").size == (2 * SIZE + 3 * 2, SIZE + 2 * 2)


@pytest.mark.parametrize("extra, message", [
    (["--class", "1000"], "--class: expected a class id in [0, 1000), got 1000"),
    (["--class", "-1"], "--class: expected a class id in [0, 1000), got -1"),
    (["--class", "goldn retriever"], "close matches: 'golden retriever' (207)"),
    (["--class", "CARDIGAN"], "ambiguous, the name of classes 264 (Cardigan), 474 (cardigan)"),
    (["--class", "12"], "--class 12: the generator knows classes [0, 10)"),
    (["--class", "1", "a prompt"], "--class: give either --class or text prompts"),
    (["--class", "1", "--aesthetic", "6"], "--aesthetic: a MaskGen option"),
    (["--class", "1", "--steps", "0"], "--steps: expected 1..1024"),
    (["--class", "1", "--cfg", "nan"], "--cfg: expected a finite value"),
])
def test_generate_classes_bad_input(assets, tmp_path, capsys, extra, message):
    rc = main(["generate", *extra, *_models(assets), "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "x").exists(), "nothing is written before the checks pass"


@pytest.mark.parametrize("tok, message", [
    ("tok32", "token count: generator 16, tokenizer 32"),
    ("tok_k128", "codebook size: generator vocabulary 64, tokenizer 128"),
    ("tok_vae", "the tokenizer is a vae tokenizer"),
])
def test_generate_classes_mismatched_tokenizer(assets, tmp_path, capsys, tok, message):
    rc = main(["generate", "--class", "1", *_models(assets, tok), "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "generator/tokenizer mismatch" in err and message in err, err
    assert not (tmp_path / "x").exists()


def test_generate_classes_needs_a_tokenizer_for_a_folder_generator(assets, tmp_path, capsys):
    rc = main(["generate", "--class", "1", "--generator", str(assets / "gen"), "-o", str(tmp_path / "x")])
    assert rc == 2 and "--tokenizer: required when --generator" in capsys.readouterr().err


# ---- sample-imagenet -------------------------------------------------------------------------

def _sample_args(assets, out, *extra):
    return ["sample-imagenet", *_models(assets), "--num-classes", "3", "--per-class", "2", "--batch", "4",
            "--seed", "3", "-o", str(out), *extra]


def _rank_main(rank: int, world: int, port: int, argv: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    rc = main(argv)
    if rc:
        raise SystemExit(rc)


@pytest.mark.slow  # the sampler's ranks and resume run in CI in test_sample_imagenet
def test_sample_imagenet_one_rank_two_ranks_and_resume(assets, tmp_path):
    from tests.training.dist_worker import free_port

    one = tmp_path / "one.npz"
    assert main(_sample_args(assets, one)) == 0
    with np.load(one) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (6, SIZE, SIZE, 3)
    np.testing.assert_array_equal(labels, [0, 1, 2, 0, 1, 2])
    # two ranks through torchrun's environment (gloo on CPU)
    two = tmp_path / "two.npz"
    ctx, port = multiprocessing.get_context("spawn"), free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, _sample_args(assets, two))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    with np.load(two) as f:
        np.testing.assert_array_equal(f["arr_0"], images)
    # resume: chunk 1 and the npz lost; chunk 0 is kept as it is, chunk 1 is made again
    work = tmp_path / "one.parts"
    kept = (work / "chunk_000000.npy").stat().st_mtime_ns
    (work / "chunk_000001.npy").unlink()
    one.unlink()
    assert main(_sample_args(assets, one)) == 0
    assert (work / "chunk_000000.npy").stat().st_mtime_ns == kept
    with np.load(one) as f:
        assert f["arr_0"].tobytes() == images.tobytes()


@pytest.mark.parametrize("extra, message", [
    (["--per-class", "0"], "--per-class: expected >= 1, got 0"),
    (["--num-classes", "1001"], "--num-classes: expected 1..1000"),
    (["--num-classes", "11"], "--num-classes 11: the generator knows 10 classes"),
    (["--batch", "0"], "--batch: expected >= 1, got 0"),
    (["--seed", "-1"], "--seed: expected >= 0"),
    (["--temperature", "-1"], "--temperature: expected a finite value >= 0"),
])
def test_sample_imagenet_bad_input(assets, tmp_path, capsys, extra, message):
    out = tmp_path / "s.npz"
    rc = main(_sample_args(assets, out, *extra))
    err = capsys.readouterr().err
    assert rc == 2 and f"error: {message}" in err and "Traceback" not in err, err
    assert not out.exists() and not (tmp_path / "s.parts").exists()


def test_sample_imagenet_output_checks(assets, tmp_path, capsys):
    assert main(_sample_args(assets, tmp_path / "s.txt")) == 2
    assert "expected a file name ending in .npz" in capsys.readouterr().err
    (tmp_path / "old.npz").write_bytes(b"x")
    assert main(_sample_args(assets, tmp_path / "old.npz")) == 2
    assert "exists; delete it" in capsys.readouterr().err
    out = tmp_path / "s.npz"
    assert main(_sample_args(assets, out, "--num-classes", "1", "--per-class", "2")) == 0
    out.unlink()
    assert main(_sample_args(assets, out, "--num-classes", "1", "--per-class", "2", "--cfg", "1.0")) == 2
    err = capsys.readouterr().err
    assert "holds chunks of another run (settings:" in err and "guidance_scale" in err and not out.exists()


# ---- eval fid --------------------------------------------------------------------------------

def test_eval_fid_bad_input(tmp_path, capsys, monkeypatch):
    good = tmp_path / "good.npz"
    np.savez(good, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    np.savez(tmp_path / "other.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    (tmp_path / "text.npz").write_text("not a zip")
    cases = [(["--samples", str(tmp_path / "none.npz"), "--ref", str(good)], "--samples", "no such file"),
             (["--samples", str(tmp_path / "floats.npz"), "--ref", str(good)], "--samples", "uint8"),
             (["--samples", str(good), "--ref", str(tmp_path / "other.npz")], "--ref", "found ['images']"),
             (["--samples", str(tmp_path / "text.npz"), "--ref", str(good)], "--samples", "not a readable .npz"),
             (["--samples", str(good), "--ref", str(good), "--batch-size", "0"], "--batch-size", "expected >= 1")]
    for argv, flag, message in cases:
        rc = main(["eval", "fid", *argv, "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2 and f"error: {flag}" in err and message in err and "Traceback" not in err, (argv, err)
    # offline without the Inception weights: the error names the file
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))
    monkeypatch.delenv("TATITOK_FAST_INCEPTION_WEIGHTS", raising=False)
    rc = main(["eval", "fid", "--samples", str(good), "--ref", str(good), "--local-files-only", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "weights-inception-2015-12-05-6726825d.pth" in err and "downloads are off" in err, err


# ---- class names and sampling defaults ---------------------------------------------------------

def test_class_names_resolve_with_close_matches():
    from tatitok_fast.imagenet_classes import ClassNameError, class_names, resolve_class

    names = class_names()
    assert len(names) == 1000 and names[0] == "tench" and names[207] == "golden retriever"
    assert resolve_class("207") == resolve_class("golden retriever") == resolve_class(" Golden Retriever ") == 207
    assert resolve_class(999) == 999 and resolve_class("cardigan") == 474 and resolve_class("Cardigan") == 264
    with pytest.raises(ClassNameError, match=r"'tenchh': not an ImageNet class name or id; close matches: 'tench' \(0\)"):
        resolve_class("tenchh")
    with pytest.raises(ClassNameError, match=r"--class: expected a class id in \[0, 10\), got 10"):
        resolve_class("10", num_classes=10, what="--class")
    with pytest.raises(ClassNameError, match="'zzzzqqqq': not an ImageNet class name or id") as info:
        resolve_class("zzzzqqqq")
    assert "close matches" not in str(info.value)


@pytest.mark.parametrize("preset, want", [  # TITOK.md 10 (sample_imagenet_titok.py with the preset yamls)
    ("titok_l32", dict(randomize_temperature=9.5, num_sample_steps=8, guidance_scale=4.5, guidance_decay="linear")),
    ("titok_b64", dict(randomize_temperature=11.0, num_sample_steps=8, guidance_scale=3.0, guidance_decay="linear")),
    ("titok_s128", dict(randomize_temperature=2.8, num_sample_steps=64, guidance_scale=6.9,
                        guidance_decay="power-cosine")),
])
def test_sampling_defaults_are_the_official_fid_settings(preset, want):
    from tatitok_fast.pipeline import sampling_settings
    from tatitok_fast.presets import titok_generator_config

    with torch.device("meta"):
        generator = ImageBert.class_for_config(titok_generator_config(preset))(titok_generator_config(preset))
    got = sampling_settings(generator)
    assert got == {**want, "guidance_scale_pow": 3.0, "softmax_temperature_annealing": True}
    assert sampling_settings(generator, guidance_scale=1.0, num_sample_steps=None)["guidance_scale"] == 1.0


def test_class_pipeline_checks_its_inputs(assets):
    from tatitok_fast import TATiTok
    from tatitok_fast.presets import tiny_tokenizer_config

    generator, tokenizer = ImageBert.from_pretrained(assets / "gen"), TiTok.from_pretrained(assets / "tok")
    with pytest.raises(TypeError, match="a class generator needs a TiTok"):
        ClassToImage(generator, TATiTok(tiny_tokenizer_config("vq")))
    with pytest.raises(TypeError, match="expected an ImageBert or UViTBert"):
        ClassToImage(tokenizer, tokenizer)
    pipe = ClassToImage(generator, tokenizer)
    with pytest.raises(ValueError, match=r"classes: expected a class id in \[0, 10\), got 10"):
        pipe(torch.tensor([3, 10]))
    with pytest.raises(ValueError, match="expected a non-empty"):
        pipe(torch.tensor([[1]]))
    with pytest.raises(ValueError, match="guidance_decay"):
        pipe([1], guidance_decay="cosine")
    assert pipe.labels(["tench", 3]).tolist() == [0, 3]
