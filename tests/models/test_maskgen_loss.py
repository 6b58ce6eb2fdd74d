"""MaskGen-VQ training loss (tatitok_fast.losses.generator.masked_token_loss) against the
reference's MLMLoss, alone and after the reference's MaskGen_VQ training forward with the same
weights, inputs and masks (../shared/peer/1d-tokenizer, imported at test time)."""
import pytest
import torch

from tatitok_fast import MaskGen_VQ
from tatitok_fast.losses.generator import masked_token_loss
from tests.helpers import tiny_generator_config
from tests.models import official_losses


def import_official(module: str):
    """A module of the reference code (modeling.maskgen needs diffusers and open_clip)."""
    return official_losses.import_official(module, ("omegaconf", "einops", "diffusers", "open_clip"))


def official_config(config: dict, **losses):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(config)
    cfg.losses = {**cfg.get("losses", {}), **losses}
    return cfg


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def _inputs(b=4, n=16, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, n, k, generator=g) * 3
    targets = torch.randint(0, k, (b, n), generator=g)
    masks = torch.rand(b, n, generator=g) < 0.5
    masks[0] = False  # a sample with no masked token: accuracy 0, as the reference
    masks[1] = True
    targets[1, :5] = logits[1, :5].argmax(-1)  # some correct predictions on masked positions
    return logits, targets, masks


@pytest.mark.parametrize("smoothing, unmasked_weight", [(0.1, 0.1), (0.0, 0.1), (0.2, 0.0), (0.1, 1.0)])
def test_matches_reference_mlm_loss(smoothing, unmasked_weight):
    losses = import_official("modeling.modules.losses")
    ref = losses.MLMLoss(official_config({}, label_smoothing=smoothing, loss_weight_unmasked_token=unmasked_weight))
    logits, targets, masks = _inputs()
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    loss, logs = masked_token_loss(a, targets, masks, label_smoothing=smoothing, unmasked_weight=unmasked_weight)
    want, want_logs = ref(b, targets, masks)
    assert rel_err(loss, want) <= 1e-5
    assert rel_err(logs["masked_accuracy"], want_logs["correct_tokens"]) <= 1e-5
    assert logs["masked_accuracy"] > 0 and not logs["loss"].requires_grad
    loss.backward()
    want.backward()
    assert rel_err(a.grad, b.grad) <= 1e-5


def test_loss_definition_by_hand():
    """sum(w * ce) / sum(w) with w = 1 on masked, 0.1 on visible tokens: a masked token weighs 10x."""
    logits, targets, _ = _inputs(b=2, n=2, k=5)
    logits, targets = logits[:1], targets[:1]
    masks = torch.tensor([[True, False]])
    ce = torch.nn.functional.cross_entropy(logits[0], targets[0], reduction="none", label_smoothing=0.1)
    loss, _ = masked_token_loss(logits, targets, masks)
    torch.testing.assert_close(loss, (ce[0] + 0.1 * ce[1]) / 1.1)


def test_input_errors():
    logits, targets, masks = _inputs()
    with pytest.raises(ValueError, match=r"logits: expected a float tensor \(B, N, K\)"):
        masked_token_loss(logits[0], targets, masks)
    with pytest.raises(ValueError, match=r"targets: expected integer ids of shape \(4, 16\)"):
        masked_token_loss(logits, targets.float(), masks)
    with pytest.raises(ValueError, match=r"masks: expected a bool tensor of shape \(4, 16\)"):
        masked_token_loss(logits, targets, masks.float())
    with pytest.raises(ValueError, match=r"label_smoothing: expected a number in \[0, 1\)"):
        masked_token_loss(logits, targets, masks, label_smoothing=1.0)
    with pytest.raises(ValueError, match="unmasked_weight: expected a number >= 0"):
        masked_token_loss(logits, targets, masks, unmasked_weight=-0.1)


def test_maskgen_vq_training_step_matches_reference():
    """Same weights, same conditions and, through the same random stream, the same masks:
    the reference's MaskGen_VQ.forward + MLMLoss and ours give the same loss and gradients."""
    maskgen = import_official("modeling.maskgen")
    losses = import_official("modeling.modules.losses")
    cfg = tiny_generator_config("vq")
    torch.manual_seed(0)
    ours = MaskGen_VQ(cfg).train()
    ref = maskgen.MaskGen_VQ(official_config(cfg)).train()
    ref.load_state_dict(ours.state_dict(), strict=True)  # same keys, same random weights
    ref_loss = losses.MLMLoss(official_config(cfg, label_smoothing=0.1, loss_weight_unmasked_token=0.1))

    g = torch.Generator().manual_seed(1)
    b, n, w = 6, ours.image_seq_len, ours.text_embed_dim
    tokens = torch.randint(0, ours.target_codebook_size, (b, n), generator=g)
    cond, pooled = torch.randn(b, 77, w, generator=g), torch.randn(b, 1, w, generator=g)
    aes = 4.0 + 3.0 * torch.rand(b, generator=g)

    torch.manual_seed(7)  # both draw the per-sample ratio, then the positions, from this stream
    want_logits, want_masks = ref(tokens, cond, pooled, aes)
    want, want_logs = ref_loss(want_logits, tokens, want_masks)
    torch.manual_seed(7)
    logits, masks = ours(tokens, cond, pooled, aes)
    loss, logs = masked_token_loss(logits, tokens, masks)

    assert torch.equal(masks, want_masks) and masks.any(1).all() and not masks.all()
    assert rel_err(logits, want_logits) <= 1e-5
    assert rel_err(loss, want) <= 1e-5
    assert rel_err(logs["masked_accuracy"], want_logs["correct_tokens"]) <= 1e-5 or want_logs["correct_tokens"] == 0
    loss.backward()
    want.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        want_grad = ref_params[name].grad
        if p.grad is None:  # the last block's text queries: unused by ours, zero gradient in the reference
            assert want_grad is None or not want_grad.any(), name
        else:
            assert rel_err(p.grad, want_grad) <= 1e-5, name
