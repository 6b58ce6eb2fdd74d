"""TA-TiTok one-stage training loss: the semantics of the official
`ReconstructionLoss_Single_Stage` (modeling/modules/losses.py), computed in fp32 with autocast off.

Generator side (the tokenizer's step), images in [0, 1]:

    total = reconstruction_weight * mse(x, x_hat)  [/ exp(logvar_init) for "vae"]
          + perceptual_weight * perceptual(x, x_hat)                 (frozen LPIPS/ConvNeXt-S)
          + quantizer_weight * quantizer_loss                       ("vq")
            or kl_weight * sum(KL) / B                              ("vae")
          + discriminator_weight * factor * (-mean(D(x_hat)))       (from discriminator_start on)

Discriminator side (after the tokenizer's optimizer step, on x_hat.detach()):

    d_loss = factor * 0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))))
           + lecam_weight * (mean(relu(mean D(x) - ema_fake)^2) + mean(relu(ema_real - mean D(x_hat))^2))

with ema_real/ema_fake the EMA (decay lecam_ema_decay) of the batch-mean logits, updated after
use. The state dict holds the discriminator and the two EMA buffers only; the perceptual
networks are frozen helpers outside the module tree (never saved, never optimized).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from tatitok_fast.losses.discriminator import NLayerDiscriminator
from tatitok_fast.losses.perceptual import PerceptualLoss, parse_perceptual_spec


def _f(default: Any, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, **({"choices": choices} if choices else {})})


@dataclass
class TokenizerLossConfig:
    """The `losses` block of configs/training/TA-TiTok/*.yaml, plus where the perceptual weights live."""

    reconstruction_loss: str = _f("l2", "pixel loss: l2 (mse) or l1", ("l2", "l1"))
    reconstruction_weight: float = _f(1.0, "weight of the pixel loss")
    perceptual_loss: str = _f("lpips-convnext_s-1.0-0.1",
                              "perceptual spec: lpips-convnext_s-A-B (A*LPIPS + B*ConvNeXt-S logits MSE)/(A+B), "
                              "lpips, convnext_s, or none")
    perceptual_weight: float = _f(1.1, "weight of the perceptual term")
    perceptual_weights: str = _f("pretrained", "perceptual networks: pretrained (ImageNet VGG16/ConvNeXt-S + LPIPS "
                                 "vgg.pth) or random (fixed seed, no files: tests and tiny runs)",
                                 ("pretrained", "random"))
    vgg16_weights_path: str = _f("", "local vgg16-397923af.pth (default: $TATITOK_FAST_VGG16_WEIGHTS, torch hub cache)")
    lpips_weights_path: str = _f("", "local LPIPS vgg.pth (default: $TATITOK_FAST_LPIPS_WEIGHTS, torch hub cache)")
    convnext_s_weights_path: str = _f("", "local convnext_small-0c510722.pth (default: "
                                      "$TATITOK_FAST_CONVNEXT_S_WEIGHTS, torch hub cache)")
    download_weights: bool = _f(True, "download missing perceptual weights into the torch hub cache")
    perceptual_precision: str = _f("fp32", "the frozen perceptual networks' compute: fp32 (the official code on "
                                   "CUDA) or bf16 (autocast; what the official code does on CPU, where its "
                                   "CUDA-only autocast guard leaves them in bf16: 2x its fp32 step on Zen 4)",
                                   ("fp32", "bf16"))
    discriminator_start: int = _f(200_000, "step from which the GAN terms are on (both sides)")
    discriminator_factor: float = _f(1.0, "factor of both GAN terms once on")
    discriminator_weight: float = _f(0.1, "weight of the generator's GAN term (constant: no adaptive weight)")
    lecam_regularization_weight: float = _f(0.001, "LeCAM regularisation weight of the discriminator loss (0 = off)")
    lecam_ema_decay: float = _f(0.999, "EMA decay of the batch-mean real/fake logits used by LeCAM")
    quantizer_weight: float = _f(1.0, "vq: weight of the quantizer loss (commitment + codebook)")
    kl_weight: float = _f(1e-6, "vae: weight of the KL term (summed over dims, averaged over the batch)")
    logvar_init: float = _f(0.0, "vae: the frozen log-variance dividing the pixel loss (official: 0)")


def validate_loss_config(cfg: TokenizerLossConfig) -> None:
    """Raise ValueError naming the field for a value the loss cannot use."""
    if not isinstance(cfg, TokenizerLossConfig):
        raise TypeError(f"cfg: expected a TokenizerLossConfig, got {type(cfg).__name__}")
    if cfg.reconstruction_loss not in ("l1", "l2"):
        raise ValueError(f"reconstruction_loss: expected 'l1' or 'l2', got {cfg.reconstruction_loss!r}")
    parse_perceptual_spec(cfg.perceptual_loss)
    if cfg.perceptual_weights not in ("pretrained", "random"):
        raise ValueError(f"perceptual_weights: expected 'pretrained' or 'random', got {cfg.perceptual_weights!r}")
    if cfg.perceptual_precision not in ("fp32", "bf16"):
        raise ValueError(f"perceptual_precision: expected 'fp32' or 'bf16', got {cfg.perceptual_precision!r}")
    for name in ("reconstruction_weight", "perceptual_weight", "discriminator_factor", "discriminator_weight",
                 "lecam_regularization_weight", "quantizer_weight", "kl_weight"):
        value = getattr(cfg, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    if not 0.0 <= cfg.lecam_ema_decay < 1.0:
        raise ValueError(f"lecam_ema_decay: expected a number in [0, 1), got {cfg.lecam_ema_decay!r}")
    if not isinstance(cfg.discriminator_start, int) or cfg.discriminator_start < 0:
        raise ValueError(f"discriminator_start: expected an int >= 0, got {cfg.discriminator_start!r}")


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def lecam_loss(real_mean: torch.Tensor, fake_mean: torch.Tensor, ema_real: torch.Tensor,
               ema_fake: torch.Tensor) -> torch.Tensor:
    """LeCAM regulariser on batch-mean logits against the EMAs of the other side."""
    return F.relu(real_mean - ema_fake).pow(2).mean() + F.relu(ema_real - fake_mean).pow(2).mean()


def _check_images(name: str, x: Any, like: torch.Tensor | None = None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected float images (B, 3, H, W) in [0, 1], got {got}")
    if like is not None and (x.shape != like.shape or x.device != like.device):
        raise ValueError(f"{name}: expected the shape and device of inputs {tuple(like.shape)} on {like.device}, "
                         f"got {tuple(x.shape)} on {x.device}")


class TokenizerLoss(nn.Module):
    """Loss module of one-stage TA-TiTok training (see the module doc).

    generator_loss(inputs, reconstructions, extra_result_dict, global_step) -> (loss, logs)
        extra_result_dict: the tokenizer's second output: for "vq" the quantizer's dict
        (quantizer_loss, commitment_loss, codebook_loss); for "vae" the posterior (has kl()).
    discriminator_loss(inputs, reconstructions, global_step) -> (loss, logs)
    discriminator_active(global_step) -> bool: whether the GAN terms are on (train D then).
    logs: dicts of detached scalar tensors.
    """

    def __init__(self, cfg: TokenizerLossConfig, quantize_mode: str = "vq"):
        super().__init__()
        validate_loss_config(cfg)
        if quantize_mode not in ("vq", "vae"):
            raise ValueError(f"quantize_mode: expected 'vq' or 'vae', got {quantize_mode!r}")
        self.cfg = dataclasses.replace(cfg)
        self.quantize_mode = quantize_mode
        self.discriminator = NLayerDiscriminator()
        self.use_lecam = cfg.lecam_regularization_weight > 0.0
        if self.use_lecam:
            self.register_buffer("ema_real_logits_mean", torch.zeros(1))
            self.register_buffer("ema_fake_logits_mean", torch.zeros(1))
        # frozen perceptual networks: kept in a list so they stay out of state_dict/parameters()
        self._perceptual: list[PerceptualLoss] = []
        if parse_perceptual_spec(cfg.perceptual_loss) is not None:
            self._perceptual.append(PerceptualLoss(
                cfg.perceptual_loss, cfg.perceptual_weights, vgg16_weights_path=cfg.vgg16_weights_path or None,
                lpips_weights_path=cfg.lpips_weights_path or None,
                convnext_s_weights_path=cfg.convnext_s_weights_path or None, download=cfg.download_weights))

    @classmethod
    def from_config(cls, cfg: TokenizerLossConfig, quantize_mode: str) -> "TokenizerLoss":
        return cls(cfg, quantize_mode)

    @property
    def perceptual(self) -> PerceptualLoss | None:
        """The frozen perceptual network (None for perceptual_loss="none")."""
        return self._perceptual[0] if self._perceptual else None

    def _perceptual_on(self, device: torch.device) -> PerceptualLoss:
        net = self._perceptual[0]
        if net.mean.device != device:  # follow the inputs; always fp32
            self._perceptual[0] = net = net.to(device=device, dtype=torch.float32)
        return net

    def discriminator_active(self, global_step: int) -> bool:
        return global_step >= self.cfg.discriminator_start

    def _factor(self, global_step: int) -> float:
        return self.cfg.discriminator_factor if self.discriminator_active(global_step) else 0.0

    # ---- generator side ----
    def generator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, extra_result_dict: Any,
                       global_step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _check_images("inputs", inputs)
        _check_images("reconstructions", reconstructions, like=inputs)
        if self.quantize_mode == "vq":
            if not isinstance(extra_result_dict, Mapping) or "quantizer_loss" not in extra_result_dict:
                raise TypeError("extra_result_dict: a 'vq' loss expects the quantizer's dict (quantizer_loss, "
                                f"commitment_loss, codebook_loss), got {type(extra_result_dict).__name__}")
        elif not callable(getattr(extra_result_dict, "kl", None)):
            raise TypeError("extra_result_dict: a 'vae' loss expects the posterior (an object with kl()), "
                            f"got {type(extra_result_dict).__name__}")
        with torch.autocast(inputs.device.type, enabled=False):
            return self._generator_loss(inputs.float(), reconstructions.float(), extra_result_dict, global_step)

    def _generator_loss(self, x, x_hat, extra, global_step):
        c = self.cfg
        pixel = F.mse_loss(x, x_hat) if c.reconstruction_loss == "l2" else F.l1_loss(x, x_hat)
        pixel = pixel * c.reconstruction_weight
        if self.quantize_mode == "vae":
            pixel = pixel / math.exp(c.logvar_init)
        zero = x.new_zeros(())
        perceptual = zero
        if self._perceptual:  # fp32 weights; bf16 compute under perceptual_precision = "bf16"
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=c.perceptual_precision == "bf16"):
                perceptual = self._perceptual_on(x.device)(x, x_hat).float()

        factor = self._factor(global_step)
        gan = zero
        if factor > 0.0 and c.discriminator_weight > 0.0:
            self.discriminator.requires_grad_(False)  # gradients reach x_hat, not D
            gan = -self.discriminator(x_hat).mean()
        weighted_gan = c.discriminator_weight * factor * gan

        total = pixel + c.perceptual_weight * perceptual + weighted_gan
        logs = dict(reconstruction_loss=pixel, perceptual_loss=c.perceptual_weight * perceptual)
        if self.quantize_mode == "vq":
            q = extra["quantizer_loss"]
            total = total + c.quantizer_weight * q
            logs.update(quantizer_loss=c.quantizer_weight * q, commitment_loss=extra.get("commitment_loss", zero),
                        codebook_loss=extra.get("codebook_loss", zero))
        else:
            kl = extra.kl()
            kl = kl.sum() / kl.shape[0]
            total = total + c.kl_weight * kl
            logs.update(kl_loss=c.kl_weight * kl)
        logs.update(weighted_gan_loss=weighted_gan, gan_loss=gan, discriminator_factor=x.new_tensor(factor),
                    d_weight=x.new_tensor(c.discriminator_weight))
        logs = {"total_loss": total, **logs}
        return total, {k: v.detach().float().to(x.device) for k, v in logs.items()}  # all on the inputs' device

    # ---- discriminator side ----
    def discriminator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor,
                           global_step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _check_images("inputs", inputs)
        _check_images("reconstructions", reconstructions, like=inputs)
        with torch.autocast(inputs.device.type, enabled=False):
            return self._discriminator_loss(inputs.float().detach(), reconstructions.float().detach(), global_step)

    def _discriminator_loss(self, x, x_hat, global_step):
        self.discriminator.requires_grad_(True)
        logits_real = self.discriminator(x)  # (B, 1, 16, 16)
        logits_fake = self.discriminator(x_hat)
        loss = self._factor(global_step) * hinge_d_loss(logits_real, logits_fake)
        lecam = x.new_zeros(())
        if self.use_lecam:
            real_mean, fake_mean = logits_real.mean(), logits_fake.mean()
            lecam = lecam_loss(real_mean, fake_mean, self.ema_real_logits_mean, self.ema_fake_logits_mean)
            lecam = lecam * self.cfg.lecam_regularization_weight
            d = self.cfg.lecam_ema_decay
            with torch.no_grad():  # EMA after use, as the official
                self.ema_real_logits_mean.mul_(d).add_(real_mean.detach(), alpha=1 - d)
                self.ema_fake_logits_mean.mul_(d).add_(fake_mean.detach(), alpha=1 - d)
        loss = loss + lecam
        logs = dict(discriminator_loss=loss, logits_real=logits_real.mean(), logits_fake=logits_fake.mean(),
                    lecam_loss=lecam)
        return loss, {k: v.detach().float() for k, v in logs.items()}


# ---------------------------------------------------------------------------------------
# TiTok two-stage training (official ReconstructionLoss_Stage1 / _Stage2)
#
# Stage 2's loss IS TokenizerLoss(cfg, "vq") above: ReconstructionLoss_Stage2's generator and
# discriminator sides are the single-stage VQ formulas (its recipes set perceptual_loss
# "convnext_s", perceptual_weight 0.1, quantizer_weight 0, discriminator_weight 0.01); stage 1
# is the proxy-code cross-entropy below.

PROXY_CODES = 1024  # the MaskGIT-VQGAN codebook the stage-1 decoder predicts


def proxy_code_loss(logits: torch.Tensor, target_codes: torch.Tensor, quantizer_result: Mapping,
                    quantizer_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage 1: cross-entropy of the decoder's logits over the 1024 MaskGIT-VQGAN codes
    against the frozen VQGAN's codes of the same images, plus the quantizer loss.

    logits (B, 1024, G, G) (any dtype; fp32 inside, autocast off); target_codes (B, G*G) or
    (B, G, G) int64; quantizer_result: the quantizer's dict (quantizer_loss, commitment_loss,
    codebook_loss). -> (total, logs of detached scalars).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4 or logits.shape[1] != PROXY_CODES:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits: expected (B, {PROXY_CODES}, G, G) logits over the MaskGIT-VQGAN codes, got {got}")
    b, positions = logits.shape[0], logits.shape[2] * logits.shape[3]
    if (not isinstance(target_codes, torch.Tensor) or target_codes.dtype != torch.long
            or target_codes.numel() != b * positions):
        got = (f"{target_codes.dtype} {tuple(target_codes.shape)}" if isinstance(target_codes, torch.Tensor)
               else type(target_codes).__name__)
        raise ValueError(f"target_codes: expected int64 codes (B, {positions}) for logits {tuple(logits.shape)}, "
                         f"got {got}")
    if not isinstance(quantizer_result, Mapping) or "quantizer_loss" not in quantizer_result:
        raise TypeError("quantizer_result: expected the quantizer's dict (quantizer_loss, commitment_loss, "
                        f"codebook_loss), got {type(quantizer_result).__name__}")
    with torch.autocast(logits.device.type, enabled=False):
        ce = F.cross_entropy(logits.float().reshape(b, PROXY_CODES, positions), target_codes.reshape(b, positions))
        q = quantizer_weight * quantizer_result["quantizer_loss"].float()
        total = ce + q
    zero = ce.new_zeros(())
    logs = dict(total_loss=total, reconstruction_loss=ce, quantizer_loss=q,
                commitment_loss=quantizer_result.get("commitment_loss", zero),
                codebook_loss=quantizer_result.get("codebook_loss", zero))
    return total, {k: v.detach().float().to(ce.device) for k, v in logs.items()}
