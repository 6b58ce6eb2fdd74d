"""MaskGen training side: the KL training forward against the reference's (its DiffLoss call
corrected), gradient checkpointing that really recomputes, and the random parts (caption
dropout, masking ratios) checked against their distributions with seeded scipy tests."""
import math

import pytest
import torch

from tatitok_fast import MaskGen_KL, MaskGen_VQ, TATiTok
from tests.helpers import tiny_generator_config, tiny_text_encoder, tiny_tokenizer_config
from tests.models.test_maskgen_loss import import_official, official_config, rel_err


def _kl_inputs(model, b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    c, n, w = model.vae_embed_dim, model.seq_len, model.text_embed_dim
    imgs = torch.cat([torch.randn(b, c, 1, n, generator=g), -1.0 + 0.5 * torch.randn(b, c, 1, n, generator=g)], 1)
    return imgs, torch.randn(b, 77, w, generator=g), torch.randn(b, 1, w, generator=g), 4 + 3 * torch.rand(b, generator=g)


# ---------------------------------------------------------------------------------------
# MaskGen-KL training forward vs the reference

def test_maskgen_kl_training_forward_matches_reference(monkeypatch):
    """Same weights and inputs; the reference's random draws (posterior noise, orders, masking
    rate, diffusion t and noise) replaced by ours at their source; its DiffLoss call without the
    `text_condition` argument it rejects."""
    maskgen = import_official("modeling.maskgen")
    cfg = tiny_generator_config("vae")
    torch.manual_seed(0)
    ours = MaskGen_KL(cfg).train()
    ref = maskgen.MaskGen_KL(official_config(cfg)).train()
    ref.load_state_dict(ours.state_dict(), strict=True)
    imgs, cond, pooled, aes = _kl_inputs(ours)
    b, n, c, m = imgs.shape[0], ours.seq_len, ours.vae_embed_dim, ours.diffusion_batch_mul

    g = torch.Generator().manual_seed(2)
    eps = torch.randn(b, c, 1, n, generator=g)  # posterior noise
    orders = torch.rand(b, n, generator=g).argsort(-1)
    t_mask = torch.tensor([0.3])  # rate arccos(0.3) / (pi / 2) = 0.806: ceil(16 * 0.806) = 13 masked
    t_diff = torch.randint(0, 1000, (m * b * n,), generator=g)
    noise = torch.randn(m * b * n, c, generator=g)
    seen = {}

    # the reference: its own code, the random sources swapped
    class Posterior(maskgen.DiagonalGaussianDistribution):
        def sample(self):  # the reference's sample() with its torch.randn replaced by eps
            return self.mean.float() + self.std.float() * eps

    ref_masking, ref_diffloss = ref.random_masking, ref.diffloss.forward
    ref_losses = ref.diffloss.train_diffusion.training_losses
    monkeypatch.setattr(maskgen, "DiagonalGaussianDistribution", Posterior)
    monkeypatch.setattr(ref, "sample_orders", lambda bsz: orders)  # (numpy shuffle + .cuda())
    monkeypatch.setattr(ref, "random_masking",
                        lambda x, timesteps, o: seen.setdefault("ref_mask", ref_masking(x, t_mask, o)))
    with pytest.raises(TypeError, match="text_condition"):  # the reference as released
        ref(imgs, cond, pooled, aes)
    monkeypatch.setattr(ref.diffloss, "forward",
                        lambda target, z, mask=None, text_condition=None: ref_diffloss(target, z, mask))
    monkeypatch.setattr(ref.diffloss.train_diffusion, "training_losses",
                        lambda model, x, t, model_kwargs=None, noise_=None: ref_losses(model, x, t_diff, model_kwargs,
                                                                                      noise=noise))
    seen.clear()
    want, want_logs = ref(imgs, cond, pooled, aes)

    # ours: the same values through its arguments
    our_latents, our_masking, our_diffloss = ours.sample_latents, ours.random_masking, ours.diffloss.forward
    monkeypatch.setattr(ours, "sample_latents", lambda x, generator=None: our_latents(x, noise=eps))
    monkeypatch.setattr(ours, "sample_orders", lambda bsz, device=None, generator=None: orders)
    monkeypatch.setattr(ours, "random_masking",
                        lambda o, generator=None: seen.setdefault("mask", our_masking(o, t=t_mask)))
    monkeypatch.setattr(ours.diffloss, "forward", lambda target, z, mask=None, generator=None:
                        our_diffloss(target, z, mask, t=t_diff, noise=noise))
    loss, logs = ours(imgs, cond, pooled, aes)

    assert torch.equal(seen["mask"], seen["ref_mask"]) and seen["mask"].sum(1).tolist() == [13.0] * b
    err = rel_err(loss, want)
    assert err <= 1e-5, err
    assert rel_err(logs["diff_loss"], want_logs["diff_loss"]) <= 1e-5
    loss.backward()
    want.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        if p.grad is None:  # the last block's text queries: unused by ours, zero in the reference
            assert not ref_params[name].grad.any(), name
        else:
            assert rel_err(p.grad, ref_params[name].grad) <= 1e-5, name


def test_maskgen_kl_forward_is_seeded_by_generator():
    torch.manual_seed(0)
    model = MaskGen_KL(tiny_generator_config("vae")).train()
    inputs = _kl_inputs(model)
    a = model(*inputs, generator=torch.Generator().manual_seed(5))[0]
    torch.manual_seed(99)  # the global generator plays no part
    b = model(*inputs, generator=torch.Generator().manual_seed(5))[0]
    c = model(*inputs, generator=torch.Generator().manual_seed(6))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match=r"imgs: expected posterior parameters \(B, 8, 1, 16\) as floats, got torch.float32 \(3, 4, 1, 16\)"):
        model(inputs[0][:, :4], *inputs[1:])


