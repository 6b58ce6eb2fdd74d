import json
import math

import pytest
import torch

from tatitok_fast.models.generators.maskgen import MaskGen_KL, MaskGen_VQ, get_masking_ratio
from tatitok_fast.presets import GENERATORS
from tests.helpers import (FIXTURES, HAS_CUDA, tiny_generator_config, tiny_text_encoder, write_parity_checkpoint)

LAYOUT = json.loads((FIXTURES / "official_layout.json").read_text())


def _rel_err(got, want):
    return ((got - want).norm() / want.norm()).item()


@pytest.fixture(scope="module")
def text_encoder():
    return tiny_text_encoder()


@pytest.fixture(scope="module")
def vq_model():
    torch.manual_seed(0)
    return MaskGen_VQ(tiny_generator_config("vq")).eval()


# ---------------------------------------------------------------------------------------
# Checkpoints and parity

def test_vq_parity_with_reference(tmp_path):
    _, case = write_parity_checkpoint("maskgen_vq_s", tmp_path)
    model = MaskGen_VQ.from_pretrained(tmp_path)
    assert model.lm_head.weight is model.embeddings.weight  # stored once, re-tied
    i = case["inputs"]
    with torch.no_grad():
        logits, masks = model(i["input_ids"], i["condition"], i["condition_pooled"], i["aesthetic_score"])
    assert masks is None
    assert _rel_err(logits, case["outputs"]["logits"]) <= 1e-5


def test_vq_save_pretrained_stores_tied_weight_once(tmp_path):
    write_parity_checkpoint("maskgen_vq_s", tmp_path / "src")
    model = MaskGen_VQ.from_pretrained(tmp_path / "src")
    model.save_pretrained(tmp_path / "out")
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "out" / "model.safetensors")).keys()
    assert "embeddings.weight" in keys and "lm_head.weight" not in keys
    again = MaskGen_VQ.from_pretrained(tmp_path / "out")
    assert torch.equal(again.lm_head.weight, model.embeddings.weight)


@pytest.mark.parametrize("preset", sorted(GENERATORS))
def test_preset_layout_matches_official(preset):
    cls = MaskGen_VQ if "_vq_" in preset else MaskGen_KL
    with torch.device("meta"):
        model = cls(GENERATORS[preset])
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == LAYOUT[preset]["state_dict"]
    # the official count sums the state dict, where the tied LM head appears twice
    assert sum(v.numel() for v in model.state_dict().values()) == LAYOUT[preset]["num_params"]


def test_wrong_kind_of_config_is_refused():
    with pytest.raises(ValueError, match="this is a MaskGen_KL config"):
        MaskGen_VQ(GENERATORS["maskgen_kl_l"])
    with pytest.raises(ValueError, match="this is a MaskGen_VQ config"):
        MaskGen_KL(GENERATORS["maskgen_vq_l"])


# ---------------------------------------------------------------------------------------
# MaskGen-VQ sampling

