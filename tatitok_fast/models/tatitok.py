"""TA-TiTok: text-aware 1-D image tokenizer (VQ or KL tokens), drop-in for the reference
`modeling.tatitok.TATiTok`: same config, same state-dict keys, same outputs.

    images (B, 3, H, W) in [0, 1] --encoder--> (B, C, 1, N) --VQ / KL--> tokens
    tokens + CLIP text guidance (B, 77, 768) --decoder--> images (B, 3, H, W)
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tatitok_fast import ops
from tatitok_fast.checkpoint import cfg_get, cfg_require
from tatitok_fast.models.layers import Linear, attention, conv2d, linear
from tatitok_fast.models.pretrained import PretrainedModel, default_text_encoder
from tatitok_fast.ops.reference import kl_sample_ref, vq_nearest_code_ref

VIT_SIZES = {  # width, layers, heads
    "tiny": (128, 4, 4),  # not an official size: CPU demos and tests
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
        x = _patch_embed(pixel_values.to(self.patch_embed.weight.dtype), self.patch_embed)  # (B, G*G, D)
        cls = self.class_embedding.to(x.dtype).expand(b, -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1+G*G, D)
        lat = (latent_tokens.to(x.dtype) + self.latent_token_positional_embedding.to(x.dtype)).expand(b, -1, -1)
        x = self.ln_pre(torch.cat([x, lat], dim=1))  # (B, 1+G*G+N, D)
        x = self.transformer(x)
        lat = self.ln_post(x[:, 1 + self.grid_size ** 2:])  # (B, N, D)
        if self.is_legacy:  # the original TiTok reinterprets (B, N, D) memory as (B, D, N)
            lat = lat.reshape(b, self.width, self.num_latent_tokens).transpose(1, 2)
        out = _pointwise_conv(lat, self.conv_out)  # (B, N, C)
        return out.transpose(1, 2).unsqueeze(2)  # (B, C, 1, N)


# ---------------------------------------------------------------------------------------
# Text-aware decoder: [class, G*G mask tokens, latent tokens, text tokens] -> ViT -> pixels

class TATiTokDecoder(nn.Module):
    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        vq = config["model"]["vq_model"]
        _vit_geometry(self, config, "dec")
        self.token_size = vq["token_size"]
        self.text_context_length = vq.get("text_context_length", 77)
        self.text_embed_dim = vq.get("text_embed_dim", 768)
        if self.is_legacy:
            raise NotImplementedError("is_legacy=True decoders (TiTok's 1024-way VQGAN head) are not TA-TiTok models")

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
        self.ffn = nn.Sequential(nn.Conv2d(w, p * p * 3, 1, padding=0, bias=True))  # ffn.0; pixel shuffle in forward
        self.conv_out = nn.Conv2d(3, 3, 3, padding=1, bias=True)
        self.text_guidance_proj = Linear(self.text_embed_dim, w)
        self.text_guidance_positional_embedding = nn.Parameter(scale * torch.randn(self.text_context_length, w))

    def forward(self, z_quantized: torch.Tensor, text_guidance: torch.Tensor) -> torch.Tensor:
        b, c, h, n = z_quantized.shape
        if h != 1 or n != self.num_latent_tokens:
            raise ValueError(f"tokens: expected (B, C, 1, {self.num_latent_tokens}), got {tuple(z_quantized.shape)}")
        wdtype = self.class_embedding.dtype  # inputs follow the weights (fp32 tokens into a bf16 model)
        x = self.decoder_embed(z_quantized.reshape(b, c, n).transpose(1, 2).to(wdtype))  # (B, N, D)
        dtype = x.dtype
        g2 = self.grid_size ** 2
        prefix = torch.cat([self.class_embedding.to(dtype).unsqueeze(0), self.mask_token.to(dtype).expand(1, g2, -1)],
                           dim=1) + self.positional_embedding.to(dtype)  # (1, 1+G*G, D)
        x = x + self.latent_token_positional_embedding[:n]
        text = self.text_guidance_proj(text_guidance.to(wdtype)) + self.text_guidance_positional_embedding  # (B, 77, D)
        x = torch.cat([prefix.expand(b, -1, -1).to(x.dtype), x, text.to(x.dtype)], dim=1)
        x = self.transformer(self.ln_pre(x))
        x = self.ln_post(x[:, 1:1 + g2])  # (B, G*G, D)
        x = _pointwise_conv(x, self.ffn[0])  # (B, G*G, p*p*3), channels ordered (p1, p2, c)
        p, g = self.patch_size, self.grid_size
        x = x.view(b, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(b, 3, g * p, g * p)  # pixel shuffle
        return conv2d(x, self.conv_out)


# ---------------------------------------------------------------------------------------
# Quantizers

class VectorQuantizer(nn.Module):
    """Nearest-code VQ in fp32 with a straight-through estimator, commitment + codebook
    losses, and the "clustering VQ" codebook refresh (training, gathered across ranks)."""

    def __init__(self, codebook_size: int, token_size: int, commitment_cost: float = 0.25,
                 use_l2_norm: bool = False, clustering_vq: bool = False):
        super().__init__()
        self.codebook_size = codebook_size
        self.token_size = token_size
        self.commitment_cost = commitment_cost
        self.use_l2_norm = use_l2_norm
        self.embedding = nn.Embedding(codebook_size, token_size)
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        self.clustering_vq = clustering_vq
        if clustering_vq:
            self.decay = 0.99
            self.register_buffer("embed_prob", torch.zeros(codebook_size))

    def nearest(self, flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        if ops.use_fused("vq_nearest_code", flat.device):
            return ops.vq_nearest_code(flat, codebook, self.use_l2_norm)[0]
        return vq_nearest_code_ref(flat, codebook, self.use_l2_norm)[0]

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(self, z: torch.Tensor):
        """z (B, C, H, W) -> z_quantized (B, C, H, W) fp32, result dict."""
        z = z.float().permute(0, 2, 3, 1)  # (B, H, W, C)
        flat = z.reshape(-1, self.token_size)
        codebook = self.embedding.weight.float()
        indices = self.nearest(flat.detach(), codebook.detach())  # (B*H*W,)
        z_q = self.get_codebook_entry(indices).view(z.shape)
        if self.use_l2_norm:
            z = F.normalize(z, dim=-1)
        commitment_loss = self.commitment_cost * torch.mean((z_q.detach() - z) ** 2)
        codebook_loss = torch.mean((z_q - z.detach()) ** 2)
        if self.clustering_vq and self.training:
            self._refresh_codebook(indices, flat.detach())
        z_q = z + (z_q - z).detach()  # straight-through
        z_q = z_q.permute(0, 3, 1, 2).contiguous()
        return z_q, dict(quantizer_loss=commitment_loss + codebook_loss, commitment_loss=commitment_loss,
                         codebook_loss=codebook_loss, min_encoding_indices=indices.view(z_q.shape[0], *z_q.shape[2:]))

    def get_codebook_entry(self, indices: torch.Tensor) -> torch.Tensor:
        if indices.dim() == 1:
            z_q = self.embedding(indices)
        elif indices.dim() == 2:  # soft assignments (N, K) @ (K, C)
            z_q = indices @ self.embedding.weight
        else:
            raise ValueError(f"indices: expected (N,) ids or (N, K) weights, got shape {tuple(indices.shape)}")
        return F.normalize(z_q, dim=-1) if self.use_l2_norm else z_q

    @torch.no_grad()
    def _refresh_codebook(self, indices: torch.Tensor, flat: torch.Tensor) -> None:
        """Clustering VQ: EMA of code usage; rarely used codes move toward the batch feature
        closest to them (over all ranks)."""
        all_idx, all_feat = _gather(indices), _gather(flat)
        usage = torch.bincount(all_idx, minlength=self.codebook_size).float() / all_idx.numel()
        self.embed_prob.mul_(self.decay).add_(usage, alpha=1 - self.decay)
        # nearest feature of every code: the same fused search with the roles swapped
        closest = self.nearest(self.embedding.weight.float(), all_feat)  # (K,)
        decay = torch.exp(-(self.embed_prob * self.codebook_size * 10) / (1 - self.decay) - 1e-3).unsqueeze(1)
        self.embedding.weight.data.mul_(1 - decay).add_(all_feat[closest] * decay)


def _gather(t: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    out = t.new_empty((dist.get_world_size() * t.shape[0], *t.shape[1:]))
    dist.all_gather_into_tensor(out, t.contiguous())
    return out


class DiagonalGaussianDistribution:
    """The KL tokenizer's posterior, with the reference class's surface (mean, std, var,
    logvar, sample(), mode(), kl()), computed by the fused kl_sample op in one pass.

    parameters: (B, 2C, H, W). `first_sample` is drawn with the posterior and is what
    encode() returns; sample() draws fresh noise each call, as the reference does.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.deterministic = deterministic
        self.first_sample, self.mean, self.std, self._kl = _kl_sample(parameters, deterministic)

    @property
    def logvar(self) -> torch.Tensor:
        return torch.clamp(self.parameters.float().chunk(2, dim=1)[1], -30.0, 20.0)

    @property
    def var(self) -> torch.Tensor:
        return self.std * self.std if self.deterministic else torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return _kl_sample(self.parameters, self.deterministic, generator)[0]

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """(B, W): 0.5 * sum over C and H of (mean^2 + var - 1 - logvar)."""
        return self._kl


