"""What the TiTok-family tokenizers (TiTok, TA-TiTok) share outside the ViT: the official
trunc-normal init, input checks, VQ ids -> code vectors, and image loading for tokenize()."""
from __future__ import annotations

import torch
import torch.nn as nn

from tatitok_fast.models.nn.layers import host_checkable


def init_titok_weights(module: nn.Module) -> None:
    """The official TiTok._init_weights: trunc-normal(0.02) Linear/Conv/Embedding weights,
    zero biases, LayerNorm to (1, 0). (nn.MultiheadAttention's packed in_proj is a bare
    Parameter there, so callers then reset it like MHA: PackedSelfAttention.reset_like_multihead_attention.)"""
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.trunc_normal_(module.weight, mean=0.0, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.zeros_(module.bias)
        nn.init.ones_(module.weight)


def check_images(x: torch.Tensor, size: int, owner: str) -> None:
    """x must be float (B, 3, size, size): the image size the tokenizer was built for."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"x: expected images (B, 3, {size}, {size}), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if tuple(x.shape[2:]) != (size, size):
        raise ValueError(f"x: this tokenizer takes {size}x{size} images, got {tuple(x.shape[2:])}; resize/crop first "
                         f"({owner}.tokenize does)")
    if not x.is_floating_point():
        raise TypeError(f"x: expected float images in [0, 1], got {x.dtype}")


def ids_to_latents(tokens: torch.Tensor, quantize, num_latent_tokens: int, codebook_size: int) -> torch.Tensor:
    """VQ token ids (B, N) or (B, 1, N) -> code vectors (B, C, 1, N) (l2-normalised when the
    quantizer is). Ids outside the codebook: ValueError on CPU, a device-side assert on CUDA."""
    if tokens.dtype not in (torch.int64, torch.int32) or tokens.dim() not in (2, 3):
        raise ValueError(f"tokens: expected integer ids (B, N) or (B, 1, N), got {tokens.dtype} {tuple(tokens.shape)}")
    ids = tokens.reshape(tokens.shape[0], -1)
    if ids.shape[1] != num_latent_tokens:
        raise ValueError(f"tokens: expected {num_latent_tokens} tokens per image, got {ids.shape[1]}")
    in_range = ((ids >= 0) & (ids < codebook_size)).all()  # 0-d bool, no host sync
    if host_checkable(ids):
        if not bool(in_range):
            bad = ids[(ids < 0) | (ids >= codebook_size)]
            raise ValueError(f"tokens: expected ids in [0, {codebook_size}) (the codebook), got "
                             f"{bad.numel()} outside it, e.g. {bad[0].item()}")
    elif ids.device.type != "meta":  # CUDA: an asynchronous device-side assert
        torch._assert_async(in_range, f"tokens: expected ids in [0, {codebook_size}) (the codebook)")
    z = quantize.get_codebook_entry(ids.reshape(-1).long())  # (B*N, C)
    return z.view(ids.shape[0], 1, ids.shape[1], -1).permute(0, 3, 1, 2).contiguous()  # (B, C, 1, N)


def check_latents(tokens: torch.Tensor, token_size: int, num_latent_tokens: int) -> torch.Tensor:
    """KL tokens: float (B, C, 1, N)."""
    expected = (token_size, 1, num_latent_tokens)
    if tokens.dim() != 4 or tuple(tokens.shape[1:]) != expected or not tokens.is_floating_point():
        raise ValueError(f"tokens: expected float (B, {', '.join(map(str, expected))}), got "
                         f"{tokens.dtype} {tuple(tokens.shape)}")
    return tokens


@torch.no_grad()
def tokenize_images(model, images, sample: bool = False) -> torch.Tensor:
    """model.tokenize: PIL images, uint8 tensors (B, 3, H, W)/(3, H, W), float tensors in
    [0, 1] or file paths -> VQ ids (B, 1, N) int64; KL (B, C, 1, N) (posterior mean, or a sample)."""
    from tatitok_fast.images import load_images

    p = next(model.parameters())
    x = load_images(images, model.image_size).to(p.device, p.dtype)
    z, result = model.encode(x)
    if model.quantize_mode == "vq":
        return result["min_encoding_indices"]
    return z if sample else result.mode()
