"""The MaskGIT-VQGAN (official modeling/modules/maskgit_vqgan.py and titok.PretrainedTokenizer):
a convolutional f16 VQGAN with a 1024 x 256 codebook. TiTok's two-stage models decode through
its decoder (their pixel_decoder.* / pixel_quantize.*), and its codes are the proxy targets of
TiTok's stage-1 training.

    images (B, 3, H, W) in [0, 1] --Encoder--> (B, 256, H/16, W/16) --VQ--> codes (B, H/16 * W/16)
    codes --codebook--> (B, 256, H/16, W/16) --Decoder--> images (B, 3, H, W) (clamped by decode)

Same state-dict keys as the official modules. The official Conv2dSame ("SAME" padding) with
stride 1 and odd kernels pads symmetrically, so plain nn.Conv2d(padding=k // 2) is exact.
Fast path: convolutions in channels_last (CUDA), bf16 when the model is, GroupNorm in fp32
under autocast, the nearest-code search through the fused vq_nearest_code op.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from tatitok_fast import ops, presets
from tatitok_fast.models.nn.layers import conv2d
from tatitok_fast.ops.reference import vq_nearest_code_ref

DOWNSAMPLE = 16  # 2 ** (num_resolutions - 1) for the official conf


def _conv(cin: int, cout: int, k: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)


def _gn(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _norm_silu(x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    return F.silu(norm(x))


class ResnetBlock(nn.Module):
    """GN -> SiLU -> conv3x3 -> GN -> SiLU -> conv3x3 (no biases), plus the residual. When the
    channels change the official shortcut is nin_shortcut(block output), not of its input."""

    def __init__(self, cin: int, cout: int, dropout: float = 0.0):
        super().__init__()
        self.in_channels, self.out_channels_ = cin, cout
        self.norm1 = _gn(cin)
        self.conv1 = _conv(cin, cout, 3, bias=False)
        self.norm2 = _gn(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv(cout, cout, 3, bias=False)
        if cin != cout:
            self.nin_shortcut = _conv(cout, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = conv2d(_norm_silu(x, self.norm1), self.conv1)
        h = conv2d(self.dropout(_norm_silu(h, self.norm2).to(h.dtype)), self.conv2)
        residual = conv2d(h, self.nin_shortcut) if self.in_channels != self.out_channels_ else x
        return h + residual.to(h.dtype)


class DownsamplingBlock(nn.Module):
    def __init__(self, conf: Mapping[str, Any], idx: int):
        super().__init__()
        mult_in = (1,) + tuple(conf["channel_mult"])
        cin, cout = conf["hidden_channels"] * mult_in[idx], conf["hidden_channels"] * conf["channel_mult"][idx]
        self.block = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, conf["dropout"])
                                    for i in range(conf["num_res_blocks"])])
        self.downsample = idx != conf["num_resolutions"] - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        return F.avg_pool2d(x, kernel_size=2, stride=2) if self.downsample else x


class UpsamplingBlock(nn.Module):
    def __init__(self, conf: Mapping[str, Any], idx: int):
        super().__init__()
        mult, hidden = conf["channel_mult"], conf["hidden_channels"]
        cin = hidden * (mult[-1] if idx == conf["num_resolutions"] - 1 else mult[idx + 1])
        cout = hidden * mult[idx]
        self.block = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, conf["dropout"])
                                    for i in range(conf["num_res_blocks"])])
        self.add_upsample = idx != 0
        if self.add_upsample:
            self.upsample_conv = _conv(cout, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        if self.add_upsample:
            x = conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), self.upsample_conv)
        return x


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    # cuDNN's NHWC convolutions (bf16 tensor cores); oneDNN on CPU prefers its own layouts
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, z_channels, H/16, W/16)."""

    def __init__(self, conf: Mapping[str, Any]):
        super().__init__()
        self.conv_in = _conv(conf["num_channels"], conf["hidden_channels"], 3, bias=False)
        self.down = nn.ModuleList([DownsamplingBlock(conf, i) for i in range(conf["num_resolutions"])])
        mid = conf["hidden_channels"] * conf["channel_mult"][-1]
        self.mid = nn.ModuleList([ResnetBlock(mid, mid, conf["dropout"]) for _ in range(conf["num_res_blocks"])])
        self.norm_out = _gn(mid)
        self.conv_out = _conv(mid, conf["z_channels"], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = conv2d(_channels_last(x.to(self.conv_in.weight.dtype)), self.conv_in)
        for blk in (*self.down, *self.mid):
            x = blk(x)
        return conv2d(_norm_silu(x, self.norm_out).to(x.dtype), self.conv_out)


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, 3, 16h, 16w), not clamped."""

    def __init__(self, conf: Mapping[str, Any]):
        super().__init__()
        top = conf["hidden_channels"] * conf["channel_mult"][conf["num_resolutions"] - 1]
        self.conv_in = _conv(conf["z_channels"], top, 3)
        self.mid = nn.ModuleList([ResnetBlock(top, top, conf["dropout"]) for _ in range(conf["num_res_blocks"])])
        self.up = nn.ModuleList([UpsamplingBlock(conf, i) for i in range(conf["num_resolutions"])])  # up[i]: level i
        bottom = conf["hidden_channels"] * conf["channel_mult"][0]
        self.norm_out = _gn(bottom)
        self.conv_out = _conv(bottom, conf["num_channels"], 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = conv2d(_channels_last(z.to(self.conv_in.weight.dtype)), self.conv_in)
        for blk in self.mid:
            x = blk(x)
        for blk in reversed(self.up):  # coarsest level first
            x = blk(x)
        return conv2d(_norm_silu(x, self.norm_out).to(x.dtype), self.conv_out)


class PixelQuantizer(nn.Module):
    """The MaskGIT-VQGAN codebook (official maskgit_vqgan.VectorQuantizer; key embedding.weight)."""

    def __init__(self, num_embeddings: int = 1024, embedding_dim: int = 256, commitment_cost: float = 0.25):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.commitment_cost = num_embeddings, embedding_dim, commitment_cost
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)
        self.embedding.weight.data.uniform_(-1.0 / num_embeddings, 1.0 / num_embeddings)

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, C, h, w) -> nearest-code ids (B, h*w) int64, in fp32."""
        b, c, h, w = z.shape
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, c)
        codebook = self.embedding.weight.float()
        if ops.use_fused("vq_nearest_code", flat.device):
            ids = ops.vq_nearest_code(flat, codebook, False)[0]
        else:
            ids = vq_nearest_code_ref(flat, codebook, False)[0]
        return ids.long().view(b, h * w)

    def get_codebook_entry(self, indices: torch.Tensor) -> torch.Tensor:
        """ids (B, h*w) with h = w, or (B, h, w) -> code vectors (B, C, h, w) (a channels-last view)."""
        if indices.dim() == 2:
            side = math.isqrt(indices.shape[1])
            h = w = side
        elif indices.dim() == 3:
            h, w = indices.shape[1:]
        else:
            raise ValueError(f"codes: expected (B, h*w) or (B, h, w) ids, got shape {tuple(indices.shape)}")
        z = self.embedding(indices.reshape(indices.shape[0], -1))  # (B, h*w, C)
        return z.view(indices.shape[0], h, w, -1).permute(0, 3, 1, 2)

    def soft_codes(self, probs: torch.Tensor) -> torch.Tensor:
        """Two-stage TiTok: probabilities over the codes (B, h, w, K) -> mixed codes (B, C, h, w)
        (channels-last view), the official einsum('nchw,cd->ndhw', probs, codebook)."""
        weight = self.embedding.weight
        out = probs.to(weight.dtype) @ weight  # (B, h, w, C)
        return out.permute(0, 3, 1, 2)


