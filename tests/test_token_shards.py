"""Token shard format (tatitok_fast.token_shards): our layout, the reference's float16 layout,
recaptions against the reference's reader, corrupt samples, caption truncation.
The writer -> reader round trips through `tatitok-fast tokenize` are in tests/test_cli.py."""
import io
import json
import random
import sys
import warnings

import numpy as np
import pytest
import torch

from tatitok_fast import token_shards as ts
from tatitok_fast.token_shards import CorruptSampleError, decode_token_sample, encode_token_sample, shard_metadata
from tests.helpers import OFFICIAL as PEER
from tests.helpers import require_official

N, K, C = 16, 64, 4


def _official_reader():
    require_official()  # skips, or fails under CI=true, without the checkout
    sys.path.insert(0, str(PEER))
    try:
        from data import webdataset_reader
    finally:
        sys.path.remove(str(PEER))
    return webdataset_reader


def _raw(sample: dict) -> dict:
    """What wds.WebDataset yields without .decode(): every field as bytes."""
    return {k: (v.encode() if isinstance(v, str) and not k.startswith("__") else v) for k, v in sample.items()}


def _vq_sample(ids=None, key="k0", **over):
    meta = shard_metadata(tokenizer="tiny", mode="vq", num_tokens=N, token_size=8, codebook_size=K)
    ids = np.arange(N) % K if ids is None else ids
    return _raw({**encode_token_sample(key, ids, "a cat", 6.25, meta), **over})


def _kl_sample(params=None, key="k1", **over):
    meta = shard_metadata(tokenizer="tiny", mode="vae", num_tokens=N, token_size=C)
    params = np.random.default_rng(0).standard_normal((2 * C, 1, N)) if params is None else params
    return _raw({**encode_token_sample(key, params, "a dog", 5.5, meta), **over})


# ---------------------------------------------------------------------------------------
# Our format

def test_our_format_is_real_npy_under_its_own_key():
    s = _vq_sample()
    assert ts.OFFICIAL_TOKENS_KEY not in s
    arr = np.load(io.BytesIO(s[ts.TOKENS_KEY]))
    assert arr.dtype == np.int16 and arr.shape == (N,)
    meta = json.loads(s["json"])
    assert (meta["mode"], meta["shape"], meta["dtype"], meta["codebook_size"]) == ("vq", [N], "int16", K)
    kl = np.load(io.BytesIO(_kl_sample()[ts.TOKENS_KEY]))
    assert kl.dtype == np.float32 and kl.shape == (2 * C, 1, N)
    assert ts.vq_id_dtype(8192) == np.int16 and ts.vq_id_dtype(32768) == np.int16 and ts.vq_id_dtype(32769) == np.int32


def test_decode_vq_and_kl():
    ids = np.random.default_rng(1).integers(0, K, N)
    out = decode_token_sample(_vq_sample(ids), mode="vq", num_tokens=N, codebook_size=K)
    assert out["tokens"].dtype == torch.int64 and out["tokens"].tolist() == ids.tolist()
    assert (out["text"], out["aes_score"], out["__key__"]) == ("a cat", 6.25, "k0")
    params = np.random.default_rng(2).standard_normal((2 * C, 1, N)).astype(np.float32)
    for token_size in (C, None):  # the shape is in the file: token_size is optional
        out = decode_token_sample(_kl_sample(params), mode="vae", num_tokens=N, token_size=token_size)
        assert out["tokens"].dtype == torch.float32 and out["tokens"].shape == (2 * C, 1, N)
        assert torch.equal(out["tokens"], torch.from_numpy(params))
    assert decode_token_sample(_kl_sample(params), mode="kl", num_tokens=N)["aes_score"] == 5.5


# ---------------------------------------------------------------------------------------
# The reference's layout: raw float16 token.npy, bytes aes_score

def _official_sample(values: np.ndarray, key="off") -> dict:
    return {"__key__": key, "token.npy": values.astype(np.float16).tobytes(), "txt": b"a bird", "aes_score": b"6.5"}


def test_official_float16_vq_ids_below_2048_read_back_equal(monkeypatch):
    monkeypatch.setattr(ts, "_warned_float16", False)
    ids = np.random.default_rng(3).integers(0, 2048, N)
    ids[0] = 2048  # the largest id float16 still holds exactly
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: every id is exact
        out = decode_token_sample(_official_sample(ids), mode="vq", num_tokens=N, codebook_size=2049)
    assert out["tokens"].tolist() == ids.tolist() and out["aes_score"] == 6.5 and out["text"] == "a bird"
    # what the reference's decode_npy reads from the same bytes
    ref = torch.tensor(np.frombuffer(_official_sample(ids)["token.npy"], dtype=np.float16))
    assert ref.long().tolist() == out["tokens"].tolist()


