"""ImageBert / UViTBert (TiTok's MaskGIT generators) against the official classes
(../shared/peer/1d-tokenizer/modeling/maskgit.py, imported at test time; needs transformers)
and the reference layouts/cases in ../shared/reference: state-dict keys and shapes of the
three zoo configs, forward logits, generate ids in the official RNG mode, save/load."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tatitok_fast import ImageBert, UViTBert
from tatitok_fast.ops import reference_mode
from tests.helpers import HAS_CUDA, REPO, assert_same_init, synthetic_weight
from tests.models.official_losses import import_official

SHARED = next((p for p in (REPO.parent / "shared", REPO / "shared") if (p / "reference").is_dir()),
              REPO.parent / "shared")
LAYOUT = SHARED / "reference" / "titok_layout.json"
ZOO = {"titok_l32": "generator_titok_l32_imagenet", "titok_b64": "generator_titok_b64_imagenet",
       "titok_s128": "generator_titok_s128_imagenet"}


@pytest.fixture(scope="module")
def official():
    """The official modeling.maskgit module (blocks.py prints its attention mode at import)."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return import_official("modeling.maskgit", deps=("transformers", "omegaconf", "einops", "huggingface_hub"))


@pytest.fixture(scope="module")
def layout():
    if not LAYOUT.is_file():
        pytest.skip(f"reference layout not found at {LAYOUT}")
    return json.loads(LAYOUT.read_text())


def small_config(model_type: str = "ViT", layers: int = 2) -> dict:
    return {"model": {"vq_model": {"codebook_size": 64, "num_latent_tokens": 16},
                      "generator": {"model_type": model_type, "hidden_size": 64, "num_hidden_layers": layers,
                                    "num_attention_heads": 4, "intermediate_size": 128, "dropout": 0.1,
                                    "attn_drop": 0.1, "image_seq_len": 16, "condition_num_classes": 10}},
            "dataset": {"preprocessing": {"crop_size": 256}}}


def _kind(name: str, shape) -> str:
    if name.endswith("LayerNorm.weight") or ".norm" in name and name.endswith("weight") or name == "norm.weight":
        return "norm_weight"
    if name.endswith("bias"):
        return "bias"
    if "embeddings" in name or name == "pos_embed":
        return "free"
    return "matrix"


def random_weights(sd: dict, seed: int = 3) -> dict:
    """Weights far from the init (so logits are not all near 0), as the parity cases draw them."""
    return {k: synthetic_weight(k, tuple(v.shape), seed, _kind(k, v.shape)) for k, v in sd.items()}


