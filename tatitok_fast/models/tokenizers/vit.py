"""The ViT pieces every TiTok-family tokenizer shares: the sizes table, pre-LN blocks with one
packed QKV (the nn.MultiheadAttention state-dict layout), the patch-embedding GEMM, the TiTok
encoder (patches + class token + learned latent tokens -> ViT -> latent tokens) and the TiTok
decoder (mask tokens + latent tokens [+ TA-TiTok's text tokens] -> ViT -> pixels or VQGAN logits).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from tatitok_fast.checkpoint import cfg_require
from tatitok_fast.models.nn.layers import Linear, attention, conv2d, linear

VIT_SIZES = {  # width, layers, heads
    "micro": (64, 2, 2),  # not official sizes: the CPU demo (micro) and tests
    "tiny": (128, 4, 4),
    "small": (512, 8, 8),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


# ---------------------------------------------------------------------------------------
# Transformer blocks (pre-LN, packed QKV; the open_clip / nn.MultiheadAttention layout)

class PackedSelfAttention(nn.Module):
    """Multi-head self-attention with one packed QKV projection. The state dict uses
    nn.MultiheadAttention's names (in_proj_weight, in_proj_bias, out_proj.*) while the
    projection itself comes from the swappable Linear factory."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj = Linear(width, 3 * width)
        self.out_proj = Linear(width, width)
        self.register_state_dict_post_hook(_packed_names_on_save)
        self.register_load_state_dict_pre_hook(_packed_names_on_load)

    # the state-dict names as attributes too (torch.distributed.checkpoint resolves keys by getattr)
    @property
    def in_proj_weight(self) -> torch.Tensor:
        return self.in_proj.weight

    @property
    def in_proj_bias(self) -> torch.Tensor:
        return self.in_proj.bias

    @torch.no_grad()
    def reset_like_multihead_attention(self) -> None:
        """nn.MultiheadAttention._reset_parameters: xavier-uniform packed QKV, zero biases"""
        nn.init.xavier_uniform_(self.in_proj.weight)
        self.in_proj.bias.zero_()
        self.out_proj.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, seq, width = x.shape
        qkv = self.in_proj(x).view(b, seq, 3, self.heads, width // self.heads)  # (B, L, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, Dh) each
        return self.out_proj(attention(q, k, v))


def _packed_names_on_save(module, state_dict, prefix, local_metadata):
    for suffix in ("weight", "bias"):
        key = f"{prefix}in_proj.{suffix}"
        if key in state_dict:
            state_dict[f"{prefix}in_proj_{suffix}"] = state_dict.pop(key)


def _packed_names_on_load(module, state_dict, prefix, *args):
    for suffix in ("weight", "bias"):
        key = f"{prefix}in_proj_{suffix}"
        if key in state_dict:
            state_dict[f"{prefix}in_proj.{suffix}"] = state_dict.pop(key)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = PackedSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", Linear(width, hidden)), ("gelu", nn.GELU()),
                                              ("c_proj", Linear(hidden, width))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D)
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.ModuleList):
    """A stack of blocks with an optional activation-checkpointing switch."""

    def __init__(self, width: int, layers: int, heads: int):
        super().__init__([ResidualAttentionBlock(width, heads) for _ in range(layers)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


def _pointwise_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A 1x1 Conv2d applied on the last dim of (..., C_in) as a matmul -> (..., C_out)."""
    return linear(x, conv.weight.flatten(1), conv.bias)


def _patch_embed(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """The p x p, stride-p patch-embedding Conv2d as one matmul over flattened patches:
    (B, C, H, W) -> (B, H/p * W/p, D), tokens in row-major grid order (the conv's flatten(2)).
    A GEMM with K = C*p*p = 768 runs at matmul speed where the convolution kernels do not
    (oneDNN's 16x16/stride-16 conv: 0.11 s vs ~0.01 s for B=4 at 256x256 on 2 Zen 3 cores)."""
    b, c, h, w = x.shape
    p = conv.kernel_size[0]
    patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, Gh, Gw, C, p, p)
    return linear(patches.reshape(b, (h // p) * (w // p), c * p * p), conv.weight.flatten(1), conv.bias)


def _vit_geometry(module: nn.Module, config: Mapping[str, Any], side: str) -> None:
    """Image size, patch grid and ViT size of the encoder (side="enc") or decoder ("dec")."""
    vq = config["model"]["vq_model"]
    module.image_size = cfg_require(config, "dataset.preprocessing.crop_size")
    module.patch_size = vq[f"vit_{side}_patch_size"]
    if module.image_size % module.patch_size:
        raise ValueError(f"crop_size {module.image_size} is not a multiple of vit_{side}_patch_size {module.patch_size}")
    module.grid_size = module.image_size // module.patch_size
    module.width, module.num_layers, module.num_heads = VIT_SIZES[vq[f"vit_{side}_model_size"]]
    module.num_latent_tokens = vq["num_latent_tokens"]
    module.is_legacy = vq.get("is_legacy", True)
    # not an official option (the official classes ignore the key and would decode such a model wrongly):
    # latent token j starts from the patches of its group of G*G/N consecutive (row-major) patches, and
    # the decoder's mask tokens of that group start from latent j, so that every token carries its own
    # region of the image from step 0 (a small model trained from scratch otherwise sits at the mean
    # image: with near-uniform attention each latent sees only the image's average)
    module.grid_anchored = bool(vq.get("grid_anchored_latents", False))
    if module.grid_anchored and module.grid_size ** 2 % module.num_latent_tokens:
        raise ValueError(f"grid_anchored_latents: the {module.grid_size ** 2} patches must split evenly into "
                         f"num_latent_tokens={module.num_latent_tokens} groups")


# ---------------------------------------------------------------------------------------
# Encoder: patches + class token + learned latent tokens -> ViT -> latent tokens

class TiTokEncoder(nn.Module):
    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        vq = config["model"]["vq_model"]
        _vit_geometry(self, config, "enc")
        self.token_size = vq["token_size"] * (2 if vq.get("quantize_mode", "vq") == "vae" else 1)  # KL: mean + logvar

        w = self.width
        scale = w ** -0.5
        self.patch_embed = nn.Conv2d(3, w, kernel_size=self.patch_size, stride=self.patch_size, bias=True)
        self.class_embedding = nn.Parameter(scale * torch.randn(1, w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size ** 2 + 1, w))
        self.latent_token_positional_embedding = nn.Parameter(scale * torch.randn(self.num_latent_tokens, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = Transformer(w, self.num_layers, self.num_heads)
        self.ln_post = nn.LayerNorm(w)
        self.conv_out = nn.Conv2d(w, self.token_size, kernel_size=1, bias=True)

    def forward(self, pixel_values: torch.Tensor, latent_tokens: torch.Tensor) -> torch.Tensor:
        b = pixel_values.shape[0]
        patches = _patch_embed(pixel_values.to(self.patch_embed.weight.dtype), self.patch_embed)  # (B, G*G, D)
        cls = self.class_embedding.to(patches.dtype).expand(b, -1, -1)
        x = torch.cat([cls, patches], dim=1) + self.positional_embedding.to(patches.dtype)  # (B, 1+G*G, D)
        lat = (latent_tokens.to(x.dtype) + self.latent_token_positional_embedding.to(x.dtype)).expand(b, -1, -1)
        if self.grid_anchored:  # + the mean patch embedding of each latent's group (B, N, D)
            lat = lat + patches.unflatten(1, (self.num_latent_tokens, -1)).mean(2)
        x = self.ln_pre(torch.cat([x, lat], dim=1))  # (B, 1+G*G+N, D)
        x = self.transformer(x)
        lat = self.ln_post(x[:, 1 + self.grid_size ** 2:])  # (B, N, D)
        if self.is_legacy:  # the original TiTok reinterprets (B, N, D) memory as (B, D, N)
            lat = lat.reshape(b, self.width, self.num_latent_tokens).transpose(1, 2)
        out = _pointwise_conv(lat, self.conv_out)  # (B, N, C)
        return out.transpose(1, 2).unsqueeze(2)  # (B, C, 1, N)


# ---------------------------------------------------------------------------------------
# Decoder: [class, G*G mask tokens, N latent tokens, optional extra tokens] -> ViT -> head

VQGAN_CODES = 1024  # the is_legacy head predicts logits over the MaskGIT-VQGAN codebook


class TiTokDecoder(nn.Module):
    """The TiTok ViT decoder (official blocks.TiTokDecoder, same state-dict keys).

    forward(z (B, C, 1, N)) -> is_legacy=False: RGB (B, 3, G*p, G*p);
    is_legacy=True: logits over the 1024 MaskGIT-VQGAN codes (B, 1024, G, G), a channels-last
    view (the two-stage decode softmaxes over the last dim of its memory).
    Subclasses add tokens after the latents through `body(z, suffix)` (TA-TiTok's text)."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        vq = config["model"]["vq_model"]
        _vit_geometry(self, config, "dec")
        self.token_size = vq["token_size"]

        w = self.width
        scale = w ** -0.5
        self.decoder_embed = Linear(self.token_size, w)
        self.class_embedding = nn.Parameter(scale * torch.randn(1, w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size ** 2 + 1, w))
        self.mask_token = nn.Parameter(scale * torch.randn(1, 1, w))
        self.latent_token_positional_embedding = nn.Parameter(scale * torch.randn(self.num_latent_tokens, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = Transformer(w, self.num_layers, self.num_heads)
        self.ln_post = nn.LayerNorm(w)
        p = self.patch_size
        if self.is_legacy:  # ffn.0 -> tanh -> ffn.2: per-position logits over the VQGAN codes
            self.ffn = nn.Sequential(nn.Conv2d(w, 2 * w, 1, padding=0, bias=True), nn.Tanh(),
                                     nn.Conv2d(2 * w, VQGAN_CODES, 1, padding=0, bias=True))
            self.conv_out = nn.Identity()
        else:  # ffn.0 to p*p*3 channels; the pixel shuffle is in head()
            self.ffn = nn.Sequential(nn.Conv2d(w, p * p * 3, 1, padding=0, bias=True))
            self.conv_out = nn.Conv2d(3, 3, 3, padding=1, bias=True)
        self.init_canvas = vq.get("decoder_init_canvas")  # applied by reset_head_to_canvas(), after the model's init
        if self.init_canvas is not None and (isinstance(self.init_canvas, bool) or
                                             not isinstance(self.init_canvas, (int, float)) or
                                             not 0.0 <= self.init_canvas <= 1.0):
            raise ValueError(f"decoder_init_canvas: expected a pixel value in [0, 1] (or null), got {self.init_canvas!r}")
        if self.init_canvas is not None and self.is_legacy:
            raise ValueError("decoder_init_canvas: the is_legacy decoder predicts VQGAN codes, not pixels")

    @torch.no_grad()
    def reset_head_to_canvas(self) -> None:
        """Not an official option (config decoder_init_canvas = v in [0, 1]): the pixel head's
        weights start at zero and every output pixel at v (1.0: white), as DiT zero-inits its final
        layer. From scratch, the head then learns from the image-dependent residual instead of first
        spending its steps cancelling random outputs (which also teaches it to ignore its tokens)."""
        if self.init_canvas is None:
            return
        self.ffn[0].weight.zero_()
        self.ffn[0].bias.zero_()
        self.conv_out.bias.fill_(float(self.init_canvas))

    def body(self, z_quantized: torch.Tensor, suffix: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, C, 1, N) [+ suffix (B, L, D) appended after the latents] -> ViT -> the G*G
        mask-token positions after ln_post (B, G*G, D)."""
        b, c, h, n = z_quantized.shape
        if h != 1 or n != self.num_latent_tokens:
            raise ValueError(f"tokens: expected (B, C, 1, {self.num_latent_tokens}), got {tuple(z_quantized.shape)}")
        wdtype = self.class_embedding.dtype  # inputs follow the weights (fp32 tokens into a bf16 model)
        x = self.decoder_embed(z_quantized.reshape(b, c, n).transpose(1, 2).to(wdtype))  # (B, N, D)
        dtype = x.dtype
        g2 = self.grid_size ** 2
        prefix = torch.cat([self.class_embedding.to(dtype).unsqueeze(0), self.mask_token.to(dtype).expand(1, g2, -1)],
                           dim=1) + self.positional_embedding.to(dtype)  # (1, 1+G*G, D)
        prefix = prefix.expand(b, -1, -1)
        if self.grid_anchored:  # mask tokens of latent j's patch group + its embedding
            prefix = torch.cat([prefix[:, :1], prefix[:, 1:] + x.repeat_interleave(g2 // n, dim=1)], dim=1)
        x = x + self.latent_token_positional_embedding[:n]
        parts = [prefix.to(x.dtype), x]
        if suffix is not None:
            parts.append(suffix.to(x.dtype))
        x = self.transformer(self.ln_pre(torch.cat(parts, dim=1)))
        return self.ln_post(x[:, 1:1 + g2])  # (B, G*G, D)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """(B, G*G, D) -> RGB (B, 3, G*p, G*p), or legacy logits (B, 1024, G, G) (channels-last view)."""
        b, g = x.shape[0], self.grid_size
        if self.is_legacy:
            x = torch.tanh(_pointwise_conv(x, self.ffn[0]))
            x = _pointwise_conv(x, self.ffn[2])  # (B, G*G, 1024)
            return x.view(b, g, g, VQGAN_CODES).permute(0, 3, 1, 2)
        x = _pointwise_conv(x, self.ffn[0])  # (B, G*G, p*p*3), channels ordered (p1, p2, c)
        p = self.patch_size
        x = x.view(b, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(b, 3, g * p, g * p)  # pixel shuffle
        return conv2d(x, self.conv_out)

    def forward(self, z_quantized: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(z_quantized))
