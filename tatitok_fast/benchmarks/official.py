"""The official implementation (bytedance/1d-tokenizer) as the benchmark baseline.

Its code is imported from a checkout at measurement time (nothing of it is copied here): the
official classes are built from the same config as ours and given the same weights (our
state dicts use the official key names), and the agreement checks below compare the two on
the same inputs before anything is timed.

    off = import_official("../shared/peer/1d-tokenizer")
    official_tok = official_model(off.TATiTok, ours)        # same config, same weights

Patches applied at import (peer/README.md): open_clip >= 3's `text_global_pool` returns one
value where `modeling.maskgen` unpacks two; the official `MaskGen_KL` samples on CUDA only
(hard-coded `.cuda()`), so its generate baseline exists on CUDA only.
"""
from __future__ import annotations

import contextlib
import copy
import io
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, Mapping

import torch
import torch.nn as nn

# official files the benchmarks import
_NEEDED = ("modeling/tatitok.py", "modeling/maskgen.py", "modeling/modules/blocks.py")


def default_checkout() -> Path | None:
    """`../shared/peer/1d-tokenizer` beside this repository's checkout, when it is there
    (the layout of the development machines and CI); None otherwise."""
    path = Path(__file__).resolve().parents[3] / "shared" / "peer" / "1d-tokenizer"
    return path if (path / _NEEDED[0]).is_file() else None


def check_checkout(path: str | Path, arg: str = "--official") -> Path:
    """The checkout's absolute path; ValueError naming `arg` when it does not hold the
    official modeling package."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(f"{arg}: {path} is not a directory; expected a checkout of bytedance/1d-tokenizer")
    missing = [f for f in _NEEDED if not (root / f).is_file()]
    if missing:
        raise ValueError(f"{arg}: {path} is not a checkout of bytedance/1d-tokenizer (missing {', '.join(missing)})")
    return root


@dataclass(frozen=True)
class Official:
    """The official classes, imported from `root`."""

    root: Path
    TATiTok: type
    MaskGen_VQ: type
    MaskGen_KL: type
    maskgen_module: ModuleType


_IMPORTED: dict[Path, Official] = {}


def import_official(path: str | Path, arg: str = "--official") -> Official:
    """Import `modeling.tatitok` and `modeling.maskgen` from the checkout at `path` (once per
    process), with the open_clip compatibility patch applied."""
    root = check_checkout(path, arg)
    if root in _IMPORTED:
        return _IMPORTED[root]
    loaded = sys.modules.get("modeling")
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve().parents[1] != root:
        raise RuntimeError(f"{arg}: a different `modeling` package is already imported ({loaded.__file__}); "
                           f"run the official baseline of {root} in a fresh process")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        # blocks.py prints its attention mode at import; torch.cuda.amp.autocast decorators warn
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            import modeling.maskgen as maskgen
            import modeling.tatitok as tatitok
    except ImportError as e:
        raise RuntimeError(f"{arg}: importing the official code from {root} failed ({e}); it needs diffusers, "
                           "omegaconf, einops, accelerate and open_clip_torch: pip install -e '.[test]'") from e
    _patch_text_global_pool(maskgen)
    off = Official(root, tatitok.TATiTok, maskgen.MaskGen_VQ, maskgen.MaskGen_KL, maskgen)
    _IMPORTED[root] = off
    return off


def _patch_text_global_pool(maskgen: ModuleType) -> None:
    """open_clip >= 3 returns only the pooled tensor; the official code unpacks (pooled, tokens)."""
    tgp = maskgen.text_global_pool
    if getattr(tgp, "_tatitok_fast_patch", False):
        return
    probe = tgp(torch.zeros(1, 3, 2), torch.tensor([[1, 3, 2]]), "argmax")
    if isinstance(probe, tuple):
        return  # an open_clip that still returns both

    def text_global_pool(x, text=None, pool_type="argmax"):
        return tgp(x, text, pool_type), x

    text_global_pool._tatitok_fast_patch = True
    maskgen.text_global_pool = text_global_pool


def official_model(cls: type, ours: nn.Module) -> nn.Module:
    """The official `cls` built from `ours.config`, holding a copy of our weights (strict
    load: same keys and shapes), in eval mode on our model's device, in fp32."""
    config: Mapping[str, Any] = copy.deepcopy(ours.config)
    p = next(ours.parameters())
    with contextlib.redirect_stdout(io.StringIO()):
        with torch.device("meta"):  # no random init: every tensor comes from our state dict
            model = cls(config)
    model.load_state_dict({k: v.detach().float().clone() for k, v in ours.state_dict().items()},
                          strict=True, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"official {cls.__name__}: tensors not in our state dict: {left}")
    _retie(model)
    return model.to(p.device).eval().requires_grad_(False)


