"""TokenizerLoss against the official ReconstructionLoss_Single_Stage (built from the TA-TiTok
training config, with random perceptual and discriminator weights copied into ours): every
logged term, the total and the gradient reaching the reconstructions, before and after
discriminator_start, in VQ and KL ("vae") modes; the discriminator side with LeCAM over several
steps; what the state dict holds; bad inputs and missing weight files."""
import dataclasses

import pytest
import torch

from tatitok_fast.losses.perceptual import PerceptualLoss, parse_perceptual_spec
from tatitok_fast.models.tokenizers.quantizers import DiagonalGaussianDistribution
from tatitok_fast.losses.tokenizer import TokenizerLoss, TokenizerLossConfig
from tatitok_fast.weight_files import WeightsFileError
from tests.models.official_losses import build_official_loss, copy_official_perceptual, import_official

D_START = 3  # discriminator_start for the parity runs
SIZE = 32  # LPIPS and the discriminator take small images; the ConvNeXt term resizes to 224


def _close(a, b, name):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
    assert err <= 1e-5, f"{name}: relative error {err:.2e} (ours {a.flatten()[:4]}, official {b.flatten()[:4]})"


def _pair(mode, perceptual_loss="lpips"):
    official = build_official_loss(mode, discriminator_start=D_START, perceptual_loss=perceptual_loss)
    with torch.no_grad():  # discriminator with non-trivial GroupNorm affine params
        for p in official.discriminator.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = TokenizerLossConfig(perceptual_weights="random", discriminator_start=D_START,
                              perceptual_loss=perceptual_loss)
    ours = TokenizerLoss.from_config(cfg, mode)
    ours.discriminator.load_state_dict(official.discriminator.state_dict(), strict=True)
    copy_official_perceptual(official.perceptual_loss, ours.perceptual)
    return official, ours


# LPIPS-only pairs for most cases (the ConvNeXt-S term at 224 px is slow on CPU); the default
# "lpips-convnext_s-1.0-0.1" spec is checked once, on one image.
@pytest.fixture(scope="module")
def vq_pair():
    return _pair("vq")


@pytest.fixture(scope="module")
def vae_pair():
    return _pair("vae")


def _images(seed, batch=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, SIZE, SIZE, generator=g)
    x_hat = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return x, x_hat


def _generator_case(official, ours, extra_official, extra_ours, step, seed=0, batch=2):
    x, x_hat = _images(seed, batch)
    r1 = x_hat.clone().requires_grad_(True)
    loss_ref, logs_ref = official(x, r1, extra_official, step, mode="generator")
    (g_ref,) = torch.autograd.grad(loss_ref, r1)
    r2 = x_hat.clone().requires_grad_(True)
    loss, logs = ours.generator_loss(x, r2, extra_ours, step)
    (g,) = torch.autograd.grad(loss, r2)
    _close(loss, loss_ref, "total")
    for k, v in logs_ref.items():
        assert k in logs, f"missing log {k}"
        _close(logs[k], v, k)
        assert logs[k].dim() == 0 and not logs[k].requires_grad
    _close(g, g_ref, "d total / d reconstructions")
    return logs


@pytest.mark.parametrize("step", [0, D_START])
def test_generator_vq_matches_official(vq_pair, step):
    official, ours = vq_pair
    q = {"quantizer_loss": torch.tensor(0.37), "commitment_loss": torch.tensor(0.07),
         "codebook_loss": torch.tensor(0.30)}
    logs = _generator_case(official, ours, q, q, step)
    assert logs["perceptual_loss"] != 0  # random LPIPS heads may be negative
    assert (logs["gan_loss"] != 0) == (step >= D_START)


