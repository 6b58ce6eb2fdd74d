"""MaskGen-VQ sampling against the official code (../shared/peer/1d-tokenizer, imported at
test time) on the same tiny weights and the same torch.rand noise: aesthetic scores, confidence
ties, softmax_temperature_annealing=False, models without micro-conditioning."""
from __future__ import annotations

import sys

import pytest
import torch

from tatitok_fast.models.generators.maskgen import MaskGen_KL, MaskGen_VQ
from tests.helpers import OFFICIAL, assert_same_init, require_official, tiny_generator_config, tiny_text_encoder

CAPTIONS = ["a cat on a mat", "a red car", ""]


@pytest.fixture(scope="module")
def official():
    """The official modeling.maskgen module, with open_clip >= 3's text_global_pool adapted
    (peer/README.md)."""
    require_official(("diffusers", "omegaconf", "einops", "open_clip"))  # skips, or fails under CI=true
    sys.path.insert(0, str(OFFICIAL))
    try:
        import modeling.maskgen as om
        from open_clip.transformer import text_global_pool
    finally:
        sys.path.remove(str(OFFICIAL))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(om, "text_global_pool", lambda x, text=None, pool_type="argmax": (text_global_pool(x, text, pool_type), x))
        yield om


@pytest.fixture(scope="module")
def text_encoder():
    return tiny_text_encoder()


def _pair(official, config, edit=None):
    """(ours, official) MaskGen_VQ with the same weights; edit(ours) runs first."""
    torch.manual_seed(0)
    ours = MaskGen_VQ(config).eval()
    if edit is not None:
        with torch.no_grad():
            edit(ours)
    ref = official.MaskGen_VQ(config).eval()
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _generate(model, text_encoder, seed, record=None, **kw):
    """model.generate on the reference's (clip_tokenizer, clip_encoder) pair; record: a list
    that receives the ids each step feeds to the network ((2B, N), [cond; uncond])."""
    hook = None
    if record is not None:
        hook = model.embeddings.register_forward_pre_hook(lambda m, args: record.append(args[0].clone()))
    try:
        torch.manual_seed(seed)
        with torch.no_grad():
            return model.generate(CAPTIONS, clip_tokenizer=text_encoder.tokenizer, clip_encoder=text_encoder.model,
                                  **kw)
    finally:
        if hook is not None:
            hook.remove()


@pytest.fixture(scope="module")
def vq_pair(official):
    return _pair(official, tiny_generator_config("vq"))


@pytest.mark.parametrize("prob_sorting", [True, False])
def test_vq_generate_matches_official(vq_pair, text_encoder, prob_sorting):
    ours, ref = vq_pair
    kw = dict(guidance_scale=4.0, randomize_temperature=2.0, num_sample_steps=6, prob_sorting=prob_sorting)
    want = _generate(ref, text_encoder, 11, sample_aesthetic_score=1.0, **kw)  # official: any value -> config's
    got = _generate(ours, text_encoder, 11, sample_aesthetic_score=ours.sample_aesthetic_score, noise="torch", **kw)
    assert torch.equal(got, want)


def test_vq_aesthetic_score_forms(vq_pair, text_encoder):
    ours, _ = vq_pair
    kw = dict(guidance_scale=4.0, randomize_temperature=2.0, num_sample_steps=3, noise="torch")
    per_sample = _generate(ours, text_encoder, 5, sample_aesthetic_score=torch.tensor([5.0, 6.5, 7.0]), **kw)
    for row, score in enumerate((5.0, 6.5, 7.0)):  # rows are independent: each follows its own score
        assert torch.equal(per_sample[row], _generate(ours, text_encoder, 5, sample_aesthetic_score=score, **kw)[row])
    default = _generate(ours, text_encoder, 5, sample_aesthetic_score=None, **kw)
    assert torch.equal(default, _generate(ours, text_encoder, 5, sample_aesthetic_score=torch.tensor(6.5), **kw))
    assert ours.sample_aesthetic_score == 6.5
    with pytest.raises(ValueError, match=r"sample_aesthetic_score: expected one score per sample, shape \(3,\)"):
        _generate(ours, text_encoder, 5, sample_aesthetic_score=torch.ones(2), **kw)
    with pytest.raises(TypeError, match="sample_aesthetic_score: expected None, a number"):
        _generate(ours, text_encoder, 5, sample_aesthetic_score="high", **kw)
    with pytest.raises(ValueError, match="sample_aesthetic_score: expected a finite score"):
        _generate(ours, text_encoder, 5, sample_aesthetic_score=float("nan"), **kw)


def test_vq_tied_confidences_follow_official(official, text_encoder):
    """Positions 0-7 share one position embedding, so while masked they get the same logits
    and, with no noise, exactly tied confidences: the cut-off re-masks the whole tie group
    and the official code takes the next re-mask count from row 0's masked tokens."""
    def share_positions(m):
        m.pos_embed[:, :8] = m.pos_embed[:, :1]

    ours, ref = _pair(official, tiny_generator_config("vq"), share_positions)
    kw = dict(guidance_scale=4.0, randomize_temperature=0.0, num_sample_steps=16)
    seen_ref, seen_ours = [], []
    want = _generate(ref, text_encoder, 3, record=seen_ref, sample_aesthetic_score=6.5, **kw)
    got = _generate(ours, text_encoder, 3, record=seen_ours, noise="torch", **kw)
    planned = [ours.image_seq_len] + [s.mask_len for s in ours.sampling_schedule(16, 4.0, 0.0, True, "cosine", 1.0,
                                                                                  True)][:-1]
    masked_row0 = [int((ids[0] == ours.mask_token_id).sum()) for ids in seen_ref]
    assert masked_row0 != planned, "the case must contain ties that re-mask more than planned"
    assert all(torch.equal(a, b) for a, b in zip(seen_ours, seen_ref))
    assert torch.equal(got, want)


