"""What keeps a long run alive or stops it cleanly: preemption signals and non-finite losses.

Preemption: SIGTERM / SIGUSR1 (what SLURM and Kubernetes send before they kill a job) only set
a flag; after each optimizer step every rank asks whether any rank got one (a CPU all-reduce
over gloo: no GPU sync), so all ranks stop after the same step, save a checkpoint and exit 0.

Non-finite losses: each step turns "the loss or the gradient norm is NaN/Inf" into a flag
tensor on the device (no host sync); the flags are counted on the device and read only when the
loop syncs anyway (at log time) and before anything is written (checkpoint, export, samples).
- stop: NonFiniteLoss names the first bad step and the terms that went non-finite; nothing
  poisoned is saved, so the last good checkpoint stays the newest.
- skip: the flag goes to the fused AdamW kernel as `found_inf` (what GradScaler uses), which
  leaves weights, moments and the step count untouched on the device; the scheduler and the EMA
  still advance (the EMA moves towards unchanged weights). Skipped steps are counted in
  `skipped_steps` and left out of the logged loss averages.
"""
from __future__ import annotations

import signal
import sys
import threading

import torch
import torch.distributed as dist

from tatitok_fast.training.parallel import World


class NonFiniteLoss(RuntimeError):
    """training.nonfinite = stop and a step had a NaN/Inf loss or gradient norm."""


class Preemption:
    """`with Preemption(world, enabled):` handles SIGTERM and SIGUSR1 inside the block;
    `requested()` (every rank, after each step) -> the signal's name or None."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, world: World, enabled: bool):
        self.world, self.enabled = world, enabled
        self.received: str | None = None
        self._previous: dict = {}
        self._group = None
        if enabled and world.distributed:  # a CPU group, so the check never waits for the GPU
            self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def __enter__(self) -> "Preemption":
        if self.enabled and threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        print(f"{self.received} received: finishing this step, then saving a checkpoint", file=sys.stderr)
        self._restore()  # a second signal acts as it would without us

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()

    def requested(self) -> str | None:
        if not self.enabled:
            return None
        if not self.world.distributed:
            return self.received
        flag = torch.tensor([1 if self.received else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return (self.received or "a signal on another rank") if int(flag) else None


class NonFiniteGuard:
    """Device-side bookkeeping of non-finite steps (see the module doc)."""

    def __init__(self, policy: str, device: torch.device, count: int = 0):
        self.policy, self.device = policy, device
        self.count = torch.tensor(count, dtype=torch.int64, device=device)  # bad steps so far (resumed runs too)
        self.first = torch.full((), -1, dtype=torch.int64, device=device)  # first bad step (1-based), -1: none
        self.terms: dict[str, torch.Tensor] = {}  # logged name -> "was non-finite at some step"

    def flag(self, logged: dict[str, torch.Tensor], grad_norm: torch.Tensor | None) -> torch.Tensor:
        """A bool tensor: this step's loss (or grad norm) is NaN/Inf; records which terms were."""
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        for k, v in logged.items():  # each on its own device: a CPU value joins as a scalar, no copy, no sync
            nonfinite = ~torch.isfinite(v).all()
            self.terms[k] = self.terms.get(k, torch.zeros_like(nonfinite)) | nonfinite
            if k == "loss" or k == "aux_loss":
                bad = bad | nonfinite
        if grad_norm is not None:
            nonfinite = ~torch.isfinite(grad_norm)
            self.terms["grad_norm"] = self.terms.get("grad_norm", torch.zeros_like(nonfinite)) | nonfinite
            bad = bad | nonfinite
        return bad

    def record(self, bad: torch.Tensor, step: int) -> None:
        self.count += bad.to(torch.int64)
        self.first = torch.where(bad & (self.first < 0), torch.full_like(self.first, step), self.first)

    def check(self, world: World, where: str) -> int:
        """Sync point: the number of bad steps so far (max over ranks); under `stop` a
        NonFiniteLoss when there is one. `where`: what was about to happen (for the message)."""
        vals = torch.stack([self.count, self.first])  # on the device: what the process group's backend takes
        if world.distributed:
            dist.all_reduce(vals, op=dist.ReduceOp.MAX)
        count, first = vals.tolist()
        if count and self.policy == "stop":
            terms = sorted(k for k, v in self.terms.items() if bool(v))
            raise NonFiniteLoss(f"non-finite loss at step {first} ({count} bad step{'s' if count > 1 else ''} "
                                f"before {where}); non-finite terms: {', '.join(terms) or 'none logged'}. "
                                "The run stopped (training.nonfinite = stop) without saving; the last good "
                                "checkpoint is kept. Resume from it with a lower lr or training.nonfinite = skip.")
        return count
