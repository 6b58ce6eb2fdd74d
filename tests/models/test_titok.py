"""TiTok tokenizers against the official classes (../shared/peer/1d-tokenizer/modeling/titok.py,
imported at test time) and the reference layouts/cases in ../shared/reference: state-dict keys
and shapes of the 9 zoo configs, the two-stage parity case, small single-stage VQ / VAE models
on the same weights as the official ones, the official init, config.json with `${...}`,
strict loading and bad inputs."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import sys
import warnings

import pytest
import torch

from tatitok_fast import TiTok
from tatitok_fast.checkpoint import CheckpointError
from tatitok_fast.presets import TITOK_TOKENIZERS
from tests.helpers import REPO, assert_same_init, official_unavailable
from tests.models.official_losses import import_official

SHARED = next((p for p in (REPO.parent / "shared", REPO / "shared") if (p / "reference").is_dir()),
              REPO.parent / "shared")
LAYOUT = SHARED / "reference" / "titok_layout.json"
CASE_2STAGE = SHARED / "reference" / "parity_titok" / "titok_2stage_s"


def _rel_err(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.fixture(scope="module")
def official():
    """The official modeling.titok module (blocks.py prints its attention mode at import)."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return import_official("modeling.titok", deps=("omegaconf", "einops", "huggingface_hub"))


@pytest.fixture(scope="module")
def layout():
    if not LAYOUT.is_file():
        official_unavailable(f"reference layout not found at {LAYOUT}")
    return json.loads(LAYOUT.read_text())


def small_config(mode: str = "vq", two_stage: bool = False, tokens: int = 8, crop: int = 32) -> dict:
    """A small-ViT TiTok on crop x crop images (official sizes only: small = 512 wide, 8 layers)."""
    vq = {"vit_enc_model_size": "small", "vit_dec_model_size": "small", "vit_enc_patch_size": 16,
          "vit_dec_patch_size": 16, "num_latent_tokens": tokens}
    if two_stage:
        vq.update(codebook_size=64, token_size=12, use_l2_norm=True, commitment_cost=0.25, finetune_decoder=True)
    elif mode == "vq":
        vq.update(codebook_size=64, token_size=16, use_l2_norm=False, commitment_cost=0.25, finetune_decoder=False,
                  is_legacy=False)
    else:
        vq.update(quantize_mode="vae", token_size=8, finetune_decoder=False, is_legacy=False)
    return {"model": {"vq_model": vq}, "dataset": {"preprocessing": {"crop_size": crop}}}


@torch.no_grad()
def _perturbed_official(official, config, seed: int):
    """The official TiTok with its init plus noise on every tensor (no zero biases, no unit
    norms left), so that every weight matters in a comparison."""
    torch.manual_seed(seed)
    model = official.TiTok(copy.deepcopy(config)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    for p in model.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


# ---------------------------------------------------------------------------------------
# Layouts of the zoo

@pytest.mark.parametrize("preset", sorted(TITOK_TOKENIZERS))
def test_preset_layout_matches_official(preset, layout, official):
    """Built from the official config dict on the meta device: exactly the official keys and
    shapes (titok_layout.json and the official class built from the same dict)."""
    entry = layout[f"tokenizer_{preset}_imagenet"]
    assert TITOK_TOKENIZERS[preset] == entry["config"]
    with torch.device("meta"):
        ours = TiTok(entry["config"])
        theirs = official.TiTok(copy.deepcopy(entry["config"]))
    got = {k: list(v.shape) for k, v in ours.state_dict().items()}
    assert got == entry["state_dict"]
    assert got == {k: list(v.shape) for k, v in theirs.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == entry["num_params"]
    assert hasattr(ours, "pixel_decoder") == entry["two_stage"]


# ---------------------------------------------------------------------------------------
# The two-stage parity case (same code path as titok_l32/b64/s128)

@pytest.fixture(scope="module")
def two_stage(tmp_path_factory):
    if not (CASE_2STAGE / "case.pt").is_file():
        official_unavailable(f"parity case not found at {CASE_2STAGE}")
    sys.path.insert(0, str(SHARED / "reference" / "parity"))
    try:
        from rebuild import rebuild
    finally:
        sys.path.pop(0)
    out = tmp_path_factory.mktemp("titok_2stage_s")
    case = rebuild(str(CASE_2STAGE), str(out))
    return out, case, TiTok.from_pretrained(out)


def test_two_stage_parity(two_stage):
    _, case, model = two_stage
    x, want = case["inputs"]["images"], case["outputs"]
    with torch.no_grad():
        enc = model.encoder(x, model.latent_tokens)
        z, result = model.encode(x)
        logits = model.decoder(z)
        decoded = model.decode_tokens(result["min_encoding_indices"])
    assert torch.equal(result["min_encoding_indices"], want["tokens"])
    assert _rel_err(enc, want["encoder_out"]) <= 1e-5
    assert _rel_err(z, want["z_quantized"]) <= 1e-5
    assert _rel_err(logits, want["decoder_out"]) <= 1e-5
    assert _rel_err(decoded, want["decoded"]) <= 1e-5
    assert decoded.shape == (2, 3, 64, 64)
    assert float(result["quantizer_loss"]) == 0.0  # two-stage encode zeroes its losses (frozen encoder)


def test_two_stage_bf16_autocast_close_to_fp32(two_stage):
    _, case, model = two_stage
    tokens = case["outputs"]["tokens"]
    with torch.no_grad():
        ref = model.decode_tokens(tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.decode_tokens(tokens)
    assert _rel_err(low, ref) < 3e-2 and _rel_err(low, ref) > 0  # it really ran in bf16


def test_strict_load_names_missing_keys(two_stage, tmp_path):
    path, _, _ = two_stage
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path / "model.safetensors"))
    del sd["pixel_decoder.conv_out.weight"], sd["latent_tokens"]
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"2 missing keys \[.*latent_tokens.*pixel_decoder\.conv_out\.weight"):
        TiTok.from_pretrained(tmp_path)


