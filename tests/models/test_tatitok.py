import json

import pytest
import torch

from tatitok_fast import TATiTok
from tatitok_fast.checkpoint import CheckpointError
from tatitok_fast.presets import TOKENIZERS
from tests.helpers import FIXTURES, assert_same_init, load_parity_case, write_parity_checkpoint

LAYOUT = json.loads((FIXTURES / "official_layout.json").read_text())


def _rel_err(got, want):
    return ((got - want).norm() / want.norm()).item()


@pytest.fixture(scope="module")
def kl_parity(tmp_path_factory):
    out = tmp_path_factory.mktemp("tatitok_kl_s")
    config, case = write_parity_checkpoint("tatitok_kl_s", out)
    return out, config, case


def test_parity_with_reference_kl(kl_parity):
    path, _, case = kl_parity
    model = TATiTok.from_pretrained(path)
    images, guidance = case["inputs"]["images"], case["inputs"]["text_guidance"]
    with torch.no_grad():
        enc = model.encoder(images, model.latent_tokens)
        z, posterior = model.encode(images)
        decoded = model.decode_tokens(posterior.mean, guidance)
    out = case["outputs"]
    assert _rel_err(enc, out["encoder_out"]) <= 1e-5
    assert _rel_err(posterior.mean, out["mean"]) <= 1e-5
    assert _rel_err(posterior.std, out["std"]) <= 1e-5
    assert _rel_err(decoded, out["decoded"]) <= 1e-5
    assert z.shape == out["mean"].shape and not torch.equal(z, posterior.mean)  # a sample, not the mean


def test_vq_tokens_equal_reference_quantizer(kl_parity):
    """A VQ tokenizer built from the same weights: ids equal the reference VectorQuantizer's
    argmin over the full distance matrix (computed here with the reference formula)."""
    _, config, case = kl_parity
    vq_config = json.loads(json.dumps(config))
    vq_config["model"]["vq_model"].update(quantize_mode="vq", codebook_size=256, token_size=16, use_l2_norm=False,
                                          commitment_cost=0.25, clustering_vq=False)
    model = TATiTok(vq_config).eval()
    x = case["inputs"]["images"]
    with torch.no_grad():
        z = model.encoder(x, model.latent_tokens)
        _, result = model.encode(x)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 16)
    e = model.quantize.embedding.weight
    d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * torch.einsum("bd,dn->bn", flat, e.T)
    assert torch.equal(result["min_encoding_indices"].flatten(), d.argmin(1))
    assert result["min_encoding_indices"].shape == (2, 1, 32)
    with torch.no_grad():
        img = model.decode_tokens(result["min_encoding_indices"], case["inputs"]["text_guidance"])
    assert img.shape == (2, 3, 64, 64)


@pytest.mark.parametrize("preset", sorted(TOKENIZERS))
def test_preset_layout_matches_official(preset):
    with torch.device("meta"):
        model = TATiTok(TOKENIZERS[preset])
    want = LAYOUT[preset]["state_dict"]
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == want
    assert sum(p.numel() for p in model.parameters()) == LAYOUT[preset]["num_params"]


def test_save_pretrained_roundtrip(kl_parity, tmp_path):
    path, _, case = kl_parity
    model = TATiTok.from_pretrained(path)
    model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["config.json", "model.safetensors"]
    again = TATiTok.from_pretrained(tmp_path / "saved")
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    again = TATiTok.from_pretrained(tmp_path / "bin")
    assert torch.equal(again.decoder.conv_out.weight, model.decoder.conv_out.weight)


def test_raw_state_dict_with_preset_config(kl_parity, tmp_path):
    path, config, _ = kl_parity
    model = TATiTok.from_pretrained(path)
    torch.save(model.state_dict(), tmp_path / "raw.bin")
    loaded = TATiTok.from_pretrained(tmp_path / "raw.bin", config=config)
    assert torch.equal(loaded.latent_tokens, model.latent_tokens)


def test_bad_checkpoints(kl_parity, tmp_path):
    path, config, _ = kl_parity
    with pytest.raises(CheckpointError, match="no weights in"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text(json.dumps(config))
        TATiTok.from_pretrained(tmp_path / "empty")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "config.json").write_text(json.dumps(config))
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="could not read weights file"):
        TATiTok.from_pretrained(tmp_path / "corrupt")
    wrong = json.loads(json.dumps(config))
    wrong["model"]["vq_model"]["num_latent_tokens"] = 64
    with pytest.raises(CheckpointError, match="wrong shape.*latent_tokens"):
        TATiTok.from_pretrained(path, config=wrong)
    with pytest.raises(CheckpointError, match="not a directory, a weights file, a preset name"):
        TATiTok.from_pretrained(tmp_path / "nope")
    with pytest.raises(KeyError, match="unknown preset"):
        from tatitok_fast.presets import preset_config
        preset_config("tatitok_bl999_vq")