def test_generator_default_spec_with_convnext_matches_official(monkeypatch):
    """The official spec: LPIPS + ConvNeXt-S logits (our PerceptualLoss runs the official's
    torchvision ConvNeXt-S instance: same weights, one network built instead of two)."""
    import tatitok_fast.losses.perceptual as perceptual

    official = build_official_loss("vq", discriminator_start=D_START)
    monkeypatch.setattr(perceptual, "_convnext_small", lambda meta=False: official.perceptual_loss.convnext)
    cfg = TokenizerLossConfig(perceptual_weights="random", discriminator_start=D_START)
    assert cfg.perceptual_loss == "lpips-convnext_s-1.0-0.1"
    ours = TokenizerLoss.from_config(cfg, "vq")
    ours.discriminator.load_state_dict(official.discriminator.state_dict(), strict=True)
    copy_official_perceptual(official.perceptual_loss, ours.perceptual)
    q = {"quantizer_loss": torch.tensor(0.2), "commitment_loss": torch.tensor(0.04),
         "codebook_loss": torch.tensor(0.16)}
    x, x_hat = _images(7, batch=1)
    with torch.no_grad():  # gradients are compared in the LPIPS cases (ConvNeXt backward is slow on CPU)
        loss_ref, logs_ref = official(x, x_hat, q, D_START, mode="generator")
        loss, logs = ours.generator_loss(x, x_hat, q, D_START)
    _close(loss, loss_ref, "total")
    for k, v in logs_ref.items():
        _close(logs[k], v, k)
    lpips_only = ours.perceptual.lpips(x, x_hat).mean()
    assert abs(logs["perceptual_loss"] - lpips_only) > 1e-6  # the ConvNeXt term contributes


@pytest.mark.parametrize("step", [0, D_START])
def test_generator_kl_matches_official(vae_pair, step):
    official, ours = vae_pair
    quantizer = import_official("modeling.quantizer.quantizer")
    params = torch.randn(2, 2 * 16, 1, 32)
    logs = _generator_case(official, ours, quantizer.DiagonalGaussianDistribution(params),
                           DiagonalGaussianDistribution(params), step, seed=1)
    assert logs["kl_loss"] > 0


def test_discriminator_and_lecam_match_official_over_steps(vq_pair):
    official, ours = vq_pair
    official.ema_real_logits_mean.zero_(), official.ema_fake_logits_mean.zero_()
    ours.ema_real_logits_mean.zero_(), ours.ema_fake_logits_mean.zero_()
    for step in range(D_START - 1, D_START + 2):  # inactive (factor 0, LeCAM only) then active
        x, x_hat = _images(10 + step)
        x, x_hat = x[..., :16, :16], x_hat[..., :16, :16]  # D alone: small images suffice
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
        _close(ours.ema_fake_logits_mean, official.ema_fake_logits_mean, "ema_fake_logits_mean")
    assert ours.ema_real_logits_mean.abs().item() > 0


def test_state_dict_is_discriminator_and_lecam_only(vq_pair):
    _, ours = vq_pair
    keys = set(ours.state_dict())
    assert keys == {f"discriminator.{k}" for k in ours.discriminator.state_dict()} | {
        "ema_real_logits_mean", "ema_fake_logits_mean"}
    assert {id(p) for p in ours.parameters()} == {id(p) for p in ours.discriminator.parameters()}
    net = ours.perceptual
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    ours.train()
    assert not net.training  # the frozen nets stay in eval mode


def test_generator_step_leaves_discriminator_untouched(vq_pair):
    _, ours = vq_pair
    ours.discriminator.zero_grad(set_to_none=True)
    x, x_hat = _images(3)
    x_hat.requires_grad_(True)
    loss, _ = ours.generator_loss(x, x_hat, {"quantizer_loss": torch.tensor(0.0)}, D_START)
    loss.backward()
    assert x_hat.grad is not None and x_hat.grad.abs().sum() > 0
    assert all(p.grad is None for p in ours.discriminator.parameters())