def _check_codes(codes: torch.Tensor, num_codes: int) -> None:
    if (not isinstance(codes, torch.Tensor) or codes.dtype not in (torch.int64, torch.int32)
            or codes.dim() not in (2, 3)):
        raise ValueError(f"codes: expected integer ids (B, h*w) or (B, h, w), got "
                         f"{getattr(codes, 'dtype', type(codes).__name__)} {tuple(getattr(codes, 'shape', ()))}")
    if codes.dim() == 2 and math.isqrt(codes.shape[1]) ** 2 != codes.shape[1]:
        raise ValueError(f"codes: (B, N) ids need a square N (an h x h grid), got N={codes.shape[1]}; pass (B, h, w)")
    if codes.device.type == "cpu" and codes.numel() and not bool(((codes >= 0) & (codes < num_codes)).all()):
        bad = codes[(codes < 0) | (codes >= num_codes)]
        raise ValueError(f"codes: expected ids in [0, {num_codes}) (the codebook), got {bad.numel()} outside it, "
                         f"e.g. {bad[0].item()}")


# ---------------------------------------------------------------------------------------
# Where the weights live: fun-research/TiTok/maskgit-vqgan-imagenet-f16-256.bin

def vqgan_weights_spec():
    from tatitok_fast.weight_files import WeightsFile

    return WeightsFile(
        what=f"MaskGIT-VQGAN weights {presets.MASKGIT_VQGAN_FILE} (Hugging Face repo {presets.TITOK_RAW_WEIGHTS_REPO})",
        filename=presets.MASKGIT_VQGAN_FILE,
        url=f"https://huggingface.co/{presets.TITOK_RAW_WEIGHTS_REPO}/resolve/main/{presets.MASKGIT_VQGAN_FILE}",
        env="TATITOK_MASKGIT_VQGAN", option="pretrained_weight= (CLI: --tokenizer PATH)")


