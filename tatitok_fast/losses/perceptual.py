"""Frozen perceptual networks for tokenizer training: LPIPS (VGG16 features + 5 learned linear
heads) and the ConvNeXt-S logits term, combined as the official spec strings
("lpips-convnext_s-1.0-0.1": (1.0 * LPIPS + 0.1 * ConvNeXt) / 1.1).

Inputs are images in [0, 1]. Weights (pretrained="pretrained"):
  - VGG16 features: torchvision VGG16_Weights.IMAGENET1K_V1 (vgg16-397923af.pth), hub cache,
    or $TATITOK_FAST_VGG16_WEIGHTS;
  - LPIPS heads: vgg.pth (md5 d507d734...), hub cache, $WORKSPACE/models/vgg_lpips.pth/vgg.pth
    (the official location), or $TATITOK_FAST_LPIPS_WEIGHTS;
  - ConvNeXt-S: torchvision ConvNeXt_Small_Weights.IMAGENET1K_V1 (convnext_small-0c510722.pth),
    hub cache, or $TATITOK_FAST_CONVNEXT_S_WEIGHTS.
pretrained="random": fixed-seed random weights, nothing read or downloaded (tests, tiny runs).

The networks are frozen (eval mode, requires_grad False); gradients still flow to the input.
"""
from __future__ import annotations

import contextlib
import re
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from tatitok_fast.weight_files import WeightsFile, load_state_dict_file, resolve_weights_file

VGG16_FILE = WeightsFile(
    "VGG16 ImageNet weights (LPIPS backbone)", "vgg16-397923af.pth",
    "https://download.pytorch.org/models/vgg16-397923af.pth", "TATITOK_FAST_VGG16_WEIGHTS", "vgg16_weights_path")
LPIPS_FILE = WeightsFile(
    "LPIPS linear heads", "vgg.pth", "https://heibox.uni-heidelberg.de/f/607503859c864bc1b30b/?dl=1",
    "TATITOK_FAST_LPIPS_WEIGHTS", "lpips_weights_path", md5="d507d7349b931f0638a25a48a722f98a",
    extra_locations=("$WORKSPACE/models/vgg_lpips.pth/vgg.pth",))
CONVNEXT_S_FILE = WeightsFile(
    "ConvNeXt-S ImageNet weights", "convnext_small-0c510722.pth",
    "https://download.pytorch.org/models/convnext_small-0c510722.pth", "TATITOK_FAST_CONVNEXT_S_WEIGHTS",
    "convnext_s_weights_path")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # the LPIPS "scaling layer" on [-1, 1] inputs
LPIPS_SCALE = (0.458, 0.448, 0.450)
RANDOM_SEED = 0  # pretrained="random"


class PerceptualSpec(NamedTuple):
    lpips_weight: float  # 0 = no LPIPS term
    convnext_weight: float  # 0 = no ConvNeXt term


def parse_perceptual_spec(spec: str) -> PerceptualSpec | None:
    """"none" -> None; "lpips" / "convnext_s" -> that term alone; "lpips-convnext_s-A-B" ->
    weights A and B (the loss is their weighted mean)."""
    if spec in ("none", "", None):
        return None
    if spec == "lpips":
        return PerceptualSpec(1.0, 0.0)
    if spec == "convnext_s":
        return PerceptualSpec(0.0, 1.0)
    m = re.fullmatch(r"lpips-convnext_s-([0-9.eE+-]+)-([0-9.eE+-]+)", spec)
    try:
        a, b = (float(m.group(1)), float(m.group(2))) if m else (None, None)
    except ValueError:
        a = b = None
    if a is None or a < 0 or b < 0 or a + b <= 0:
        raise ValueError(f"perceptual_loss: expected 'none', 'lpips', 'convnext_s' or 'lpips-convnext_s-A-B' "
                         f"(A, B >= 0 weights, A + B > 0), got {spec!r}")
    return PerceptualSpec(a, b)


def perceptual_weight_files(spec: str) -> list[WeightsFile]:
    """The pretrained files a spec needs (to check them before training starts)."""
    parsed = parse_perceptual_spec(spec)
    if parsed is None:
        return []
    return ([VGG16_FILE, LPIPS_FILE] if parsed.lpips_weight else []) + ([CONVNEXT_S_FILE] if parsed.convnext_weight else [])


def _freeze(module: nn.Module) -> nn.Module:
    return module.eval().requires_grad_(False)


def _load(module: nn.Module, state_dict: dict, what: str) -> None:
    """Strict load that also fills meta-device (uninitialised) modules."""
    try:
        module.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as exc:
        raise ValueError(f"{what}: the weights file does not fit the network: {exc}") from None


# ---------------------------------------------------------------------------------------
# LPIPS

# VGG16 config "D" up to relu5_3: torchvision indices, so `features.N.*` keys load as `net.N.*`
_VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_VGG16_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)


def _vgg16_features() -> nn.Sequential:
    layers, c = [], 3
    for v in _VGG16_LAYERS:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(*layers)  # 30 modules, indices 0..29


