"""TiTok two-stage training losses against the official ReconstructionLoss_Stage1 and
ReconstructionLoss_Stage2 (../shared/peer/1d-tokenizer/modeling/modules/losses.py, built from
configs/training/TiTok/stage{1,2}/titok_l32.yaml with random perceptual and discriminator
weights copied into ours): losses, every log and the gradients, <= 1e-5 relative."""
from __future__ import annotations

import pytest
import torch

from tatitok_fast.losses.tokenizer import TokenizerLoss, proxy_code_loss
from tatitok_fast.training.recipes.titok import TiTokLossConfig
from tests.helpers import OFFICIAL
from tests.models.official_losses import copy_official_perceptual, import_official, offline_official_builders
from tests.models.test_tokenizer_loss import _close

STAGE1 = OFFICIAL / "configs" / "training" / "TiTok" / "stage1" / "titok_l32.yaml"
STAGE2 = OFFICIAL / "configs" / "training" / "TiTok" / "stage2" / "titok_l32.yaml"
D_START = 3


def _official_config(path, **losses):
    from omegaconf import OmegaConf

    import_official("modeling")
    cfg = OmegaConf.load(path)
    for k, v in losses.items():
        cfg.losses[k] = v
    return cfg


def _quantizer(seed):
    g = torch.Generator().manual_seed(seed)
    c, k = torch.rand(2, generator=g)
    return {"quantizer_loss": c + k, "commitment_loss": c, "codebook_loss": k}


@pytest.mark.parametrize("quantizer_weight", [1.0, 0.5])
def test_stage1_proxy_code_loss_matches_official(quantizer_weight):
    losses = import_official("modeling.modules.losses")
    official = losses.ReconstructionLoss_Stage1(_official_config(STAGE1, quantizer_weight=quantizer_weight))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1024, 4, 4, generator=g) * 3
    codes = torch.randint(0, 1024, (3, 16), generator=g)
    q = _quantizer(1)
    a = logits.clone().requires_grad_(True)
    loss_ref, logs_ref = official(codes, a, q)
    (g_ref,) = torch.autograd.grad(loss_ref, a)
    b = logits.clone().requires_grad_(True)
    loss, logs = proxy_code_loss(b, codes, q, quantizer_weight)
    (grad,) = torch.autograd.grad(loss, b)
    _close(loss, loss_ref, "total")
    for k, v in logs_ref.items():
        _close(logs[k], v, k)
    _close(grad, g_ref, "d total / d logits")
    assert loss.item() > 6.0  # ~ln(1024) + q for random logits: the CE is over the 1024 codes


def test_stage1_bad_inputs():
    q = _quantizer(0)
    with pytest.raises(ValueError, match=r"logits: expected \(B, 1024, G, G\)"):
        proxy_code_loss(torch.randn(2, 512, 4, 4), torch.zeros(2, 16, dtype=torch.long), q)
    with pytest.raises(ValueError, match=r"target_codes: expected int64 codes \(B, 16\)"):
        proxy_code_loss(torch.randn(2, 1024, 4, 4), torch.zeros(2, 9, dtype=torch.long), q)
    with pytest.raises(TypeError, match="quantizer_result"):
        proxy_code_loss(torch.randn(2, 1024, 4, 4), torch.zeros(2, 16, dtype=torch.long), {})


def _stage2_pair(perceptual_loss):
    """The official stage-2 loss (titok_l32 stage-2 yaml; discriminator_start D_START) and ours
    from the same values, with the official random networks copied into ours."""
    losses = import_official("modeling.modules.losses")
    cfg = _official_config(STAGE2, discriminator_start=D_START, perceptual_loss=perceptual_loss)
    with offline_official_builders():
        official = losses.ReconstructionLoss_Stage2(cfg)
    with torch.no_grad():
        for p in official.discriminator.parameters():
            p.add_(0.05 * torch.randn_like(p))
    c = cfg.losses
    ours = TokenizerLoss.from_config(TiTokLossConfig(
        reconstruction_loss=c.reconstruction_loss, reconstruction_weight=c.reconstruction_weight,
        perceptual_loss=perceptual_loss, perceptual_weight=c.perceptual_weight, perceptual_weights="random",
        quantizer_weight=c.quantizer_weight, discriminator_start=D_START, discriminator_factor=c.discriminator_factor,
        discriminator_weight=c.discriminator_weight, lecam_regularization_weight=c.lecam_regularization_weight), "vq")
    ours.discriminator.load_state_dict(official.discriminator.state_dict(), strict=True)
    return official, ours


