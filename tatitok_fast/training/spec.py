"""The contract between the engine and a model family ("recipe"): the recipe provides the
model, the frozen helpers, the loss and the batch transform; the engine owns parallelism,
FP8, optimizers, EMA, checkpoints, data streaming and metrics.

    captions/images --(worker) decode_sample--> collate --(device) batch_transform-->
        forward_loss(model) --> loss.backward --> [aux_loss(loss module) --> backward]

A recipe is registered in RECIPES by name (the TOML's `job.recipe`) and imported lazily.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn

from tatitok_fast.training.errors import ConfigError

RECIPES: dict[str, str] = {
    "maskgen": "tatitok_fast.training.recipes.maskgen:MaskGenRecipe",
    "tatitok": "tatitok_fast.training.recipes.tatitok:TATiTokRecipe",
    "titok": "tatitok_fast.training.recipes.titok:TiTokRecipe",
    "maskgit": "tatitok_fast.training.recipes.maskgit:MaskGITRecipe",
}


@dataclass
class StepOutput:
    """What a loss function returns: the scalar to backpropagate, detached metrics to log
    (scalars), and extras handed to aux_loss (e.g. the reconstructions for the discriminator)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


class Recipe:
    """Base class of the model families. Subclasses set `name` and `loss_config` (a dataclass
    whose fields are the `[loss]` section) and implement the methods marked abstract."""

    name: ClassVar[str]
    loss_config: ClassVar[type]

    def __init__(self, cfg, device: torch.device):
        self.cfg = cfg
        self.device = device

    # ---- model side ----
    def build_model(self) -> nn.Module:
        """The trained model in fp32 on the CPU, initialised (seeded) or loaded from
        model.init_from; it has `config` and `save_pretrained` (official layout).
        Also called once before anything is built, on a probe instance (device "meta",
        model.init_from = "", under torch.device("meta")) for the data check: it must set what
        decode_sample needs (sizes, codebook, mode) and load no weights there."""
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """Transformer blocks: units of activation checkpointing, compile and fully_shard."""
        raise NotImplementedError

    def no_decay(self, name: str, param: nn.Parameter) -> bool:
        """Parameters without weight decay (official: ndim < 2 and norm/bias/embedding names)."""
        keys = ("ln", "bias", "latent_tokens", "mask_token", "embedding", "norm", "gamma", "embed")
        return param.ndim < 2 or any(k in name for k in keys)

    def build_frozen(self) -> None:
        """Frozen helpers (text encoder, perceptual networks) on self.device, kept on the recipe:
        never sharded, never in an optimizer or a checkpoint."""

    def build_loss(self) -> nn.Module | None:
        """Loss-side module; its trainable parameters get the aux optimizer (discriminator)."""
        return None

    # ---- data side ----
    def decode_sample(self, sample: dict, rng: np.random.Generator) -> dict:
        """A raw webdataset sample (bytes per key) -> fields; raises ValueError when corrupt.
        Runs in data-loader workers; `rng` is seeded per sample (exactly resumable)."""
        raise NotImplementedError

    def collate(self, samples: list[dict]) -> dict:
        """Stack tensors, keep lists of everything else."""
        out = {}
        for key in samples[0]:
            vals = [s[key] for s in samples]
            out[key] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
        return out

    def batch_transform(self, batch: dict) -> dict:
        """On self.device, under no_grad: frozen encoders, per-sample random draws."""
        return batch

    # ---- step ----
    def forward_loss(self, model: nn.Module, batch: dict, step: int) -> StepOutput:
        """Call `model(...)` (its forward, so DDP/FSDP hooks run) and return the loss."""
        raise NotImplementedError

    def aux_loss(self, loss_module: nn.Module, batch: dict, extras: dict, step: int) -> StepOutput | None:
        """The loss-side step after the model's optimizer step (None: nothing to train now)."""
        return None

    def flops_per_sample(self, model: nn.Module) -> float:
        """Training FLOPs (forward + backward) of one sample, for MFU."""
        return 0.0

    # ---- outputs ----
    def log_samples(self, model: nn.Module, step: int) -> dict[str, torch.Tensor]:
        """Images to log (name -> (B, 3, H, W) in [0, 1]); called with the EMA weights in place."""
        return {}

    def export(self, model: nn.Module, out_dir) -> None:
        """Official layout (config.json + model.safetensors) that from_pretrained loads."""
        model.save_pretrained(out_dir)


def recipe_class(name: str) -> type[Recipe]:
    if name not in RECIPES:
        raise ConfigError(f"job.recipe: unknown recipe {name!r}; known: {sorted(RECIPES)}")
    module, _, attr = RECIPES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def loss_config_class(name: str) -> type:
    cls = recipe_class(name).loss_config
    assert dataclasses.is_dataclass(cls), f"{name}: loss_config must be a dataclass"
    return cls


def per_sample_generators(seeds: list[int] | torch.Tensor, salt: int) -> list[torch.Generator]:
    """One CPU generator per sample, from the sample's stream seed and a salt naming the draw:
    draws that do not depend on which rank or step a sample lands in."""
    seeds = seeds.tolist() if isinstance(seeds, torch.Tensor) else seeds
    return [torch.Generator().manual_seed((int(s) * 1000003 + salt) % (1 << 63)) for s in seeds]

