"""Token shards: the pre-tokenized webdataset samples MaskGen trains on.

One sample (webdataset: files `<key>.<field>` in a tar) holds

    tokens.npy  a real .npy file (with header):
                VQ: token ids (N,), int16 (int32 when the codebook has more than 32768 codes);
                KL: posterior parameters (2C, 1, N) float32, mean then logvar on dim 0
                (the channel-major layout MaskGen_KL.forward takes).
    txt         the caption, UTF-8.
    aes_score   the aesthetic score, UTF-8 decimal text ("6.25"), micro-conditioning input.
    recap_txt   optional recaption, UTF-8 (read with probability `recap_prob`).
    json        metadata: format, version, tokenizer, mode, num_tokens, token_size,
                codebook_size, image_size, shape, dtype, source.

Class-labelled samples (MaskGIT training, `tatitok-fast tokenize --labels` or `--from-jsonl`)
hold `tokens.npy`, `cls` (the class index, UTF-8 decimal text, as webdataset's .cls) and `json`,
plus `txt` when the image had a caption; `encode_class_token_sample` / `decode_class_token_sample`.

The reference's shards (data/webdataset_reader.py) are also read: `token.npy` holding raw
little-endian float16 bytes without an .npy header, `aes_score` as bytes of decimal text.
float16 holds every integer up to 2048 exactly and no VQ id above it reliably (2049 is the
first it cannot), so reading VQ ids from that layout warns once when ids or the codebook go
above 2048. The tokens are stored under a different name (`tokens.npy`) so that a reader of
one layout never misreads the other.

`decode_token_sample` turns one raw sample (bytes values, as `wds.WebDataset` yields them
without `.decode()`) into training inputs, or raises `CorruptSampleError` (a ValueError)
naming the sample key and what was expected; the data loader's handler skips and counts those.
"""
from __future__ import annotations

import io
import json
import math
import random
import warnings
from typing import Any, Mapping

import numpy as np
import torch

__all__ = ["FORMAT", "FORMAT_VERSION", "TOKENS_KEY", "OFFICIAL_TOKENS_KEY", "TEXT_KEY", "RECAP_KEY", "AES_KEY",
           "META_KEY", "RECAP_PREFIXES", "OFFICIAL_RECAP_PROB", "FLOAT16_EXACT_MAX", "CorruptSampleError",
           "Float16TokenWarning", "shard_metadata", "encode_token_sample", "decode_token_sample",
           "strip_recap_prefix", "parse_aes_score", "vq_id_dtype", "CLASS_KEY", "encode_class_token_sample",
           "decode_class_token_sample", "parse_class_label"]

FORMAT = "tatitok_fast.token_shards"
FORMAT_VERSION = 1
TOKENS_KEY = "tokens.npy"  # ours: .npy with header
OFFICIAL_TOKENS_KEY = "token.npy"  # the reference's: raw float16 bytes
TEXT_KEY = "txt"
RECAP_KEY = "recap_txt"
AES_KEY = "aes_score"
META_KEY = "json"
CLASS_KEY = "cls"
RECAP_PREFIXES = tuple(f"The image {v}" for v in ("depicts", "displays", "showcases", "features", "shows"))
OFFICIAL_RECAP_PROB = 0.95  # the reference's use_recap_prob when recaptions are enabled
FLOAT16_EXACT_MAX = 2048  # the largest integer range float16 holds exactly: [0, 2048]
MODES = ("vq", "vae")


class CorruptSampleError(ValueError):
    """A token sample that cannot be used (missing field, wrong shape/dtype, bad values)."""


class Float16TokenWarning(UserWarning):
    """VQ ids read from the reference's float16 layout may have been rounded."""


_warned_float16 = False


def _warn_float16_once(message: str) -> None:
    global _warned_float16
    if not _warned_float16:
        _warned_float16 = True
        warnings.warn(message, Float16TokenWarning, stacklevel=3)


def _mode(mode: str) -> str:
    m = {"kl": "vae"}.get(mode, mode)
    if m not in MODES:
        raise ValueError(f"mode: expected 'vq' or 'vae' (KL), got {mode!r}")
    return m


