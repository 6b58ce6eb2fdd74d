"""The text encoder named in exported configs (model.text_encoder): CLIPTextEncoder.from_spec /
.spec, how `tatitok-fast generate` / `reconstruct` pick it, and that the official loader
ignores the extra entry."""
import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tatitok_fast import TATiTok
from tatitok_fast.cli import main
from tatitok_fast.cli.common import DEFAULT_TEXT_ENCODER, CommandError, text_encoder_spec
from tatitok_fast.images import to_pil
from tatitok_fast.models.generators.maskgen import MaskGen_VQ
from tatitok_fast.pipeline import TextToImage
from tatitok_fast.presets import tiny_generator_config, tiny_tokenizer_config
from tatitok_fast.text import CLIPTextEncoder

SPEC = {"name": "tiny", "seed": 3}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny VQ tokenizer + generator whose configs name the tiny text encoder (seed 3), and a
    generator without the entry (like an official checkpoint)."""
    root = tmp_path_factory.mktemp("spec")
    torch.manual_seed(0)
    tok_cfg, gen_cfg = tiny_tokenizer_config("vq"), tiny_generator_config("vq")
    MaskGen_VQ(gen_cfg).save_pretrained(root / "gen_plain")
    for cfg in (tok_cfg, gen_cfg):
        cfg["model"]["text_encoder"] = dict(SPEC)
    TATiTok(tok_cfg).save_pretrained(root / "tok")
    MaskGen_VQ(gen_cfg).save_pretrained(root / "gen")
    return root


def test_spec_round_trip():
    enc = CLIPTextEncoder.tiny(3)
    assert enc.spec == SPEC
    again = CLIPTextEncoder.from_spec(enc.spec)
    assert again.spec == SPEC
    for (k, a), (_, b) in zip(enc.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), k
    other = CLIPTextEncoder.from_spec({"name": "tiny", "seed": 4})
    assert not torch.equal(other.model.token_embedding.weight, enc.model.token_embedding.weight)
    assert CLIPTextEncoder.from_open_clip(enc.model, enc.tokenizer).spec is None  # nothing to rebuild it from


def test_short_context_end_to_end():
    """The demo's text context (16 CLIP tokens, its captions' longest is 15): the spec keeps
    it, the tokenizer cuts to it, a tokenizer + generator built for it generate, and a
    generator/tokenizer pair of different lengths is refused before any compute."""
    spec = {"name": "tiny", "seed": 3, "context_length": 16}
    enc = CLIPTextEncoder.from_spec(spec)
    assert enc.spec == spec and enc.context_length == 16
    from tatitok_fast.demo import shapes
    from tatitok_fast.demo.run import TEXT_ENCODER

    assert TEXT_ENCODER["context_length"] == 16
    captions = [shapes.caption([{"color": c1, "shape": s1, "position": "left"},
                                {"color": c2, "shape": s2, "position": "right"}])
                for c1, s1 in shapes.ALL_PAIRS for c2, s2 in shapes.ALL_PAIRS]
    ids = enc.tokenize(captions)  # every two-object caption of the demo's grammar: none is cut
    eot = ids.argmax(-1)  # CLIP's EOT has the largest id
    assert ids.shape == (len(captions), 16) and int(eot.max()) == 14
    assert bool((ids.gather(1, eot[:, None]) == ids.max()).all()) and int((ids[:, 15] != 0).sum()) == 0
    assert enc(["a red circle"]).guidance.shape == (1, 16, enc.width)
    torch.manual_seed(0)
    tok_cfg, gen_cfg = tiny_tokenizer_config("vq"), tiny_generator_config("vq")
    for cfg in (tok_cfg, gen_cfg):
        cfg["model"]["vq_model"]["text_context_length"] = 16
    tok, gen = TATiTok(tok_cfg).eval(), MaskGen_VQ(gen_cfg).eval()
    images = TextToImage(gen, tok, enc)(["a red circle", "a blue square"], steps=2,
                                        generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, tok.image_size, tok.image_size) and torch.isfinite(images).all()
    with pytest.raises(ValueError, match="text_encoder: gives 77 CLIP tokens per caption, the generator was built "
                                         "for 16"):
        TextToImage(gen, tok, CLIPTextEncoder.tiny(3)).tokens(["a red circle"], steps=2)
    with pytest.raises(ValueError, match="text_context_length .*generator 77, tokenizer 16"):
        TextToImage(MaskGen_VQ(tiny_generator_config("vq")), tok, enc)


def test_spec_of_a_named_open_clip_model(tmp_path):
    import open_clip

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "tatitok-fast-spec-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "tatitok-fast-spec-test.json")
    enc = CLIPTextEncoder("tatitok-fast-spec-test", None)
    assert enc.spec == {"name": "tatitok-fast-spec-test", "pretrained": None}
    assert CLIPTextEncoder.from_spec(enc.spec).width == 32


@pytest.mark.parametrize("spec, message", [
    ({"seed": 0}, "expected a dict with a 'name'"),
    ("tiny", "expected a dict with a 'name'"),
    ({"name": "tiny", "seed": 0, "width": 64}, r"unknown keys \['width'\]"),
    ({"name": "tiny", "seed": "0"}, "'seed' must be an int"),
    ({"name": "tiny", "seed": 0, "context_length": 78}, r"context_length: expected an int in \[2, 77\]"),
    ({"name": "ViT-L-14-336"}, "expected 'pretrained'"),
    ({"name": "no-such-clip", "pretrained": None}, "is not an open_clip model"),
])
def test_bad_specs_are_rejected(spec, message):
    with pytest.raises(ValueError, match=message):
        CLIPTextEncoder.from_spec(spec)


@pytest.fixture(scope="module")
def loaded(checkpoints):
    return TATiTok.from_pretrained(checkpoints / "tok"), MaskGen_VQ.from_pretrained(checkpoints / "gen")


def _args(clip_model=None, clip_pretrained=None):
    return argparse.Namespace(clip_model=clip_model, clip_pretrained=clip_pretrained)


def test_which_spec_the_commands_pick(capsys):
    gen = {"model": {"text_encoder": {"name": "tiny", "seed": 1}}}
    tok = {"model": {"text_encoder": {"name": "tiny", "seed": 2}}}
    official = {"model": {"vq_model": {}}}
    sources = [("--generator", gen), ("--tokenizer", tok)]
    assert text_encoder_spec(_args(), sources)[0] == {"name": "tiny", "seed": 1}  # the generator's first
    assert "using --generator's" in capsys.readouterr().err  # they disagree: said so
    assert text_encoder_spec(_args(), [("--generator", official), ("--tokenizer", tok)])[0] == tok["model"][
        "text_encoder"]
    assert text_encoder_spec(_args(), [("--generator", official)])[0] == DEFAULT_TEXT_ENCODER
    assert text_encoder_spec(_args("ViT-B-32"), sources)[0] == {"name": "ViT-B-32", "pretrained": "openai"}
    assert text_encoder_spec(_args(None, "none"), sources)[0] == {"name": "ViT-L-14-336", "pretrained": None}
    with pytest.raises(CommandError, match="--tokenizer: config entry model.text_encoder must be a dict"):
        text_encoder_spec(_args(), [("--tokenizer", {"model": {"text_encoder": "tiny"}})])


def test_generate_uses_the_configs_text_encoder_offline(checkpoints, loaded, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    assert main(["generate", "a green triangle", "--generator", str(checkpoints / "gen"), "--tokenizer",
                 str(checkpoints / "tok"), "-o", str(out), "--device", "cpu", "--steps", "2", "--seed", "5",
                 "--no-progress"]) == 0
    got = np.asarray(Image.open(out / "00000_a_green_triangle.png"))

    def expected(encoder):
        tok, gen = loaded
        torch.manual_seed(5)
        return np.asarray(to_pil(TextToImage(gen, tok, encoder)(["a green triangle"], steps=2))[0])

    assert np.array_equal(got, expected(CLIPTextEncoder.tiny(3)))
    assert not np.array_equal(got, expected(CLIPTextEncoder.tiny(0)))  # the spec's seed matters


def test_reconstruct_uses_the_tokenizers_text_encoder(checkpoints, loaded, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(tmp_path / "x.png")
    assert main(["reconstruct", str(tmp_path / "x.png"), "--tokenizer", str(checkpoints / "tok"), "--caption",
                 "a red circle", "-o", str(tmp_path / "rec"), "--device", "cpu", "--no-progress"]) == 0
    tok = loaded[0]
    with torch.no_grad():
        want = tok.detokenize(tok.tokenize(tmp_path / "x.png"), ["a red circle"], text_encoder=CLIPTextEncoder.tiny(3))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "rec" / "x_recon.png")), np.asarray(to_pil(want)[0]))


def test_official_loader_ignores_the_entry(checkpoints, loaded):
    from tests.models.official_losses import import_official

    official_tok = import_official("modeling.tatitok").TATiTok.from_pretrained(str(checkpoints / "tok"))
    official_gen = import_official("modeling.maskgen").MaskGen_VQ.from_pretrained(str(checkpoints / "gen"))
    assert dict(official_tok.config.model.text_encoder) == SPEC
    for ours, theirs in zip(loaded, (official_tok, official_gen)):
        theirs_sd = theirs.state_dict()
        for k, v in ours.state_dict().items():
            assert torch.equal(v, theirs_sd[k]), k