def reference_generate(model, cond, pooled, null_c, null_p, guidance_scale, randomize_temperature, aes, steps,
                       decay, decay_pow=1.0, prob_sorting=True):
    """MaskGen_VQ.generate as the reference writes it (bytedance/1d-tokenizer 942a96f), step by
    step in plain torch on the model's own forward, Gumbel noise from torch.rand."""
    n, seq_len, mask_id = cond.shape[0], model.image_seq_len, model.mask_token_id
    none_c, none_p = null_c.repeat(n, 1, 1), null_p.repeat(n, 1, 1)
    ids = torch.full((n, seq_len), mask_id)
    cfg_scale = guidance_scale if decay == "none" else 0.0
    aes_t = torch.full((n * 2,), aes)

    def gumbel(t):
        u = torch.zeros_like(t).uniform_(0, 1)
        return -torch.log((-torch.log(u.clamp(min=1e-20))).clamp(min=1e-20))

    for step in range(steps):
        ratio = 1.0 * (step + 1) / steps
        annealed = randomize_temperature * (1.0 - ratio)
        is_mask = ids == mask_id
        if decay == "cosine":
            scale_step = (1 - torch.cos((ratio ** (torch.ones(1) * decay_pow)) * torch.pi)) * 1 / 2
            cfg_scale = (guidance_scale - 1) * scale_step + 1
        elif decay == "linear":
            cfg_scale = ratio * (guidance_scale - 1) + 1
        logits = model(torch.cat([ids, ids]), torch.cat([cond, none_c]), torch.cat([pooled, none_p]), aes_t)[0]
        c, u = logits[:n], logits[n:]
        logits = (c + (c - u) * cfg_scale) / (0.5 + 0.8 * (1 - ratio))
        sampled = (logits + annealed * gumbel(logits)).argmax(dim=-1)
        sampled_logits = torch.gather(logits, -1, sampled.unsqueeze(-1)).squeeze(-1)
        sampled = torch.where(is_mask, sampled, ids)
        sampled_logits = torch.where(is_mask, sampled_logits, math.inf).float()
        mask_len = torch.floor(seq_len * get_masking_ratio(ratio, "arccos"))
        mask_len = torch.maximum(torch.Tensor([1]), torch.minimum(is_mask.sum(-1, keepdim=True) - 1, mask_len))[0].squeeze()
        conf = sampled_logits + annealed * gumbel(sampled_logits) if prob_sorting else sampled_logits
        cut_off = torch.sort(conf, dim=-1)[0][:, mask_len.long() - 1:mask_len.long()]
        ids = sampled if step == steps - 1 else torch.where(conf <= cut_off, mask_id, sampled)
    return ids


@pytest.mark.parametrize("decay, prob_sorting", [("cosine", True), ("linear", True), ("flippedcosine", True),
                                                 ("none", True), ("cosine", False)])
def test_vq_generate_reproduces_reference_loop(vq_model, text_encoder, decay, prob_sorting):
    captions = ["a cat on a mat", "a red car", ""]
    kw = dict(guidance_scale=4.0, randomize_temperature=2.0, sample_aesthetic_score=6.5, num_sample_steps=6,
              guidance_decay=decay, prob_sorting=prob_sorting)
    torch.manual_seed(11)
    ours = vq_model.generate(captions, text_encoder=text_encoder, noise="torch", **kw)
    enc, null = text_encoder(captions), text_encoder.empty_prompt(1)
    torch.manual_seed(11)
    with torch.no_grad():
        ref = reference_generate(vq_model, enc.penultimate, enc.pooled, null.penultimate, null.pooled, 4.0, 2.0, 6.5, 6,
                                 decay, prob_sorting=prob_sorting)
    assert torch.equal(ours, ref)


def test_vq_generate_fused_noise(vq_model, text_encoder):
    captions = ["a cat", "a dog", "a bird", "a fish"]
    g = torch.Generator().manual_seed(5)
    ids = vq_model.generate(captions, text_encoder=text_encoder, num_sample_steps=8, generator=g)
    assert ids.shape == (4, vq_model.image_seq_len) and ids.dtype == torch.int64
    assert bool(((ids >= 0) & (ids < vq_model.target_codebook_size)).all()), "ids outside the codebook / mask id left"
    g.manual_seed(5)
    assert torch.equal(ids, vq_model.generate(captions, text_encoder=text_encoder, num_sample_steps=8, generator=g))
    g.manual_seed(6)
    assert not torch.equal(ids, vq_model.generate(captions, text_encoder=text_encoder, num_sample_steps=8, generator=g))
    one = vq_model.generate(["a cat"], text_encoder=text_encoder, num_sample_steps=1)
    assert one.shape == (1, vq_model.image_seq_len) and bool((one < vq_model.target_codebook_size).all())


