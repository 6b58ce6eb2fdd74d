"""Text conditions for the generators: caption checks, CLIP states from our CLIPTextEncoder
or the reference's (clip_tokenizer, clip_encoder) pair, and a cached empty-prompt encoding."""
from __future__ import annotations

import weakref
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

_NULL_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _check_captions(captions) -> list[str]:
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, (list, tuple)) or not all(isinstance(c, str) for c in captions):
        raise TypeError(f"captions: expected a list of strings, got {type(captions).__name__}")
    if len(captions) == 0:
        raise ValueError("captions: expected at least one prompt, got an empty list")
    return list(captions)


def text_conditions(captions: Sequence[str], text_encoder=None, clip_tokenizer=None, clip_encoder=None,
                    default_encoder: Callable[[], Any] | None = None, context_length: int | None = None):
    """(penultimate (B, L, W), pooled (B, 1, E), null penultimate (1, L, W), null pooled (1, 1, E)),
    L = the encoder's context length (CLIP's 77), which must equal `context_length` when given
    (checked before encoding). The empty-prompt encoding is computed once per encoder, device
    and dtype."""
    from tatitok_fast.text import CLIPTextEncoder, encode_text

    if text_encoder is None and (clip_tokenizer is None) != (clip_encoder is None):
        raise ValueError("clip_tokenizer, clip_encoder: pass both (the reference's open_clip pair) or neither")
    if text_encoder is None and clip_encoder is None:
        if default_encoder is None:
            raise ValueError("text_encoder: pass a CLIPTextEncoder or the (clip_tokenizer, clip_encoder) pair")
        text_encoder = default_encoder()
    if text_encoder is not None and not isinstance(text_encoder, CLIPTextEncoder):
        raise TypeError(f"text_encoder: expected a tatitok_fast.text.CLIPTextEncoder, "
                        f"got {type(text_encoder).__name__}")
    length = (text_encoder.context_length if text_encoder is not None
              else int(clip_encoder.positional_embedding.shape[0]))
    if context_length is not None and length != context_length:
        raise ValueError(f"text_encoder: gives {length} CLIP tokens per caption, the generator was built for "
                         f"{context_length} (its config's vq_model.text_context_length)")
    if text_encoder is not None:
        enc, null = text_encoder(captions), text_encoder.empty_prompt(1)
    else:
        enc = encode_text(clip_tokenizer, clip_encoder, captions)
        p = next(clip_encoder.parameters())
        per_model = _NULL_CACHE.setdefault(clip_encoder, {})
        key = (p.device, p.dtype, p.data_ptr())
        if key not in per_model:
            per_model.clear()
            per_model[key] = encode_text(clip_tokenizer, clip_encoder, [""])
        null = per_model[key]
    return enc.penultimate, enc.pooled, null.penultimate, null.pooled


def _check_text_states(name: str, t: torch.Tensor, batch: int | None, dims: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != len(dims) + 1 or tuple(t.shape[1:]) != dims:
        raise ValueError(f"{name}: expected (B, {', '.join(map(str, dims))}), got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if batch is not None and t.shape[0] != batch:
        raise ValueError(f"{name}: expected batch {batch}, got {t.shape[0]}")
