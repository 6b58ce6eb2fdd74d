"""FP8 training of the projections, after the weights are loaded (so official checkpoints
still load strictly into the plain model):

- Transformer Engine: eligible nn.Linear layers are swapped for te.Linear (weights copied),
  and forward + loss run under te.autocast(recipe=...) (te.fp8_autocast before TE 2.9). The
  recipe follows the GPU: MXFP8 block scaling on sm100, Float8CurrentScaling (or
  DelayedScaling) on sm89/sm90.
- torchao: convert_to_float8_training with a module filter (both dims divisible by 16 and at
  least fp8.min_features; never the LM head, embeddings or tiny projections), float8
  all-gather under FSDP2, emulate=True on CPU.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn as nn


class FP8Unavailable(RuntimeError):
    """The FP8 backend asked for cannot run here (package or hardware missing)."""


def eligible(module: nn.Module, fqn: str, min_features: int) -> bool:
    """Projections FP8 may take: nn.Linear with both dims divisible by 16 and >= min_features."""
    if type(module) is not nn.Linear:
        return False
    i, o = module.in_features, module.out_features
    if i % 16 or o % 16 or min(i, o) < min_features:
        return False
    return not any(k in fqn for k in ("lm_head", "embed"))


# ---------------------------------------------------------------------------------------
# torchao

def convert_torchao(model: nn.Module, cfg, fsdp: bool, device: torch.device) -> int:
    """Swap eligible Linear layers for torchao Float8Linear in place; returns how many."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as exc:
        raise FP8Unavailable("fp8.backend = 'torchao' needs torchao: pip install torchao") from exc
    emulate = cfg.emulate or device.type != "cuda"
    if not emulate and torch.cuda.get_device_capability(device) < (8, 9):
        raise FP8Unavailable(f"fp8.backend = 'torchao': {torch.cuda.get_device_name(device)} has no FP8 tensor "
                             "cores (compute capability >= 8.9 needed); set fp8.emulate = true to emulate")
    recipe = "tensorwise" if cfg.recipe == "auto" else cfg.recipe
    config = Float8LinearConfig.from_recipe_name(recipe)
    if recipe == "tensorwise" and fsdp:
        config = Float8LinearConfig(enable_fsdp_float8_all_gather=True, emulate=emulate)
    elif emulate:
        import dataclasses

        config = dataclasses.replace(config, emulate=True)
    count = [0]

    def keep(module: nn.Module, fqn: str) -> bool:
        ok = eligible(module, fqn, cfg.min_features)
        count[0] += ok
        return ok

    convert_to_float8_training(model, config=config, module_filter_fn=keep)
    return count[0]


def torchao_after_step(model: nn.Module, cfg, fsdp: bool) -> None:
    """FSDP2 + tensorwise float8 all-gather: precompute the scales once per step."""
    if cfg.backend == "torchao" and fsdp and cfg.recipe in ("auto", "tensorwise"):
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        precompute_float8_dynamic_scale_for_fsdp(model)


# ---------------------------------------------------------------------------------------
# Transformer Engine

def _import_te():
    try:
        import transformer_engine.pytorch as te
        from transformer_engine.common import recipe as te_recipe
    except (ImportError, OSError) as exc:  # OSError: TE's CUDA libraries need a driver
        raise FP8Unavailable("fp8.backend = 'te' needs Transformer Engine "
                             "(pip install transformer-engine[pytorch]) on a CUDA machine: " + str(exc)) from exc
    return te, te_recipe


def te_recipe_for(cfg, device: torch.device):
    """The TE recipe object: fp8.recipe, or from the GPU (auto)."""
    te, te_recipe = _import_te()
    if device.type != "cuda":
        raise FP8Unavailable("fp8.backend = 'te' runs on CUDA only")
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        raise FP8Unavailable(f"fp8.backend = 'te': {torch.cuda.get_device_name(device)} (sm{cap[0]}{cap[1]}) has "
                             "no FP8 tensor cores (sm89 or newer needed)")
    name = cfg.recipe
    if name == "auto":
        name = "mxfp8" if cap[0] == 10 else "current"
    if name == "mxfp8":
        if cap[0] != 10:
            raise FP8Unavailable(f"fp8.recipe = 'mxfp8' needs compute capability 10.x, this GPU is sm{cap[0]}{cap[1]}")
        return te_recipe.MXFP8BlockScaling()
    fmt = te_recipe.Format.HYBRID
    if name == "current" and hasattr(te_recipe, "Float8CurrentScaling"):
        return te_recipe.Float8CurrentScaling(fp8_format=fmt)
    return te_recipe.DelayedScaling(fp8_format=fmt, amax_history_len=1024, amax_compute_algo="max")


def convert_te(model: nn.Module, cfg) -> int:
    """Swap eligible nn.Linear layers for te.Linear with the same weights; returns how many."""
    te, _ = _import_te()
    swaps = []
    for fqn, module in model.named_modules():
        for name, child in module.named_children():
            path = f"{fqn}.{name}" if fqn else name
            if eligible(child, path, cfg.min_features):
                swaps.append((module, name, child))
    for parent, name, lin in swaps:
        new = te.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                        params_dtype=lin.weight.dtype, device=lin.weight.device)
        with torch.no_grad():
            new.weight.copy_(lin.weight)
            if lin.bias is not None:
                new.bias.copy_(lin.bias)
        setattr(parent, name, new)
    return len(swaps)


def te_autocast(recipe) -> Callable[[], contextlib.AbstractContextManager]:
    te, _ = _import_te()
    if hasattr(te, "autocast"):  # TE >= 2.9
        return lambda: te.autocast(enabled=True, recipe=recipe)
    return lambda: te.fp8_autocast(enabled=True, fp8_recipe=recipe)


# ---------------------------------------------------------------------------------------
# Entry point for the trainer

def apply_fp8(model: nn.Module, cfg, fsdp: bool, device: torch.device):
    """Convert `model` per cfg (the FP8 section). Returns (number of converted projections,
    a zero-argument context-manager factory to wrap forward + loss in)."""
    if cfg.backend == "none":
        return 0, contextlib.nullcontext
    if cfg.backend == "torchao":
        return convert_torchao(model, cfg, fsdp, device), contextlib.nullcontext
    recipe = te_recipe_for(cfg, device)  # checks TE and the hardware before touching the model
    return convert_te(model, cfg), te_autocast(recipe)
