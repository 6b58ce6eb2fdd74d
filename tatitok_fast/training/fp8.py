"""FP8 training of the projections, after the weights are loaded (so official checkpoints
still load strictly into the plain model).

Which projections convert (`eligible`, the same rules for both backends):
  1. an nn.Linear, subclasses included (the models' FastLinear), but not one already
     converted (torchao Float8Linear, te.Linear) and not nn.MultiheadAttention's out_proj
     (MHA reads its weight directly, never calls it);
  2. in and out features divisible by 16 (32 for TE's MXFP8 recipe) and >= fp8.min_features;
  3. not the LM head or an embedding table: no component of its fqn is "lm_head" or starts
     with "embed" (projections merely named *_embed*, e.g. text_embed_proj, do convert).
The token dimension (rows = the product of the leading dims, B, B*77, B*N...) is not a
rule: both backends pad it. torchao runs with pad_inner_dim=True (its grad-weight GEMM
contracts over the rows, which _scaled_mm wants divisible by 16); the TE layers pad their
input rows with zeros to a multiple of 16 (32 for MXFP8) and slice the output (TE refuses
FP8 GEMMs on rows not divisible by 8), so per-sample projections (adaLN, pooled conditions:
B rows) and the text stream (B*77 rows) work at any batch size.

- Transformer Engine: eligible layers are swapped for te.Linear (weights and requires_grad
  copied), and forward + loss run under te.autocast(recipe=...) (te.fp8_autocast before
  TE 2.9). The recipe follows the GPU: MXFP8 block scaling on sm100, Float8CurrentScaling
  (or DelayedScaling) on sm89/sm90.
- torchao: convert_to_float8_training with `eligible` as the module filter, float8
  all-gather under FSDP2, emulate=True on CPU (real float8 casts, matmul in high precision).

`apply_fp8` returns an FP8Plan: how many of the model's projections converted (printed as
"fp8: N of M projections converted (backend, recipe)" and logged as fp8/layers), and the
autocast factory. It refuses a run where nothing would convert.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from tatitok_fast.training.errors import ConfigError


class FP8Unavailable(RuntimeError):
    """The FP8 backend asked for cannot run here (package or hardware missing)."""


# ---------------------------------------------------------------------------------------
# Which projections convert

def _converted_types() -> tuple[type, ...]:
    """Classes of projections that are already FP8 (never converted twice). TE and torchao are
    looked up only when already imported (a model cannot hold their layers otherwise): importing
    TE needs a GPU driver, and importing torchao logs a torch warning on every run."""
    types: list[type] = [_PaddedRowsMixin]
    ao = sys.modules.get("torchao.float8.float8_linear")
    if ao is not None and hasattr(ao, "Float8Linear"):
        types.append(ao.Float8Linear)
    te = sys.modules.get("transformer_engine.pytorch")
    if te is not None and hasattr(te, "Linear"):
        types.append(te.Linear)
    return tuple(types)


def eligible(module: nn.Module, fqn: str, min_features: int, dim_multiple: int = 16) -> bool:
    """Whether FP8 may take this projection (the rules in the module docstring)."""
    if not isinstance(module, nn.Linear) or isinstance(module, _converted_types()):
        return False
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return False
    i, o = module.in_features, module.out_features
    if i % dim_multiple or o % dim_multiple or min(i, o) < min_features:
        return False
    return not any(part == "lm_head" or part.startswith("embed") for part in fqn.split("."))


def count_projections(model: nn.Module) -> int:
    """M of "N of M": every projection of the model, converted or not."""
    return sum(isinstance(m, (nn.Linear, *_converted_types())) for m in model.modules())


def _eligible_fqns(model: nn.Module, cfg, dim_multiple: int) -> list[str]:
    return [fqn for fqn, m in model.named_modules() if fqn and eligible(m, fqn, cfg.min_features, dim_multiple)]


@dataclasses.dataclass
class FP8Plan:
    """What apply_fp8 did: `converted` of the model's `total` projections run in FP8
    (`backend`, `recipe`); `autocast()` wraps forward + loss."""

    backend: str
    recipe: str
    converted: int
    total: int
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    def summary(self) -> str:
        if self.backend == "none":
            return "fp8: off"
        return f"fp8: {self.converted} of {self.total} projections converted ({self.backend}, {self.recipe})"


def _check_something_converts(model: nn.Module, cfg, dim_multiple: int) -> int:
    """The number of eligible projections; an error naming the rules when there are none."""
    n = len(_eligible_fqns(model, cfg, dim_multiple))
    if n == 0:
        total = count_projections(model)
        raise ConfigError(
            f"fp8.backend = {cfg.backend!r}: none of the model's {total} projections can run in FP8 (an "
            f"nn.Linear with in and out features divisible by {dim_multiple} and >= fp8.min_features = "
            f"{cfg.min_features}, not the LM head or an embedding); lower fp8.min_features or set "
            "fp8.backend = 'none'")
    return n


def _verify(model: nn.Module, expected: int, cls: type | tuple[type, ...], backend: str) -> None:
    got = sum(isinstance(m, cls) for m in model.modules())
    if got != expected:
        raise RuntimeError(f"fp8.backend = {backend!r}: {expected} projections were eligible but {got} were "
                           "converted")


# ---------------------------------------------------------------------------------------
# torchao

def torchao_config(cfg, fsdp: bool, emulate: bool):
    """The Float8LinearConfig of fp8.recipe: pad_inner_dim on (any token count), float8
    all-gather under FSDP2 with tensorwise scaling, emulate off FP8 hardware."""
    from torchao.float8 import Float8LinearConfig

    recipe = "tensorwise" if cfg.recipe == "auto" else cfg.recipe
    config = Float8LinearConfig.from_recipe_name(recipe)
    extra = {"pad_inner_dim": True, "emulate": emulate}
    if recipe == "tensorwise" and fsdp:
        extra["enable_fsdp_float8_all_gather"] = True
    return dataclasses.replace(config, **extra)


def convert_torchao(model: nn.Module, cfg, fsdp: bool, device: torch.device) -> FP8Plan:
    """Swap the eligible projections for torchao Float8Linear in place (same Parameters)."""
    try:
        from torchao.float8 import convert_to_float8_training
        from torchao.float8.float8_linear import Float8Linear
    except ImportError as exc:
        raise FP8Unavailable("fp8.backend = 'torchao' needs torchao: pip install torchao") from exc
    emulate = cfg.emulate or device.type != "cuda"
    if not emulate and torch.cuda.get_device_capability(device) < (8, 9):
        raise FP8Unavailable(f"fp8.backend = 'torchao': {torch.cuda.get_device_name(device)} has no FP8 tensor "
                             "cores (compute capability >= 8.9 needed); set fp8.emulate = true to emulate")
    expected = _check_something_converts(model, cfg, 16)
    total = count_projections(model)
    config = torchao_config(cfg, fsdp, emulate)
    convert_to_float8_training(model, config=config, module_filter_fn=lambda m, fqn: eligible(m, fqn, cfg.min_features))
    _verify(model, expected, Float8Linear, "torchao")
    recipe = ("tensorwise" if cfg.recipe == "auto" else cfg.recipe) + (", emulated" if emulate else "")
    return FP8Plan("torchao", recipe, expected, total)


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


def te_recipe_name(cfg, capability: tuple[int, int]) -> str:
    """fp8.recipe resolved for a GPU of `capability`: mxfp8 on sm100, else current (auto)."""
    if cfg.recipe != "auto":
        return cfg.recipe
    return "mxfp8" if capability[0] == 10 else "current"


def te_recipe_for(cfg, device: torch.device):
    """The TE recipe object: fp8.recipe, or from the GPU (auto)."""
    te, te_recipe = _import_te()
    if device.type != "cuda":
        raise FP8Unavailable("fp8.backend = 'te' runs on CUDA only")
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        raise FP8Unavailable(f"fp8.backend = 'te': {torch.cuda.get_device_name(device)} (sm{cap[0]}{cap[1]}) has "
                             "no FP8 tensor cores (sm89 or newer needed)")
    name = te_recipe_name(cfg, cap)
    if name == "mxfp8":
        if cap[0] != 10:
            raise FP8Unavailable(f"fp8.recipe = 'mxfp8' needs compute capability 10.x, this GPU is sm{cap[0]}{cap[1]}")
        return te_recipe.MXFP8BlockScaling()
    fmt = te_recipe.Format.HYBRID
    if name == "current" and hasattr(te_recipe, "Float8CurrentScaling"):
        return te_recipe.Float8CurrentScaling(fp8_format=fmt)
    return te_recipe.DelayedScaling(fp8_format=fmt, amax_history_len=1024, amax_compute_algo="max")


def pad_rows_call(fn: Callable[..., torch.Tensor], x: torch.Tensor, multiple: int, *args, **kwargs) -> torch.Tensor:
    """fn on x (..., in) seen as (rows, in) with zero rows appended up to a multiple of
    `multiple`, the extra output rows sliced off: (..., out). Zero rows add nothing to the
    weight and bias gradients (their output gradient is zero) nor to an amax."""
    lead = x.shape[:-1]
    rows = math.prod(lead)
    pad = -rows % multiple
    if pad == 0:
        return fn(x, *args, **kwargs)
    out = fn(F.pad(x.reshape(rows, x.shape[-1]), (0, 0, 0, pad)), *args, **kwargs)
    return out[:rows].reshape(*lead, out.shape[-1])


class _PaddedRowsMixin:
    """Put before a Linear class: forward pads the input rows to `row_multiple` (pad_rows_call)."""

    row_multiple = 16

    def forward(self, x, *args, **kwargs):
        return pad_rows_call(super().forward, x, self.row_multiple, *args, **kwargs)


_PADDED_CLASSES: dict[tuple[type, int], type] = {}


def padded_linear_class(base: type, row_multiple: int) -> type:
    """`base` (te.Linear; nn.Linear in tests) whose forward pads its input rows; same
    parameters and state-dict keys as `base`."""
    key = (base, row_multiple)
    if key not in _PADDED_CLASSES:
        name = f"RowPadded{row_multiple}_{base.__module__.replace('.', '_')}_{base.__name__}"
        cls = type(name, (_PaddedRowsMixin, base), {"row_multiple": row_multiple, "__module__": __name__,
                                                     "__qualname__": name})
        globals()[name] = cls  # importable by name: pickled / torch.save'd models load back
        _PADDED_CLASSES[key] = cls
    return _PADDED_CLASSES[key]


def copy_linear_params(src: nn.Linear, dst: nn.Module) -> None:
    """dst.weight/bias <- src's values and requires_grad (a frozen projection stays frozen:
    DDP with find_unused_parameters=False would otherwise wait for its gradient)."""
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if src.bias is not None:
            dst.bias.copy_(src.bias)
    dst.weight.requires_grad_(src.weight.requires_grad)
    if src.bias is not None:
        dst.bias.requires_grad_(src.bias.requires_grad)


def swap_linears(model: nn.Module, cfg, make: Callable[[nn.Linear], nn.Module], dim_multiple: int = 16) -> int:
    """Replace every eligible projection by make(old) with old's parameters copied; returns
    how many (a module reached under two names is swapped once, under every name)."""
    made: dict[int, nn.Module] = {}
    swaps = []
    for fqn, module in model.named_modules(remove_duplicate=False):
        for name, child in module.named_children():
            path = f"{fqn}.{name}" if fqn else name
            if id(child) in made or eligible(child, path, cfg.min_features, dim_multiple):
                swaps.append((module, name, child))
                made.setdefault(id(child), None)
    for parent, name, old in swaps:
        if made[id(old)] is None:
            new = make(old)
            copy_linear_params(old, new)
            made[id(old)] = new
        setattr(parent, name, made[id(old)])
    return len(made)


def convert_te(model: nn.Module, cfg, row_multiple: int = 16) -> int:
    """Swap the eligible projections for row-padding te.Linear layers with the same weights;
    returns how many."""
    te, _ = _import_te()
    cls = padded_linear_class(te.Linear, row_multiple)

    def make(lin: nn.Linear) -> nn.Module:
        return cls(lin.in_features, lin.out_features, bias=lin.bias is not None, params_dtype=lin.weight.dtype,
                   device=lin.weight.device)

    return swap_linears(model, cfg, make, row_multiple)


def te_autocast(recipe) -> Callable[[], contextlib.AbstractContextManager]:
    te, _ = _import_te()
    if hasattr(te, "autocast"):  # TE >= 2.9
        return lambda: te.autocast(enabled=True, recipe=recipe)
    return lambda: te.fp8_autocast(enabled=True, fp8_recipe=recipe)


# ---------------------------------------------------------------------------------------
# Entry point for the trainer and the training benchmark

def apply_fp8(model: nn.Module, cfg, fsdp: bool, device: torch.device) -> FP8Plan:
    """Convert `model` per cfg (the FP8 section) -> FP8Plan (counts, autocast factory).
    Raises FP8Unavailable (backend or hardware missing) or ConfigError (nothing eligible)
    before touching the model; both print as `error: ...` from the command line."""
    if cfg.backend == "none":
        return FP8Plan("none", "", 0, count_projections(model))
    if cfg.backend == "torchao":
        return convert_torchao(model, cfg, fsdp, device)
    recipe = te_recipe_for(cfg, device)  # checks TE and the hardware before touching the model
    name = te_recipe_name(cfg, torch.cuda.get_device_capability(device))
    multiple = 32 if name == "mxfp8" else 16
    expected = _check_something_converts(model, cfg, multiple)
    total = count_projections(model)
    n = convert_te(model, cfg, multiple)
    _verify(model, expected, _PaddedRowsMixin, "te")
    return FP8Plan("te", name, n, total, te_autocast(recipe))
