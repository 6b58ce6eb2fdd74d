"""The shuffle buffer of the training stream (data.shuffle_buffer / data.shuffle_initial):
the first sample is drawn after `shuffle_initial` reads, the buffer then grows to
`shuffle_buffer` while it yields (webdataset's behaviour), and a resumed stream continues
exactly."""
from __future__ import annotations

import itertools
import random

import pytest

from tatitok_fast.training.data import DataPosition, ShardStream
from tests.training.shards import write_token_shards


def stream(urls, buffer: int, initial: int, **kw) -> ShardStream:
    return ShardStream(urls, lambda s, rng: {"key": s["__key__"]}, lambda b: {"key": [s["key"] for s in b]}, 1,
                       seed=0, rank=0, world_size=1, num_workers=0, resampled=False, split="shard",
                       shuffle_buffer=buffer, shuffle_initial=initial, **kw)


@pytest.fixture(scope="module")
def urls(tmp_path_factory):
    return write_token_shards(tmp_path_factory.mktemp("shards"), shards=1, per_shard=40)


@pytest.mark.parametrize("buffer,initial", [(8, 2), (8, 5), (16, 1), (8, 8)])
def test_first_sample_after_initial_reads_then_the_buffer_fills(urls, buffer, initial):
    reads = 0

    def source():
        nonlocal reads
        for i in range(100):
            reads += 1
            yield i

    out, held = [], []
    for x in stream(urls, buffer, initial)._shuffled(source(), random.Random(0)):
        if not out:
            assert reads == initial, (reads, initial)  # nothing read beyond `initial` before the first draw
        out.append(x)
        held.append(reads - len(out) + 1)  # samples in the buffer when x was drawn
    assert sorted(out) == list(range(100))  # a permutation: nothing lost or repeated
    assert max(held) == buffer  # it grew to the full buffer, never beyond


def test_initial_changes_the_order(urls):
    """With a buffer of 8, initial 2 draws the first sample from the first 2 of the shard;
    initial 8 waits for 8 (before the fix both gave the same order)."""
    first = list(itertools.islice((b["key"][0] for b in stream(urls, 8, 8)), 40))
    early = list(itertools.islice((b["key"][0] for b in stream(urls, 8, 2)), 40))
    shard_order = [b["key"][0] for b in itertools.islice(stream(urls, 0, 0), 40)]  # one epoch, unshuffled
    assert early[0] in shard_order[:2]
    assert early != first


def test_resume_is_exact_while_the_buffer_grows(urls):
    """Stop after 5 batches (the buffer still growing), rebuild the stream from the saved
    position: the next batches are those the uninterrupted stream gives, across an epoch end."""
    full = [b["key"][0] for b in itertools.islice(stream(urls, 16, 3), 60)]
    pos = DataPosition()
    for b in itertools.islice(stream(urls, 16, 3), 5):
        pos.update(b)
    state = pos.state_dict()
    resumed = stream(urls, 16, 3, start_batch=state["consumed"], resume=state["workers"])
    assert [b["key"][0] for b in itertools.islice(resumed, 55)] == full[5:]
