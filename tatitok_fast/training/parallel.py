"""Processes and parallelism: torchrun's environment -> process group and device; the trained
model wrapped for one process, DDP or FSDP2, with per-block activation checkpointing and
torch.compile (torchtitan's order: checkpointing -> compile -> fully_shard per block -> root).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device_choice: str = "auto") -> World:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; start the process group (NCCL on CUDA,
    gloo on CPU) when more than one process runs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device_choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("training.device = 'cuda' but CUDA is not available on this machine")
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30),
                                device_id=device if use_cuda else None)
    return World(rank, world_size, local_rank, device)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_reduce_mean(values: dict[str, torch.Tensor], world: World) -> dict[str, float]:
    """Detached scalars averaged over ranks, in one all-reduce."""
    if not values:
        return {}
    keys = sorted(values)
    flat = torch.stack([torch.as_tensor(values[k], dtype=torch.float32).detach().float().reshape(())
                        .to(world.device) for k in keys])
    if world.distributed:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world.world_size
    return dict(zip(keys, flat.tolist()))


def resolve_mode(mode: str, world: World) -> str:
    if mode == "auto":
        return "fsdp" if world.distributed else "none"
    if mode in ("ddp", "fsdp") and not world.distributed:
        return "none"  # one process: nothing to shard or synchronise
    return mode


def apply_activation_checkpointing(blocks: list[nn.Module]) -> None:
    """Wrap each block's forward in torch.utils.checkpoint (non-reentrant), in place, so
    parameter names and the module tree stay as they are (checkpoints and exports unchanged)."""
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        block.forward = forward


def parallelize(model: nn.Module, blocks: list[nn.Module], cfg, world: World, mixed_precision: str) -> nn.Module:
    """cfg: the Parallelism section. Returns the module to call (DDP wrapper, FSDP2 model or
    the model itself); the model's parameters are on world.device afterwards."""
    if cfg.activation_checkpoint == "full":
        apply_activation_checkpointing(blocks)
    if cfg.compile:
        for block in blocks:
            block.compile()
    mode = resolve_mode(cfg.mode, world)
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        model.to(world.device)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if mixed_precision == "bf16" else torch.float32,
                                  reduce_dtype=torch.float32)
        for block in blocks:
            fully_shard(block, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
        fully_shard(model, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
        for m in model.modules():  # their forwards would write into the discarded all-gather copy
            if hasattr(m, "apply_deferred_updates"):
                m.defer_updates = True
        return model
    model.to(world.device)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[world.local_rank] if world.device.type == "cuda" else None,
                                       find_unused_parameters=False)
    return model


def apply_deferred_updates(model: nn.Module) -> None:
    """After each backward: the in-place parameter updates that modules computed in forward
    (clustering VQ's codebook refresh) applied to the sharded FSDP2 parameters. Under FSDP2
    (parallelize sets `defer_updates` on every module with `apply_deferred_updates`) a
    forward sees the unsharded all-gather copy, which is thrown away at reshard; one
    process and DDP write into the parameters themselves and leave nothing pending."""
    for m in model.modules():
        if getattr(m, "defer_updates", False):
            m.apply_deferred_updates()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def average_gradients(module: nn.Module, world: World) -> None:
    """Mean of the gradients over ranks, one coalesced all-reduce: the loss-side module (the
    discriminator) is small and replicated, and its losses call methods other than forward,
    which DDP's hooks would not see."""
    if not world.distributed:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world.world_size
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)