def test_vq_generate_with_reference_clip_pair(vq_model, text_encoder):
    torch.manual_seed(3)
    a = vq_model.generate(["a boat"], clip_tokenizer=text_encoder.tokenizer, clip_encoder=text_encoder.model,
                          sample_aesthetic_score=6.5, num_sample_steps=4, noise="torch")
    torch.manual_seed(3)
    b = vq_model.generate(["a boat"], text_encoder=text_encoder, sample_aesthetic_score=6.5, num_sample_steps=4,
                          noise="torch")
    assert torch.equal(a, b)


def test_vq_schedule_reveals_every_token(vq_model):
    sched = vq_model.sampling_schedule(8, 12.0, 2.0, True, "cosine", 1.0, True)
    still_masked = [vq_model.image_seq_len] + [s.mask_len for s in sched[:-1]]
    assert all(s.mask_len < before for s, before in zip(sched[:-1], still_masked)), "every step reveals a token"
    assert all(1 <= s.mask_len for s in sched)
    assert sched[-1].last and sched[-1].gumbel_temperature == 0.0 and not any(s.last for s in sched[:-1])


def test_vq_training_forward(vq_model):
    model = MaskGen_VQ(vq_model.config).train()
    ids = torch.randint(0, 64, (3, 16))
    logits, masks = model(ids, torch.randn(3, 77, 64), torch.randn(3, 1, 64), torch.full((3,), 6.0))
    assert logits.shape == (3, 16, 64) and masks.shape == (3, 16) and bool((masks.sum(1) >= 1).all())
    logits.float().logsumexp(-1).mean().backward()
    assert model.embeddings.weight.grad is not None and model.blocks[0].attn.to_q.weight.grad is not None


def test_vq_bad_inputs(vq_model, text_encoder):
    with pytest.raises(ValueError, match="captions: expected at least one prompt"):
        vq_model.generate([], text_encoder=text_encoder)
    with pytest.raises(TypeError, match="captions: expected a list of strings"):
        vq_model.generate([1, 2], text_encoder=text_encoder)
    with pytest.raises(ValueError, match="guidance_decay: expected one of"):
        vq_model.generate(["a"], text_encoder=text_encoder, guidance_decay="exp")
    with pytest.raises(ValueError, match=r"num_sample_steps: expected an int in \[1, 1024\]"):
        vq_model.generate(["a"], text_encoder=text_encoder, num_sample_steps=0)
    with pytest.raises(ValueError, match="guidance_scale: expected a finite number >= 0"):
        vq_model.generate(["a"], text_encoder=text_encoder, guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="clip_tokenizer, clip_encoder: pass both"):
        vq_model.generate(["a"], clip_encoder=text_encoder.model)
    with pytest.raises(ValueError, match="use_cuda_graph: CUDA graphs need a CUDA model"):
        vq_model.generate(["a"], text_encoder=text_encoder, use_cuda_graph=True)
    with pytest.raises(ValueError, match="aesthetic_score: this model is micro-conditioned"):
        vq_model(torch.zeros(1, 16, dtype=torch.long), torch.randn(1, 77, 64), torch.randn(1, 1, 64))
    with pytest.raises(ValueError, match=r"condition: expected \(B, 77, 64\)"):
        vq_model(torch.zeros(1, 16, dtype=torch.long), torch.randn(1, 77, 32), torch.randn(1, 1, 64), torch.ones(1))


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_vq_cuda_graph_replay(vq_model, text_encoder):
    model = MaskGen_VQ(vq_model.config).cuda().eval()
    model.load_state_dict(vq_model.state_dict())
    enc = tiny_text_encoder().to("cuda")
    first = model.generate(["a cat", "a dog"], text_encoder=enc, num_sample_steps=6)  # captures the graph
    torch.manual_seed(1)
    a = model.generate(["a cat", "a dog"], text_encoder=enc, num_sample_steps=6)
    torch.manual_seed(1)
    b = model.generate(["a cat", "a dog"], text_encoder=enc, num_sample_steps=6)
    assert len(model._graphs.graphs) == 1
    assert torch.equal(a, b) and bool((a < 64).all()) and first.shape == a.shape
    eager = model.generate(["a cat", "a dog"], text_encoder=enc, num_sample_steps=6, use_cuda_graph=False)
    assert eager.shape == a.shape and bool((eager < 64).all())


