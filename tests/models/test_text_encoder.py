"""tatitok_fast.text against the reference formulas, on a tiny random open_clip CLIP.

No weights are downloaded: the tokenizer is open_clip's bundled BPE and every socket is
blocked (and recorded) for the whole module.
"""
from __future__ import annotations

import copy
import json
import socket

import pytest
import torch
import torch.nn as nn

open_clip = pytest.importorskip("open_clip")
from open_clip.model import CLIP, convert_weights_to_lp  # noqa: E402
from open_clip.transformer import QuickGELU, Transformer  # noqa: E402

from tatitok_fast.text import CLIPTextEncoder, TextEncoding, encode_text, encode_token_ids  # noqa: E402

TINY_NAME = "tatitok-fast-tiny-test"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
}
CAPTIONS = ["A photo of a jay.", "", "two dogs playing in the snow, 35mm film, golden hour",
            "a red cube"]


# ---------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def network_attempts():
    """Block (and record) every DNS lookup and socket connection made by this module."""
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network access is disabled in these tests")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        try:  # huggingface_hub reads the variable at import: set its constant too
            from huggingface_hub import constants as hf_constants
            mp.setattr(hf_constants, "HF_HUB_OFFLINE", True)
        except ImportError:
            pass
        mp.setattr(socket, "getaddrinfo", refuse)
        mp.setattr(socket.socket, "connect", refuse)
        yield attempts


@pytest.fixture(scope="module")
def tokenizer(network_attempts):
    tok = open_clip.get_tokenizer("ViT-L-14-336")
    assert network_attempts == []  # the BPE vocabulary ships with open_clip
    return tok


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory, network_attempts) -> str:
    """Register the tiny architecture with open_clip so CLIPTextEncoder can build it by name."""
    path = tmp_path_factory.mktemp("configs") / f"{TINY_NAME}.json"
    path.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(path)
    return TINY_NAME


def tiny_clip(cast_dtype: torch.dtype | None = None, seed: int = 0) -> CLIP:
    """Tiny CLIP whose every parameter (biases and LayerNorms included) is random."""
    torch.manual_seed(seed)
    model = CLIP(**copy.deepcopy(TINY_CFG), cast_dtype=cast_dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


# ---------------------------------------------------------------------------------------
# Independent computations, written as the reference writes them


def reference_conditions(tokenizer, model: CLIP, captions: list[str]) -> tuple[torch.Tensor, ...]:
    """MaskGen's helper: blocks[:-1] -> penultimate, last block, ln_final, EOT pool @ proj."""
    ids = tokenizer(captions)
    dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(ids).to(dtype) + model.positional_embedding.to(dtype)
    for block in model.transformer.resblocks[:-1]:
        x = block(x, attn_mask=model.attn_mask)
    penultimate = x
    x = model.ln_final(model.transformer.resblocks[-1](x, attn_mask=model.attn_mask))
    pooled = x[torch.arange(len(captions)), ids.argmax(dim=-1)] @ model.text_projection
    return x, penultimate, pooled.unsqueeze(1)


def readme_guidance(tokenizer, model: CLIP, captions: list[str]) -> torch.Tensor:
    """The TA-TiTok README's text guidance: (L, B, D) through transformer with batch_first=False."""
    ids = tokenizer(captions)
    dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(ids).to(dtype) + model.positional_embedding.to(dtype)
    x = model.transformer(x.permute(1, 0, 2), attn_mask=model.attn_mask).permute(1, 0, 2)
    return model.ln_final(x)


def assert_encoding_close(enc: TextEncoding, expected: tuple[torch.Tensor, ...], **tol) -> None:
    for name, got, want in zip(TextEncoding._fields, enc, expected):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, msg=lambda m, n=name: f"{n}: {m}", **tol)


# ---------------------------------------------------------------------------------------
# encode_text


@pytest.mark.parametrize("batch_first", [True, False])
def test_matches_reference_formulas(tokenizer, batch_first):
    model = tiny_clip()
    model.transformer.batch_first = batch_first  # the README sets False on a built model
    enc = encode_text(tokenizer, model, CAPTIONS)

    assert enc.guidance.shape == (4, 77, 64) and enc.penultimate.shape == (4, 77, 64)
    assert enc.pooled.shape == (4, 1, 32)
    with torch.no_grad():
        expected = reference_conditions(tokenizer, model, CAPTIONS)
        assert_encoding_close(enc, expected)
        if batch_first:  # open_clip's own pooled embedding (Transformer.forward honours the flag)
            torch.testing.assert_close(enc.pooled[:, 0], model.encode_text(tokenizer(CAPTIONS)))
        else:  # the README's path for the guidance
            torch.testing.assert_close(enc.guidance, readme_guidance(tokenizer, model, CAPTIONS))
    # the penultimate stream is a different tensor from the guidance
    assert not torch.allclose(enc.penultimate, enc.guidance, atol=1e-3)


