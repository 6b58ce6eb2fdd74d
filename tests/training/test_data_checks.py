"""The up-front data checks and the re-split of data positions, as units (no training):
shard expansion (braces, globs, '::' lists, remote URLs left lazy), the first-samples check
(a corrupt sample among good ones passes, a shard of the wrong kind does not), and
reshard_position (counters summed, the global stream continued, shard streams re-salted)."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from tatitok_fast.training.data import DataError, ShardStream, check_first_samples, expand_shards, reshard_position
from tests.training.shards import write_token_shards


def test_expand_shards_checks_local_files_only(tmp_path):
    paths = write_token_shards(tmp_path, "vq", shards=3, per_shard=2)
    brace = str(tmp_path / "tokens-{000000..000002}.tar")
    assert expand_shards([brace]) == paths
    assert expand_shards([str(tmp_path / "tokens-*.tar")]) == paths  # a local glob, sorted
    assert expand_shards([f"{paths[0]}::{paths[2]}"]) == [paths[0], paths[2]]
    remote = ["pipe:cat /no/such/file.tar", "https://example.invalid/shard-{0..1}.tar", "s3://bucket/a.tar"]
    assert len(expand_shards(remote)) == 4  # never opened here: webdataset reads them lazily
    with pytest.raises(DataError, match=r"data.shards: 2 of 3 shard files do not exist: .*tokens-000007.tar"):
        expand_shards([paths[0], str(tmp_path / "tokens-000007.tar"), str(tmp_path / "tokens-000008.tar")])
    with pytest.raises(DataError, match="matches no file"):
        expand_shards([str(tmp_path / "images-*.tar")])


def _decode_vq(raw, rng):
    from tatitok_fast.token_shards import decode_token_sample

    return decode_token_sample(raw, mode="vq", num_tokens=16, codebook_size=64)


def test_first_samples_check(tmp_path):
    good = write_token_shards(tmp_path / "good", "vq", shards=1, per_shard=4)[0]
    # a first sample with a truncated token array, then good ones: passes (the stream skips it)
    mixed = tmp_path / "mixed.tar"
    with tarfile.open(good) as src, tarfile.open(mixed, "w") as dst:
        for i, member in enumerate(src.getmembers()):
            data = src.extractfile(member).read()
            if member.name.endswith("tokens.npy") and member.name.startswith("s0_00000"):
                data = data[:20]
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    check_first_samples([str(mixed)], _decode_vq, "maskgen")
    other = write_token_shards(tmp_path / "other", "vq", shards=1, per_shard=4, codebook_size=128)[0]
    with pytest.raises(DataError, match="first 4 samples of .* do not fit recipe 'maskgen'.*codebook_size=128"):
        check_first_samples([other], _decode_vq, "maskgen")
    check_first_samples(["pipe:cat /no/such/file.tar"], _decode_vq, "maskgen")  # remote: not opened


def _samples(stream: ShardStream, batches: int) -> list[str]:
    it = iter(stream)
    return [key for _ in range(batches) for key in next(it)["__key__"]]


def _stream(urls, rank, world, batch, position=None, split="sample"):
    position = position or {}
    return ShardStream(urls, lambda raw, rng: {"__key__": raw["__key__"]}, lambda s: {"__key__": [x["__key__"] for x in s]},
                       batch, seed=1, rank=rank, world_size=world, num_workers=0, resampled=False, split=split,
                       shuffle_buffer=0, shuffle_initial=0, resume=position.get("workers"),
                       salt=position.get("salt", ""), start_pos=position.get("start_pos", -1))


def test_reshard_position_continues_the_global_stream(tmp_path):
    urls = write_token_shards(tmp_path, "vq", shards=2, per_shard=12)
    one = _samples(_stream(urls, 0, 1, 4), 4)  # 16 samples of the global stream, one rank
    # 2 ranks x 2 samples for 2 batches (8 global samples), positions as the checkpoint holds them
    saved = []
    for rank in range(2):
        it = iter(_stream(urls, rank, 2, 2))
        stats = [next(it)["__stats__"] for _ in range(2)][-1]
        saved.append({"consumed": 2, "workers": {0: {k: v for k, v in stats.items() if k != "worker"}}})
    pos = [reshard_position(saved, r, "sample") for r in range(3)]
    assert pos[0]["base"]["samples"] == 8 and pos[1]["base"] == {} and pos[0]["start_pos"] == 7
    # on 1 rank: the next 8 samples are the uninterrupted stream's
    assert _samples(_stream(urls, 0, 1, 4, pos[0]), 2) == one[8:16]
    # on 3 ranks: together they read the next 9, none of the first 8
    three = [_samples(_stream(urls, r, 3, 3, reshard_position(saved, r, "sample")), 1) for r in range(3)]
    assert sorted(k for keys in three for k in keys) == sorted(_samples(_stream(urls, 0, 1, 17), 1)[8:17])
    # split = shard: new streams with a salt naming the change, deterministic
    shard = reshard_position(saved, 0, "shard")
    assert shard["salt"] == "/resplit-2-at-2" and shard["start_pos"] == -1
    assert reshard_position(saved, 0, "shard") == shard
