"""CLIP text conditioning for TA-TiTok and MaskGen, from one pass through the text tower.

The three tensors the reference computes with separate helpers come out of one pass:

    ids ─▶ token_embedding + positional_embedding   (in the tower's cast dtype)
        ─▶ blocks[:-1] ─▶ penultimate (B, 77, W)     MaskGen `condition`
        ─▶ blocks[-1] ─▶ ln_final ─▶ guidance (B, 77, W)   TA-TiTok decoder text guidance
                                 └─▶ [EOT] @ text_projection ─▶ pooled (B, 1, E)
                                                            MaskGen `condition_pooled`

W = E = 768 for ViT-L-14-336. `encode_text` works on any open_clip (tokenizer, CLIP) pair, the
pair the reference API takes as `clip_tokenizer` / `clip_encoder`; `CLIPTextEncoder` builds the
pair itself, keeps only the text tower and caches the empty prompt (the null condition for CFG).

Layout: in open_clip 3.x each block's nn.MultiheadAttention fixes its own layout when it is
built (batch-first; TextTransformer always builds it so). `transformer.batch_first` only tells
`Transformer.forward` whether to transpose its input around the blocks: the reference README
sets it to False *and* permutes to (L, B, D) itself, so the blocks still see (B, L, D). We call
the blocks directly and feed each the layout its attention module was built for, so the flag
never matters.
"""
from __future__ import annotations

import gc
import os
import weakref
from collections import OrderedDict
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn

__all__ = ["TextEncoding", "encode_text", "encode_token_ids", "CLIPTextEncoder"]

_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")
_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class TextEncoding(NamedTuple):
    """CLIP text conditions of a batch of captions.

    guidance:    (B, L, W) ln_final(all blocks), every position: the TA-TiTok text guidance.
    penultimate: (B, L, W) residual stream before the last block: MaskGen's `condition`.
    pooled:      (B, 1, E) ln_final output at the EOT token @ text_projection: `condition_pooled`.
    """

    guidance: torch.Tensor
    penultimate: torch.Tensor
    pooled: torch.Tensor

    def expand(self, batch_size: int) -> "TextEncoding":
        """Views of a batch-of-one encoding repeated `batch_size` times (no copy)."""
        return TextEncoding(*(t.expand(batch_size, *t.shape[1:]) for t in self))


# ---------------------------------------------------------------------------------------
# Input checks


def _check_captions(captions: object) -> list[str]:
    """str or non-empty list/tuple of str -> list of str."""
    if isinstance(captions, str):
        return [captions]
    if not isinstance(captions, (list, tuple)) or not all(isinstance(c, str) for c in captions):
        raise TypeError(f"captions: expected a str or a list of str, got {_describe(captions)}")
    if len(captions) == 0:
        raise ValueError("captions: expected at least one caption, got an empty list")
    return list(captions)


def _describe(obj: object) -> str:
    if isinstance(obj, (list, tuple)):
        kinds = sorted({type(c).__name__ for c in obj})
        return f"a {type(obj).__name__} of {', '.join(kinds) or 'nothing'}"
    return f"{type(obj).__name__}"


def _check_model(model: object) -> None:
    """The reference reads these attributes of an open_clip CLIP; fail early if one is missing."""
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask",
              "text_projection")
    missing = [n for n in needed if not hasattr(model, n)]
    if not missing and not hasattr(model.transformer, "resblocks"):
        missing = ["transformer.resblocks"]
    if missing:
        raise TypeError(
            "model: expected an open_clip CLIP model with its built-in text tower "
            f"(open_clip.create_model(...)); {type(model).__name__} lacks {', '.join(missing)}")


def _cast_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the text tower computes in: open_clip's Transformer.get_cast_dtype()."""
    get = getattr(model.transformer, "get_cast_dtype", None)
    return get() if get is not None else model.token_embedding.weight.dtype