@pytest.fixture(scope="module")
def lpips_pair():
    official, ours = _stage2_pair("lpips")
    copy_official_perceptual(official.perceptual_loss, ours.perceptual)
    return official, ours


def _images(seed, batch=2, size=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, size, size, generator=g)
    return x, (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)


@pytest.mark.parametrize("step", [0, D_START])
def test_stage2_generator_matches_official(lpips_pair, step):
    official, ours = lpips_pair
    x, x_hat = _images(step)
    q = _quantizer(2)
    r1, r2 = x_hat.clone().requires_grad_(True), x_hat.clone().requires_grad_(True)
    loss_ref, logs_ref = official(x, r1, q, step, mode="generator")
    (g_ref,) = torch.autograd.grad(loss_ref, r1)
    loss, logs = ours.generator_loss(x, r2, q, step)
    (grad,) = torch.autograd.grad(loss, r2)
    _close(loss, loss_ref, "total")
    for k, v in logs_ref.items():
        _close(logs[k], v, k)
    _close(grad, g_ref, "d total / d reconstructions")
    assert (logs["gan_loss"] != 0) == (step >= D_START)
    assert logs["quantizer_loss"] == 0  # quantizer_weight 0 in stage 2


def test_stage2_convnext_perceptual_matches_official(monkeypatch):
    """The official stage-2 perceptual term: ConvNeXt-S logits at 224 px (no LPIPS)."""
    import tatitok_fast.losses.perceptual as perceptual

    official, _ = _stage2_pair("convnext_s")
    monkeypatch.setattr(perceptual, "_convnext_small", lambda meta=False: official.perceptual_loss.convnext)
    _, ours = _stage2_pair("convnext_s")
    ours.discriminator.load_state_dict(official.discriminator.state_dict(), strict=True)
    assert ours.perceptual.lpips is None
    x, x_hat = _images(7, batch=1)
    with torch.no_grad():  # ConvNeXt-S backward at 224 px is slow on CPU; gradients are checked above
        loss_ref, logs_ref = official(x, x_hat, _quantizer(3), D_START, mode="generator")
        loss, logs = ours.generator_loss(x, x_hat, _quantizer(3), D_START)
    _close(loss, loss_ref, "total")
    for k, v in logs_ref.items():
        _close(logs[k], v, k)
    assert logs["perceptual_loss"] > 0


def test_stage2_discriminator_and_lecam_match_official(lpips_pair):
    official, ours = lpips_pair
    official.ema_real_logits_mean.zero_(), official.ema_fake_logits_mean.zero_()
    ours.ema_real_logits_mean.zero_(), ours.ema_fake_logits_mean.zero_()
    for step in range(D_START - 1, D_START + 2):  # inactive (LeCAM only), then active
        x, x_hat = _images(20 + step, size=16)
        official.discriminator.zero_grad(), ours.discriminator.zero_grad()
        loss_ref, logs_ref = official(x, x_hat, {}, step, mode="discriminator")
        loss_ref.backward()
        loss, logs = ours.discriminator_loss(x, x_hat, step)
        loss.backward()
        assert ours.discriminator_active(step) == official.should_discriminator_be_trained(step)
        _close(loss, loss_ref, f"step {step} discriminator_loss")
        for k, v in logs_ref.items():
            _close(logs[k], v, f"step {step} {k}")
        for (name, p), p_ref in zip(ours.discriminator.named_parameters(), official.discriminator.parameters()):
            _close(p.grad, p_ref.grad, f"step {step} grad {name}")
        _close(ours.ema_real_logits_mean, official.ema_real_logits_mean, "ema_real_logits_mean")
    assert ours.ema_real_logits_mean.abs().item() > 0