def vq_id_dtype(codebook_size: int) -> np.dtype:
    """The integer dtype VQ ids are stored in: int16 up to 32768 codes, else int32."""
    return np.dtype(np.int16) if codebook_size <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


# ---------------------------------------------------------------------------------------
# Writing

def shard_metadata(*, tokenizer: str, mode: str, num_tokens: int, token_size: int,
                   codebook_size: int | None = None, image_size: int | None = None) -> dict[str, Any]:
    """The per-tokenizer part of every sample's `json` (shape and dtype follow from it)."""
    mode = _mode(mode)
    for name, v in (("num_tokens", num_tokens), ("token_size", token_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if mode == "vq":
        if not isinstance(codebook_size, int) or codebook_size < 1:
            raise ValueError(f"codebook_size: a VQ tokenizer needs a positive int, got {codebook_size!r}")
        shape, dtype = [num_tokens], str(vq_id_dtype(codebook_size))
    else:
        codebook_size = None
        shape, dtype = [2 * token_size, 1, num_tokens], "float32"
    return {"format": FORMAT, "version": FORMAT_VERSION, "tokenizer": str(tokenizer), "mode": mode,
            "num_tokens": num_tokens, "token_size": token_size, "codebook_size": codebook_size,
            "image_size": image_size, "shape": shape, "dtype": dtype}


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def encode_token_sample(key: str, tokens: np.ndarray | torch.Tensor, text: str, aes_score: float,
                        meta: Mapping[str, Any], *, recap_text: str | None = None,
                        source: str | None = None) -> dict[str, Any]:
    """One sample for `webdataset.ShardWriter.write`.

    tokens: VQ ids (N,) (any integer dtype, stored as `meta["dtype"]`) or KL posterior
        parameters (2C, 1, N) (stored as float32); meta: from `shard_metadata`.
    """
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens)
    shape, mode = tuple(meta["shape"]), meta["mode"]
    if arr.size != math.prod(shape):
        raise ValueError(f"tokens of {key}: expected {math.prod(shape)} values {shape}, got shape {arr.shape}")
    arr = arr.reshape(shape)
    if mode == "vq":
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"tokens of {key}: expected integer VQ ids, got {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= meta["codebook_size"]):
            raise ValueError(f"tokens of {key}: expected ids in [0, {meta['codebook_size']}), "
                             f"got [{arr.min()}, {arr.max()}]")
        arr = arr.astype(meta["dtype"])
    else:
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(f"tokens of {key}: posterior parameters contain NaN or inf")
    score = float(aes_score)
    if not math.isfinite(score):
        raise ValueError(f"aes_score of {key}: expected a finite number, got {aes_score!r}")
    sample = {"__key__": key, TOKENS_KEY: _npy_bytes(arr), TEXT_KEY: str(text), AES_KEY: repr(score),
              META_KEY: json.dumps({**meta, **({"source": source} if source is not None else {})})}
    if recap_text is not None:
        sample[RECAP_KEY] = str(recap_text)
    return sample


def encode_class_token_sample(key: str, tokens: np.ndarray | torch.Tensor, label: int, meta: Mapping[str, Any], *,
                              text: str | None = None, source: str | None = None) -> dict[str, Any]:
    """One class-labelled VQ sample: tokens.npy, cls (decimal text), json, and txt when given."""
    if meta["mode"] != "vq":
        raise ValueError(f"meta: class-labelled token shards hold VQ ids, got mode {meta['mode']!r}")
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or label < 0:
        raise ValueError(f"label of {key}: expected a class index >= 0, got {label!r}")
    sample = encode_token_sample(key, tokens, "", 0.0, meta, source=source)
    del sample[AES_KEY], sample[TEXT_KEY]
    sample[CLASS_KEY] = str(int(label))
    if text is not None:
        sample[TEXT_KEY] = str(text)
    return sample


# ---------------------------------------------------------------------------------------
# Reading

def strip_recap_prefix(text: str) -> str:
    """The reference's recaption clean-up: strip, drop a leading "The image depicts/displays/
    showcases/features/shows", strip again and capitalise the first letter."""
    text = text.strip()
    for prefix in RECAP_PREFIXES:
        if text.startswith(prefix):
            text = text[len(prefix):].strip()
            return text[:1].upper() + text[1:]
    return text


def _as_text(key: str, field: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptSampleError(f"sample {key}: {field} is not UTF-8 text ({exc})") from None
    raise CorruptSampleError(f"sample {key}: {field}: expected text bytes, got {type(value).__name__}")


def parse_aes_score(value: Any, key: str = "?") -> float:
    """An aesthetic score from a shard field (bytes/str of a decimal number) or a number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        score = float(value)
    else:
        text = _as_text(key, AES_KEY, value).strip()
        try:
            score = float(text)
        except ValueError:
            raise CorruptSampleError(f"sample {key}: {AES_KEY}: expected a decimal number, got {text[:40]!r}") from None
    if not math.isfinite(score):
        raise CorruptSampleError(f"sample {key}: {AES_KEY}: expected a finite number, got {score}")
    return score


def _load_npy(key: str, value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):  # already decoded by wds .decode()
        return value
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise CorruptSampleError(f"sample {key}: {TOKENS_KEY}: expected .npy bytes, got {type(value).__name__}")
    try:
        return np.load(io.BytesIO(bytes(value)), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise CorruptSampleError(f"sample {key}: {TOKENS_KEY}: not a readable .npy file ({exc})") from None


def _load_official(key: str, value: Any) -> np.ndarray:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise CorruptSampleError(f"sample {key}: {OFFICIAL_TOKENS_KEY}: expected raw float16 bytes, "
                                 f"got {type(value).__name__}")
    raw = bytes(value)
    if len(raw) % 2:
        raise CorruptSampleError(f"sample {key}: {OFFICIAL_TOKENS_KEY}: expected raw float16 bytes "
                                 f"(an even byte count), got {len(raw)} bytes")
    return np.frombuffer(raw, dtype="<f2")


def _vq_tokens(key: str, arr: np.ndarray, num_tokens: int, codebook_size: int | None,
               official: bool) -> torch.Tensor:
    field = OFFICIAL_TOKENS_KEY if official else TOKENS_KEY
    if arr.size != num_tokens:
        raise CorruptSampleError(f"sample {key}: {field}: expected {num_tokens} VQ ids, got {arr.size} "
                                 f"values (shape {arr.shape})")
    flat = arr.reshape(-1)
    if np.issubdtype(flat.dtype, np.floating):
        if not official:
            raise CorruptSampleError(f"sample {key}: {field}: expected integer VQ ids, got {flat.dtype}")
        f = flat.astype(np.float64)
        if not np.isfinite(f).all() or (f != np.round(f)).any():
            raise CorruptSampleError(f"sample {key}: {field}: expected whole-number ids, got NaN/inf or fractions")
        ids = f.astype(np.int64)
        top = ids.max(initial=0)
        if top > FLOAT16_EXACT_MAX or (codebook_size is not None and codebook_size - 1 > FLOAT16_EXACT_MAX):
            _warn_float16_once(
                f"sample {key}: VQ ids read from the reference's float16 {OFFICIAL_TOKENS_KEY} "
                f"(largest id {top}, codebook {codebook_size}): float16 holds ids exactly only up to "
                f"{FLOAT16_EXACT_MAX}, larger ones may have been rounded; re-tokenize with "
                "`tatitok-fast tokenize` (integer ids). Shown once.")
    elif np.issubdtype(flat.dtype, np.integer):
        ids = flat.astype(np.int64)
    else:
        raise CorruptSampleError(f"sample {key}: {field}: expected integer VQ ids, got {flat.dtype}")
    if ids.size and ids.min() < 0:
        raise CorruptSampleError(f"sample {key}: {field}: expected ids >= 0, got {ids.min()}")
    if codebook_size is not None and ids.size and ids.max() >= codebook_size:
        raise CorruptSampleError(f"sample {key}: {field}: expected ids < codebook_size {codebook_size}, "
                                 f"got {ids.max()}")
    return torch.from_numpy(ids)


def _kl_tokens(key: str, arr: np.ndarray, num_tokens: int, token_size: int | None,
               official: bool) -> torch.Tensor:
    field = OFFICIAL_TOKENS_KEY if official else TOKENS_KEY
    if not np.issubdtype(arr.dtype, np.floating):
        raise CorruptSampleError(f"sample {key}: {field}: expected float posterior parameters, got {arr.dtype}")
    if token_size is None:
        if arr.ndim != 3 or arr.shape[1:] != (1, num_tokens) or arr.shape[0] % 2:
            raise CorruptSampleError(f"sample {key}: {field}: expected posterior parameters (2C, 1, {num_tokens}), "
                                     f"got shape {arr.shape} (pass token_size to read flat arrays)")
        shape = arr.shape
    else:
        shape = (2 * token_size, 1, num_tokens)
        if arr.size != math.prod(shape) or (arr.ndim > 1 and arr.shape != shape):
            raise CorruptSampleError(f"sample {key}: {field}: expected posterior parameters {shape} "
                                     f"({math.prod(shape)} values), got shape {arr.shape}")
    out = arr.reshape(shape).astype(np.float32)
    if not np.isfinite(out).all():
        raise CorruptSampleError(f"sample {key}: {field}: posterior parameters contain NaN or inf")
    return torch.from_numpy(out)


def _check_meta(key: str, sample: Mapping[str, Any], mode: str, num_tokens: int,
                codebook_size: int | None, token_size: int | None) -> None:
    """Cross-check our own json metadata (when present) against what the reader expects."""
    raw = sample.get(META_KEY)
    if raw is None:
        return
    try:
        meta = raw if isinstance(raw, Mapping) else json.loads(_as_text(key, META_KEY, raw))
    except json.JSONDecodeError as exc:
        raise CorruptSampleError(f"sample {key}: {META_KEY}: not valid JSON ({exc})") from None
    if not isinstance(meta, Mapping) or meta.get("format") != FORMAT:
        return  # someone else's metadata
    wanted = {"mode": mode, "num_tokens": num_tokens}
    if mode == "vq" and codebook_size is not None:
        wanted["codebook_size"] = codebook_size
    if token_size is not None:
        wanted["token_size"] = token_size
    for name, want in wanted.items():
        if meta.get(name) != want:
            raise CorruptSampleError(f"sample {key}: written by tokenizer {meta.get('tokenizer')!r} with "
                                     f"{name}={meta.get(name)!r}, the reader expects {name}={want!r}")


def _check_reader_args(mode, num_tokens, codebook_size, token_size, recap_prob) -> str:
    mode = _mode(mode)
    if not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens: expected a positive int, got {num_tokens!r}")
    for name, v in (("codebook_size", codebook_size), ("token_size", token_size)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ValueError(f"{name}: expected a positive int or None, got {v!r}")
    if not isinstance(recap_prob, (int, float)) or not 0.0 <= recap_prob <= 1.0:
        raise ValueError(f"recap_prob: expected a probability in [0, 1], got {recap_prob!r}")
    return mode


def _sample_tokens(sample: Mapping[str, Any], expected: str, hint: str = "") -> tuple[str, np.ndarray, bool]:
    """(key, token array, whether it is in the reference's layout) of a raw sample; a
    CorruptSampleError naming the key, `expected` and the fields it has otherwise."""
    if not isinstance(sample, Mapping):
        raise CorruptSampleError(f"sample: expected a dict of fields, got {type(sample).__name__}")
    key = str(sample.get("__key__", "?"))
    if TOKENS_KEY in sample:
        return key, _load_npy(key, sample[TOKENS_KEY]), False
    if OFFICIAL_TOKENS_KEY in sample:
        return key, _load_official(key, sample[OFFICIAL_TOKENS_KEY]), True
    raise CorruptSampleError(f"sample {key}: no tokens: expected {expected}, got fields "
                             f"{sorted(k for k in sample if not k.startswith('__'))}{hint}")


def decode_token_sample(sample: Mapping[str, Any], *, mode: str, num_tokens: int, codebook_size: int | None = None,
                        token_size: int | None = None, recap_prob: float = 0.0,
                        rng: random.Random | np.random.Generator | None = None) -> dict[str, Any]:
    """One raw token sample -> training inputs.

    Args:
        sample: webdataset sample, values as bytes (str / decoded arrays also accepted).
        mode: "vq" or "vae" ("kl"); num_tokens: N; codebook_size: VQ ids must be below it;
        token_size: KL channels C (required to read the reference's flat float16 layout).
        recap_prob: probability of training on `recap_txt` (cleaned by strip_recap_prefix)
            instead of `txt` when the sample has one (the reference: 0.95 when enabled).
        rng: draws the recaption choice (`.random()`); the `random` module when None.
    Returns:
        {"tokens": VQ (N,) int64 | KL (2C, 1, N) float32, "text": str, "aes_score": float,
         "__key__": str}
    Raises:
        CorruptSampleError (a ValueError) naming the key and what was expected.
    """
    mode = _check_reader_args(mode, num_tokens, codebook_size, token_size, recap_prob)
    key, arr, official = _sample_tokens(sample, f"a {TOKENS_KEY} field (or the reference's {OFFICIAL_TOKENS_KEY})")
    _check_meta(key, sample, mode, num_tokens, codebook_size, token_size)
    if mode == "vq":
        tokens = _vq_tokens(key, arr, num_tokens, codebook_size, official)
    else:
        tokens = _kl_tokens(key, arr, num_tokens, token_size, official)
    if TEXT_KEY not in sample:
        raise CorruptSampleError(f"sample {key}: no caption: expected a {TEXT_KEY} field")
    text = _as_text(key, TEXT_KEY, sample[TEXT_KEY])
    if recap_prob > 0 and RECAP_KEY in sample:
        if (rng or random).random() < recap_prob:
            text = strip_recap_prefix(_as_text(key, RECAP_KEY, sample[RECAP_KEY]))
    if AES_KEY not in sample:
        raise CorruptSampleError(f"sample {key}: no aesthetic score: expected an {AES_KEY} field")
    return {"tokens": tokens, "text": text, "aes_score": parse_aes_score(sample[AES_KEY], key), "__key__": key}


def parse_class_label(value: Any, key: str = "?", num_classes: int | None = None) -> int:
    """A class index from a `cls` field (bytes/str of a decimal int, or an int)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        label = int(value)
    else:
        text = _as_text(key, CLASS_KEY, value).strip()
        try:
            label = int(text)
        except ValueError:
            raise CorruptSampleError(f"sample {key}: {CLASS_KEY}: expected a class index (decimal int), "
                                     f"got {text[:40]!r}") from None
    if label < 0 or (num_classes is not None and label >= num_classes):
        want = f"in [0, {num_classes})" if num_classes is not None else ">= 0"
        raise CorruptSampleError(f"sample {key}: {CLASS_KEY}: expected a class index {want}, got {label}")
    return label


def decode_class_token_sample(sample: Mapping[str, Any], *, num_tokens: int, codebook_size: int,
                              num_classes: int) -> dict[str, Any]:
    """One raw class-labelled VQ sample -> {"tokens": (N,) int64, "label": int, "__key__": str}.
    The json metadata (when ours) must name the same num_tokens and codebook_size: tokens of
    another tokenizer are refused. Raises CorruptSampleError naming the key and what was expected."""
    _check_reader_args("vq", num_tokens, codebook_size, None, 0.0)
    key, arr, official = _sample_tokens(sample, f"a {TOKENS_KEY} field", " (image shards are turned into token "
                                        "shards by `tatitok-fast tokenize --labels`)")
    _check_meta(key, sample, "vq", num_tokens, codebook_size, None)
    tokens = _vq_tokens(key, arr, num_tokens, codebook_size, official)
    if CLASS_KEY not in sample:
        raise CorruptSampleError(f"sample {key}: no class label: a class-conditional recipe needs a {CLASS_KEY} "
                                 "field (tokenize class-labelled images with `tatitok-fast tokenize --labels`, "
                                 "or the official jsonl with --from-jsonl)")
    return {"tokens": tokens, "label": parse_class_label(sample[CLASS_KEY], key, num_classes), "__key__": key}
