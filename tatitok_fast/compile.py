"""`tatitok_fast.compile(model)`: inference with torch.compile (inductor), same results.

What is compiled is the network each public method spends its time in, never the Python
around it (argument checks, the sampling loops' host-side control flow, the CUDA-graph
runner), so eager semantics are kept and the loops stay as they are:

    TATiTok / TiTok      encoder and decoder forwards (TiTok's pixel decoder too): encode,
                         decode, decode_tokens, tokenize, detokenize
    MaskGen_VQ           logits (one sampling step's forward): generate
    MaskGen_KL           forward_mae_decoder and the diffusion head (net.forward_embedded, one
                         denoising step): sample_tokens
    ImageBert, UViTBert  token_logits: generate

On CPU inductor runs with freezing (weights become constants, folded and prepacked for
oneDNN's GEMMs: config `freezing`, `cpp.weight_prepack`), which applies to calls made under
torch.no_grad() / inference_mode() (generate and sample_tokens always are); compile after
loading the weights, since frozen weights are not re-read. On CUDA the sampling loops keep
their CUDA graph: the compiled step forward is captured inside it (the graph runner's
warm-up runs compile it first).

Batch sizes: `dynamic=True` (default) marks dim 0 of every tensor argument dynamic (the batch;
other sizes stay static, so the GEMMs keep fixed feature sizes), so a new batch size reuses
the graph (size 1 is specialised by dynamo and gets its own). Marking only the batch also
avoids dynamo's duck sizing, which would tie a batch equal to a feature size (2B = C = 4) to
that constant and recompile at the next batch. `dynamic=False` specialises on every shape.

Cache: inductor's FX-graph cache and AOT-autograd cache are switched on, on disk under
`cache_dir` (sets TORCHINDUCTOR_CACHE_DIR for this process) or wherever
TORCHINDUCTOR_CACHE_DIR already points (else inductor's default under /tmp), so a second
process with the same model, dtype and shapes loads the compiled code instead of compiling.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

# attribute paths (from the model) of the callables compiled, per model class name; the
# first class in the model's MRO that is listed wins
_TARGETS: dict[str, tuple[str, ...]] = {
    "TATiTok": ("encoder.forward", "decoder.forward"),
    "TiTok": ("encoder.forward", "decoder.forward", "pixel_decoder.forward"),
    "MaskGen_VQ": ("logits",),
    "MaskGen_KL": ("forward_mae_decoder", "diffloss.net.forward_embedded"),
    "ImageBert": ("token_logits",),  # UViTBert subclasses it
}
COMPILED_ATTR = "_tatitok_compiled"  # on the model: {"targets": [...], "dynamic": ..., "options": {...}}


def targets_of(model: nn.Module) -> tuple[str, ...]:
    """The attribute paths `compile` compiles for this model (ValueError for other types)."""
    if isinstance(model, nn.Module):
        for cls in type(model).__mro__:
            if cls.__name__ in _TARGETS and cls.__module__.startswith("tatitok_fast."):
                return _TARGETS[cls.__name__]
    raise ValueError(f"model: expected a tatitok_fast TATiTok, TiTok, MaskGen_VQ, MaskGen_KL, ImageBert or "
                     f"UViTBert, got {type(model).__name__}")


def inductor_options(device: torch.device) -> dict[str, object]:
    """Inductor config patches: freezing + weight prepacking on CPU, defaults elsewhere."""
    if device.type == "cpu":
        return {"freezing": True, "cpp.weight_prepack": True}
    return {}


def set_cache_dir(cache_dir: str | os.PathLike | None) -> Path | None:
    """Point inductor's on-disk caches at `cache_dir` (created), and switch the FX-graph and
    AOT-autograd caches on. Returns the cache directory in use (None: inductor's default)."""
    import torch._functorch.config
    import torch._inductor.config

    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    if cache_dir is not None:
        path = Path(cache_dir).expanduser().resolve()
        if path.exists() and not path.is_dir():
            raise ValueError(f"cache_dir: expected a directory, got the file {path}")
        path.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    return Path(current) if current else None


def _resolve(model: nn.Module, path: str):
    """'decoder.forward' -> (model.decoder, 'forward'); None when a module on the path is
    absent (TiTok without a pixel decoder)."""
    *mods, name = path.split(".")
    obj = model
    for m in mods:
        obj = getattr(obj, m, None)
        if obj is None:
            return None
    return obj, name


def _batch_dynamic(compiled):
    """Call `compiled` with dim 0 (the batch) of every tensor argument marked dynamic
    (parameters, e.g. TiTok's latent tokens, are left static)."""
    def call(*args, **kwargs):
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter) and a.dim() > 0:
                torch._dynamo.maybe_mark_dynamic(a, 0)
        return compiled(*args, **kwargs)

    return call