def test_vq_without_softmax_annealing(vq_pair, text_encoder):
    """softmax temperature = the annealed randomize temperature: equal to the official steps
    until the last, where it is 0. There the official code divides by zero (README,
    differences); ours takes the T -> 0 limit, the greedy argmax of the guided logits."""
    ours, ref = vq_pair
    kw = dict(guidance_scale=4.0, randomize_temperature=2.0, num_sample_steps=5, softmax_temperature_annealing=False)
    seen_ref, seen_ours = [], []
    _generate(ref, text_encoder, 9, record=seen_ref, sample_aesthetic_score=6.5, **kw)
    got = _generate(ours, text_encoder, 9, record=seen_ours, noise="torch", **kw)
    assert len(seen_ours) == len(seen_ref) == 5
    assert all(torch.equal(a, b) for a, b in zip(seen_ours, seen_ref))
    last = seen_ours[-1]  # (2B, N): the ids the last step starts from
    enc, null = text_encoder(CAPTIONS), text_encoder.empty_prompt(3)
    with torch.no_grad():
        logits = ours(last, torch.cat([enc.penultimate, null.penultimate]), torch.cat([enc.pooled, null.pooled]),
                      torch.full((6,), 6.5))[0]
    cond, uncond = logits[:3], logits[3:]
    greedy = (cond + (cond - uncond) * 4.0).argmax(-1)  # cosine decay ends at the full scale
    was_masked = last[:3] == ours.mask_token_id
    assert bool(was_masked.any())
    assert torch.equal(got[was_masked], greedy[was_masked]) and torch.equal(got[~was_masked], last[:3][~was_masked])


def test_models_without_micro_conditioning(official, text_encoder):
    vq_cfg = tiny_generator_config("vq")
    vq_cfg["model"]["maskgen"]["micro_condition"] = False
    ours, ref = _pair(official, vq_cfg)
    kw = dict(guidance_scale=4.0, randomize_temperature=2.0, num_sample_steps=4)
    want = _generate(ref, text_encoder, 2, sample_aesthetic_score=None, **kw)
    assert torch.equal(_generate(ours, text_encoder, 2, sample_aesthetic_score=None, noise="torch", **kw), want)
    # the official MaskGen_KL samples on CUDA only; ours: aes_scores=None is accepted and unused
    kl_cfg = tiny_generator_config("vae")
    kl_cfg["model"]["maskgen"]["micro_condition"] = False
    torch.manual_seed(0)
    kl = MaskGen_KL(kl_cfg).eval()
    g = torch.Generator().manual_seed(4)
    a = kl.sample_tokens(2, num_iter=3, captions=["a", "b"], aes_scores=None, text_encoder=text_encoder, generator=g)
    g.manual_seed(4)
    b = kl.sample_tokens(2, num_iter=3, captions=["a", "b"], aes_scores=2.0, text_encoder=text_encoder, generator=g)
    assert torch.equal(a, b) and bool(a.isfinite().all())


def test_kl_aes_scores_none_uses_the_config_value(text_encoder):
    torch.manual_seed(0)
    kl = MaskGen_KL(tiny_generator_config("vae")).eval()
    g = torch.Generator()
    outs = []
    for aes in (None, torch.tensor([6.5, 6.5])):
        g.manual_seed(4)
        outs.append(kl.sample_tokens(2, num_iter=2, captions=["a", "b"], aes_scores=aes, text_encoder=text_encoder,
                                     generator=g))
    assert torch.equal(outs[0], outs[1])
    g.manual_seed(4)
    other = kl.sample_tokens(2, num_iter=2, captions=["a", "b"], aes_scores=3.0, text_encoder=text_encoder,
                             generator=g)
    assert not torch.equal(other, outs[0]), "the score conditions the samples"
    with pytest.raises(ValueError, match=r"aes_scores: expected one score per sample, shape \(2,\)"):
        kl.sample_tokens(2, num_iter=3, captions=["a", "b"], aes_scores=torch.ones(3), text_encoder=text_encoder)


@pytest.mark.parametrize("kind", ["vq", "vae"])
def test_initialisation_follows_official(official, kind):
    """Training from scratch starts from the official init: every tensor of a freshly built
    model has the official one's spread (std within 15 %), and the constant ones are equal."""
    config = tiny_generator_config(kind)
    if kind == "vq":  # wide enough for the std of every matrix to be a tight statistic
        config["model"]["maskgen"].update(decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=4)
    torch.manual_seed(0)
    want = (official.MaskGen_VQ if kind == "vq" else official.MaskGen_KL)(config).state_dict()
    got = (MaskGen_VQ if kind == "vq" else MaskGen_KL)(config).state_dict()
    assert_same_init(got, want)