def _block_is_batch_first(block: nn.Module) -> bool:
    """Layout a residual block expects: nn.MultiheadAttention carries its own flag; open_clip's
    custom attention blocks are always batch-first."""
    attn = getattr(block, "attn", None)
    if isinstance(attn, nn.MultiheadAttention):
        return bool(attn.batch_first)
    return True


def _eot_index(model: nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) ids -> (B,) position pooled by the model's text_pool_type."""
    pool_type = getattr(model, "text_pool_type", "argmax")
    if pool_type == "argmax":  # OpenAI BPE: EOT (49407) is the largest id in every row
        return token_ids.argmax(dim=-1)
    if pool_type == "eos":  # first occurrence of the tokenizer's eos id
        eos_id = getattr(model, "text_eos_id", None)
        if eos_id is None:
            raise ValueError("model: text_pool_type is 'eos' but the model has no text_eos_id")
        return (token_ids == eos_id).int().argmax(dim=-1)
    if pool_type == "first":
        return token_ids.new_zeros(token_ids.shape[0])
    if pool_type == "last":
        return token_ids.new_full((token_ids.shape[0],), token_ids.shape[1] - 1)
    raise ValueError(
        f"model: text_pool_type must be 'argmax', 'eos', 'first' or 'last' to give a pooled "
        f"embedding, got {pool_type!r}")


