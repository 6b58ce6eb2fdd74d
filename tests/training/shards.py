"""Small real token shards for engine tests: what `tatitok-fast tokenize` writes
(tatitok_fast.token_shards), with random ids / posterior parameters and captions."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def write_token_shards(out: Path, mode: str = "vq", *, shards: int = 2, per_shard: int = 32, num_tokens: int = 16,
                       codebook_size: int = 64, token_size: int = 4, seed: int = 0) -> list[str]:
    """-> shard paths. Ids / parameters follow a simple caption-dependent pattern so that a
    model can learn something: the caption's colour picks the id range."""
    import webdataset as wds

    from tatitok_fast.token_shards import encode_token_sample, shard_metadata

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    meta = shard_metadata(tokenizer="test", mode=mode, num_tokens=num_tokens, token_size=token_size,
                          codebook_size=codebook_size if mode == "vq" else None)
    colours = ["red", "green", "blue", "yellow"]
    paths = []
    for s in range(shards):
        path = out / f"tokens-{s:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(per_shard):
                c = int(rng.integers(len(colours)))
                if mode == "vq":
                    lo = c * codebook_size // len(colours)
                    tokens = rng.integers(lo, lo + codebook_size // len(colours), num_tokens)
                else:
                    tokens = np.concatenate([rng.normal(c - 1.5, 0.3, (token_size, 1, num_tokens)),
                                             np.full((token_size, 1, num_tokens), -4.0)]).astype(np.float32)
                sink.write(encode_token_sample(f"s{s}_{i:05d}", tokens, f"a {colours[c]} thing", 6.0, meta))
        paths.append(str(path))
    return paths