def test_seq_first_blocks_give_the_same_numbers(tokenizer):
    """A tower built with sequence-first attention (batch_first=False at construction)."""
    model = tiny_clip()
    seq_first = copy.deepcopy(model)
    seq_first.transformer = Transformer(width=64, layers=3, heads=4, batch_first=False)
    seq_first.transformer.load_state_dict(model.transformer.state_dict())
    assert seq_first.transformer.resblocks[0].attn.batch_first is False

    enc = encode_text(tokenizer, seq_first, CAPTIONS)
    with torch.no_grad():
        assert_encoding_close(enc, reference_conditions(tokenizer, model, CAPTIONS))
        torch.testing.assert_close(enc.pooled[:, 0], seq_first.encode_text(tokenizer(CAPTIONS)))


def test_respects_cast_dtype(tokenizer):
    """open_clip's mixed precision: bf16 projections, fp32 embeddings and LayerNorms."""
    model = tiny_clip(cast_dtype=torch.bfloat16)
    convert_weights_to_lp(model, dtype=torch.bfloat16)
    assert model.token_embedding.weight.dtype == torch.float32
    assert model.transformer.get_cast_dtype() == torch.bfloat16

    enc = encode_text(tokenizer, model, CAPTIONS)
    assert all(t.dtype == torch.bfloat16 for t in enc)
    with torch.no_grad():
        assert_encoding_close(enc, reference_conditions(tokenizer, model, CAPTIONS))
        torch.testing.assert_close(enc.pooled[:, 0], model.encode_text(tokenizer(CAPTIONS)))


def test_batch_of_one_matches_batch_of_many(tokenizer):
    model = tiny_clip()
    with torch.no_grad():
        batched = encode_text(tokenizer, model, CAPTIONS)
        for i, caption in enumerate(CAPTIONS):
            single = encode_text(tokenizer, model, caption)  # a bare str is a batch of one
            assert_encoding_close(single, tuple(t[i:i + 1] for t in batched), atol=1e-5, rtol=1e-5)


def test_long_prompt_is_truncated_with_eot_kept(tokenizer):
    encoder = CLIPTextEncoder.from_open_clip(tiny_clip(), tokenizer)
    long_caption = " ".join(["word"] * 200)
    ids = encoder.tokenize([long_caption, "short"])
    assert ids.shape == (2, 77) and ids.dtype == torch.int64
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    assert ids[0, 0] == sot and ids[0, -1] == eot and (ids[0] != 0).all()
    assert (ids[0, 1:-1] != eot).all()

    enc = encoder([long_caption])
    proj = encoder.model.text_projection
    torch.testing.assert_close(enc.pooled[0, 0], enc.guidance[0, -1] @ proj)  # pooled at the last slot


# ---------------------------------------------------------------------------------------
# CLIPTextEncoder


def test_from_open_clip_matches_encode_text(tokenizer):
    model = tiny_clip()
    expected = encode_text(tokenizer, model, CAPTIONS)
    encoder = CLIPTextEncoder.from_open_clip(model, tokenizer)

    enc = encoder(CAPTIONS)
    assert_encoding_close(enc, tuple(t.detach() for t in expected))
    assert not any(t.requires_grad for t in enc)
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.model.training
    assert (encoder.width, encoder.embed_dim, encoder.context_length) == (64, 32, 77)
    assert encoder.device == torch.device("cpu") and encoder.dtype == torch.float32


def test_empty_prompt_is_cached_and_refreshed_on_move(tokenizer):
    encoder = CLIPTextEncoder.from_open_clip(tiny_clip(), tokenizer)
    passes = []
    encoder.model.token_embedding.register_forward_hook(lambda *_: passes.append(1))

    one = encoder.empty_prompt()
    four = encoder.empty_prompt(batch_size=4)
    assert len(passes) == 1  # computed once, expanded without recomputation
    assert four.guidance.shape == (4, 77, 64) and four.pooled.shape == (4, 1, 32)
    for a, b in zip(one, four):
        assert a.data_ptr() == b.data_ptr()  # views of the same cached tensors
        torch.testing.assert_close(b, a.expand_as(b))
    assert_encoding_close(one, tuple(encoder([""])))
    passes.clear()

    encoder.to(torch.float64)
    wide = encoder.empty_prompt(2)
    assert len(passes) == 1 and all(t.dtype == torch.float64 for t in wide)
    assert_encoding_close(wide, tuple(t[:2].double() for t in four), atol=1e-5, rtol=1e-5)

    encoder.to(torch.float32)
    again = encoder.empty_prompt()
    assert len(passes) == 2 and again.guidance.data_ptr() != one.guidance.data_ptr()
    assert_encoding_close(again, tuple(one), atol=1e-6, rtol=1e-6)