def _project(model: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """(B, W) -> (B, E) through text_projection (a (W, E) parameter, a Linear, or none)."""
    proj = model.text_projection
    if proj is None:
        return pooled
    if isinstance(proj, nn.Module):
        return proj(pooled)
    return pooled.to(proj.dtype) @ proj


# ---------------------------------------------------------------------------------------
# One pass through the text tower


def encode_token_ids(model: nn.Module, token_ids: torch.Tensor) -> TextEncoding:
    """Text conditions of already tokenized captions.

    model: an open_clip CLIP (its text tower is used; `visual` may be deleted).
    token_ids: (B, L) integer ids, L = the model's context length (77), on the model's device.
    Autograd follows the caller's mode, as in the reference helpers.
    """
    _check_model(model)
    if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 2 \
            or token_ids.dtype not in (torch.int64, torch.int32):
        got = (f"{tuple(token_ids.shape)} {token_ids.dtype}" if isinstance(token_ids, torch.Tensor)
               else type(token_ids).__name__)
        raise TypeError(f"token_ids: expected a (B, L) integer tensor, got {got}")
    context = model.positional_embedding.shape[0]
    if token_ids.shape[1] != context or token_ids.shape[0] == 0:
        raise ValueError(f"token_ids: expected shape (B >= 1, {context}), got {tuple(token_ids.shape)}")
    weight_device = model.token_embedding.weight.device
    if token_ids.device != weight_device:
        raise ValueError(f"token_ids: expected on {weight_device} (the model's device), "
                         f"got {token_ids.device}")

    dtype = _cast_dtype(model)
    x = model.token_embedding(token_ids).to(dtype)  # (B, L, W)
    x = x + model.positional_embedding.to(dtype)
    mask = model.attn_mask  # (L, L) additive causal mask, or None for a bidirectional tower

    blocks = model.transformer.resblocks
    batch_first = True  # layout of x right now
    penultimate = x
    for i, block in enumerate(blocks):
        want = _block_is_batch_first(block)
        if want != batch_first:
            x, batch_first = x.transpose(0, 1), want  # (B, L, W) <-> (L, B, W)
        if i == len(blocks) - 1:
            penultimate = x if batch_first else x.transpose(0, 1)
        x = block(x, attn_mask=mask)
    if not batch_first:
        x = x.transpose(0, 1)  # (B, L, W)

    guidance = model.ln_final(x)  # (B, L, W)
    rows = torch.arange(guidance.shape[0], device=guidance.device)
    pooled = _project(model, guidance[rows, _eot_index(model, token_ids)])  # (B, E)
    return TextEncoding(guidance.contiguous(), penultimate.contiguous(), pooled.unsqueeze(1))


def _tokenize(tokenizer: object, captions: list[str]) -> torch.Tensor:
    if not callable(tokenizer):
        raise TypeError(f"tokenizer: expected an open_clip tokenizer (callable on a list of str), "
                        f"got {type(tokenizer).__name__}")
    ids = tokenizer(captions)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != len(captions):
        raise ValueError(f"tokenizer: expected a ({len(captions)}, context) tensor of ids, got "
                         f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
    return ids.long()


def encode_text(tokenizer: object, model: nn.Module, captions: str | Sequence[str], *,
                device: torch.device | str | None = None) -> TextEncoding:
    """TA-TiTok guidance and MaskGen conditions of `captions` in one pass.

    tokenizer, model: an open_clip pair, e.g. open_clip.get_tokenizer("ViT-L-14-336") and the
        CLIP from open_clip.create_model("ViT-L-14-336", "openai"), used as they are.
    captions: a str or a non-empty list of str (B of them).
    device: where the model's weights are; defaults to the token embedding's device.
    Returns TextEncoding: guidance (B, 77, W), penultimate (B, 77, W), pooled (B, 1, E).
    """
    captions = _check_captions(captions)
    _check_model(model)
    weight_device = model.token_embedding.weight.device
    if device is not None and torch.device(device) != weight_device:
        want = torch.device(device)
        # "cuda" names the current CUDA device; accept it when the weights are there.
        if not (want.index is None and want.type == weight_device.type):
            raise ValueError(f"device: the model's weights are on {weight_device}, got {want}; "
                             "move the model first")
    return encode_token_ids(model, _tokenize(tokenizer, captions).to(weight_device))


# ---------------------------------------------------------------------------------------
# The text encoder module


class CLIPTextEncoder(nn.Module):
    """Frozen open_clip text tower giving `TextEncoding`s, with a cached empty prompt.

        enc = CLIPTextEncoder("ViT-L-14-336", "openai", device="cuda")
        cond = enc(["a photo of a jay"])        # guidance / penultimate (B, 77, 768), pooled (B, 1, 768)
        null = enc.empty_prompt(batch_size=4)  # encoding of "" (cached), expanded to 4 rows

    The cached empty prompt is shared: its tensors are views, do not write into them.
    """

    def __init__(self, model_name: str = "ViT-L-14-336", pretrained: str | None = "openai", *,
                 cache_dir: str | os.PathLike | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 quick_gelu: bool | None = None):
        """Build `model_name`'s CLIP with open_clip, drop its vision tower, freeze it.

        pretrained: an open_clip tag ("openai"), a local weights file (.bin/.pt/.pth/.safetensors)
            or None (random weights, for tests and benchmarks).
        dtype: compute dtype; fp16/bf16 use open_clip's mixed precision (weights of the
            projections in low precision, LayerNorms and embeddings in fp32).
        quick_gelu: None follows how the weights were trained: the tag's setting, or for a file
            the model's "openai" tag (QuickGELU). open_clip >= 3 no longer applies it by itself
            for the "openai" tag, which would give GELU activations the weights never saw.
        """
        super().__init__()
        if not isinstance(model_name, str) or not model_name:
            raise TypeError(f"model_name: expected an open_clip model name, got {model_name!r}")
        if pretrained is not None and not isinstance(pretrained, (str, os.PathLike)):
            raise TypeError(f"pretrained: expected a tag, a file path or None, "
                            f"got {type(pretrained).__name__}")
        if dtype is not None and dtype not in _PRECISION:
            raise ValueError(f"dtype: expected one of {list(_PRECISION)}, got {dtype}")
        import open_clip

        has_schema = model_name.startswith(("hf-hub:", "local-dir:"))
        if not has_schema and open_clip.get_model_config(model_name) is None:
            raise ValueError(f"model_name: {model_name!r} is not an open_clip model; "
                             f"see open_clip.list_models()")
        pretrained = os.fspath(pretrained) if pretrained is not None else None
        if quick_gelu is None:
            quick_gelu = _trained_with_quick_gelu(open_clip, model_name, pretrained)
        model = _create_model(open_clip, model_name, pretrained, cache_dir, dtype, quick_gelu)
        if hasattr(model, "visual"):
            del model.visual  # the vision tower is never used here: free it before moving
            gc.collect()
        kwargs = {} if cache_dir is None else {"cache_dir": os.fspath(cache_dir)}
        self._init(model, open_clip.get_tokenizer(model_name, **kwargs))
        self._spec = {"name": model_name, "pretrained": pretrained}
        if quick_gelu != _trained_with_quick_gelu(open_clip, model_name, pretrained):
            self._spec["quick_gelu"] = quick_gelu
        if device is not None:
            self.to(device)

    @classmethod
    def tiny(cls, seed: int = 0, context_length: int = 77) -> "CLIPTextEncoder":
        """A random CLIP with a 64-wide, 2-layer text tower (embed_dim 64) and the real
        ViT-L-14-336 tokenizer: for tests, quick benchmarks and the demo, with
        tatitok_fast.presets' tiny configs. The weights depend on `seed` (and the context
        length) only. No download. context_length: tokens per caption (CLIP's 77; the demo's
        one-line captions fit in 16, which makes every text token its models attend to real)."""
        if isinstance(context_length, bool) or not isinstance(context_length, int) or not 2 <= context_length <= 77:
            raise ValueError(f"context_length: expected an int in [2, 77], got {context_length!r}")
        import open_clip
        from open_clip.model import CLIP

        gen = torch.Generator().manual_seed(seed)
        # open_clip's own init draws from the global RNG (e.g. Linear biases, which the loop below
        # only perturbs): seed it too, in a fork, so the weights depend on `seed` alone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIP(embed_dim=64,
                         vision_cfg={"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
                         text_cfg={"context_length": context_length, "vocab_size": 49408, "width": 64, "heads": 4,
                                   "layers": 2})
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.05, generator=gen) if p.dim() > 1 else p.add_(0.05 * torch.randn(p.shape, generator=gen))
        self = cls.from_open_clip(model.eval(), open_clip.get_tokenizer("ViT-L-14-336", context_length=context_length))
        self._spec = {"name": "tiny", "seed": seed}
        if context_length != 77:  # specs of CLIP's own length stay as they were
            self._spec["context_length"] = context_length
        return self

    # -- specs: the text encoder a checkpoint's config names (model.text_encoder) ------------

    @classmethod
    def from_spec(cls, spec: dict, *, cache_dir: str | os.PathLike | None = None,
                  device: torch.device | str | None = None) -> "CLIPTextEncoder":
        """Build the encoder a spec names (the `model.text_encoder` entry of a config):

            {"name": "tiny", "seed": 0}                        CLIPTextEncoder.tiny(0), offline
                (optional "context_length": int, as in tiny())
            {"name": "ViT-L-14-336", "pretrained": "openai"}   open_clip model + tag / file / None
                (optional "quick_gelu": bool, as in __init__)
        """
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ValueError(f"text encoder spec: expected a dict with a 'name' (an open_clip model or "
                             f"'tiny'), got {spec!r}")
        allowed = {"name", "seed", "context_length"} if spec["name"] == "tiny" else {"name", "pretrained", "quick_gelu"}
        if unknown := sorted(set(spec) - allowed):
            raise ValueError(f"text encoder spec {spec!r}: unknown keys {unknown}; expected {sorted(allowed)}")
        if spec["name"] == "tiny":
            seed = spec.get("seed", 0)
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise ValueError(f"text encoder spec {spec!r}: 'seed' must be an int")
            enc = cls.tiny(seed, spec.get("context_length", 77))
            return enc.to(device) if device is not None else enc
        if "pretrained" not in spec:
            raise ValueError(f"text encoder spec {spec!r}: expected 'pretrained' (a tag, a weights file or null)")
        return cls(spec["name"], spec["pretrained"], quick_gelu=spec.get("quick_gelu"), cache_dir=cache_dir,
                   device=device)

    @property
    def spec(self) -> dict | None:
        """The spec `from_spec` rebuilds this encoder from; None for a wrapped open_clip pair."""
        spec = self.__dict__.get("_spec")
        return dict(spec) if spec is not None else None

    @classmethod
    def from_open_clip(cls, model: nn.Module, tokenizer: object) -> "CLIPTextEncoder":
        """Wrap an existing (CLIP, tokenizer) pair (not copied; frozen in place, visual kept)."""
        _check_model(model)
        if not callable(tokenizer):
            raise TypeError(f"tokenizer: expected an open_clip tokenizer, "
                            f"got {type(tokenizer).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._init(model, tokenizer)
        return self

    def _init(self, model: nn.Module, tokenizer: object) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self._empty: dict[tuple[torch.device, torch.dtype], TextEncoding] = {}
        # caption -> its batch-of-one encoding, least recently used first (off at size 0; see cache_captions)
        self.caption_cache_size = 0
        self._captions: OrderedDict[str, TextEncoding] = OrderedDict()
        # New weights make the cached empty prompt stale; hooked on the CLIP itself so that
        # loading into either it or this wrapper clears the cache (weakref: no cycle through it).
        owner = weakref.ref(self)

        def _clear(_module: nn.Module, _keys: object) -> None:
            if (encoder := owner()) is not None:
                encoder._empty.clear()
                encoder._captions.clear()

        model.register_load_state_dict_post_hook(_clear)

    # -- properties ------------------------------------------------------------------------

    @property
    def width(self) -> int:
        """W: the text transformer's width (768 for ViT-L-14-336)."""
        return int(self.model.positional_embedding.shape[1])

    @property
    def embed_dim(self) -> int:
        """E: size of the pooled embedding after text_projection."""
        proj = self.model.text_projection
        if proj is None:
            return self.width
        return int(proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1])

    @property
    def context_length(self) -> int:
        """L: tokens per caption (77 for CLIP)."""
        return int(self.model.positional_embedding.shape[0])

    @property
    def device(self) -> torch.device:
        return self.model.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the tower (open_clip's cast dtype)."""
        return _cast_dtype(self.model)

    # -- encoding --------------------------------------------------------------------------

    def tokenize(self, captions: str | Sequence[str]) -> torch.Tensor:
        """captions -> (B, L) int64 ids on the CPU; long captions are cut to L tokens, EOT kept."""
        ids = _tokenize(self.tokenizer, _check_captions(captions))
        if ids.shape[1] != self.context_length:
            raise ValueError(f"tokenizer: gives {ids.shape[1]} tokens per caption, the model "
                             f"expects {self.context_length}")
        return ids

    def forward(self, captions: str | Sequence[str]) -> TextEncoding:
        """captions (B of them) -> TextEncoding (B, L, W), (B, L, W), (B, 1, E).

        no_grad rather than inference_mode: the outputs feed trainable generators, and
        inference tensors cannot be saved for their backward pass.
        """
        if self.caption_cache_size:
            return self._cached(_check_captions(captions))
        with torch.no_grad():
            return encode_token_ids(self.model, self.tokenize(captions).to(self.device))

    def cache_captions(self, max_entries: int) -> "CLIPTextEncoder":
        """Keep the encodings of up to `max_entries` distinct captions (least recently used
        out first; 0: off, the default). For training on data that repeats its captions (the
        demo's ~200 captions, where the frozen tower was a fifth of a generator step). Each new
        caption is encoded alone, so its states never depend on the captions that shared its
        batch: a run gives the same numbers whatever the cache held (a resumed run starts empty).
        Uncached, a batch is encoded in one call, which may differ from this in the last bits."""
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 0:
            raise ValueError(f"max_entries: expected an int >= 0, got {max_entries!r}")
        self.caption_cache_size = max_entries
        while len(self._captions) > max_entries:
            self._captions.popitem(last=False)
        return self

    def _cached(self, captions: list[str]) -> TextEncoding:
        cache, batch = self._captions, {}
        for caption in dict.fromkeys(captions):  # distinct, in order
            enc = cache.pop(caption, None)
            if enc is None:
                with torch.no_grad():
                    enc = encode_token_ids(self.model, self.tokenize([caption]).to(self.device))
            cache[caption] = batch[caption] = enc  # most recently used last
            if len(cache) > self.caption_cache_size:
                cache.popitem(last=False)
        return TextEncoding(*(torch.cat(parts) for parts in zip(*(batch[c] for c in captions))))

    def empty_prompt(self, batch_size: int = 1) -> TextEncoding:
        """Encoding of "" (the CFG / text-dropout null condition), computed once per
        (device, dtype) and returned as (batch_size, ...) views of the cached batch of one."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        key = (self.device, self.dtype)
        if key not in self._empty:
            self._empty[key] = self([""])
        return self._empty[key].expand(batch_size)

    def _apply(self, fn, recurse: bool = True):
        # .to()/.cuda()/.half() rewrite the weights: the cached empty prompt and captions are stale.
        self._empty.clear()
        self._captions.clear()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"width={self.width}, embed_dim={self.embed_dim}, "
                f"context_length={self.context_length}, dtype={self.dtype}")


# ---------------------------------------------------------------------------------------
# Building the open_clip model


def _looks_like_path(pretrained: str) -> bool:
    return pretrained.endswith(_WEIGHT_SUFFIXES) or os.sep in pretrained or "/" in pretrained


def _trained_with_quick_gelu(open_clip, model_name: str, pretrained: str | None) -> bool:
    """QuickGELU setting of the tag, or of the model's 'openai' tag for a file / no weights."""
    tag = pretrained if pretrained is not None and not _looks_like_path(pretrained) else "openai"
    cfg = open_clip.get_pretrained_cfg(model_name, tag) or {}
    return bool(cfg.get("quick_gelu", False))


def _create_model(open_clip, model_name: str, pretrained: str | None,
                  cache_dir: str | os.PathLike | None, dtype: torch.dtype | None,
                  quick_gelu: bool) -> nn.Module:
    """open_clip.create_model on the CPU, failures turned into one actionable RuntimeError."""
    where = f"cache_dir={os.fspath(cache_dir) if cache_dir is not None else None!r}"
    hint = ("Pass a local weights file as `pretrained` (.bin/.pt/.safetensors), or point "
            "`cache_dir` / HF_HOME at a Hugging Face cache that holds the weights (with "
            "HF_HUB_OFFLINE=1 when there is no network).")

    def fail(what: str) -> RuntimeError:
        return RuntimeError(f"CLIPTextEncoder: could not get weights for model {model_name!r} "
                            f"from pretrained={pretrained!r} ({where}): {what.rstrip('. ')}. {hint}")

    if pretrained is not None and _looks_like_path(pretrained) and not os.path.isfile(pretrained):
        raise fail("the file does not exist") from FileNotFoundError(2, "No such file", pretrained)
    try:
        return open_clip.create_model(
            model_name, pretrained=pretrained, precision=_PRECISION.get(dtype, "fp32"),
            device="cpu", cache_dir=os.fspath(cache_dir) if cache_dir is not None else None,
            force_quick_gelu=quick_gelu)
    except Exception as e:  # network, unknown tag, bad file: all surface the same way
        raise fail(f"{type(e).__name__}: {e}") from e