class LPIPS(nn.Module):
    """Learned perceptual distance: (B, 3, H, W), (B, 3, H, W) in [0, 1] -> (B, 1, 1, 1).
    meta=True builds the networks without initialising them (load_vgg16/load_heads follow)."""

    def __init__(self, meta: bool = False):
        super().__init__()
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        with torch.device("meta") if meta else contextlib.nullcontext():
            self.net = _vgg16_features()
            self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _LPIPS_CHANNELS)

    def load_vgg16(self, state_dict: dict) -> None:
        """torchvision VGG16 state dict (`features.N.*`, classifier ignored)."""
        sd = {k[len("features."):]: v for k, v in state_dict.items() if k.startswith("features.")}
        sd = {k: v for k, v in sd.items() if int(k.split(".")[0]) < len(self.net)}
        _load(self.net, sd, "VGG16 features")

    def load_heads(self, state_dict: dict) -> None:
        """LPIPS vgg.pth (`lin{k}.model.1.weight`, the Dropout+Conv NetLinLayer layout)."""
        keys = [f"lin{k}.model.1.weight" for k in range(len(self.heads))]
        if missing := [k for k in keys if k not in state_dict]:
            raise KeyError(f"LPIPS heads: {missing} missing from the state dict (keys: {sorted(state_dict)[:8]}...)")
        _load(self.heads, {f"{k}.weight": state_dict[key] for k, key in enumerate(keys)}, "LPIPS heads")

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = ((x * 2.0 - 1.0) - self.shift) / self.scale
        taps = []
        for i, layer in enumerate(self.net):
            x = layer(x)
            if i in _VGG16_TAPS:
                taps.append(x)
        return taps

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for head, fa, fb in zip(self.heads, self._features(input), self._features(target)):
            fa = fa / (fa.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)  # unit channel vectors
            fb = fb / (fb.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + head((fa - fb) ** 2).mean(dim=(2, 3), keepdim=True)  # (B, 1, 1, 1)
        return total


# ---------------------------------------------------------------------------------------
# The combined perceptual loss


class PerceptualLoss(nn.Module):
    """spec (see parse_perceptual_spec) -> loss(input, target) = per-sample weighted mean of
    the LPIPS distance (B, 1, 1, 1) and the ConvNeXt-S logits MSE (a batch scalar), as the
    official PerceptualLoss; `forward` returns its batch mean (a scalar).

    pretrained: "pretrained" (files, see module doc) or "random" (fixed seed, no files).
    """

    def __init__(self, spec: str = "lpips-convnext_s-1.0-0.1", pretrained: str = "pretrained", *,
                 vgg16_weights_path: str | None = None, lpips_weights_path: str | None = None,
                 convnext_s_weights_path: str | None = None, download: bool = True):
        super().__init__()
        parsed = parse_perceptual_spec(spec)
        if parsed is None:
            raise ValueError("perceptual_loss: 'none' builds no PerceptualLoss")
        if pretrained not in ("pretrained", "random"):
            raise ValueError(f"perceptual_weights: expected 'pretrained' or 'random', got {pretrained!r}")
        self.spec = parsed
        # resolve every file first, so a missing one fails before any network is built
        paths = {}
        if pretrained == "pretrained":
            if parsed.lpips_weight:
                paths["vgg16"] = resolve_weights_file(VGG16_FILE, vgg16_weights_path, download)
                paths["lpips"] = resolve_weights_file(LPIPS_FILE, lpips_weights_path, download)
            if parsed.convnext_weight:
                paths["convnext"] = resolve_weights_file(CONVNEXT_S_FILE, convnext_s_weights_path, download)
        meta = pretrained == "pretrained"  # no random init for weights about to be replaced
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            self.lpips = LPIPS(meta) if parsed.lpips_weight else None
            self.convnext = _convnext_small(meta) if parsed.convnext_weight else None
        if "vgg16" in paths:
            self.lpips.load_vgg16(load_state_dict_file(paths["vgg16"]))
            self.lpips.load_heads(load_state_dict_file(paths["lpips"]))
        if "convnext" in paths:
            _load(self.convnext, load_state_dict_file(paths["convnext"]), "ConvNeXt-S")
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        _freeze(self)

    def train(self, mode: bool = True) -> "PerceptualLoss":
        return super().train(False)  # always eval (no dropout, fixed norms)

    def convnext_loss(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """MSE between the ConvNeXt-S logits (B, 1000) of both images at 224 px."""
        def logits(x):
            x = F.interpolate(x, size=224, mode="bilinear", align_corners=False, antialias=True)
            return self.convnext((x - self.mean) / self.std)
        return F.mse_loss(logits(input), logits(target))

    def per_sample(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, 1, 1, 1) with LPIPS, or a scalar for ConvNeXt alone (the official shapes)."""
        a, b = self.spec
        loss = 0.0
        if self.lpips is not None:
            loss = a * self.lpips(input, target)
        if self.convnext is not None:
            loss = loss + b * self.convnext_loss(input, target)
        return loss / (a + b)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.per_sample(input, target).mean()


def _convnext_small(meta: bool = False) -> nn.Module:
    from torchvision.models import convnext_small

    with torch.device("meta") if meta else contextlib.nullcontext():
        return convnext_small(weights=None)
