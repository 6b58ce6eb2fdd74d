"""TA-TiTok: text-aware 1-D image tokenizer (VQ or KL tokens), drop-in for the reference
`modeling.tatitok.TATiTok`: same config, same state-dict keys, same outputs.

    images (B, 3, H, W) in [0, 1] --encoder--> (B, C, 1, N) --VQ / KL--> tokens
    tokens + CLIP text guidance (B, 77, 768) --decoder--> images (B, 3, H, W)
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn

from tatitok_fast.checkpoint import cfg_get
from tatitok_fast.models.nn.layers import Linear
from tatitok_fast.models.nn.pretrained import PretrainedModel, default_text_encoder
from tatitok_fast.models.tokenizers.common import (check_images, check_latents, ids_to_latents, init_titok_weights,
                                                   tokenize_images)
from tatitok_fast.models.tokenizers.quantizers import DiagonalGaussianDistribution, VectorQuantizer
from tatitok_fast.models.tokenizers.vit import VIT_SIZES, PackedSelfAttention, TiTokDecoder, TiTokEncoder


# ---------------------------------------------------------------------------------------
# Text-aware decoder: the TiTok decoder with [class, G*G mask tokens, latent tokens, text tokens]

class TATiTokDecoder(TiTokDecoder):
    """TiTokDecoder (RGB head) + the projected CLIP text guidance appended after the latents."""

    def __init__(self, config: Mapping[str, Any]):
        vq = config["model"]["vq_model"]
        if vq.get("is_legacy", True):
            raise NotImplementedError("is_legacy=True decoders (TiTok's 1024-way VQGAN head) are not TA-TiTok models")
        super().__init__(config)
        self.text_context_length = vq.get("text_context_length", 77)
        self.text_embed_dim = vq.get("text_embed_dim", 768)
        w = self.width
        self.text_guidance_proj = Linear(self.text_embed_dim, w)
        self.text_guidance_positional_embedding = nn.Parameter(w ** -0.5 * torch.randn(self.text_context_length, w))

    def forward(self, z_quantized: torch.Tensor, text_guidance: torch.Tensor) -> torch.Tensor:
        wdtype = self.class_embedding.dtype
        text = self.text_guidance_proj(text_guidance.to(wdtype)) + self.text_guidance_positional_embedding  # (B, 77, D)
        return self.head(self.body(z_quantized, suffix=text))


# ---------------------------------------------------------------------------------------
# The tokenizer

class TATiTok(PretrainedModel):
    """TA-TiTok tokenizer (VQ or KL), built from the official config dict.

    encode(x) -> (z_quantized, result_dict): x (B, 3, H, W) in [0, 1]; z (B, C, 1, N);
        VQ: dict with min_encoding_indices (B, 1, N) and the quantizer losses;
        KL: a DiagonalGaussianDistribution (z is its first sample).
    decode(z, text_guidance (B, 77, 768)) -> images (B, 3, H, W), [0, 1] scale (clamp to use).
    decode_tokens(tokens, text_guidance): VQ tokens (B, 1, N) or (B, N) ids; KL (B, C, 1, N).
    """

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        config = self.config
        vq = config["model"]["vq_model"]
        self.quantize_mode = vq.get("quantize_mode", "vq")
        self.finetune_decoder = vq.get("finetune_decoder", False)
        self.num_latent_tokens = vq["num_latent_tokens"]
        self.token_size = vq["token_size"]
        self.image_size = config["dataset"]["preprocessing"]["crop_size"]
        # The reference's init: TiTok.__init__ applies _init_weights (trunc-normal 0.02) to the
        # encoder, then TATiTok swaps in its text-aware decoder, which keeps PyTorch's default
        # init. nn.MultiheadAttention's packed in_proj is a bare Parameter: xavier, zero bias.
        self.encoder = TiTokEncoder(config)
        self.latent_tokens = nn.Parameter(self.encoder.width ** -0.5 * torch.randn(self.num_latent_tokens,
                                                                                   self.encoder.width))
        self.encoder.apply(self._init_weights)
        self.decoder = TATiTokDecoder(config)
        for attn in (m for m in self.modules() if isinstance(m, PackedSelfAttention)):
            attn.reset_like_multihead_attention()
        self.decoder.reset_head_to_canvas()
        if self.quantize_mode == "vq":
            self.codebook_size = vq["codebook_size"]
            self.quantize = VectorQuantizer(vq["codebook_size"], vq["token_size"], vq.get("commitment_cost", 0.25),
                                            vq.get("use_l2_norm", False), vq.get("clustering_vq", False))
        else:
            self.codebook_size = None

    @classmethod
    def validate_config(cls, config: Mapping[str, Any]) -> None:
        vq = cfg_get(config, "model.vq_model")
        if not isinstance(vq, Mapping):
            raise ValueError("config: expected a tokenizer config with model.vq_model (the official schema)")
        mode = vq.get("quantize_mode", "vq")
        if mode not in ("vq", "vae"):
            raise ValueError(f"config: model.vq_model.quantize_mode must be 'vq' or 'vae', got {mode!r}")
        if vq.get("finetune_decoder", False):
            raise NotImplementedError("config: finetune_decoder=True (TiTok's two-stage VQGAN decoder) is not "
                                      "a TA-TiTok setting")
        for key in ("vit_enc_model_size", "vit_dec_model_size"):
            if vq.get(key) not in VIT_SIZES:
                raise ValueError(f"config: model.vq_model.{key} must be one of {sorted(VIT_SIZES)}, got {vq.get(key)!r}")
        for key in ("num_latent_tokens", "token_size", "vit_enc_patch_size", "vit_dec_patch_size"):
            if not isinstance(vq.get(key), int) or vq[key] <= 0:
                raise ValueError(f"config: model.vq_model.{key} must be a positive int, got {vq.get(key)!r}")
        if mode == "vq" and not isinstance(vq.get("codebook_size"), int):
            raise ValueError("config: a VQ tokenizer needs model.vq_model.codebook_size")
        if not isinstance(cfg_get(config, "dataset.preprocessing.crop_size"), int):
            raise ValueError("config: missing dataset.preprocessing.crop_size")

    _init_weights = staticmethod(init_titok_weights)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.transformer.grad_checkpointing = enable
        self.decoder.transformer.grad_checkpointing = enable

    # ---- the reference's surface ----
    def encode(self, x: torch.Tensor, noise: torch.Tensor | None = None):
        """noise (KL only): optional (B, C, 1, N) standard-normal noise of the posterior sample
        (training draws it per sample, so that any number of processes draws the same)."""
        check_images(x, self.image_size, "TATiTok")
        z = self.encoder(pixel_values=x, latent_tokens=self.latent_tokens)
        if self.quantize_mode == "vq":
            if noise is not None:
                raise ValueError("noise: a VQ tokenizer draws no posterior sample")
            return self.quantize(z)
        posterior = DiagonalGaussianDistribution(z, noise=noise)
        return posterior.first_sample, posterior

    def decode(self, z_quantized: torch.Tensor, text_guidance: torch.Tensor) -> torch.Tensor:
        _check_text_guidance(text_guidance, z_quantized.shape[0], self.decoder)
        return self.decoder(z_quantized, text_guidance)

    def decode_tokens(self, tokens: torch.Tensor, text_guidance: torch.Tensor) -> torch.Tensor:
        if self.quantize_mode == "vq":
            z = ids_to_latents(tokens, self.quantize, self.num_latent_tokens, self.codebook_size)
        else:
            z = check_latents(tokens, self.token_size, self.num_latent_tokens)
        return self.decode(z, text_guidance)

    def forward(self, x: torch.Tensor, text_guidance: torch.Tensor, noise: torch.Tensor | None = None):
        z, result = self.encode(x, noise)
        return self.decode(z, text_guidance), result

    # ---- high-level API ----
    def tokenize(self, images, *, sample: bool = False) -> torch.Tensor:
        """PIL images, uint8 tensors (B, 3, H, W)/(3, H, W), float tensors in [0, 1] or file
        paths -> tokens: VQ ids (B, 1, N) int64; KL (B, C, 1, N) (posterior mean, or a sample)."""
        return tokenize_images(self, images, sample)

    @torch.no_grad()
    def detokenize(self, tokens: torch.Tensor, captions, text_encoder=None) -> torch.Tensor:
        """tokens (see decode_tokens) + one caption per image -> images (B, 3, H, W) in [0, 1].
        text_encoder: a tatitok_fast.text.CLIPTextEncoder (default: ViT-L-14-336/openai)."""
        if isinstance(captions, str):
            captions = [captions]
        if len(captions) != tokens.shape[0]:
            raise ValueError(f"captions: expected {tokens.shape[0]} captions (one per image), got {len(captions)}")
        if text_encoder is None:
            text_encoder = default_text_encoder(self, tokens.device)
        guidance = text_encoder(captions).guidance.to(tokens.device)
        p = next(self.parameters())
        with torch.autocast(p.device.type, enabled=False):
            out = self.decode_tokens(tokens, guidance.to(p.dtype))
        return out.float().clamp_(0.0, 1.0)


def _check_text_guidance(t: torch.Tensor, batch: int, decoder: TATiTokDecoder) -> None:
    expected = (batch, decoder.text_context_length, decoder.text_embed_dim)
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != expected:
        raise ValueError(f"text_guidance: expected CLIP text states {expected}, got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