# ---------------------------------------------------------------------------------------
# MaskGen-KL

@pytest.fixture(scope="module")
def kl_model():
    torch.manual_seed(0)
    return MaskGen_KL(tiny_generator_config("vae")).eval()


def test_kl_parity_with_reference(tmp_path):
    _, case = write_parity_checkpoint("maskgen_kl_s", tmp_path)
    model = MaskGen_KL.from_pretrained(tmp_path)
    i, o = case["inputs"], case["outputs"]
    with torch.no_grad():
        cond, pooled = model.project_conditions(i["condition"], i["condition_pooled"], i["aesthetic_score"])
        z = model.forward_mae_decoder(i["tokens"], i["mask"], cond, pooled)
        net = model.diffloss.net(i["x_t"], i["t"], z.reshape(-1, z.shape[-1]))
    assert _rel_err(cond, o["condition"]) <= 1e-5
    assert _rel_err(pooled, o["condition_pooled"]) <= 1e-5
    assert _rel_err(z, o["z"]) <= 1e-5
    assert _rel_err(net, o["diffloss_net"]) <= 1e-5


def test_kl_sample_tokens(kl_model, text_encoder):
    g = torch.Generator().manual_seed(2)
    captions = ["a cat", "a dog", "a tree"]
    tokens = kl_model.sample_tokens(3, num_iter=6, cfg=3.0, captions=captions, aes_scores=6.5,
                                    text_encoder=text_encoder, generator=g)
    assert tokens.shape == (3, 4, 1, 16) and tokens.dtype == torch.float32 and bool(tokens.isfinite().all())
    assert bool((tokens.abs().sum(1) > 0).all()), "every token position is sampled"
    g.manual_seed(2)
    again = kl_model.sample_tokens(3, num_iter=6, cfg=3.0, captions=captions, aes_scores=6.5,
                                   text_encoder=text_encoder, generator=g)
    assert torch.equal(tokens, again)
    no_cfg = kl_model.sample_tokens(1, num_iter=40, cfg=1.0, captions=["x"], text_encoder=text_encoder,
                                    cfg_schedule="constant")  # more steps than tokens
    assert no_cfg.shape == (1, 4, 1, 16) and bool(no_cfg.isfinite().all())


def test_kl_schedule_reveals_each_token_once(kl_model):
    for num_iter in (1, 5, 32, 50):
        sched = kl_model.sampling_schedule(num_iter, 3.0, "linear")
        revealed = sum(stop - start for s in sched for start, stop in [s.revealed])
        assert revealed == kl_model.seq_len and sched[-1].mask_len == 0


def test_kl_training_forward_runs_and_trains(kl_model):
    model = MaskGen_KL(kl_model.config).train()
    imgs = torch.randn(4, 8, 1, 16)
    loss, logs = model(imgs, torch.randn(4, 77, 64), torch.randn(4, 1, 64), torch.full((4,), 6.0))
    assert loss.ndim == 0 and bool(loss.isfinite()) and "diff_loss" in logs
    loss.backward()
    assert model.z_proj.weight.grad is not None and model.decoder_blocks[0].attn.to_q.weight.grad is not None
    assert model.diffloss.net.input_proj.weight.grad is not None


def test_kl_init_matches_reference_quirk(kl_model):
    # the reference's xavier pass reaches the DiffLoss head: its adaLN layers are not zero
    assert kl_model.diffloss.net.final_layer.adaLN_modulation[1].weight.abs().sum() > 0