def test_official_float16_vq_ids_above_2048_warn_once(monkeypatch):
    monkeypatch.setattr(ts, "_warned_float16", False)
    ids = np.full(N, 5000)
    assert np.float16(2049) == 2048  # the first integer float16 cannot hold
    with pytest.warns(ts.Float16TokenWarning, match="2048"):
        decode_token_sample(_official_sample(ids), mode="vq", num_tokens=N, codebook_size=8192)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        decode_token_sample(_official_sample(ids), mode="vq", num_tokens=N, codebook_size=8192)
    # ids below 2048 from an 8192-code tokenizer may be rounded values of larger ones: warned too
    monkeypatch.setattr(ts, "_warned_float16", False)
    with pytest.warns(ts.Float16TokenWarning):
        decode_token_sample(_official_sample(np.arange(N)), mode="vq", num_tokens=N, codebook_size=8192)
    # the last code, 8191, comes back as 8192 from float16: out of the codebook
    with pytest.raises(CorruptSampleError, match="off: token.npy: expected ids < codebook_size 8192, got 8192"):
        decode_token_sample(_official_sample(np.full(N, 8191)), mode="vq", num_tokens=N, codebook_size=8192)


def test_official_float16_kl_layout():
    params = np.random.default_rng(4).standard_normal((2 * C, 1, N)).astype(np.float16)
    out = decode_token_sample(_official_sample(params.reshape(-1)), mode="vae", num_tokens=N, token_size=C)
    assert torch.equal(out["tokens"], torch.from_numpy(params.astype(np.float32)))
    with pytest.raises(CorruptSampleError, match=r"off: .*pass token_size"):
        decode_token_sample(_official_sample(params.reshape(-1)), mode="vae", num_tokens=N)


# ---------------------------------------------------------------------------------------
# Recaptions, as the reference's process_recap_text

RECAPS = ["The image depicts a red fox in snow.", "The image shows  two boats", "The image showcases",
          "A plain recaption.", "  The image features an owl  ", "the image depicts lower case"]


@pytest.mark.parametrize("recap", RECAPS)
def test_recaption_matches_reference(recap):
    reader = _official_reader()
    ref = reader.process_recap_text(1.0)({"text": b"orig", "recap_txt": recap.encode()})["text"].decode()
    s = {**_vq_sample(), "recap_txt": recap.encode()}
    out = decode_token_sample(s, mode="vq", num_tokens=N, codebook_size=K, recap_prob=1.0)
    assert out["text"] == ref
    assert decode_token_sample(s, mode="vq", num_tokens=N, codebook_size=K)["text"] == "a cat"  # off by default


def test_recaption_probability_is_binomial():
    from scipy.stats import binomtest

    s = {**_vq_sample(), "recap_txt": b"The image shows a recap"}
    rng, n = random.Random(0), 4000
    hits = sum(decode_token_sample(s, mode="vq", num_tokens=N, recap_prob=ts.OFFICIAL_RECAP_PROB, rng=rng)["text"]
               == "A recap" for _ in range(n))
    assert binomtest(hits, n, ts.OFFICIAL_RECAP_PROB).pvalue > 1e-3
    no_recap = _vq_sample()  # no recap_txt: always the caption, and no draw is made
    assert decode_token_sample(no_recap, mode="vq", num_tokens=N, recap_prob=1.0)["text"] == "a cat"


# ---------------------------------------------------------------------------------------
# Corrupt and mismatched samples: ValueError naming the key and what was expected