def test_offline_hub_error_names_what_was_tried(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="turkeyju/tokenizer_tatitok_bl32_vae.*offline"):
        TATiTok.from_pretrained("turkeyju/tokenizer_tatitok_bl32_vae", cache_dir=str(tmp_path), local_files_only=True)
    with pytest.raises(CheckpointError, match="turkeyju/tokenizer_tatitok_bl32_vq"):
        TATiTok.from_pretrained("tatitok_bl32_vq", cache_dir=str(tmp_path), local_files_only=True)


def test_bad_inputs(kl_parity):
    path, _, case = kl_parity
    model = TATiTok.from_pretrained(path)
    with pytest.raises(ValueError, match=r"x: this tokenizer takes 64x64 images"):
        model.encode(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"x: expected images \(B, 3, 64, 64\)"):
        model.encode(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match=r"text_guidance: expected CLIP text states \(2, 77, 768\)"):
        model.decode_tokens(torch.randn(2, 16, 1, 32), torch.randn(2, 77, 512))
    with pytest.raises(ValueError, match=r"tokens: expected float \(B, 16, 1, 32\)"):
        model.decode_tokens(torch.randn(2, 16, 1, 64), case["inputs"]["text_guidance"])
    with pytest.raises(ValueError, match="quantize_mode must be"):
        cfg = json.loads(json.dumps(model.config))
        cfg["model"]["vq_model"]["quantize_mode"] = "fsq"
        TATiTok(cfg)


# ---------------------------------------------------------------------------------------
# Fast path properties on a tiny tokenizer

@pytest.fixture(scope="module")
def tiny_vq():
    from tatitok_fast.presets import tiny_tokenizer_config

    torch.manual_seed(0)
    return TATiTok(tiny_tokenizer_config("vq")).eval()


def test_compile_fullgraph_no_graph_breaks(tiny_vq):
    x, guidance = torch.rand(2, 3, 32, 32), torch.randn(2, 77, 64)

    def enc(x):
        return tiny_vq.encode(x)[1]["min_encoding_indices"]

    def dec(ids, g):
        return tiny_vq.decode_tokens(ids, g)

    torch._dynamo.reset()
    with torch.no_grad():
        ids = enc(x)
        assert torch.equal(torch.compile(enc, fullgraph=True, backend="aot_eager")(x), ids)
        torch.testing.assert_close(torch.compile(dec, fullgraph=True, backend="aot_eager")(ids, guidance),
                                   dec(ids, guidance), rtol=1e-5, atol=1e-5)


def test_bf16_autocast_matches_fp32(tiny_vq):
    x, guidance = torch.rand(2, 3, 32, 32), torch.randn(2, 77, 64)
    with torch.no_grad():
        z32, _ = tiny_vq.encode(x)
        ref = tiny_vq.decode(z32, guidance)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z16, res = tiny_vq.encode(x)
            out = tiny_vq.decode(z16, guidance)
    assert z16.dtype == torch.float32  # the quantizer runs in fp32 under autocast, as the reference
    assert _rel_err(out.float(), ref) < 3e-2


def test_grad_checkpointing_gives_the_same_gradients(tiny_vq):
    from tatitok_fast.presets import tiny_tokenizer_config

    x, guidance = torch.rand(2, 3, 32, 32), torch.randn(2, 77, 64)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = TATiTok(tiny_tokenizer_config("vq")).train()
        model.set_grad_checkpointing(ckpt)
        out, res = model(x, guidance)
        ((out - x) ** 2).mean().add(res["quantizer_loss"]).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_kl_training_losses_have_gradients():
    from tatitok_fast.presets import tiny_tokenizer_config

    model = TATiTok(tiny_tokenizer_config("vae")).train()
    out, posterior = model(torch.rand(2, 3, 32, 32), torch.randn(2, 77, 64))
    assert posterior.kl().shape == (2, 16)
    (out.mean() + posterior.kl().mean()).backward()
    assert model.encoder.conv_out.weight.grad.abs().sum() > 0