# ---------------------------------------------------------------------------------------
# Gradient checkpointing: recomputes in backward, same gradients

def _count_calls(modules):
    counts = [0] * len(modules)
    for i, mod in enumerate(modules):
        # a pre-hook: checkpoint's recomputation stops early, before a post-hook would run
        mod.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _vq_step(model):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, model.target_codebook_size, (2, model.image_seq_len), generator=g)
    logits, _ = model(tokens, torch.randn(2, 77, 64, generator=g), torch.randn(2, 1, 64, generator=g),
                      torch.full((2,), 6.0), generator=torch.Generator().manual_seed(4))
    return logits.square().mean()


def _kl_step(model):
    return model(*_kl_inputs(model), generator=torch.Generator().manual_seed(4))[0]


def _tatitok_step(model):
    g = torch.Generator().manual_seed(3)
    images, guidance = torch.rand(1, 3, 32, 32, generator=g), torch.randn(1, 77, 64, generator=g)
    recon, info = model(images, guidance)
    return (recon - images).square().mean() + info["quantizer_loss"]


def _short_tatitok():
    """The tiny tokenizer with 2 of its 8 encoder and decoder blocks: the switch is per stack."""
    model = TATiTok(tiny_tokenizer_config("vq"))
    del model.encoder.transformer[2:], model.decoder.transformer[2:]
    return model