def test_caption_cache_gives_each_captions_batch_of_one_encoding(tokenizer):
    encoder = CLIPTextEncoder.from_open_clip(tiny_clip(), tokenizer)
    batched = encoder(CAPTIONS)
    singles = {c: encoder([c]) for c in CAPTIONS}
    passes = []
    encoder.model.token_embedding.register_forward_hook(lambda *_: passes.append(1))

    encoder.cache_captions(3)
    mixed = [CAPTIONS[2], CAPTIONS[0], CAPTIONS[2], CAPTIONS[1]]
    enc = encoder(mixed)
    assert len(passes) == 3  # one pass per distinct caption, the repeat from the cache
    for i, c in enumerate(mixed):  # bit for bit each caption's own batch of one, whatever shares its batch
        assert all(torch.equal(t[i:i + 1], u) for t, u in zip(enc, singles[c]))
    assert_encoding_close(tuple(t[[2, 0, 2, 1]] for t in batched), tuple(enc), atol=1e-5, rtol=1e-5)
    assert list(encoder._captions) == [CAPTIONS[2], CAPTIONS[0], CAPTIONS[1]]  # least recently used first

    encoder([CAPTIONS[3], CAPTIONS[0]])  # a 4th caption evicts the least recently used (CAPTIONS[2])
    assert len(passes) == 4 and list(encoder._captions) == [CAPTIONS[1], CAPTIONS[3], CAPTIONS[0]]
    encoder([CAPTIONS[0]])
    assert len(passes) == 4  # still held

    encoder.to(torch.float64)  # new weights' dtype: the held encodings are stale
    assert not encoder._captions
    assert encoder([CAPTIONS[0]]).pooled.dtype == torch.float64 and len(passes) == 5
    encoder.load_state_dict({f"model.{k}": v.double() for k, v in tiny_clip(seed=1).state_dict().items()})
    assert not encoder._captions
    encoder.cache_captions(0)  # off: the batched call again
    assert len(encoder([CAPTIONS[0], CAPTIONS[1]])) == 3 and not encoder._captions
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="max_entries"):
            encoder.cache_captions(bad)


@pytest.mark.parametrize("into", ["wrapper", "clip"])
def test_empty_prompt_refreshed_on_new_weights(tokenizer, into):
    encoder = CLIPTextEncoder.from_open_clip(tiny_clip(seed=0), tokenizer)
    before = encoder.empty_prompt()
    state = tiny_clip(seed=1).state_dict()
    if into == "wrapper":
        encoder.load_state_dict({f"model.{k}": v for k, v in state.items()})
    else:
        encoder.model.load_state_dict(state)
    after = encoder.empty_prompt()
    assert not torch.allclose(before.pooled, after.pooled)
    assert_encoding_close(after, tuple(encoder([""])))


def test_constructor_builds_text_tower_only(tiny_config, network_attempts):
    encoder = CLIPTextEncoder(tiny_config, pretrained=None, dtype=torch.float32)
    assert not hasattr(encoder.model, "visual")
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.model.training
    enc = encoder(CAPTIONS[:2])
    assert enc.guidance.shape == (2, 77, 64) and enc.pooled.shape == (2, 1, 32)
    assert network_attempts == []


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_constructor_loads_local_weights(tiny_config, tokenizer, tmp_path, suffix):
    source = tiny_clip(seed=3)
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)

    encoder = CLIPTextEncoder(tiny_config, pretrained=str(path))
    with torch.no_grad():
        assert_encoding_close(encoder(CAPTIONS), tuple(encode_text(tokenizer, source, CAPTIONS)))


def test_constructor_low_precision(tiny_config):
    encoder = CLIPTextEncoder(tiny_config, pretrained=None, dtype=torch.bfloat16)
    assert encoder.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for t in encoder(["a cat"]))


def test_constructor_quick_gelu(tiny_config):
    encoder = CLIPTextEncoder(tiny_config, pretrained=None, quick_gelu=True)
    assert isinstance(encoder.model.transformer.resblocks[0].mlp.gelu, QuickGELU)


