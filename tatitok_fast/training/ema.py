"""Exponential moving average of the trained weights, in fp32.

Shadows are clones of the parameters (DTensor shards under FSDP2: each rank averages its own
shard, no communication) updated with one foreach lerp per step. `swap()` puts the averages
into the model for export and sample logging and puts the live weights back afterwards.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.updates = 0

    def current_decay(self) -> float:
        """official (diffusers-style EMAModel): the first update copies, then
        min((1 + t) / (10 + t), decay) with t = updates so far"""
        if self.updates == 0:
            return 0.0
        if not self.warmup:
            return self.decay
        return min((1 + self.updates) / (10 + self.updates), self.decay)

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        live = [p.detach().float() if p.dtype != torch.float32 else p.detach() for p in self.params]
        torch._foreach_lerp_(self.shadow, live, 1.0 - d)
        self.updates += 1

    @contextlib.contextmanager
    def swap(self, model: nn.Module | None = None):
        """Run the block with the averaged weights in the model, then restore the live ones."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    def state_dict(self) -> dict:
        return {"shadow": dict(zip(self.names, self.shadow)), "updates": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for n, s in zip(self.names, self.shadow):
                s.copy_(state["shadow"][n])
        self.updates = int(state["updates"])