CASES = {
    "maskgen_vq": (lambda: MaskGen_VQ(tiny_generator_config("vq")), _vq_step, lambda m: list(m.blocks)),
    "maskgen_kl": (lambda: MaskGen_KL(tiny_generator_config("vae")), _kl_step,
                   lambda m: list(m.decoder_blocks) + list(m.diffloss.net.res_blocks)),
    "tatitok": (lambda: _short_tatitok(), _tatitok_step,
                lambda m: list(m.encoder.transformer) + list(m.decoder.transformer)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_grad_checkpointing_recomputes_with_same_gradients(case):
    build, step, blocks_of = CASES[case]
    torch.manual_seed(0)
    model = build().train()
    counts = _count_calls(blocks_of(model))
    step(model).backward()
    assert counts == [1] * len(counts)  # one forward per block
    plain = _grads(model)
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    counts[:] = [0] * len(counts)
    step(model).backward()
    assert counts == [2] * len(counts)  # forward, then recomputed in backward
    ckpt = _grads(model)
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-7, msg=k)
    model.set_grad_checkpointing(False)
    counts[:] = [0] * len(counts)
    step(model).backward()
    assert counts == [1] * len(counts)


def test_grad_checkpointing_from_config():
    """`training.grad_checkpointing: true` in the config switches it on (the reference reads
    it with OmegaConf's .get on a dotted key, which never finds it)."""
    cfg = tiny_generator_config("vae")
    cfg["training"] = {"grad_checkpointing": True}
    torch.manual_seed(0)
    model = MaskGen_KL(cfg).train()
    counts = _count_calls(list(model.decoder_blocks) + list(model.diffloss.net.res_blocks))
    _kl_step(model).backward()
    assert counts == [2] * len(counts)
    maskgen = import_official("modeling.maskgen")
    assert maskgen.MaskGen_KL(official_config(cfg)).grad_checkpointing is False  # the reference's bug


# ---------------------------------------------------------------------------------------
# Caption dropout: p = 0.1 per caption, sequence and pooled together, aesthetic score kept

@pytest.fixture(scope="module")
def text_encoder():
    return tiny_text_encoder()


@pytest.mark.parametrize("cls, mode", [(MaskGen_VQ, "vq"), (MaskGen_KL, "vae")])
def test_caption_dropout_is_binomial_and_keeps_aesthetic_score(cls, mode, text_encoder):
    from scipy.stats import binomtest

    torch.manual_seed(0)
    model, enc = cls(tiny_generator_config(mode)), text_encoder
    n, vocab = 800, [f"a {c} {a}" for c in ("red", "green", "blue", "small", "large") for a in ("fox", "cat", "boat")]
    which = torch.arange(n) % len(vocab)
    cond, pooled = model.preprocess_condition([vocab[i] for i in which], text_encoder=enc,
                                              generator=torch.Generator().manual_seed(1))
    full, null = enc(vocab), enc.empty_prompt(1)
    is_null = (cond == null.penultimate).flatten(1).all(1)
    is_kept = (cond == full.penultimate[which]).flatten(1).all(1)
    assert torch.equal(is_null, (pooled == null.pooled).flatten(1).all(1))  # both dropped together
    assert torch.equal(~is_null, (pooled == full.pooled[which]).flatten(1).all(1)) and torch.equal(~is_null, is_kept)
    drops = int(is_null.sum())
    assert binomtest(drops, n, model.text_drop_prob).pvalue > 1e-3, drops
    # the micro-condition still sees each sample's own score after its caption was dropped
    i = int(is_null.nonzero()[0])
    aes = torch.tensor([4.0, 7.5])
    rows = model.project_conditions(cond[[i, i]], pooled[[i, i]], aes)[1]
    want = model.project_conditions(null.penultimate.expand(2, -1, -1), null.pooled.expand(2, -1, -1), aes)[1]
    torch.testing.assert_close(rows, want)
    assert not torch.allclose(rows[0], rows[1])


@pytest.mark.parametrize("cls, mode", [(MaskGen_VQ, "vq"), (MaskGen_KL, "vae")])
def test_caption_dropout_matches_reference(cls, mode, text_encoder, monkeypatch):
    """The reference's preprocess_condition ("" encoded with the batch, one uniform per
    caption from the global stream) and ours drop the same captions and give the same states."""
    import open_clip

    maskgen = import_official("modeling.maskgen")
    tgp = open_clip.transformer.text_global_pool  # open_clip >= 3 returns one value (peer/README.md)
    monkeypatch.setattr(maskgen, "text_global_pool", lambda x, text=None, pool_type="argmax": (tgp(x, text, pool_type), x))
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)  # the KL version's .cuda()
    cfg = tiny_generator_config(mode)
    torch.manual_seed(0)
    ours = cls(cfg)
    ref = getattr(maskgen, cls.__name__)(official_config(cfg))
    captions = [f"a photo of thing {i}" for i in range(48)]
    torch.manual_seed(3)
    want = ref.preprocess_condition(list(captions), text_encoder.tokenizer, text_encoder.model)
    torch.manual_seed(3)
    got = ours.preprocess_condition(captions, text_encoder=text_encoder)
    null = text_encoder.empty_prompt(1).pooled
    dropped = (got[1] == null).flatten(1).all(1)
    assert 0 < int(dropped.sum()) < len(captions)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Masking ratios: arccos schedule, t ~ U(0, 1): P(ratio <= x) = 1 - cos(pi x / 2)

