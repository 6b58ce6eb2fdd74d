"""tatitok_fast.compile: per model family, compiled outputs against eager on tiny random
models (CPU: inductor with freezing), and a second batch size that reuses the compiled
graphs (dynamo's unique_graphs counter does not move).

Tolerances are computed per test: the same model in bf16 (eager) sets the scale of an
acceptable difference (`_bf16_tol`); compiled fp32 must be well inside it. Token ids must be
identical wherever the eager distances leave a margin larger than the compiled error."""
import copy

import pytest
import torch
from torch._dynamo.utils import counters

import tatitok_fast
from tatitok_fast import ImageBert, MaskGen_KL, MaskGen_VQ, TATiTok, TiTok, UViTBert
from tatitok_fast.compile import is_compiled, targets_of
from tatitok_fast.presets import tiny_titok_config
from tests.helpers import tiny_generator_config, tiny_text_encoder, tiny_tokenizer_config
from tests.models.test_maskgit import small_config


@pytest.fixture(autouse=True)
def _fresh_dynamo(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _bf16_tol(fn, model, *args) -> float:
    """The relative error the same model makes in bf16 (eager) against fp32, floored: any
    difference a compiled fp32 graph may show must be far below what bf16 already costs."""
    low = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        err = _rel(fn(low, *[a.to(torch.bfloat16) if a.is_floating_point() else a for a in args]),
                   fn(model, *args))
    return max(err, 1e-3)


def _vq_ids_agree(z: torch.Tensor, codebook: torch.Tensor, got: torch.Tensor, want: torch.Tensor, eps: float):
    """Ids equal except where the eager margin between the two codes is below eps (relative)."""
    got, want = got.reshape(-1), want.reshape(-1)
    diff = (got != want).nonzero().flatten()
    if diff.numel():
        d = torch.cdist(z[diff].double(), codebook.double())
        gap = (d.gather(1, got[diff, None]) - d.gather(1, want[diff, None])).abs().squeeze(1)
        assert bool((gap <= eps * d.min(1).values.clamp_min(1e-6)).all()), f"ids differ at {diff.tolist()}"
    assert diff.numel() <= max(1, got.numel() // 50)


def test_compile_rejects_other_models_and_bad_args():
    with pytest.raises(ValueError, match="model: expected a tatitok_fast TATiTok"):
        tatitok_fast.compile(torch.nn.Linear(2, 2))
    model = TATiTok(tiny_tokenizer_config("vq")).eval()
    with pytest.raises(ValueError, match="dynamic: expected True, False or None"):
        tatitok_fast.compile(model, dynamic="yes")
    assert not is_compiled(model)
    assert targets_of(UViTBert(small_config("UViT"))) == ("token_logits",)


@pytest.mark.slow  # two ViTs compiled per mode: 70-100 s on a loaded 2-core machine
@pytest.mark.parametrize("mode", ["vq", "vae"])
def test_tatitok_encode_decode_compiled_matches_eager(mode, tmp_path):
    torch.manual_seed(0)
    eager = TATiTok(tiny_tokenizer_config(mode)).eval()
    model = tatitok_fast.compile(copy.deepcopy(eager), cache_dir=tmp_path / "cache")
    assert is_compiled(model) and type(model) is TATiTok
    assert sorted(model.state_dict()) == sorted(eager.state_dict())  # no _orig_mod. prefixes
    width = eager.decoder.text_embed_dim
    x, g = torch.rand(2, 3, 32, 32), torch.randn(2, 77, width)
    with torch.no_grad():
        z_e, r_e = eager.encode(x)
        z_c, r_c = model.encode(x)
        tol = _bf16_tol(lambda m, z, t: m.decode(z, t), eager, z_e, g)
        assert _rel(model.decode(z_e, g), eager.decode(z_e, g)) < tol / 10
        if mode == "vq":
            zq = eager.encoder(pixel_values=x, latent_tokens=eager.latent_tokens)  # (B, C, 1, N)
            zq = zq.permute(0, 2, 3, 1).reshape(-1, zq.shape[1])
            _vq_ids_agree(zq, eager.quantize.embedding.weight, r_c["min_encoding_indices"],
                          r_e["min_encoding_indices"], 1e-4)
            tokens = r_e["min_encoding_indices"]
        else:
            assert _rel(r_c.mean, r_e.mean) < tol / 10
            tokens = r_e.mean
        assert _rel(model.decode_tokens(tokens, g), eager.decode_tokens(tokens, g)) < tol / 10
        graphs = _graphs()
        assert graphs >= 2  # encoder and decoder
        x3, g3 = torch.rand(3, 3, 32, 32), torch.randn(3, 77, width)  # a second batch size
        _, r3 = model.encode(x3)
        z3, r3_e = eager.encode(x3)  # KL: encode draws a posterior sample; decode the same one
        out3 = model.decode(z3, g3)
        assert _graphs() == graphs, "a new batch size recompiled"
        assert _rel(out3, eager.decode(z3, g3)) < tol / 10
        if mode == "vae":
            assert _rel(r3.mean, r3_e.mean) < tol / 10
    assert any((tmp_path / "cache").rglob("*")), "nothing written to the cache_dir"


@pytest.mark.slow  # 31 s; TiTok's ViT blocks compile in CI through TA-TiTok's fullgraph test
def test_titok_compiled_matches_eager():
    torch.manual_seed(0)
    eager = TiTok(tiny_titok_config("vq")).eval()
    model = tatitok_fast.compile(copy.deepcopy(eager))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        _, r_e = eager.encode(x)
        _, r_c = model.encode(x)
        zq = torch.nn.functional.normalize(
            eager.encoder(pixel_values=x, latent_tokens=eager.latent_tokens), dim=1)  # l2-normalised codes
        zq = zq.permute(0, 2, 3, 1).reshape(-1, zq.shape[1])
        codebook = torch.nn.functional.normalize(eager.quantize.embedding.weight, dim=-1)
        _vq_ids_agree(zq, codebook, r_c["min_encoding_indices"], r_e["min_encoding_indices"], 1e-4)
        tokens = r_e["min_encoding_indices"]
        tol = _bf16_tol(lambda m, t: m.decode_tokens(t), eager, tokens)
        assert _rel(model.decode_tokens(tokens), eager.decode_tokens(tokens)) < tol / 10
        graphs = _graphs()
        t3 = torch.randint(0, eager.codebook_size, (3, 1, tokens.shape[-1]))
        assert _rel(model.decode_tokens(t3), eager.decode_tokens(t3)) < tol / 10
        assert _graphs() == graphs, "a new batch size recompiled"


def _assert_same_ids_or_margin(got: torch.Tensor, want: torch.Tensor) -> None:
    # sampled ids: a compiled logit differs by ~1e-6 relative, far below the Gumbel-max
    # margins of a random-weight model; the fixed seeds make this deterministic
    assert torch.equal(got, want), f"{(got != want).sum().item()} of {got.numel()} ids differ"


@pytest.mark.slow  # 28 s; a compiled generator runs in CI (ImageBert)
def test_maskgen_vq_generate_compiled_matches_eager():
    torch.manual_seed(0)
    eager = MaskGen_VQ(tiny_generator_config("vq")).eval()
    model = tatitok_fast.compile(copy.deepcopy(eager))
    enc = tiny_text_encoder()
    kw = dict(text_encoder=enc, num_sample_steps=4, noise="torch")
    caps = ["a cat", "a dog"]
    want = eager.generate(caps, generator=torch.Generator().manual_seed(3), **kw)
    got = model.generate(caps, generator=torch.Generator().manual_seed(3), **kw)
    _assert_same_ids_or_margin(got, want)
    graphs = _graphs()
    assert graphs >= 1
    caps3 = ["a cat", "a dog", "a boat"]
    got3 = model.generate(caps3, generator=torch.Generator().manual_seed(4), **kw)
    assert _graphs() == graphs, "a new batch size recompiled"
    _assert_same_ids_or_margin(got3, eager.generate(caps3, generator=torch.Generator().manual_seed(4), **kw))


@pytest.mark.slow  # 28 s; a compiled generator runs in CI (ImageBert)
def test_maskgen_kl_sample_tokens_compiled_matches_eager():
    torch.manual_seed(0)
    eager = MaskGen_KL(tiny_generator_config("vae")).eval()
    model = tatitok_fast.compile(copy.deepcopy(eager))
    enc = tiny_text_encoder()
    kw = dict(num_iter=3, cfg=3.0, text_encoder=enc)
    with torch.no_grad():
        want = eager.sample_tokens(2, captions=["a", "b"], generator=torch.Generator().manual_seed(5), **kw)
        got = model.sample_tokens(2, captions=["a", "b"], generator=torch.Generator().manual_seed(5), **kw)
        # continuous tokens through a 10-step diffusion: errors compound, so the scale is
        # the bf16 model's own deviation on the same draw
        low = copy.deepcopy(eager).to(torch.bfloat16)
        bf = low.sample_tokens(2, captions=["a", "b"], generator=torch.Generator().manual_seed(5), **kw)
        tol = max(_rel(bf, want), 1e-3)
        assert _rel(got, want) < tol / 10
        graphs = _graphs()
        model.sample_tokens(3, captions=["a", "b", "c"], generator=torch.Generator().manual_seed(6), **kw)
        assert _graphs() == graphs, "a new batch size recompiled"


@pytest.mark.parametrize("cls, kind", [(ImageBert, "ViT"), pytest.param(UViTBert, "UViT", marks=pytest.mark.slow)])
def test_maskgit_generate_compiled_matches_eager(cls, kind):
    torch.manual_seed(0)
    eager = cls(small_config(kind)).eval()
    model = tatitok_fast.compile(copy.deepcopy(eager))
    kw = dict(num_sample_steps=4)
    want = eager.generate([1, 2], generator=torch.Generator().manual_seed(7), **kw)
    got = model.generate([1, 2], generator=torch.Generator().manual_seed(7), **kw)
    _assert_same_ids_or_margin(got, want)
    graphs = _graphs()
    got3 = model.generate([1, 2, 3], generator=torch.Generator().manual_seed(8), **kw)
    assert _graphs() == graphs, "a new batch size recompiled"
    _assert_same_ids_or_margin(got3, eager.generate([1, 2, 3], generator=torch.Generator().manual_seed(8), **kw))


@pytest.mark.slow  # 10 s
def test_compile_cache_is_reused_after_a_reset(tmp_path):
    # the FX-graph cache is on disk: after dynamo forgets everything, the same graphs load
    torch.manual_seed(0)
    cache = tmp_path / "shared_cache"
    eager = ImageBert(small_config("ViT")).eval()
    tatitok_fast.compile(copy.deepcopy(eager), cache_dir=cache).generate([1, 2], num_sample_steps=2)
    assert counters["inductor"]["fxgraph_cache_miss"] >= 1
    torch._dynamo.reset()
    counters.clear()
    tatitok_fast.compile(copy.deepcopy(eager), cache_dir=cache).generate([1, 2], num_sample_steps=2)
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1
    assert counters["inductor"]["fxgraph_cache_miss"] == 0


@pytest.mark.slow  # the CLI's --compile on top of the compiled-vs-eager tests: 50 s
def test_cli_reconstruct_compile_writes_the_eager_images(tmp_path):
    import numpy as np
    from PIL import Image

    from tatitok_fast.cli import main

    torch.manual_seed(0)
    TiTok(tiny_titok_config("vq")).save_pretrained(tmp_path / "tok")
    imgs = tmp_path / "images"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(imgs / f"{name}.png")
    common = ["reconstruct", str(imgs), "--tokenizer", str(tmp_path / "tok"), "--device", "cpu", "--no-progress",
              "--batch-size", "2"]
    assert main([*common, "-o", str(tmp_path / "eager")]) == 0
    assert main([*common, "-o", str(tmp_path / "compiled"), "--compile", "--compile-cache",
                 str(tmp_path / "cache")]) == 0
    for name in ("a", "b", "c"):
        want = np.asarray(Image.open(tmp_path / "eager" / f"{name}_recon.png"), dtype=np.int16)
        got = np.asarray(Image.open(tmp_path / "compiled" / f"{name}_recon.png"), dtype=np.int16)
        assert np.abs(got - want).max() <= 1  # uint8 rounding of fp32 images that differ by ~1e-6
    assert any((tmp_path / "cache").rglob("*"))


def test_cli_compile_names_the_option_of_a_model_without_a_compiled_path():
    import argparse

    from tatitok_fast.cli.common import CommandError
    from tatitok_fast.compile import compile_if_asked

    args = argparse.Namespace(compile=True, compile_cache=None)
    with pytest.raises(CommandError, match="--compile: --tokenizer gave a Linear, which has no compiled path"):
        compile_if_asked(args, torch.nn.Linear(2, 2), "--tokenizer", CommandError)
    model = torch.nn.Linear(2, 2)
    assert compile_if_asked(argparse.Namespace(compile=False), model, "--tokenizer") is model
    bad = argparse.Namespace(compile=True, compile_cache=__file__)  # a file, not a directory
    with pytest.raises(CommandError, match="--compile-cache: cache_dir: expected a directory"):
        compile_if_asked(bad, TATiTok(tiny_tokenizer_config("vq")).eval(), "--tokenizer", CommandError)


@pytest.mark.slow  # 14 s
def test_bf16_compiled_step_is_as_close_to_fp32_as_eager_bf16():
    # the speed mode: a bf16 model compiled (freezing folds bf16 weights; inductor may keep
    # fp32 intermediates): its logits are no further from the fp32 model's than eager bf16's
    torch.manual_seed(0)
    eager = ImageBert(small_config("ViT")).eval()
    low = copy.deepcopy(eager).to(torch.bfloat16)
    compiled = tatitok_fast.compile(copy.deepcopy(low))
    seq = torch.cat([torch.tensor([[70], [71], [72]]), torch.randint(0, 64, (3, 16))], dim=1)  # [class; ids]
    with torch.no_grad():
        want = eager.token_logits(seq)
        eager_err = _rel(low.token_logits(seq), want)
        got = compiled.token_logits(seq)
        assert got.dtype == torch.bfloat16 and got.shape == want.shape
        assert _rel(got, want) <= 2 * eager_err + 1e-3
        graphs = _graphs()
        compiled.token_logits(seq[:2])
        assert _graphs() == graphs, "a new batch size recompiled"
