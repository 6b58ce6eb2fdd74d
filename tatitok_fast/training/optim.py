"""AdamW with the official no-weight-decay groups, and the official learning-rate schedules
(linear warmup from 0, then cosine to end_lr or constant)."""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn as nn


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                 no_decay: Callable[[str, nn.Parameter], bool]) -> list[dict]:
    decay, plain = [], []
    for name, p in named:
        if p.requires_grad:
            (plain if no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(named: Iterable[tuple[str, nn.Parameter]], cfg, no_decay, device: torch.device):
    """cfg: an Optimizer section. "auto" takes the fused AdamW kernel on CUDA and CPU: on CPU
    torch's default is its per-tensor loop (no foreach there), 3.4x slower (MaskGIT-L32's 177 M
    parameters on 2 Zen 4 cores: 319 ms a step against 93 ms, 721 ms with foreach)."""
    groups = param_groups(named, cfg.weight_decay, no_decay)
    if not groups:
        raise ValueError("optimizer: the model has no trainable parameters")
    fused = cfg.fused == "on" or (cfg.fused == "auto" and device.type in ("cuda", "cpu"))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


def lr_factor(step: int, cfg, base_lr: float, total_steps: int) -> float:
    """Multiplier of base_lr at optimizer step `step` (0-based): linear warmup from 0 over
    warmup_steps, then constant, or cosine from base_lr to end_lr at total_steps."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return step / cfg.warmup_steps
    if cfg.kind == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    lr = cfg.end_lr + (base_lr - cfg.end_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr / base_lr


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, total_steps: int, start_step: int = 0):
    """LambdaLR over optimizer steps counted from `start_step` (the discriminator's schedule
    starts when it starts training). State (last_epoch) is checkpointed."""
    base = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg, base, max(1, total_steps - start_step)))