def _ratio_cdf(x: float) -> float:
    return 1.0 - math.cos(math.pi / 2 * min(max(x, 0.0), 1.0))


def _chisquare_pvalue(counts: dict[int, int], probs: dict[int, float]) -> float:
    """Goodness of fit over the support, rare bins (expected < 5) pooled into their neighbour."""
    from scipy.stats import chisquare

    total = sum(counts.values())
    assert set(counts) <= set(probs), f"counts outside the support: {set(counts) - set(probs)}"
    obs, exp, o, e = [], [], 0, 0.0
    for k in sorted(probs):
        o, e = o + counts.get(k, 0), e + probs[k] * total
        if e >= 5:
            obs.append(o)
            exp.append(e)
            o, e = 0, 0.0
    obs[-1], exp[-1] = obs[-1] + o, exp[-1] + e
    return chisquare(obs, [x * total / sum(exp) for x in exp]).pvalue


def test_vq_masking_ratio_per_sample():
    """n = max(1, round(N * ratio)) masked per sample, each sample its own ratio, positions uniform."""
    from scipy.stats import chisquare

    torch.manual_seed(0)
    model = MaskGen_VQ(tiny_generator_config("vq"))
    b, n = 6000, model.image_seq_len
    tokens = torch.randint(0, model.target_codebook_size, (b, n))
    ids, masks = model.masking_input_tokens(tokens, torch.Generator().manual_seed(1))
    assert torch.equal(ids, torch.where(masks, model.mask_token_id, tokens))
    counts = masks.sum(1)
    assert counts.min() >= 1
    probs = {1: _ratio_cdf(1.5 / n), n: 1.0 - _ratio_cdf((n - 0.5) / n)}
    probs.update({k: _ratio_cdf((k + 0.5) / n) - _ratio_cdf((k - 0.5) / n) for k in range(2, n)})
    hist = {int(k): int(v) for k, v in zip(*torch.unique(counts, return_counts=True))}
    assert _chisquare_pvalue(hist, probs) > 1e-3, hist
    assert chisquare(masks.sum(0).double().numpy()).pvalue > 1e-3  # no position favoured


def test_kl_masking_ratio_per_batch():
    """One ratio per batch: n = ceil(N * ratio) masked in every sample, at its own order's first n."""
    torch.manual_seed(0)
    model = MaskGen_KL(tiny_generator_config("vae"))
    n, g, hist = model.seq_len, torch.Generator().manual_seed(1), {}
    for _ in range(1500):
        orders = model.sample_orders(4, generator=g)
        mask = model.random_masking(orders, g)
        k = int(mask[0].sum())
        assert mask.sum(1).tolist() == [k] * 4  # the same count in the whole batch
        assert torch.equal(mask.gather(1, orders[:, :k]), torch.ones(4, k))  # the first k of each order
        hist[k] = hist.get(k, 0) + 1
    probs = {k: _ratio_cdf(k / n) - _ratio_cdf((k - 1) / n) for k in range(1, n + 1)}
    assert _chisquare_pvalue(hist, probs) > 1e-3, hist
