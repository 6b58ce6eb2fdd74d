"""The TA-TiTok GAN discriminator: the official `NLayerDiscriminator` architecture (improved
VQGAN discriminator with blur downsampling), with the same module names and tensor shapes, so
official discriminator state dicts load unchanged.

    images (B, 3, H, W) in [0, 1]
      block_in:  conv5x5 3->C + LeakyReLU(0.1)                       (B, C, H, W)
      blocks[i]: conv3x3 -> blur (1,3,3,1) stride 2 -> GroupNorm(32) -> LeakyReLU(0.1)
                 channels C -> C -> 2C -> 4C, spatial size halved each stage
      pool:      AdaptiveMaxPool2d(16)                                (B, 4C, 16, 16)
      to_logits: conv1x1 + LeakyReLU + conv5x5 -> 1                   (B, 1, 16, 16)

All convolutions use TensorFlow "same" padding (stride 1, odd kernels: symmetric).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

BLUR_KERNELS = {3: (1, 2, 1), 4: (1, 3, 3, 1), 5: (1, 4, 6, 4, 1)}


def _same_conv(c_in: int, c_out: int, kernel_size: int) -> nn.Conv2d:
    """Stride-1 odd-kernel conv with "same" padding (what the official Conv2dSame computes
    for these shapes: (k-1)/2 zeros on every side). Parameters: weight, bias."""
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size: expected an odd kernel, got {kernel_size}")
    return nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2)


class BlurBlock(nn.Module):
    """Depthwise low-pass filter (outer product of a binomial row, normalised) with stride 2.
    The input is padded as TensorFlow "same" for a 4-tap window (the official pads for k=4
    whatever the kernel), extra row/column at the bottom/right."""

    def __init__(self, kernel: tuple[int, ...] = (1, 3, 3, 1)):
        super().__init__()
        k = torch.tensor(kernel, dtype=torch.float32)
        k = k[None, :] * k[:, None]
        self.register_buffer("kernel", (k / k.sum())[None, None])  # (1, 1, k, k); in official state dicts

    @staticmethod
    def _same_pad(size: int, window: int = 4, stride: int = 2) -> tuple[int, int]:
        total = max((math.ceil(size / stride) - 1) * stride + window - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))
        c, h, w = x.shape[-3:]
        top, bottom = self._same_pad(h)
        left, right = self._same_pad(w)
        if top or bottom or left or right:
            x = F.pad(x, [left, right, top, bottom])
        weight = self.kernel.to(x.dtype).expand(c, -1, -1, -1)  # (C, 1, k, k)
        return F.conv2d(x, weight, stride=2, groups=c)


class NLayerDiscriminator(nn.Module):
    """PatchGAN-style discriminator: (B, num_channels, H, W) -> logits (B, 1, 16, 16)."""

    def __init__(self, num_channels: int = 3, hidden_channels: int = 128, num_stages: int = 3,
                 blur_resample: bool = True, blur_kernel_size: int = 4):
        super().__init__()
        if num_stages < 1:
            raise ValueError(f"num_stages: expected >= 1, got {num_stages}")
        if blur_resample and blur_kernel_size not in BLUR_KERNELS:
            raise ValueError(f"blur_kernel_size: expected one of {sorted(BLUR_KERNELS)}, got {blur_kernel_size}")
        if hidden_channels % 32:
            raise ValueError(f"hidden_channels: expected a multiple of 32 (GroupNorm(32)), got {hidden_channels}")
        self.block_in = nn.Sequential(_same_conv(num_channels, hidden_channels, 5), nn.LeakyReLU(0.1))
        widths = [hidden_channels] + [hidden_channels * 2 ** i for i in range(num_stages)]  # C, C, 2C, 4C
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            down = BlurBlock(BLUR_KERNELS[blur_kernel_size]) if blur_resample else nn.AvgPool2d(2, 2)
            self.blocks.append(nn.Sequential(_same_conv(c_in, c_out, 3), down, nn.GroupNorm(32, c_out),
                                             nn.LeakyReLU(0.1)))
        c = widths[-1]
        self.pool = nn.AdaptiveMaxPool2d((16, 16))
        self.to_logits = nn.Sequential(_same_conv(c, c, 1), nn.LeakyReLU(0.1), _same_conv(c, 1, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 1, 16, 16)
        h = self.block_in(x)
        for block in self.blocks:
            h = block(h)
        return self.to_logits(self.pool(h))