def test_clustering_vq_refresh_follows_the_reference_formula():
    from tatitok_fast.models.tokenizers.quantizers import VectorQuantizer

    torch.manual_seed(0)
    q = VectorQuantizer(16, 4, clustering_vq=True).train()
    before = q.embedding.weight.detach().clone()
    z = torch.randn(2, 4, 1, 8) * 3
    _, res = q(z)
    # the reference: EMA of one-hot usage, then every code moves toward its closest batch
    # feature with decay exp(-usage * K * 10 / (1 - 0.99) - 1e-3)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    usage = torch.bincount(res["min_encoding_indices"].flatten(), minlength=16).float() / 16
    prob = 0.01 * usage
    torch.testing.assert_close(q.embed_prob, prob)
    d = flat.pow(2).sum(1, keepdim=True) + before.pow(2).sum(1) - 2 * flat @ before.T
    feat = flat[d.argmin(0)]
    decay = torch.exp(-(prob * 16 * 10) / 0.01 - 1e-3).unsqueeze(1)
    torch.testing.assert_close(q.embedding.weight.detach(), before * (1 - decay) + feat * decay)
    unused = usage == 0
    assert bool(unused.any()) and bool(((q.embedding.weight - before).norm(dim=1)[unused] > 0).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_in_encode_decode(tiny_vq):
    import copy

    model = copy.deepcopy(tiny_vq).cuda()
    x, guidance = torch.rand(2, 3, 32, 32, device="cuda"), torch.randn(2, 77, 64, device="cuda")
    with torch.no_grad():
        ids = model.encode(x)[1]["min_encoding_indices"]  # warm-up: lazy CUDA/cuBLAS init may sync
        model.decode_tokens(ids, guidance)
        torch.cuda.set_sync_debug_mode("error")
        try:
            ids = model.encode(x)[1]["min_encoding_indices"]
            model.decode_tokens(ids, guidance)
        finally:
            torch.cuda.set_sync_debug_mode(0)


def test_initialisation_follows_official():
    """From-scratch training starts where the official code starts: TiTok's trunc-normal(0.02)
    init on the encoder only, PyTorch defaults on the text-aware decoder (built after it), and
    nn.MultiheadAttention's xavier QKV everywhere. Compared tensor by tensor (std, zeros, ones)."""
    from tests.models.official_losses import import_official

    official = import_official("modeling.tatitok", ("omegaconf", "einops"))
    vq = {"quantize_mode": "vq", "vit_enc_model_size": "small", "vit_dec_model_size": "small",
          "vit_enc_patch_size": 16, "vit_dec_patch_size": 16, "num_latent_tokens": 32, "token_size": 12,
          "codebook_size": 64, "commitment_cost": 0.25, "use_l2_norm": True, "clustering_vq": False,
          "finetune_decoder": False, "is_legacy": False, "text_embed_dim": 64}
    config = {"model": {"vq_model": vq}, "dataset": {"preprocessing": {"crop_size": 64}}}
    torch.manual_seed(0)
    want = official.TATiTok(config).state_dict()
    got = TATiTok(config).state_dict()
    assert_same_init(got, want)


# ---------------------------------------------------------------------------------------
# Non-official options for small models trained from scratch (the demo's tokenizer)

def _demo_like_config(**vq) -> dict:
    from tatitok_fast.presets import tiny_tokenizer_config

    cfg = tiny_tokenizer_config("vq", tokens=32, crop=64)
    cfg["model"]["vq_model"].update(vit_enc_model_size="micro", vit_dec_model_size="micro", vit_enc_patch_size=8,
                                    vit_dec_patch_size=8, use_l2_norm=True, **vq)
    return cfg


def _shapes_batch(n: int = 8) -> torch.Tensor:
    from tatitok_fast.demo import shapes
    from tatitok_fast.images import load_images

    return load_images([im for im, _ in shapes.iter_samples(n, 3, pairs=shapes.ALL_PAIRS)], 64)


def test_grid_anchored_latents_differ_across_images_at_init():
    """The stall of issue 23: at the official init each latent is nearly the same for every image
    (white backgrounds, near-uniform attention); anchored latents start from their own patches."""
    x = _shapes_batch()
    spread = {}
    for anchored in (False, True):
        torch.manual_seed(0)
        model = TATiTok(_demo_like_config(grid_anchored_latents=anchored)).eval()
        with torch.no_grad():
            z = model.encoder(x, model.latent_tokens)  # (B, C, 1, N)
        spread[anchored] = (z.std(0).mean() / z.std()).item()  # across images, relative to all values
    assert spread[False] < 0.02 and spread[True] > 5 * spread[False], spread
    # the same parameters either way: the option changes the forward, not the checkpoint layout
    plain, anchored = (TATiTok(_demo_like_config(grid_anchored_latents=a)).state_dict() for a in (False, True))
    assert {k: v.shape for k, v in plain.items()} == {k: v.shape for k, v in anchored.items()}


def test_decoder_init_canvas_starts_every_pixel_there_and_keeps_gradients():
    torch.manual_seed(0)
    model = TATiTok(_demo_like_config(decoder_init_canvas=1.0, grid_anchored_latents=True))
    x = _shapes_batch(4)
    out, extra = model(x, torch.randn(4, 77, 64))
    assert torch.equal(out, torch.ones_like(out))  # a white canvas whatever the input
    ((out - x) ** 2).mean().backward()
    assert model.decoder.ffn[0].weight.grad.abs().sum() > 0  # the head learns from the first step
    saved = TATiTok(_demo_like_config(decoder_init_canvas=1.0))
    saved.load_state_dict(TATiTok(_demo_like_config()).state_dict())  # loading replaces the init entirely
    with torch.no_grad():
        assert not torch.equal(saved(x, torch.randn(4, 77, 64))[0], torch.ones_like(out))


@pytest.mark.parametrize("vq, match", [
    ({"decoder_init_canvas": 2.0}, r"decoder_init_canvas: expected a pixel value in \[0, 1\]"),
    ({"decoder_init_canvas": "white"}, r"decoder_init_canvas: expected a pixel value"),
    ({"grid_anchored_latents": True, "num_latent_tokens": 24},
     r"grid_anchored_latents: the 64 patches must split evenly into num_latent_tokens=24"),
])
def test_bad_non_official_options(vq, match):
    with pytest.raises(ValueError, match=match):
        TATiTok(_demo_like_config(**vq))