def compile(model: nn.Module, *, dynamic: bool | None = True, cache_dir: str | os.PathLike | None = None,
            fullgraph: bool = False) -> nn.Module:  # noqa: A001 - the public name the issue asks for
    """Compile `model`'s per-call networks in place (see the module doc) and return it.

    dynamic: True (default) a symbolic batch size, no recompile per batch size; False one
        graph per shape; None torch's automatic choice (static, then dynamic on a change).
    cache_dir: where inductor keeps its compiled graphs across processes (default: the
        TORCHINDUCTOR_CACHE_DIR environment variable, else inductor's default).
    fullgraph: raise if a compiled network would break into several graphs.
    Compiling twice is a no-op. The model's weights must be loaded before (frozen on CPU)."""
    targets = targets_of(model)
    if dynamic not in (True, False, None):
        raise ValueError(f"dynamic: expected True, False or None, got {dynamic!r}")
    set_cache_dir(cache_dir)
    if getattr(model, COMPILED_ATTR, None) is not None:
        return model
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    options = inductor_options(device)
    done = []
    for path in targets:
        where = _resolve(model, path)
        if where is None:
            continue
        obj, name = where
        fn = getattr(obj, name)
        compiled = torch.compile(fn, dynamic=None if dynamic else dynamic, fullgraph=fullgraph,
                                 options=options or None)
        # an instance attribute shadows the class's method: state_dict, parameters and the
        # class stay as they are, and the eager method is still type(obj).<name>
        setattr(obj, name, _batch_dynamic(compiled) if dynamic else compiled)
        done.append(path)
    setattr(model, COMPILED_ATTR, {"targets": done, "dynamic": dynamic, "options": options})
    return model


def is_compiled(model: nn.Module) -> bool:
    return getattr(model, COMPILED_ATTR, None) is not None


# ---- the CLI's --compile (reconstruct, tokenize, generate) ----

def add_compile_arguments(parser) -> None:
    parser.add_argument("--compile", action="store_true",
                        help="run the models through torch.compile (inductor; freezing on CPU): slower first "
                             "batch, faster after; same results within rounding")
    parser.add_argument("--compile-cache", metavar="DIR", default=None,
                        help="with --compile: where compiled graphs are kept across runs (default: "
                             "$TORCHINDUCTOR_CACHE_DIR, else inductor's default)")


def compile_if_asked(args, model: nn.Module, option: str, error: type[Exception] = ValueError) -> nn.Module:
    """`compile(model)` when --compile was given; `error` naming `option` (the flag that
    chose the model) for a model that cannot be compiled or a bad --compile-cache."""
    if not getattr(args, "compile", False):
        return model
    try:
        targets_of(model)
    except ValueError:
        raise error(f"--compile: {option} gave a {type(model).__name__}, which has no compiled path (TATiTok, "
                    f"TiTok, MaskGen_VQ, MaskGen_KL, ImageBert and UViTBert have one)") from None
    try:
        return compile(model, cache_dir=getattr(args, "compile_cache", None))
    except ValueError as exc:
        raise error(f"--compile-cache: {exc}") from None