@pytest.fixture(scope="module", params=["ViT", "UViT"])
def pair(request, official):
    """(ours, official) small generators of one kind with the same random weights."""
    cls_ours, cls_off = (ImageBert, official.ImageBert) if request.param == "ViT" else (UViTBert, official.UViTBert)
    cfg = small_config(request.param, 2 if request.param == "ViT" else 4)
    ref = cls_off(copy.deepcopy(cfg)).eval()
    ref.load_state_dict(random_weights(ref.state_dict()))
    ours = cls_ours(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---------------------------------------------------------------------------------------
# Layouts

@pytest.mark.parametrize("preset", sorted(ZOO))
def test_zoo_layout_matches_official(preset, layout, official):
    """The official generator configs (on meta) expose exactly the official keys and shapes,
    against titok_layout.json and against the official classes."""
    entry = layout[ZOO[preset]]
    cfg = entry["config"]
    cls = UViTBert if entry["class"] == "UViTBert" else ImageBert
    with torch.device("meta"):
        ours = ImageBert.class_for_config(cfg)(cfg)
        ref = getattr(official, entry["class"])(copy.deepcopy(cfg))
    assert type(ours) is cls
    got = {k: list(v.shape) for k, v in ours.state_dict().items()}
    assert got == {k: list(v) for k, v in entry["state_dict"].items()}
    assert got == {k: list(v.shape) for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == entry["num_params"]


def test_interpolated_image_seq_len(tmp_path):
    """config.json as the official save writes it (image_seq_len unresolved) loads."""
    cfg = small_config()
    cfg["model"]["generator"]["image_seq_len"] = "${model.vq_model.num_latent_tokens}"
    torch.manual_seed(0)
    m = ImageBert(small_config())
    m.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    back = ImageBert.from_pretrained(tmp_path)
    assert back.image_seq_len == 16


# ---------------------------------------------------------------------------------------
# Forward

def test_parity_case_imagebert_s(tmp_path):
    """../shared/reference/parity_titok/imagebert_s: logits with and without the labels."""
    case_dir = SHARED / "reference" / "parity_titok" / "imagebert_s"
    if not case_dir.is_dir():
        pytest.skip(f"parity case not found at {case_dir}")
    sys.path.insert(0, str(SHARED / "reference" / "parity"))
    try:
        from rebuild import rebuild
    finally:
        sys.path.pop(0)
    case = rebuild(str(case_dir), str(tmp_path / "ckpt"))
    m = ImageBert.from_pretrained(tmp_path / "ckpt")
    inp, out = case["inputs"], case["outputs"]
    with torch.no_grad():
        logits = m(inp["input_ids"], inp["condition"], cond_drop_prob=0.0)
        uncond = m(inp["input_ids"], inp["condition"], cond_drop_prob=1.0)
    assert logits.shape == out["logits"].shape
    assert rel(logits, out["logits"]) < 1e-5
    assert rel(uncond, out["logits_uncond"]) < 1e-5
    assert rel(logits, out["logits_uncond"]) > 1e-2  # the label matters: the check can fail


def test_forward_matches_official(pair):
    ours, ref = pair
    torch.manual_seed(0)
    ids = torch.randint(0, 65, (3, 16))
    cond = torch.tensor([0, 7, 9])
    with torch.no_grad():
        for p in (0.0, 1.0):
            want = ref(ids, cond.clone(), cond_drop_prob=p)
            got = ours(ids, cond, cond_drop_prob=p)
            assert rel(got, want) < 1e-5, p
        torch.manual_seed(2)  # the label drop with 0 < p < 1 replays the official rand_like draw
        want = ref(ids, cond.clone(), cond_drop_prob=0.5)
        torch.manual_seed(2)
        assert rel(ours(ids, cond, cond_drop_prob=0.5), want) < 1e-5
        with reference_mode():  # the textbook attention path too
            assert rel(ours(ids, cond, cond_drop_prob=0.0), ref(ids, cond.clone(), cond_drop_prob=0.0)) < 1e-5


# ---------------------------------------------------------------------------------------
# generate

GENERATE_CASES = [
    dict(guidance_decay="constant", guidance_scale=3.0, randomize_temperature=4.5),
    dict(guidance_decay="linear", guidance_scale=4.5, randomize_temperature=9.5, softmax_temperature_annealing=True),
    dict(guidance_decay="linear", guidance_scale=3.0, randomize_temperature=1.0),
    dict(guidance_decay="power-cosine", guidance_scale=6.9, randomize_temperature=2.8,
         softmax_temperature_annealing=True, num_sample_steps=12),
    dict(guidance_decay="power-cosine", guidance_scale=2.0, guidance_scale_pow=1.5, randomize_temperature=4.5),
    dict(guidance_decay="constant", guidance_scale=0.0, randomize_temperature=4.5, softmax_temperature_annealing=True),
    dict(guidance_decay="linear", guidance_scale=4.5, randomize_temperature=0.0, num_sample_steps=5),  # no noise
    dict(guidance_decay="constant", guidance_scale=3.0, randomize_temperature=4.5, num_sample_steps=1),
    dict(guidance_decay="power-cosine", guidance_scale=6.9, randomize_temperature=2.8, num_sample_steps=32),
]


@pytest.mark.parametrize("kw", GENERATE_CASES, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_generate_matches_official(pair, kw):
    """Official RNG mode (the default): after torch.manual_seed the ids are the official ones."""
    ours, ref = pair
    cond = torch.tensor([0, 3, 9, 3, 5])
    torch.manual_seed(11)
    want = ref.generate(cond.clone(), **kw)
    after_ref = torch.rand(1)  # the official loop's RNG consumption is replayed too
    torch.manual_seed(11)
    got = ours.generate(cond, **kw)
    assert torch.equal(torch.rand(1), after_ref)
    assert got.dtype == torch.int64 and got.shape == (5, 16)
    assert torch.equal(got, want)
    assert int((got == ours.mask_token_id).sum()) == 0


def test_generate_reference_mode_matches_official(pair):
    """The fallback path (no fused kernel: the PyTorch twin, math attention) gives the same ids."""
    ours, ref = pair
    cond = torch.tensor([1, 2, 8])
    kw = dict(guidance_decay="linear", guidance_scale=4.5, randomize_temperature=9.5,
              softmax_temperature_annealing=True)
    torch.manual_seed(5)
    want = ref.generate(cond.clone(), **kw)
    torch.manual_seed(5)
    with reference_mode():
        got = ours.generate(cond, **kw)
    assert torch.equal(got, want)


def test_generate_philox_mode(pair):
    """noise="philox": the fused in-kernel noise, reproducible with a generator, all decoded."""
    ours, _ = pair
    cond = torch.tensor([0, 4, 9, 2])
    kw = dict(guidance_decay="linear", guidance_scale=4.5, randomize_temperature=9.5,
              softmax_temperature_annealing=True, noise="philox")
    a = ours.generate(cond, generator=torch.Generator().manual_seed(1), **kw)
    b = ours.generate(cond, generator=torch.Generator().manual_seed(1), **kw)
    c = ours.generate(cond, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (4, 16) and int(a.min()) >= 0 and int(a.max()) < ours.target_codebook_size


def test_generate_bf16_runs_the_same_loop(pair):
    """bf16 weights: the same loop runs (bf16 logits, the op upcasts) and gives valid ids;
    the bf16 logits are within bf16 rounding of the fp32 ones."""
    ours, _ = pair
    cond = torch.tensor([0, 4, 9, 2])
    kw = dict(guidance_decay="constant", guidance_scale=3.0, randomize_temperature=0.0)
    torch.manual_seed(0)
    want = ours.generate(cond, **kw)
    low = copy.deepcopy(ours).to(torch.bfloat16)
    torch.manual_seed(0)
    got = low.generate(cond, **kw)
    assert got.shape == want.shape and int(got.max()) < ours.target_codebook_size and int(got.min()) >= 0
    ids = torch.randint(0, 65, (2, 16))
    with torch.no_grad():
        assert rel(low(ids, cond[:2], cond_drop_prob=0.0), ours(ids, cond[:2], cond_drop_prob=0.0)) < 3e-2


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_generate_cuda_graph_matches_eager(pair):
    """On CUDA: the captured loop (philox noise) replays the eager loop's ids for one seed, and
    the official RNG mode still gives the official ids."""
    ours, ref = pair
    ours, ref = copy.deepcopy(ours).cuda(), copy.deepcopy(ref).cuda()
    cond = torch.tensor([0, 4, 9, 2], device="cuda")
    kw = dict(guidance_decay="power-cosine", guidance_scale=6.9, randomize_temperature=2.8,
              softmax_temperature_annealing=True, num_sample_steps=12)
    torch.manual_seed(3)
    eager = ours.generate(cond, noise="philox", use_cuda_graph=False, **kw)
    for _ in range(2):  # capture, then replay
        torch.manual_seed(3)
        assert torch.equal(ours.generate(cond, noise="philox", use_cuda_graph=True, **kw), eager)
    torch.manual_seed(3)
    want = ref.generate(cond.clone(), **kw)
    torch.manual_seed(3)
    assert torch.equal(ours.generate(cond, **kw), want)


# ---------------------------------------------------------------------------------------
# Init and training masks

@pytest.mark.parametrize("model_type", ["ViT", "UViT"])
def test_init_matches_official(official, model_type):
    cfg = small_config(model_type, 4)
    ours_cls, off_cls = (ImageBert, official.ImageBert) if model_type == "ViT" else (UViTBert, official.UViTBert)
    torch.manual_seed(0)
    ours = ours_cls(cfg).state_dict()
    torch.manual_seed(1)
    assert_same_init(ours, off_cls(copy.deepcopy(cfg)).state_dict())


def test_masking_input_tokens_matches_official(pair):
    ours, ref = pair
    tokens = torch.randint(0, 64, (6, 16))
    torch.manual_seed(4)
    want_ids, want_masks = ref.masking_input_tokens(tokens)
    torch.manual_seed(4)
    got_ids, got_masks = ours.masking_input_tokens(tokens)
    assert torch.equal(got_masks, want_masks) and torch.equal(got_ids, want_ids)
    assert bool(got_masks.any(dim=1).all())
    with pytest.raises(ValueError, match=r"input_tokens: ids must be in \[0, K\)"):
        ours.masking_input_tokens(tokens + 64)


# ---------------------------------------------------------------------------------------
# Save / load

def test_save_load_official_layout(pair, tmp_path, official):
    """save_pretrained writes the official keys; the official from_pretrained and ours read it
    back to the same logits."""
    from safetensors.torch import load_file

    ours, ref = pair
    ours.save_pretrained(tmp_path)
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert keys == set(ref.state_dict())
    ids, cond = torch.randint(0, 65, (2, 16)), torch.tensor([1, 6])
    with torch.no_grad():
        want = ref(ids, cond.clone(), cond_drop_prob=0.0)
        back = type(ours).from_pretrained(tmp_path)
        assert type(back) is type(ours)
        assert torch.equal(back(ids, cond, cond_drop_prob=0.0), ours(ids, cond, cond_drop_prob=0.0))
        off = type(ref).from_pretrained(str(tmp_path)).eval()
        assert rel(off(ids, cond.clone(), cond_drop_prob=0.0), want) == 0.0
    # ImageBert.from_pretrained picks the class from model.generator.model_type
    assert type(ImageBert.from_pretrained(tmp_path)) is type(ours)


def test_from_pretrained_strict(pair, tmp_path):
    from safetensors.torch import load_file, save_file

    ours, _ = pair
    ours.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd.pop(sorted(sd)[0])
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(Exception, match="missing keys"):
        type(ours).from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------
# Bad input

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return ImageBert(small_config()).eval()


@pytest.mark.parametrize("condition, exc, match", [
    (torch.tensor([0, 10]), ValueError, r"condition: class ids must be in \[0, 10\).*got 10"),
    (torch.tensor([-1, 2]), ValueError, r"condition: .*got -1"),
    (torch.tensor([0.0, 1.0]), ValueError, "condition: expected a \\(B,\\) integer tensor"),
    (torch.tensor([[0, 1]]), ValueError, "condition: expected a \\(B,\\) integer tensor"),
    ("cat", TypeError, "condition: expected a \\(B,\\) tensor"),
    ([1, 2.5], TypeError, "condition: expected class ids"),
])
def test_generate_bad_condition(tiny, condition, exc, match):
    with pytest.raises(exc, match=match):
        tiny.generate(condition)


def test_generate_accepts_a_list(tiny):
    torch.manual_seed(0)
    a = tiny.generate([1, 2], num_sample_steps=4)
    torch.manual_seed(0)
    assert torch.equal(a, tiny.generate(torch.tensor([1, 2]), num_sample_steps=4))


@pytest.mark.parametrize("kw, match", [
    (dict(guidance_decay="cosine"), "guidance_decay: expected one of"),
    (dict(noise="numpy"), "noise: expected one of"),
    (dict(num_sample_steps=0), "num_sample_steps"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(randomize_temperature=-1.0), "randomize_temperature"),
    (dict(guidance_scale_pow="3"), "guidance_scale_pow"),
])
def test_generate_bad_arguments(tiny, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tiny.generate(torch.tensor([1]), **kw)


def test_forward_bad_input(tiny):
    ids = torch.zeros(2, 16, dtype=torch.long)
    with pytest.raises(ValueError, match="input_ids: expected integer token ids"):
        tiny(ids.float(), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"input_ids: ids must be in \[0, K\]"):
        tiny(ids + 65, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="condition: expected 2 class ids"):
        tiny(ids, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"condition: class ids must be in \[0, 10\]"):
        tiny(ids, torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="input_ids: expected at most image_seq_len=16"):
        tiny(torch.zeros(2, 17, dtype=torch.long), torch.tensor([0, 1]))


def test_bad_config():
    cfg = small_config()
    cfg["model"]["generator"]["num_attention_heads"] = 5
    with pytest.raises(ValueError, match="hidden_size must be divisible by num_attention_heads"):
        ImageBert(cfg)
    cfg = small_config()
    del cfg["model"]["generator"]["image_seq_len"]
    with pytest.raises(ValueError, match="model.generator.image_seq_len must be a positive int"):
        ImageBert(cfg)


def test_preset_name_means_the_generator_repo():
    """A TiTok preset name is its generator's Hub repo (offline here: the error names it)."""
    with pytest.raises(Exception, match="yucornetto/generator_titok_l32_imagenet"):
        ImageBert.from_pretrained("titok_l32", local_files_only=True)


@pytest.mark.parametrize("model_type", ["ViT", "UViT"])
def test_training_forward(model_type):
    """Training mode: the config's dropout applies (BERT: hidden and attention; the official
    U-ViT has none); gradients reach every parameter."""
    cls = ImageBert if model_type == "ViT" else UViTBert
    ids, cond = torch.randint(0, 65, (2, 16)), torch.tensor([1, 2])
    torch.manual_seed(0)
    m = cls(small_config(model_type, 2))
    m.load_state_dict(random_weights(m.state_dict()))
    with torch.no_grad():
        want = m.eval()(ids, cond, cond_drop_prob=0.0)
        got = m.train()(ids, cond, cond_drop_prob=0.0)
    assert torch.equal(got, want) == (model_type == "UViT")
    cfg = small_config(model_type, 2)
    cfg["model"]["generator"].update(dropout=0.0, attn_drop=0.0)
    m0 = cls(cfg)
    m0.load_state_dict(m.state_dict())
    m0.train()
    out = m0(ids, cond, cond_drop_prob=0.0)
    assert rel(out.detach(), want) < 1e-6
    out.square().mean().backward()
    assert [n for n, p in m0.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_graph_path_plumbing_on_cpu(pair, monkeypatch):
    """The CUDA-graph branch of generate (static inputs, one capture per key, replay) with a
    stand-in capture that, as the real one, undoes its warm-up's random draws: the replayed
    ids equal the eager ones for one seed, and a second batch of classes reuses the capture."""
    from tatitok_fast.models.generators import maskgit
    from tatitok_fast.models.generators.graph_runner import CapturedLoop, _GraphRunner

    captures = []

    def capture(fn, static_in):
        state = torch.get_rng_state()
        fn(*static_in)  # warm-up
        torch.set_rng_state(state)
        out = fn(*static_in).clone()
        torch.set_rng_state(state)
        captures.append(1)
        return CapturedLoop(lambda: out.copy_(fn(*static_in)), out, lambda: None)

    ours = copy.deepcopy(pair[0])
    kw = dict(guidance_decay="linear", guidance_scale=4.5, randomize_temperature=9.5, noise="philox")
    for cond in (torch.tensor([0, 4, 9]), torch.tensor([5, 1, 2])):
        torch.manual_seed(8)
        eager = ours.generate(cond, **kw)
        monkeypatch.setattr(maskgit, "_use_graph", lambda *a: True)
        ours._graphs = ours._graphs if captures else _GraphRunner(capture=capture)
        torch.manual_seed(8)
        graphed = ours.generate(cond, **kw)
        monkeypatch.setattr(maskgit, "_use_graph", lambda *a: False)
        assert torch.equal(graphed, eager)
    assert captures == [1]