# ---------------------------------------------------------------------------------------
# Errors


def test_missing_weights_file_raises_clear_error(tiny_config, tmp_path):
    missing = tmp_path / "nowhere" / "weights.safetensors"
    with pytest.raises(RuntimeError) as info:
        CLIPTextEncoder(tiny_config, pretrained=str(missing), cache_dir=tmp_path / "cache")
    message = str(info.value)
    for part in (tiny_config, str(missing), "cache_dir", str(tmp_path / "cache"),
                 "local weights file", "HF_HUB_OFFLINE"):
        assert part in message
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_unknown_tag_raises_clear_error(tiny_config):
    with pytest.raises(RuntimeError, match="no_such_tag") as info:
        CLIPTextEncoder(tiny_config, pretrained="no_such_tag")
    assert info.value.__cause__ is not None and "HF_HUB_OFFLINE" in str(info.value)


def test_offline_hub_raises_clear_error(tmp_path, network_attempts):
    """ViT-L-14-336/openai with no network and an empty cache: fails before building anything."""
    with pytest.raises(RuntimeError, match="ViT-L-14-336") as info:
        CLIPTextEncoder("ViT-L-14-336", "openai", cache_dir=tmp_path)
    assert "openai" in str(info.value) and str(tmp_path) in str(info.value)
    assert info.value.__cause__ is not None


def test_bad_inputs(tokenizer):
    model = tiny_clip()
    for bad in (None, 3, ["ok", 3], [b"bytes"], {"a": 1}):
        with pytest.raises(TypeError, match="captions"):
            encode_text(tokenizer, model, bad)
    with pytest.raises(ValueError, match="captions"):
        encode_text(tokenizer, model, [])
    with pytest.raises(TypeError, match="model"):
        encode_text(tokenizer, nn.Linear(2, 2), "a cat")
    with pytest.raises(TypeError, match="tokenizer"):
        encode_text("not a tokenizer", model, "a cat")
    with pytest.raises(ValueError, match="device"):
        encode_text(tokenizer, model, "a cat", device="meta")
    with pytest.raises(ValueError, match="token_ids"):
        encode_token_ids(model, torch.zeros(2, 10, dtype=torch.long))
    with pytest.raises(TypeError, match="token_ids"):
        encode_token_ids(model, torch.zeros(2, 77))

    encoder = CLIPTextEncoder.from_open_clip(model, tokenizer)
    with pytest.raises(TypeError, match="captions"):
        encoder(42)
    with pytest.raises(ValueError, match="captions"):
        encoder.tokenize([])
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="batch_size"):
            encoder.empty_prompt(bad)
    with pytest.raises(TypeError, match="tokenizer"):
        CLIPTextEncoder.from_open_clip(model, None)
    with pytest.raises(ValueError, match="model_name"):
        CLIPTextEncoder("no-such-architecture", pretrained=None)
    with pytest.raises(ValueError, match="dtype"):
        CLIPTextEncoder("ViT-L-14-336", pretrained=None, dtype=torch.int8)


@pytest.mark.slow
def test_vit_l_14_336_architecture():
    """The real architecture (random weights): sizes, QuickGELU as the 'openai' tag was trained."""
    encoder = CLIPTextEncoder("ViT-L-14-336", pretrained=None)
    assert (encoder.width, encoder.embed_dim, encoder.context_length) == (768, 768, 77)
    assert not hasattr(encoder.model, "visual")
    assert isinstance(encoder.model.transformer.resblocks[0].mlp.gelu, QuickGELU)
    enc = encoder(["a photo of a jay"])
    assert enc.guidance.shape == (1, 77, 768) and enc.pooled.shape == (1, 1, 768)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(tokenizer):
    encoder = CLIPTextEncoder.from_open_clip(tiny_clip(), tokenizer)
    on_cpu, null_cpu = encoder(CAPTIONS), encoder.empty_prompt(2)
    encoder.to("cuda")
    assert encoder.device.type == "cuda"
    on_gpu, null_gpu = encoder(CAPTIONS), encoder.empty_prompt(2)
    assert all(t.is_cuda for t in (*on_gpu, *null_gpu))
    assert_encoding_close(tuple(t.cpu() for t in on_gpu), tuple(on_cpu), atol=1e-4, rtol=1e-4)
    assert_encoding_close(tuple(t.cpu() for t in null_gpu), tuple(null_cpu), atol=1e-4, rtol=1e-4)