def test_config_missing_key_is_named(two_stage, tmp_path):
    path, _, _ = two_stage
    config = json.loads((path / "config.json").read_text())
    del config["model"]["vq_model"]["token_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing required entry 'model\.vq_model\.token_size'"):
        TiTok.from_pretrained(tmp_path)
    config["model"]["vq_model"]["token_size"] = 12
    del config["dataset"]
    with pytest.raises(ValueError, match=r"missing required entry 'dataset\.preprocessing\.crop_size'"):
        TiTok(config)


def test_bad_inputs(two_stage):
    _, case, model = two_stage
    with pytest.raises(ValueError, match=r"x: this tokenizer takes 64x64 images, got \(32, 32\)"):
        model.encode(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"tokens: expected ids in \[0, 256\)"):
        model.decode_tokens(torch.full((1, 32), 256))
    with pytest.raises(ValueError, match="tokens: expected 32 tokens per image"):
        model.decode_tokens(torch.zeros(1, 16, dtype=torch.long))
    bad = copy.deepcopy(model.config)
    bad["model"]["vq_model"]["quantize_mode"] = "vae"
    with pytest.raises(ValueError, match="finetune_decoder=True.*needs quantize_mode 'vq'"):
        TiTok(bad)


# ---------------------------------------------------------------------------------------
# Single-stage VQ and VAE against the official classes, same weights

def test_single_stage_vq_matches_official(official):
    config = small_config("vq")
    theirs = _perturbed_official(official, config, 3)
    ours = TiTok(config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z_o, res_o = theirs.encode(x)
        z, res = ours.encode(x)
        dec_o = theirs.decode_tokens(res_o["min_encoding_indices"])
        dec = ours.decode_tokens(res["min_encoding_indices"])
    assert torch.equal(res["min_encoding_indices"], res_o["min_encoding_indices"])
    assert res["min_encoding_indices"].shape == (2, 1, 8)
    assert _rel_err(z, z_o) <= 1e-5
    assert _rel_err(dec, dec_o) <= 1e-5 and dec.shape == (2, 3, 32, 32)
    assert abs(res["quantizer_loss"].item() - res_o["quantizer_loss"].item()) <= 1e-5 * res_o["quantizer_loss"].item()


def test_vae_posterior_matches_official(official):
    config = small_config("vae")
    theirs = _perturbed_official(official, config, 5)
    ours = TiTok(config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, post_o = theirs.encode(x)
        z, post = ours.encode(x)
        dec_o, dec = theirs.decode_tokens(post_o.mean), ours.decode_tokens(post.mean)
    assert _rel_err(post.mean, post_o.mean) <= 1e-5
    assert _rel_err(post.std, post_o.std) <= 1e-5
    assert _rel_err(post.kl(), post_o.kl()) <= 1e-5 and post.kl().shape == (2, 8)
    assert _rel_err(dec, dec_o) <= 1e-5
    assert z.shape == (2, 8, 1, 8) and not torch.equal(z, post.mean)  # encode returns a sample
    assert torch.equal(ours.tokenize(x), post.mean)  # tokenize: the posterior mean


def test_initialisation_follows_official(official):
    """From-scratch training starts where the official TiTok starts: trunc-normal(0.02) on
    encoder and decoder, nn.MultiheadAttention's xavier QKV, the quantizers' and the
    MaskGIT-VQGAN modules' own init. Compared tensor by tensor (std, zeros, ones)."""
    config = small_config(two_stage=True)
    torch.manual_seed(0)
    want = official.TiTok(copy.deepcopy(config)).state_dict()
    got = TiTok(config).state_dict()
    assert_same_init(got, want)


# ---------------------------------------------------------------------------------------
# config.json as the official save writes it

def test_from_pretrained_resolves_interpolations(official, tmp_path):
    """The official _save_pretrained writes the config unresolved: `${...}` strings load (and
    give the same model in both implementations)."""
    config = small_config("vq")
    theirs = _perturbed_official(official, config, 7)
    theirs.save_pretrained(tmp_path)  # the official writer: config.json + model.safetensors
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["model"]["generator"] = {"image_seq_len": "${model.vq_model.num_latent_tokens}"}
    saved["model"]["vq_model"]["vit_dec_patch_size"] = "${model.vq_model.vit_enc_patch_size}"
    (tmp_path / "config.json").write_text(json.dumps(saved))
    ours = TiTok.from_pretrained(tmp_path)
    assert ours.config["model"]["generator"]["image_seq_len"] == 8
    assert ours.config["model"]["vq_model"]["vit_dec_patch_size"] == 16
    again = official.TiTok.from_pretrained(str(tmp_path)).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours.encode(x)[1]["min_encoding_indices"], again.encode(x)[1]["min_encoding_indices"])
    saved["model"]["generator"]["image_seq_len"] = "${model.vq_model.no_such_key}"
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match=r"model\.generator\.image_seq_len.*no_such_key"):
        TiTok.from_pretrained(tmp_path)


