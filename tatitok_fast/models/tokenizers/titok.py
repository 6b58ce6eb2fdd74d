"""TiTok ("An Image is Worth 32 Tokens for Reconstruction and Generation", arXiv 2406.07550):
drop-in for the official `modeling.titok.TiTok`: same config, same state-dict keys, same outputs.
It is TA-TiTok's tokenizer without the text path (the same encoder and ViT decoder body, vit.py).

    images (B, 3, H, W) in [0, 1] --encoder--> (B, C, 1, N) --VQ / KL--> tokens
    single-stage: tokens --decoder--> images (B, 3, H, W)
    two-stage (finetune_decoder, is_legacy): tokens --decoder--> logits over the 1024 MaskGIT-VQGAN
        codes (B, 1024, G, G) --softmax, mix the VQGAN codebook--> (B, 256, G, G) --pixel_decoder--> images
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn

from tatitok_fast import presets
from tatitok_fast.checkpoint import cfg_get
from tatitok_fast.models.nn.pretrained import PretrainedModel
from tatitok_fast.models.tokenizers.common import (check_images, check_latents, ids_to_latents, init_titok_weights,
                                                   tokenize_images)
from tatitok_fast.models.tokenizers.quantizers import DiagonalGaussianDistribution, VectorQuantizer
from tatitok_fast.models.tokenizers.vit import VIT_SIZES, PackedSelfAttention, TiTokDecoder, TiTokEncoder
from tatitok_fast.models.tokenizers.vqgan import Decoder as PixelDecoder
from tatitok_fast.models.tokenizers.vqgan import PixelQuantizer

# entries the official TiTok reads without a default (config.model.vq_model.X / config.dataset...)
_REQUIRED = ("model.vq_model.vit_enc_model_size", "model.vq_model.vit_dec_model_size",
             "model.vq_model.vit_enc_patch_size", "model.vq_model.vit_dec_patch_size",
             "model.vq_model.num_latent_tokens", "model.vq_model.token_size", "dataset.preprocessing.crop_size")
_REQUIRED_VQ = ("model.vq_model.codebook_size", "model.vq_model.commitment_cost", "model.vq_model.use_l2_norm")
_MISSING = object()


class TiTok(PretrainedModel):
    """The TiTok tokenizer (two-stage VQ, single-stage VQ or VAE), built from the official config.

    encode(x) -> (z_quantized, result): x (B, 3, H, W) in [0, 1]; z (B, C, 1, N);
        VQ: result dict with min_encoding_indices (B, 1, N) and the quantizer losses (zero for
        two-stage models, whose encoder is frozen); VAE: a DiagonalGaussianDistribution (z is its sample).
    decode(z) -> images (B, 3, H, W) on the [0, 1] scale, not clamped (stage-1 legacy models:
        the VQGAN logits (B, 1024, G, G)).
    decode_tokens(tokens): VQ ids (B, N) or (B, 1, N); VAE latents (B, C, 1, N).
    """

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        config = self.config
        vq = config["model"]["vq_model"]
        self.quantize_mode = vq.get("quantize_mode", "vq")
        self.finetune_decoder = vq.get("finetune_decoder", True)  # the official default
        self.num_latent_tokens = vq["num_latent_tokens"]
        self.token_size = vq["token_size"]
        self.image_size = config["dataset"]["preprocessing"]["crop_size"]
        # The official init: encoder, decoder, latent tokens, then apply(_init_weights) (trunc-normal
        # 0.02) to all of them; nn.MultiheadAttention's packed in_proj is a bare Parameter there
        # (xavier, zero bias). The quantizer and the MaskGIT-VQGAN modules keep their own init.
        self.encoder = TiTokEncoder(config)
        self.decoder = TiTokDecoder(config)
        self.latent_tokens = nn.Parameter(self.encoder.width ** -0.5 * torch.randn(self.num_latent_tokens,
                                                                                   self.encoder.width))
        self.apply(init_titok_weights)
        for attn in (m for m in self.modules() if isinstance(m, PackedSelfAttention)):
            attn.reset_like_multihead_attention()
        self.decoder.reset_head_to_canvas()
        if self.quantize_mode == "vq":
            self.codebook_size = vq["codebook_size"]
            self.quantize = VectorQuantizer(vq["codebook_size"], vq["token_size"], vq["commitment_cost"],
                                            vq["use_l2_norm"], vq.get("clustering_vq", False))
        else:
            self.codebook_size = None
        if self.finetune_decoder:  # MaskGIT-VQGAN codebook + decoder; the encoder side is frozen
            self.latent_tokens.requires_grad_(False)
            self.encoder.requires_grad_(False)
            self.quantize.requires_grad_(False)
            self.pixel_quantize = PixelQuantizer(*presets.MASKGIT_VQGAN_CODEBOOK)
            self.pixel_decoder = PixelDecoder(dict(presets.MASKGIT_VQGAN_CONFIG))

    @classmethod
    def validate_config(cls, config: Mapping[str, Any]) -> None:
        vq = cfg_get(config, "model.vq_model")
        if not isinstance(vq, Mapping):
            raise ValueError("config: expected a TiTok tokenizer config with model.vq_model (the official schema), "
                             "missing entry 'model.vq_model'")
        mode = vq.get("quantize_mode", "vq")
        if mode not in ("vq", "vae"):
            raise ValueError(f"config: model.vq_model.quantize_mode must be 'vq' or 'vae', got {mode!r}")
        required = _REQUIRED + (_REQUIRED_VQ if mode == "vq" else ())
        for key in required:
            if cfg_get(config, key, _MISSING) is _MISSING:
                raise ValueError(f"config: missing required entry {key!r} (a TiTok {mode.upper()} config needs "
                                 f"{', '.join(k.rsplit('.', 1)[1] for k in required)})")
        for key in ("vit_enc_model_size", "vit_dec_model_size"):
            if vq[key] not in VIT_SIZES:
                raise ValueError(f"config: model.vq_model.{key} must be one of {sorted(VIT_SIZES)}, got {vq[key]!r}")
        for key in ("num_latent_tokens", "token_size", "vit_enc_patch_size", "vit_dec_patch_size") + (
                ("codebook_size",) if mode == "vq" else ()):
            if not isinstance(vq[key], int) or isinstance(vq[key], bool) or vq[key] <= 0:
                raise ValueError(f"config: model.vq_model.{key} must be a positive int, got {vq[key]!r}")
        crop = cfg_get(config, "dataset.preprocessing.crop_size")
        if not isinstance(crop, int) or crop <= 0:
            raise ValueError(f"config: dataset.preprocessing.crop_size must be a positive int, got {crop!r}")
        finetune = vq.get("finetune_decoder", True)
        if finetune and mode != "vq":
            raise ValueError("config: model.vq_model.finetune_decoder=True (the two-stage MaskGIT-VQGAN decoder) "
                             "needs quantize_mode 'vq' (the official TiTok raises here too)")
        if finetune and not vq.get("is_legacy", True):
            raise ValueError("config: model.vq_model.finetune_decoder=True needs is_legacy=True (the decoder must "
                             "predict the 1024 MaskGIT-VQGAN codes the pixel decoder mixes)")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.transformer.grad_checkpointing = enable
        self.decoder.transformer.grad_checkpointing = enable

    # ---- the official surface ----
    def encode(self, x: torch.Tensor):
        check_images(x, self.image_size, "TiTok")
        if self.finetune_decoder:  # frozen encoder + quantizer, zeroed losses (official titok.py:160-171)
            with torch.no_grad():
                z = self.encoder(pixel_values=x, latent_tokens=self.latent_tokens)
                z_quantized, result = self.quantize(z)
                for key in ("quantizer_loss", "commitment_loss", "codebook_loss"):
                    result[key] = result[key] * 0
            return z_quantized, result
        z = self.encoder(pixel_values=x, latent_tokens=self.latent_tokens)
        if self.quantize_mode == "vq":
            return self.quantize(z)
        posterior = DiagonalGaussianDistribution(z)
        return posterior.first_sample, posterior

    def decode(self, z_quantized: torch.Tensor) -> torch.Tensor:
        decoded = self.decoder(z_quantized)
        if self.finetune_decoder:
            # softmax over the 1024 codes (fp32) on the (B, G, G, 1024) memory of the logits, then
            # the official einsum('nchw,cd->ndhw') as one GEMM: (B, G, G, 1024) @ (1024, 256)
            probs = decoded.permute(0, 2, 3, 1).float().softmax(dim=-1)
            decoded = self.pixel_decoder(self.pixel_quantize.soft_codes(probs))
        return decoded

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.quantize_mode == "vq":
            z = ids_to_latents(tokens, self.quantize, self.num_latent_tokens, self.codebook_size)
        else:
            z = check_latents(tokens, self.token_size, self.num_latent_tokens)
        return self.decode(z)

    def forward(self, x: torch.Tensor):
        z, result = self.encode(x)
        return self.decode(z), result

    # ---- high-level API (as TATiTok's, without captions) ----
    def tokenize(self, images, *, sample: bool = False) -> torch.Tensor:
        """PIL images, uint8 tensors (B, 3, H, W)/(3, H, W), float tensors in [0, 1] or file
        paths -> tokens: VQ ids (B, 1, N) int64; VAE (B, C, 1, N) (posterior mean, or a sample)."""
        return tokenize_images(self, images, sample)

    @torch.no_grad()
    def detokenize(self, tokens: torch.Tensor, captions=None, text_encoder=None) -> torch.Tensor:
        """tokens (see decode_tokens) -> images (B, 3, H, W) float32 in [0, 1]. TiTok has no text
        path: captions and text_encoder are accepted (the TA-TiTok signature) and ignored."""
        if self.decoder.is_legacy and not self.finetune_decoder:
            raise ValueError("tokens: this is a stage-1 TiTok (is_legacy, finetune_decoder=False): its decoder "
                             "predicts MaskGIT-VQGAN codes, not pixels; decode their argmax with MaskGITVQGAN")
        p = next(self.parameters())
        with torch.autocast(p.device.type, enabled=False):
            out = self.decode_tokens(tokens)
        return out.float().clamp_(0.0, 1.0)