def test_kl_bad_inputs(kl_model, text_encoder):
    with pytest.raises(ValueError, match="captions: expected bsz=2 captions"):
        kl_model.sample_tokens(2, captions=["a"], text_encoder=text_encoder)
    with pytest.raises(ValueError, match=r"num_iter: expected an int in \[1, 1024\]"):
        kl_model.sample_tokens(1, captions=["a"], num_iter=0, text_encoder=text_encoder)
    with pytest.raises(ValueError, match="cfg_schedule: expected 'linear' or 'constant'"):
        kl_model.sample_tokens(1, captions=["a"], cfg_schedule="cosine", text_encoder=text_encoder)
    with pytest.raises(ValueError, match=r"imgs: expected posterior parameters \(B, 8, 1, 16\)"):
        kl_model(torch.randn(2, 4, 1, 16), torch.randn(2, 77, 64), torch.randn(2, 1, 64), torch.ones(2))


def test_fused_and_reference_paths_agree(vq_model, text_encoder):
    from tatitok_fast.ops import reference_mode

    ids = torch.randint(0, 65, (2, 16))
    cond, pooled, aes = torch.randn(2, 77, 64), torch.randn(2, 1, 64), torch.full((2,), 6.0)
    with torch.no_grad():
        fused = vq_model(ids, cond, pooled, aes)[0]
        with reference_mode():
            ref = vq_model(ids, cond, pooled, aes)[0]
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)
    torch.manual_seed(4)
    a = vq_model.generate(["a", "b"], text_encoder=text_encoder, num_sample_steps=4, noise="torch")
    torch.manual_seed(4)
    with reference_mode():
        b = vq_model.generate(["a", "b"], text_encoder=text_encoder, num_sample_steps=4, noise="torch")
    assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["vq", "vae"])
def test_bf16_pipeline_end_to_end(text_encoder, mode):
    """bf16 weights everywhere (the fast path's precision): fp32 tokens and text states
    flow into bf16 models, and images come out in [0, 1]."""
    from tatitok_fast import TATiTok, TextToImage
    from tatitok_fast.presets import tiny_tokenizer_config

    torch.manual_seed(0)
    gen = (MaskGen_VQ if mode == "vq" else MaskGen_KL)(tiny_generator_config(mode)).eval().to(torch.bfloat16)
    tok = TATiTok(tiny_tokenizer_config(mode)).eval().to(torch.bfloat16)
    images = TextToImage(gen, tok, text_encoder)(["a red cube", "a blue ball"], steps=3)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert bool(images.isfinite().all()) and images.min() >= 0 and images.max() <= 1


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_vq_sampling_loop_has_no_host_sync(vq_model):
    model = MaskGen_VQ(vq_model.config).cuda().eval()
    sched = model.sampling_schedule(4, 12.0, 2.0, True, "cosine", 1.0, True)
    ctx, temb = torch.randn(4, 77, 64, device="cuda"), torch.randn(4, 64, device="cuda")
    ctx, temb = model.project_conditions(ctx, temb.unsqueeze(1)[:, :, :64], torch.full((4,), 6.5, device="cuda"))
    ids = torch.full((2, 16), model.mask_token_id, device="cuda")
    with torch.no_grad():
        model._sample_loop(ctx, temb, ids, sched, None, "philox")  # warm-up
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = model._sample_loop(ctx, temb, ids, sched, None, "philox")
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert bool((out < 64).all())


def test_load_generator_picks_the_class_from_the_config(tmp_path, kl_model):
    from tatitok_fast.models.generators.maskgen import load_generator

    kl_model.save_pretrained(tmp_path / "kl")
    assert type(load_generator(tmp_path / "kl")) is MaskGen_KL
    with pytest.raises(ValueError, match="this is a MaskGen_KL config"):
        MaskGen_VQ.from_pretrained(tmp_path / "kl")