CORRUPT = {
    "wrong length": (lambda: {**_vq_sample(), "tokens.npy": _npy(np.arange(N - 1, dtype=np.int16))}, "vq", r"bad: tokens\.npy: expected 16 VQ ids, got 15"),
    "id >= codebook": (lambda: {**_vq_sample(), "tokens.npy": _npy(np.full(N, K, np.int16))}, "vq", r"bad: .*ids < codebook_size 64, got 64"),
    "negative id": (lambda: {**_vq_sample(), "tokens.npy": _npy(np.full(N, -1, np.int16))}, "vq", r"bad: .*ids >= 0"),
    "float ids": (lambda: {**_vq_sample(), "tokens.npy": _npy(np.zeros(N, np.float32))}, "vq",
                  r"bad: .*expected integer VQ ids, got float32"),
    "NaN parameters": (lambda: {**_kl_sample(), "tokens.npy": _npy(np.full((2 * C, 1, N), np.nan, np.float32))},
                       "vae", r"bad: .*NaN"),
    "KL wrong shape": (lambda: {**_kl_sample(), "tokens.npy": _npy(np.zeros((2 * C, N), np.float32))}, "vae",
                       r"bad: .*expected posterior parameters \(8, 1, 16\)"),
    "aes not a number": (lambda: _vq_sample(aes_score=b"high"), "vq", r"bad: aes_score: expected a decimal number"),
    "aes NaN": (lambda: _vq_sample(aes_score=b"nan"), "vq", r"bad: aes_score: expected a finite number"),
    "aes missing": (lambda: {k: v for k, v in _vq_sample().items() if k != "aes_score"}, "vq", r"bad: no aesthetic"),
    "tokens missing": (lambda: {k: v for k, v in _vq_sample().items() if k != "tokens.npy"}, "vq",
                       r"bad: no tokens: expected a tokens\.npy field"),
    "caption missing": (lambda: {k: v for k, v in _vq_sample().items() if k != "txt"}, "vq", r"bad: no caption"),
    "not npy": (lambda: {**_vq_sample(), "tokens.npy": b"\x00\x01garbage"}, "vq", r"bad: tokens\.npy: not a readable"),
    "odd float16 bytes": (lambda: {**_official_sample(np.arange(N)), "token.npy": b"\x00" * 31}, "vq",
                          r"bad: token\.npy: expected raw float16 bytes"),
    "VQ shard read as KL": (lambda: _vq_sample(), "vae", r"bad: written by tokenizer 'tiny' with mode='vq'.*mode='vae'"),
    "caption not UTF-8": (lambda: _vq_sample(txt=b"\xff\xfe"), "vq", r"bad: txt is not UTF-8"),
}


def _npy(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_samples_raise_value_error_naming_key(case):
    make, mode, pattern = CORRUPT[case]
    sample = {**make(), "__key__": "bad"}
    with pytest.raises(ValueError, match=pattern):
        decode_token_sample(sample, mode=mode, num_tokens=N, codebook_size=K if mode == "vq" else None,
                            token_size=C if mode == "vae" else None)


def test_bad_reader_arguments():
    s = _vq_sample()
    for kwargs, pattern in (({"mode": "ar", "num_tokens": N}, "mode: expected 'vq' or 'vae'"),
                            ({"mode": "vq", "num_tokens": 0}, "num_tokens: expected a positive int"),
                            ({"mode": "vq", "num_tokens": N, "recap_prob": 1.5}, r"recap_prob: expected .* \[0, 1\]"),
                            ({"mode": "vq", "num_tokens": N, "codebook_size": -3}, "codebook_size: expected")):
        with pytest.raises(ValueError, match=pattern) as info:
            decode_token_sample(s, **kwargs)
        assert not isinstance(info.value, CorruptSampleError)  # a caller bug, not a bad sample
    with pytest.raises(ValueError, match=r"tokens of k: expected ids in \[0, 64\)"):
        encode_token_sample("k", np.full(N, K), "x", 5.0, shard_metadata(tokenizer="t", mode="vq", num_tokens=N,
                                                                          token_size=8, codebook_size=K))


# ---------------------------------------------------------------------------------------
# Long captions: the reader keeps the text; CLIP tokenization cuts it at 77 tokens, EOT last

def test_long_caption_truncated_as_open_clip():
    from tests.helpers import tiny_text_encoder

    caption = " ".join(f"word{i}" for i in range(200))
    out = decode_token_sample(_vq_sample(txt=caption.encode()), mode="vq", num_tokens=N)
    assert out["text"] == caption
    enc = tiny_text_encoder()
    ids = enc.tokenize([out["text"], "short"])
    sot, eot = enc.tokenizer.sot_token_id, enc.tokenizer.eot_token_id
    bpe = enc.tokenizer.encode(caption)
    assert ids.shape == (2, 77) and len(bpe) > 77
    assert ids[0, 0] == sot and ids[0, -1] == eot and ids[0, 1:76].tolist() == bpe[:75]
    assert (ids[0] == eot).sum() == 1
    assert ids[0].argmax() == 76  # the pooled embedding is read at EOT (argmax pooling): the last position
