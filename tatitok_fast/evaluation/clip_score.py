"""CLIP score of generated images against their prompts (Hessel et al. 2021, as torchmetrics
computes it): 100 * max(cos(image embedding, text embedding), 0), averaged over images.

    scorer = CLIPScorer("ViT-L-14", "openai", device="cuda")   # torchmetrics' default model
    scores = scorer(images, prompts)                            # (B,) for images in [0, 1]

pretrained: an open_clip tag, a local weights file, or "random" (fixed-seed random weights:
tests only, the scores mean nothing).
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

RANDOM_SEED = 0


class CLIPScorer(nn.Module):
    def __init__(self, model_name: str = "ViT-L-14", pretrained: str = "openai", *, cache_dir: str | None = None,
                 device: torch.device | str = "cpu"):
        super().__init__()
        import open_clip

        if open_clip.get_model_config(model_name) is None:
            raise ValueError(f"--clip-score-model: {model_name!r} is not an open_clip model; see open_clip.list_models()")
        kwargs = {"cache_dir": cache_dir} if cache_dir else {}
        if pretrained == "random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_SEED)
                model = open_clip.create_model(model_name, pretrained=None)
        else:
            tag_ok = pretrained in open_clip.list_pretrained_tags_by_model(model_name)
            if not tag_ok and not os.path.isfile(pretrained):
                raise ValueError(f"--clip-score-pretrained: {pretrained!r} is neither a pretrained tag of {model_name} "
                                 f"({open_clip.list_pretrained_tags_by_model(model_name)}) nor a local weights file")
            try:
                model = open_clip.create_model(model_name, pretrained=pretrained, require_pretrained=True, **kwargs)
            except Exception as exc:  # offline, missing file, HF hub errors
                raise RuntimeError(
                    f"--clip-score-model {model_name} --clip-score-pretrained {pretrained}: could not load the weights "
                    f"({type(exc).__name__}: {exc}). Offline, download them elsewhere and pass the file with "
                    f"--clip-score-pretrained /path/to/weights, or fill the cache (--cache-dir / HF_HOME)") from None
        self._init(model, open_clip.get_tokenizer(model_name, **kwargs))
        self.to(device)

    @classmethod
    def from_open_clip(cls, model: nn.Module, tokenizer) -> "CLIPScorer":
        """Wrap an existing open_clip (CLIP with its visual tower, tokenizer) pair."""
        if not hasattr(model, "visual") or not callable(getattr(model, "encode_text", None)):
            raise TypeError(f"model: expected an open_clip CLIP with a visual tower, got {type(model).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._init(model, tokenizer)
        return self

    def _init(self, model: nn.Module, tokenizer) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        size = cfg.get("size", getattr(model.visual, "image_size", 224))
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        mean = cfg.get("mean", getattr(model.visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
        std = cfg.get("std", getattr(model.visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def _preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> shorter side resized (bicubic, antialias), centre crop,
        normalised: open_clip's eval transform on tensors."""
        h, w = images.shape[-2:]
        th, tw = self.image_size
        scale = max(th / h, tw / w)
        nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
        x = F.interpolate(images.float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
        top, left = (nh - th) // 2, (nw - tw) // 2
        x = x[..., top:top + th, left:left + tw].clamp(0, 1)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images: expected (B, 3, H, W) in [0, 1], got {got}")
        if isinstance(prompts, str) or len(prompts) != images.shape[0]:
            raise ValueError(f"prompts: expected a list of {images.shape[0]} prompts (one per image), "
                             f"got {prompts!r}"[:200])
        device = self.mean.device
        img = self.model.encode_image(self._preprocess(images.to(device)))
        txt = self.model.encode_text(self.tokenizer(list(prompts)).to(device))
        cos = F.cosine_similarity(img.float(), txt.float(), dim=-1)
        return 100.0 * cos.clamp_min(0.0)