def vqgan_weights_path(path: str | os.PathLike | None = None, *, cache_dir: str | None = None,
                       local_files_only: bool = False) -> str:
    """The local maskgit-vqgan-imagenet-f16-256.bin: `path` (a file, or a folder holding it), then
    $TATITOK_MASKGIT_VQGAN, the Hugging Face cache of fun-research/TiTok, the torch hub cache, then
    (unless local_files_only or HF_HUB_OFFLINE) a download. WeightsFileError names the file and repo."""
    from tatitok_fast.weight_files import resolve_weights_file

    spec = vqgan_weights_spec()
    if path is not None and os.path.isdir(path):
        path = os.path.join(path, spec.filename)
    if path is None and not os.environ.get(spec.env):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(presets.TITOK_RAW_WEIGHTS_REPO, spec.filename, cache_dir=cache_dir)
            if isinstance(cached, str) and os.path.isfile(cached):
                return cached
        except ImportError:  # pragma: no cover - huggingface_hub is a dependency
            pass
    offline = local_files_only or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    return str(resolve_weights_file(spec, path, download=not offline))


# ---------------------------------------------------------------------------------------
# The tokenizer

class MaskGITVQGAN(nn.Module):
    """The MaskGIT-VQGAN as a tokenizer, drop-in for the official titok.PretrainedTokenizer.

    MaskGITVQGAN(pretrained_weight): loads the official .bin strictly, frozen, in eval (as the
    official class); MaskGITVQGAN() / MaskGITVQGAN(None): random init (tests); from_pretrained()
    finds the file (see vqgan_weights_path).
    encode(x (B, 3, H, W) in [0, 1], H, W multiples of 16) -> codes (B, H/16 * W/16) int64;
    decode(codes) -> images clamped to [0, 1]; decode_tokens = decode.
    """

    def __init__(self, pretrained_weight: str | os.PathLike | None = None, *, image_size: int = 256):
        super().__init__()
        conf = dict(presets.MASKGIT_VQGAN_CONFIG)
        # with weights to load, build on the meta device (no 54M-parameter random init) and assign
        with torch.device("meta") if pretrained_weight is not None else contextlib.nullcontext():
            self.encoder = Encoder(conf)
            self.decoder = Decoder(conf)
            self.quantize = PixelQuantizer(*presets.MASKGIT_VQGAN_CODEBOOK)
        # the tokenizer surface the CLI commands read (TiTok / TA-TiTok have the same names)
        self.config = {"maskgit_vqgan": conf, "dataset": {"preprocessing": {"crop_size": image_size}}}
        if image_size % DOWNSAMPLE:
            raise ValueError(f"image_size: expected a multiple of {DOWNSAMPLE}, got {image_size}")
        self.image_size = image_size
        self.quantize_mode = "vq"
        self.codebook_size, self.token_size = presets.MASKGIT_VQGAN_CODEBOOK
        self.num_latent_tokens = (image_size // DOWNSAMPLE) ** 2
        if pretrained_weight is not None:
            self.load_weights(pretrained_weight)
            self.eval()
            self.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike | None = None, *, cache_dir: str | None = None,
                        local_files_only: bool = False, device=None, torch_dtype=None, image_size: int = 256):
        """None, "maskgit_vqgan" or "fun-research/TiTok": the official file from the Hub (or its
        cache); else a local .bin / folder holding it."""
        if name_or_path is not None and str(name_or_path) in (presets.MASKGIT_VQGAN, presets.TITOK_RAW_WEIGHTS_REPO):
            name_or_path = None
        path = vqgan_weights_path(name_or_path, cache_dir=cache_dir, local_files_only=local_files_only)
        model = cls(path, image_size=image_size)
        if device is not None or torch_dtype is not None:
            model = model.to(device=device, dtype=torch_dtype)
        return model

    def load_weights(self, path: str | os.PathLike) -> None:
        from pathlib import Path

        from tatitok_fast import checkpoint

        sd = checkpoint.load_state_dict_file(Path(path))
        sd = checkpoint.check_and_fill(self, sd, f"MaskGIT-VQGAN weights {path}")
        on_meta = next(self.parameters()).is_meta
        if on_meta:  # fp32 parameters, as the official model holds them, whatever the file stores
            sd = {k: v.float().contiguous() if v.is_floating_point() else v for k, v in sd.items()}
        self.load_state_dict(sd, strict=True, assign=on_meta)

    def _check_images(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x: expected images (B, 3, H, W) with H, W multiples of {DOWNSAMPLE}, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[2] % DOWNSAMPLE or x.shape[3] % DOWNSAMPLE:
            raise ValueError(f"x: the MaskGIT-VQGAN takes images whose sides are multiples of {DOWNSAMPLE}, got "
                             f"{tuple(x.shape[2:])}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected float images in [0, 1], got {x.dtype}")

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self._check_images(x)
        return self.quantize.codes(self.encoder(x))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        _check_codes(codes, self.codebook_size)
        return torch.clamp(self.decoder(self.quantize.get_codebook_entry(codes)), 0.0, 1.0)

    @torch.no_grad()
    def decode_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decode(codes)

    # ---- the high-level tokenizer API of tatitok_fast (tokenize / detokenize) ----
    @torch.no_grad()
    def tokenize(self, images, *, sample: bool = False) -> torch.Tensor:
        """PIL images, uint8/float tensors or paths (resized/cropped to image_size) -> codes (B, N)."""
        from tatitok_fast.images import load_images

        p = next(self.parameters())
        return self.encode(load_images(images, self.image_size).to(p.device, p.dtype))

    @torch.no_grad()
    def detokenize(self, tokens: torch.Tensor, captions=None, text_encoder=None) -> torch.Tensor:
        """codes -> images (B, 3, H, W) float32 in [0, 1] (captions are ignored: no text path)."""
        return self.decode(tokens.reshape(tokens.shape[0], -1) if tokens.dim() == 3 and tokens.shape[1] == 1
                           else tokens).float()


PretrainedTokenizer = MaskGITVQGAN  # the official name