def _retie(model: nn.Module) -> None:
    """assign=True replaced the tied parameter on one side only: point the official
    weight-tied LM head at the embedding table again."""
    head, emb = getattr(model, "lm_head", None), getattr(model, "embeddings", None)
    if head is not None and emb is not None and hasattr(head, "target_codebook_size"):
        head.weight = emb.weight


# ---------------------------------------------------------------------------------------
# Agreement checks: run before timing; a mismatch stops the run

# agreement tolerances (checked before anything is timed)
FP32_TOL = 1e-4  # relative error of ours vs official in fp32 (parity tests see ~1e-6)
LOW_PRECISION_FLOOR = 1e-2  # fast path vs official fp32: accepted whatever the autocast error


class AgreementError(AssertionError):
    """Ours and the official implementation disagree on the same weights and inputs."""


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in fp64."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def check_close(what: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> float:
    if tuple(got.shape) != tuple(want.shape):
        raise AgreementError(f"{what}: shape {tuple(got.shape)} vs official {tuple(want.shape)}")
    err = rel_err(got, want)
    if not err <= tol:  # also catches NaN
        raise AgreementError(f"{what}: relative error {err:.3g} vs the official output exceeds {tol:.3g}; "
                             "ours and the official code disagree on the same weights and inputs")
    return err


def check_equal_ids(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    got, want = got.reshape(got.shape[0], -1).cpu(), want.reshape(want.shape[0], -1).cpu()
    if got.shape != want.shape or not torch.equal(got, want):
        n = int((got != want).sum()) if got.shape == want.shape else -1
        raise AgreementError(f"{what}: token ids differ from the official ids ({n} of {want.numel()} differ; "
                             f"shapes {tuple(got.shape)} vs {tuple(want.shape)})")


@contextlib.contextmanager
def offline_perceptual():
    """torchvision builders with weights=None and LPIPS without its download, while the
    official loss module is constructed (`modeling.modules.lpips` must be imported). LPIPS only
    reads vgg16().features: the stand-in skips building the 120M-parameter classifier."""
    import torchvision.models as tvm
    from torchvision.models.vgg import cfgs, make_layers

    lpips = sys.modules["modeling.modules.lpips"]
    saved = tvm.vgg16, tvm.convnext_small, lpips.LPIPS.load_pretrained
    convnext_small = tvm.convnext_small
    tvm.vgg16 = lambda weights=None, **kw: SimpleNamespace(features=make_layers(cfgs["D"]))
    tvm.convnext_small = lambda weights=None, **kw: convnext_small(weights=None, **kw)
    lpips.LPIPS.load_pretrained = lambda self: None
    try:
        yield
    finally:
        tvm.vgg16, tvm.convnext_small, lpips.LPIPS.load_pretrained = saved


def official_mixed_precision(device: torch.device, fp32: bool = False):
    """The official training step's precision on `device`: autocast fp16 + GradScaler on CUDA
    (its configs' mixed_precision: fp16), autocast bf16 on CPU; fp32: neither (on a CPU
    without bf16 units the faster official mode). Returns (autocast kwargs,
    backward_step(loss, params, optimizer): backward, unscale, clip 1.0, step, zero_grad)."""
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if cuda and not fp32 else None
    amp = dict(device_type=device.type, dtype=torch.float16 if cuda else torch.bfloat16, enabled=not fp32)

    def backward_step(loss, params, optimizer):
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        (scaler.step(optimizer) if scaler is not None else optimizer.step())
        if scaler is not None:
            scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return amp, backward_step