def test_autocast_is_disabled_inside(vq_pair):
    _, ours = vq_pair
    x, x_hat = _images(4)
    ref, _ = ours.generator_loss(x, x_hat, {"quantizer_loss": torch.tensor(0.0)}, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = ours.generator_loss(x.bfloat16(), x_hat.bfloat16(), {"quantizer_loss": torch.tensor(0.0)}, 0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=0)  # only the bf16 rounding of the inputs


def test_perceptual_none_and_weights():
    cfg = TokenizerLossConfig(perceptual_loss="none", discriminator_start=0, discriminator_weight=0.0)
    loss_mod = TokenizerLoss.from_config(cfg, "vq")
    assert loss_mod.perceptual is None
    x, x_hat = _images(5)
    q = torch.tensor(0.5)
    total, logs = loss_mod.generator_loss(x, x_hat, {"quantizer_loss": q}, 10)
    _close(total, torch.mean((x - x_hat) ** 2) + q, "pixel + quantizer")
    assert logs["perceptual_loss"] == 0 and logs["gan_loss"] == 0


def test_config_fields_have_help_and_official_defaults():
    fields = dataclasses.fields(TokenizerLossConfig)
    assert all(f.metadata.get("help") for f in fields)
    official = import_official("omegaconf").OmegaConf.load(
        __import__("tests.models.official_losses", fromlist=["TA_TITOK_CONFIG"]).TA_TITOK_CONFIG).losses
    cfg = TokenizerLossConfig()
    for key, value in official.items():
        assert getattr(cfg, key) == value, key
    assert cfg.lecam_ema_decay == 0.999 and cfg.kl_weight == 1e-6


def test_bad_inputs_and_config():
    with pytest.raises(ValueError, match="reconstruction_loss"):
        TokenizerLoss(TokenizerLossConfig(reconstruction_loss="l3", perceptual_loss="none"))
    with pytest.raises(ValueError, match="perceptual_loss"):
        TokenizerLoss(TokenizerLossConfig(perceptual_loss="vgg-2"))
    with pytest.raises(ValueError, match="lecam_ema_decay"):
        TokenizerLoss(TokenizerLossConfig(perceptual_loss="none", lecam_ema_decay=1.0))
    with pytest.raises(ValueError, match="quantize_mode"):
        TokenizerLoss(TokenizerLossConfig(perceptual_loss="none"), "fsq")
    loss_mod = TokenizerLoss(TokenizerLossConfig(perceptual_loss="none"), "vq")
    x, x_hat = _images(6)
    with pytest.raises(ValueError, match="reconstructions"):
        loss_mod.generator_loss(x, x_hat[:1], {"quantizer_loss": torch.tensor(0.0)}, 0)
    with pytest.raises(ValueError, match="inputs"):
        loss_mod.discriminator_loss(x[:, :1], x_hat, 0)
    with pytest.raises(TypeError, match="extra_result_dict"):
        loss_mod.generator_loss(x, x_hat, torch.tensor(0.0), 0)
    kl_mod = TokenizerLoss(TokenizerLossConfig(perceptual_loss="none"), "vae")
    with pytest.raises(TypeError, match="posterior"):
        kl_mod.generator_loss(x, x_hat, {"quantizer_loss": torch.tensor(0.0)}, 0)


def test_perceptual_spec_parsing():
    assert parse_perceptual_spec("none") is None
    assert parse_perceptual_spec("lpips-convnext_s-1.0-0.1") == (1.0, 0.1)
    assert parse_perceptual_spec("convnext_s") == (0.0, 1.0)
    for bad in ("lpips-convnext_s", "lpips-convnext_s-a-b", "lpips-convnext_s--1-2", "convnext"):
        with pytest.raises(ValueError, match="perceptual_loss"):
            parse_perceptual_spec(bad)


def test_missing_pretrained_weights_fail_early_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    for var in ("TATITOK_FAST_VGG16_WEIGHTS", "TATITOK_FAST_LPIPS_WEIGHTS", "TATITOK_FAST_CONVNEXT_S_WEIGHTS",
                "WORKSPACE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(WeightsFileError, match=r"vgg16-397923af\.pth.*TATITOK_FAST_VGG16_WEIGHTS"):
        TokenizerLoss(TokenizerLossConfig(download_weights=False))
    with pytest.raises(WeightsFileError, match=r"convnext_small-0c510722\.pth.*TATITOK_FAST_CONVNEXT_S_WEIGHTS"):
        PerceptualLoss("convnext_s", download=False)
    vgg = tmp_path / "vgg16.pth"
    torch.save({}, vgg)
    with pytest.raises(WeightsFileError, match=r"lpips_weights_path points to .*nope\.pth"):
        PerceptualLoss("lpips", vgg16_weights_path=str(vgg), lpips_weights_path=str(tmp_path / "nope.pth"),
                       download=False)
    with pytest.raises(WeightsFileError, match=r"vgg\.pth.*TATITOK_FAST_LPIPS_WEIGHTS"):
        PerceptualLoss("lpips", vgg16_weights_path=str(vgg), download=False)
    bad = tmp_path / "vgg.pth"
    bad.write_bytes(b"not the LPIPS heads")
    monkeypatch.setenv("TATITOK_FAST_LPIPS_WEIGHTS", str(bad))
    with pytest.raises(WeightsFileError, match="md5"):
        PerceptualLoss("lpips", vgg16_weights_path=str(vgg), download=False)


def test_pretrained_files_are_loaded_from_local_paths(tmp_path, monkeypatch):
    """A local file in torchvision's convnext_small format (what IMAGENET1K_V1 holds) is found
    through the environment variable and loaded exactly; the network is frozen."""
    from torchvision.models import convnext_small

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in convnext_small(weights=None).state_dict().items()}
    sd = {k: torch.randn(shape) for k, shape in shapes.items()}
    path = tmp_path / "convnext_small-0c510722.pth"
    torch.save(sd, path)
    monkeypatch.setenv("TATITOK_FAST_CONVNEXT_S_WEIGHTS", str(path))
    net = PerceptualLoss("convnext_s", download=False)
    got = net.convnext.state_dict()
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    torch.save({**sd, "classifier.2.weight": torch.zeros(3, 768)}, path)
    with pytest.raises(ValueError, match="ConvNeXt-S.*does not fit"):
        PerceptualLoss("convnext_s", download=False)


def test_bf16_perceptual_computes_in_bf16():
    """perceptual_precision = "bf16" runs the frozen perceptual networks' convolutions and
    projections in bf16 (what the official loss does in a CPU training step, where its
    torch.cuda.amp guard leaves CPU autocast on), keeps the loss and the gradient fp32, and
    stays within bf16 rounding of the fp32 term; "fp32" (the default) computes in fp32."""
    x, x_hat = _images(3)
    seen, terms = {}, {}
    for precision in ("fp32", "bf16"):
        cfg = TokenizerLossConfig(perceptual_weights="random", perceptual_loss="lpips", discriminator_start=D_START,
                                  perceptual_precision=precision)
        loss_mod = TokenizerLoss.from_config(cfg, "vq")
        dtypes = seen[precision] = set()
        for m in loss_mod.perceptual.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.register_forward_hook(lambda mod, args, out, dtypes=dtypes: dtypes.add(out.dtype))
        r = x_hat.clone().requires_grad_(True)
        loss, logs = loss_mod.generator_loss(x, r, {"quantizer_loss": torch.tensor(0.0)}, 0)
        (g,) = torch.autograd.grad(loss, r)
        assert loss.dtype == g.dtype == torch.float32 and torch.isfinite(g).all()
        terms[precision] = logs["perceptual_loss"]
    assert seen == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}}
    assert terms["bf16"] != terms["fp32"]
    assert abs(terms["bf16"] - terms["fp32"]) <= 0.05 * abs(terms["fp32"]), terms
    with pytest.raises(ValueError, match="perceptual_precision: expected 'fp32' or 'bf16', got 'fp16'"):
        TokenizerLoss.from_config(dataclasses.replace(cfg, perceptual_precision="fp16"), "vq")