def test_stage1_legacy_decoder_gives_vqgan_logits_like_official(official):
    """Stage 1 of the two-stage recipe (finetune_decoder=False, is_legacy=True): the decoder's
    output is the 1024-way logits over the MaskGIT-VQGAN codes, trained against proxy codes."""
    config = small_config("vq")
    config["model"]["vq_model"].update(is_legacy=True, use_l2_norm=True, token_size=12)
    theirs = _perturbed_official(official, config, 11)
    ours = TiTok(config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not hasattr(ours, "pixel_decoder")
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out_o, res_o = theirs(x)
        out, res = ours(x)
    assert torch.equal(res["min_encoding_indices"], res_o["min_encoding_indices"])
    assert out.shape == (2, 1024, 2, 2) and _rel_err(out, out_o) <= 1e-5
    assert res["quantizer_loss"].item() > 0  # trainable encoder: real losses
    with pytest.raises(ValueError, match="stage-1 TiTok"):
        ours.detokenize(res["min_encoding_indices"])


def test_zoo_hub_ids_and_raw_files(layout):
    """Each preset's Hub repo and raw fun-research/TiTok file, tokenizers and generators."""
    from tatitok_fast import presets

    for preset in TITOK_TOKENIZERS:
        entry = layout[f"tokenizer_{preset}_imagenet"]
        assert presets.hub_repo(preset) == entry["hub_repo"]
        assert presets.TITOK_RAW_FILES[entry["fun_research_file"]] == (preset, "tokenizer")
    for preset in presets.TITOK_GENERATORS:
        entry = layout[f"generator_{preset}_imagenet"]
        assert presets.hub_repo(preset, "generator") == entry["hub_repo"]
        assert presets.titok_generator_config(preset) == entry["config"]
        assert presets.titok_generator_class_name(entry["config"]) == entry["class"]
        assert presets.TITOK_RAW_FILES[entry["fun_research_file"]] == (preset, "generator")
    with pytest.raises(KeyError, match="without a released generator"):
        presets.hub_repo("titok_bl64_vq8k", "generator")


def test_compile_fullgraph_no_graph_breaks():
    from tatitok_fast.presets import tiny_titok_config

    torch.manual_seed(0)
    model = TiTok(tiny_titok_config("vq")).eval()
    x = torch.rand(2, 3, 32, 32)

    def roundtrip(x):
        ids = model.encode(x)[1]["min_encoding_indices"]
        return ids, model.decode_tokens(ids)

    torch._dynamo.reset()
    with torch.no_grad():
        ids, img = roundtrip(x)
        ids_c, img_c = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(ids_c, ids)
    torch.testing.assert_close(img_c, img, rtol=1e-5, atol=1e-5)


def test_non_official_init_options_on_titok():
    """TiTok shares the ViT with TA-TiTok: grid-anchored latents work there too; a white canvas
    makes no sense for the two-stage decoder, which predicts VQGAN codes."""
    from tatitok_fast.presets import tiny_titok_config

    cfg = tiny_titok_config("vq", tokens=4, crop=32)
    cfg["model"]["vq_model"].update(grid_anchored_latents=True, decoder_init_canvas=0.5)
    model = TiTok(cfg)
    with torch.no_grad():
        out = model.decode_tokens(torch.zeros(2, 1, 4, dtype=torch.long))
    assert torch.equal(out, torch.full_like(out, 0.5)) and model.encoder.grid_anchored
    legacy = tiny_titok_config(tokens=4, crop=32, two_stage=True)
    legacy["model"]["vq_model"]["decoder_init_canvas"] = 1.0
    with pytest.raises(ValueError, match="decoder_init_canvas: the is_legacy decoder predicts VQGAN codes"):
        TiTok(legacy)