def _kl_sample(parameters, deterministic, generator=None):
    if ops.use_fused("kl_sample", parameters.device):
        return ops.kl_sample(parameters, None, deterministic, generator)
    return kl_sample_ref(parameters, None, deterministic)


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

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.trunc_normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.zeros_(module.bias)
            nn.init.ones_(module.weight)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.transformer.grad_checkpointing = enable
        self.decoder.transformer.grad_checkpointing = enable

    # ---- the reference's surface ----
    def encode(self, x: torch.Tensor):
        _check_images(x, self.image_size)
        z = self.encoder(pixel_values=x, latent_tokens=self.latent_tokens)
        if self.quantize_mode == "vq":
            return self.quantize(z)
        posterior = DiagonalGaussianDistribution(z)
        return posterior.first_sample, posterior

    def decode(self, z_quantized: torch.Tensor, text_guidance: torch.Tensor) -> torch.Tensor:
        _check_text_guidance(text_guidance, z_quantized.shape[0], self.decoder)
        return self.decoder(z_quantized, text_guidance)

    def decode_tokens(self, tokens: torch.Tensor, text_guidance: torch.Tensor) -> torch.Tensor:
        if self.quantize_mode == "vq":
            if tokens.dtype not in (torch.int64, torch.int32) or tokens.dim() not in (2, 3):
                raise ValueError(f"tokens: expected integer ids (B, N) or (B, 1, N), got {tokens.dtype} {tuple(tokens.shape)}")
            ids = tokens.reshape(tokens.shape[0], -1)
            if ids.shape[1] != self.num_latent_tokens:
                raise ValueError(f"tokens: expected {self.num_latent_tokens} tokens per image, got {ids.shape[1]}")
            in_range = ((ids >= 0) & (ids < self.codebook_size)).all()  # 0-d bool, no host sync
            if ids.device.type == "cpu" and not torch.compiler.is_compiling():
                if not bool(in_range):
                    bad = ids[(ids < 0) | (ids >= self.codebook_size)]
                    raise ValueError(f"tokens: expected ids in [0, {self.codebook_size}) (the codebook), got "
                                     f"{bad.numel()} outside it, e.g. {bad[0].item()}")
            elif ids.device.type != "meta":  # CUDA: an asynchronous device-side assert
                torch._assert_async(in_range, f"tokens: expected ids in [0, {self.codebook_size}) (the codebook)")
            z = self.quantize.get_codebook_entry(ids.reshape(-1).long())  # (B*N, C)
            z = z.view(ids.shape[0], 1, ids.shape[1], -1).permute(0, 3, 1, 2).contiguous()  # (B, C, 1, N)
        else:
            expected = (self.token_size, 1, self.num_latent_tokens)
            if tokens.dim() != 4 or tuple(tokens.shape[1:]) != expected or not tokens.is_floating_point():
                raise ValueError(f"tokens: expected float (B, {', '.join(map(str, expected))}), got "
                                 f"{tokens.dtype} {tuple(tokens.shape)}")
            z = tokens
        return self.decode(z, text_guidance)

    def forward(self, x: torch.Tensor, text_guidance: torch.Tensor):
        z, result = self.encode(x)
        return self.decode(z, text_guidance), result

    # ---- high-level API ----
    @torch.no_grad()
    def tokenize(self, images, *, sample: bool = False) -> torch.Tensor:
        """PIL images, uint8 tensors (B, 3, H, W)/(3, H, W), float tensors in [0, 1] or file
        paths -> tokens: VQ ids (B, 1, N) int64; KL (B, C, 1, N) (posterior mean, or a sample)."""
        from tatitok_fast.images import load_images

        p = next(self.parameters())
        x = load_images(images, self.image_size).to(p.device, p.dtype)
        z, result = self.encode(x)
        if self.quantize_mode == "vq":
            return result["min_encoding_indices"]
        return z if sample else result.mode()

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


def _check_images(x: torch.Tensor, size: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"x: expected images (B, 3, {size}, {size}), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if tuple(x.shape[2:]) != (size, size):
        raise ValueError(f"x: this tokenizer takes {size}x{size} images, got {tuple(x.shape[2:])}; resize/crop first "
                         "(TATiTok.tokenize does)")
    if not x.is_floating_point():
        raise TypeError(f"x: expected float images in [0, 1], got {x.dtype}")


def _check_text_guidance(t: torch.Tensor, batch: int, decoder: TATiTokDecoder) -> None:
    expected = (batch, decoder.text_context_length, decoder.text_embed_dim)
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != expected:
        raise ValueError(f"text_guidance: expected CLIP text states {expected}, got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
