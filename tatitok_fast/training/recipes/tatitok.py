"""TA-TiTok one-stage training on image + caption shards (the official recipe, §1 of
TRAINING.md):

    jpg/png/webp + txt --decode--> resize shorter side (bicubic, antialias), random crop,
        random flip, [0, 1] --batch_transform--> CLIP text guidance (final layer after ln_final,
        (B, 77, W), no grad) --forward_loss--> tokenizer(x, guidance) -> TokenizerLoss
        generator side (L2 + perceptual + GAN + VQ / KL)
    aux_loss: the discriminator side (hinge + LeCAM) on the same batch, after the tokenizer's
        step, from loss.discriminator_start on, with its own optimizer and schedule.

Clustering VQ refreshes the codebook inside the tokenizer's forward from features gathered
over every rank.
"""
from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn as nn

from tatitok_fast.losses.tokenizer import TokenizerLoss, TokenizerLossConfig
from tatitok_fast.training.config import ConfigError
from tatitok_fast.training.data import decode_image
from tatitok_fast.training.recipes import common
from tatitok_fast.training.spec import Recipe, StepOutput, per_sample_generators

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SALT_POSTERIOR = 21  # the KL posterior's sample noise


def caption_of(sample: dict) -> str:
    if "txt" in sample:
        return sample["txt"].decode("utf-8").strip()
    if "json" in sample:
        meta = json.loads(sample["json"])
        return str(meta.get("caption", meta.get("text", "")))
    return ""


def random_resized_crop(img, size: int, rng: np.random.Generator, flip: bool) -> torch.Tensor:
    """PIL image -> (3, size, size) in [0, 1]: shorter side to `size` (bicubic, antialias),
    a random size x size crop, a random horizontal flip (the official train transform)."""
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
    left, top = int(rng.integers(0, nw - size + 1)), int(rng.integers(0, nh - size + 1))
    x = torch.from_numpy(np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8).copy())
    x = x.permute(2, 0, 1).float() / 255.0
    return x.flip(-1) if flip and rng.random() < 0.5 else x


class TATiTokRecipe(Recipe):
    name = "tatitok"
    loss_config = TokenizerLossConfig

    def __init__(self, cfg, device):
        super().__init__(cfg, device)
        self.aux_start_step = cfg.loss.discriminator_start
        self._preview: torch.Tensor | None = None

    # ---- model ----
    def build_model(self) -> nn.Module:
        from tatitok_fast import TATiTok

        model = common.build(TATiTok, common.model_config(self.cfg.model, "tokenizer"), self.cfg)
        self.mode, self.crop = model.quantize_mode, self.cfg.data.crop_size or model.image_size
        self.codebook_size = model.codebook_size  # kept: forward_loss gets the DDP wrapper, not the model
        self.latent_shape = (model.token_size, 1, model.num_latent_tokens)  # (C, 1, N)
        if self.crop != model.image_size:
            raise ConfigError(f"data.crop_size: {self.crop} differs from the model's crop_size {model.image_size}")
        return model.train()

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.encoder.transformer) + list(model.decoder.transformer)

    def build_loss(self) -> nn.Module:
        try:
            self.loss_module = TokenizerLoss.from_config(self.cfg.loss, self.mode)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"loss: {exc}") from None
        return self.loss_module

    def build_frozen(self) -> None:
        self.text = common.text_encoder(self.cfg.model.text_encoder, self.device, self.cfg.model.text_cache)
        self._inception = None
        e = self.cfg.eval
        if e.interval and e.shards and e.inception_weights != "none":  # fails here, before training, when offline
            from tatitok_fast.evaluation.inception import InceptionFeatures

            self._inception = InceptionFeatures(e.inception_weights or None, device=self.device)

    # ---- data ----
    def decode_sample(self, sample: dict, rng: np.random.Generator) -> dict:
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None:
            raise ValueError(f"sample {sample.get('__key__')}: no image ({'/'.join(IMAGE_KEYS)})")
        image = random_resized_crop(decode_image(sample[key]), self.crop, rng, self.cfg.data.random_flip)
        return {"image": image, "text": caption_of(sample), "__key__": sample["__key__"]}

    def batch_transform(self, batch: dict) -> dict:
        batch["guidance"] = self.text(batch["text"]).guidance.float().to(self.device)  # (B, 77, W)
        if self.mode == "vae":  # per-sample posterior noise (B, C, 1, N): the same draws at any world size
            batch["posterior_noise"] = torch.stack([torch.randn(self.latent_shape, generator=g) for g in
                                                    per_sample_generators(batch["__seed__"], SALT_POSTERIOR)]
                                                   ).to(self.device)
        if self._preview is None:  # a fixed batch for the reconstruction grids
            self._preview = batch["image"][: self.cfg.samples.num].detach().clone()
            self._preview_guidance = batch["guidance"][: self.cfg.samples.num].clone()
        return batch

    # ---- step ----
    def forward_loss(self, model: nn.Module, batch: dict, step: int) -> StepOutput:
        x = batch["image"]
        recon, extra = model(x, batch["guidance"], batch.get("posterior_noise"))
        loss, logs = self.loss_module.generator_loss(x, recon.float(), extra, step)
        logs = {k: v for k, v in logs.items() if k != "total_loss"}
        if self.mode == "vq" and isinstance(extra, dict) and "min_encoding_indices" in extra:
            ids = extra["min_encoding_indices"].reshape(-1)
            logs["codebook_usage"] = torch.unique(ids).numel() / self.codebook_size
        return StepOutput(loss, logs, {"recon": recon.detach().float()})

    def aux_loss(self, loss_module: nn.Module, batch: dict, extras: dict, step: int) -> StepOutput | None:
        if not loss_module.discriminator_active(step):
            return None
        loss, logs = loss_module.discriminator_loss(batch["image"], extras["recon"], step)
        return StepOutput(loss, {f"disc/{k}": v for k, v in logs.items()})

    def flops_per_sample(self, model: nn.Module) -> float:
        """6 x linear params x tokens per ViT + attention, for MFU (convs left out)."""
        g2, n = model.encoder.grid_size ** 2, model.num_latent_tokens
        total = 0.0
        for vit, seq in ((model.encoder, 1 + g2 + n), (model.decoder, 1 + g2 + n + model.decoder.text_context_length)):
            params = sum(m.weight.numel() for m in vit.transformer.modules() if isinstance(m, nn.Linear))
            total += 6.0 * params * seq + 12.0 * vit.num_layers * vit.width * seq ** 2
        return total

    # ---- outputs ----
    def log_samples(self, model: nn.Module, step: int) -> dict[str, torch.Tensor]:
        if self._preview is None:
            return {}
        recon, _ = model(self._preview.to(self.device), self._preview_guidance)
        return {"originals": self._preview, "reconstructions": recon.float().clamp(0, 1)}

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        """Reconstruction metrics on eval.shards (center crops, EMA weights): PSNR, SSIM,
        codebook usage / entropy, and rFID / IS unless eval.inception_weights = 'none'."""
        from tatitok_fast.evaluation.data import image_batches
        from tatitok_fast.evaluation.reconstruction import evaluate_reconstruction

        e = self.cfg.eval
        if not e.shards:
            return {}
        batches = image_batches(e.shards, self.crop, self.cfg.training.local_batch_size, max_images=e.num_samples)
        out = evaluate_reconstruction(model, batches, self.text, features=self._inception,
                                      max_images=e.num_samples, all_reduce=False)
        return {k: float(v) for k, v in out.items() if isinstance(v, (int, float))}

